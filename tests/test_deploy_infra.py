"""The deploy wiring (pipelines/aws/deploy_infra.py) under moto, and the IAM policy it ships.

moto creates Lambda functions (it does not run them: the handler itself is tested in-process in
tests/test_deploy.py), EventBridge rules whose patterns it evaluates on put_events, and SQS queues that show
which events a rule let through.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID

from pipelines import config
from pipelines.aws import deploy_infra
from pipelines.run import main
from pipelines.util.errors import CommandError
from steps import deploy

REGION = "us-east-1"
GROUP = config.MODEL_PACKAGE_GROUP
EXECUTION_ROLE = f"arn:aws:iam::{DEFAULT_ACCOUNT_ID}:role/sagemaker-execution"
WRITE_PREFIXES = ("Create", "Update", "Put", "Add", "Remove", "Delete")


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv(config.ENV_DEPLOY_ROLE_ARN, raising=False)
    monkeypatch.delenv(config.ENV_ROLE_ARN, raising=False)
    with mock_aws():
        yield boto3.session.Session(region_name=REGION)


@pytest.fixture
def deploy_role(session) -> str:
    """The function's role, made the way docs/iam.md says (the shipped trust policy)."""
    iam = session.client("iam")
    return iam.create_role(
        RoleName="imgclf-deploy-lambda", AssumeRolePolicyDocument=json.dumps(deploy_infra.trust_policy())
    )["Role"]["Arn"]


def upsert_args(*flags: str) -> argparse.Namespace:
    """Parse flags the way the upsert command does: its own --role plus add_deploy_arguments."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", default=None)
    deploy_infra.add_deploy_arguments(parser)
    return parser.parse_args(list(flags))


def record_writes(session: Any) -> list[str]:
    """Names of the mutating AWS operations made through ``session`` from now on."""
    writes: list[str] = []

    def record(model: Any, **_: Any) -> None:
        if model.name.startswith(WRITE_PREFIXES):
            writes.append(model.name)

    session.events.register("before-call", record)
    return writes


# --- the rule's pattern ---------------------------------------------------------------------------------------


def test_rule_pattern_lets_through_only_approvals_of_the_group(session) -> None:
    events, sqs = session.client("events"), session.client("sqs")
    rule = deploy_infra.upsert_rule(events, rule_name=config.DEPLOY_RULE_NAME, model_package_group=GROUP)
    queue_url = sqs.create_queue(QueueName="matched-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_targets(Rule=rule["name"], Targets=[{"Id": "queue", "Arn": queue_arn}])

    def put(detail_type: str, group: str, status: str, tag: str, source: str = "aws.sagemaker") -> None:
        detail = {"ModelPackageGroupName": group, "ModelApprovalStatus": status, "tag": tag}
        entry = {"Source": source, "DetailType": detail_type, "Detail": json.dumps(detail)}
        assert events.put_events(Entries=[entry])["FailedEntryCount"] == 0

    change = "SageMaker Model Package State Change"
    put(change, GROUP, "Approved", "approved-of-the-group")
    put(change, GROUP, "PendingManualApproval", "pending")
    put(change, GROUP, "Rejected", "rejected")
    put(change, "SomeOtherModels", "Approved", "other-group")
    put(change, GROUP.lower(), "Approved", "group-in-other-case")
    put("SageMaker Model State Change", GROUP, "Approved", "other-detail-type")
    put(change, GROUP, "Approved", "other-source", source="my.application")

    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
    matched = [json.loads(message["Body"])["detail"]["tag"] for message in messages]
    assert matched == ["approved-of-the-group"]
    assert json.loads(events.describe_rule(Name=rule["name"])["EventPattern"]) == deploy_infra.event_pattern(GROUP)


# --- upsert ---------------------------------------------------------------------------------------------------


def test_upsert_creates_function_rule_target_and_permission(session, deploy_role) -> None:
    args = upsert_args("--role", EXECUTION_ROLE, "--deploy-role-arn", deploy_role, "--min-capacity", "1",
                       "--max-capacity", "3")  # fmt: skip
    result = deploy_infra.upsert_from_args(args, session, GROUP)

    assert result["changed"] is True
    assert {result[part]["action"] for part in ("function", "rule", "target", "permission")} == {"created"}
    lambda_client, events = session.client("lambda"), session.client("events")
    function = lambda_client.get_function_configuration(FunctionName=config.DEPLOY_FUNCTION_NAME)
    assert function["Handler"] == "deploy.handler"
    assert function["Runtime"] == config.DEPLOY_LAMBDA_RUNTIME
    assert function["Role"] == deploy_role
    assert function["Timeout"] == config.DEPLOY_LAMBDA_TIMEOUT_SECONDS
    assert function["CodeSha256"] == deploy_infra.code_sha256(deploy_infra.build_function_zip())
    environment = function["Environment"]["Variables"]
    assert environment["MODEL_PACKAGE_GROUP_NAME"] == GROUP
    assert environment["EXECUTION_ROLE_ARN"] == EXECUTION_ROLE
    assert (environment["MIN_CAPACITY"], environment["MAX_CAPACITY"]) == ("1", "3")
    assert environment["INSTANCE_TYPE"] == deploy.SETTINGS_BY_NAME["endpoint_instance_type"].default
    # What the function will parse from that environment is what upsert validated.
    assert deploy.DeploySettings.from_env(environment).resolved_endpoint_name == result["endpoint_name"]

    rule = events.describe_rule(Name=config.DEPLOY_RULE_NAME)
    assert rule["State"] == "ENABLED"
    assert json.loads(rule["EventPattern"]) == deploy_infra.event_pattern(GROUP)
    (target,) = events.list_targets_by_rule(Rule=config.DEPLOY_RULE_NAME)["Targets"]
    assert target["Arn"] == function["FunctionArn"]
    (statement,) = json.loads(lambda_client.get_policy(FunctionName=config.DEPLOY_FUNCTION_NAME)["Policy"])["Statement"]
    assert statement["Action"] == "lambda:InvokeFunction"
    assert statement["Principal"] == {"Service": "events.amazonaws.com"}
    assert statement["Condition"]["ArnLike"]["AWS:SourceArn"] == rule["Arn"]


def test_upsert_twice_changes_nothing(session, deploy_role) -> None:
    args = upsert_args("--role", EXECUTION_ROLE, "--deploy-role-arn", deploy_role)
    first = deploy_infra.upsert_from_args(args, session, GROUP)
    writes = record_writes(session)
    second = deploy_infra.upsert_from_args(args, session, GROUP)

    assert second["changed"] is False
    assert {second[part]["action"] for part in ("function", "rule", "target", "permission")} == {"unchanged"}
    assert writes == []
    assert second["function"]["code_sha256"] == first["function"]["code_sha256"]
    lambda_client, events = session.client("lambda"), session.client("events")
    assert [rule["Name"] for rule in events.list_rules()["Rules"]] == [config.DEPLOY_RULE_NAME]
    assert len(events.list_targets_by_rule(Rule=config.DEPLOY_RULE_NAME)["Targets"]) == 1
    policy = json.loads(lambda_client.get_policy(FunctionName=config.DEPLOY_FUNCTION_NAME)["Policy"])
    assert len(policy["Statement"]) == 1
    assert [f["FunctionName"] for f in lambda_client.list_functions()["Functions"]] == [config.DEPLOY_FUNCTION_NAME]


def test_upsert_updates_only_what_changed(session, deploy_role) -> None:
    deploy_infra.upsert_from_args(
        upsert_args("--role", EXECUTION_ROLE, "--deploy-role-arn", deploy_role), session, GROUP
    )
    writes = record_writes(session)
    changed_args = upsert_args(
        "--role", EXECUTION_ROLE, "--deploy-role-arn", deploy_role, "--endpoint-instance-type", "ml.c5.xlarge"
    )
    result = deploy_infra.upsert_from_args(changed_args, session, GROUP)

    assert result["function"]["action"] == "updated"
    assert result["function"]["changed"] == ["Environment"]  # the code is the same
    assert writes == ["UpdateFunctionConfiguration"]
    function = session.client("lambda").get_function_configuration(FunctionName=config.DEPLOY_FUNCTION_NAME)
    assert function["Environment"]["Variables"]["INSTANCE_TYPE"] == "ml.c5.xlarge"
    assert (result["rule"]["action"], result["target"]["action"], result["permission"]["action"]) == (
        "unchanged",
        "unchanged",
        "unchanged",
    )


def test_upsert_repoints_the_target_and_permission_of_a_renamed_function(session, deploy_role) -> None:
    base = ("--role", EXECUTION_ROLE, "--deploy-role-arn", deploy_role)
    deploy_infra.upsert_from_args(upsert_args(*base), session, GROUP)
    result = deploy_infra.upsert_from_args(
        upsert_args(*base, "--deploy-function-name", "renamed-deploy"), session, GROUP
    )

    assert result["function"]["action"] == "created"
    assert result["target"]["action"] == "updated"
    (target,) = session.client("events").list_targets_by_rule(Rule=config.DEPLOY_RULE_NAME)["Targets"]
    assert target["Arn"] == result["function"]["arn"]
    assert result["permission"]["action"] == "created"


def test_upsert_without_a_deploy_role_says_how_to_get_one(session) -> None:
    with pytest.raises(CommandError, match=config.ENV_DEPLOY_ROLE_ARN):
        deploy_infra.upsert_from_args(upsert_args("--role", EXECUTION_ROLE), session, GROUP)


def test_upsert_without_an_execution_role_is_a_clear_error(session, deploy_role) -> None:
    with pytest.raises(CommandError, match=config.ENV_ROLE_ARN):
        deploy_infra.upsert_from_args(upsert_args("--deploy-role-arn", deploy_role), session, GROUP)


def test_upsert_handles_args_without_endpoint_flags(session, deploy_role, monkeypatch) -> None:
    """upsert_from_args reads every flag with getattr: a Namespace without them gets the handler's defaults."""
    monkeypatch.setenv(config.ENV_ROLE_ARN, EXECUTION_ROLE)
    monkeypatch.setenv(config.ENV_DEPLOY_ROLE_ARN, deploy_role)
    result = deploy_infra.upsert_from_args(argparse.Namespace(), session, GROUP)
    assert result["function"]["action"] == "created"
    assert result["environment"]["EXECUTION_ROLE_ARN"] == EXECUTION_ROLE


def test_bad_endpoint_flags_fail_before_any_aws_call(session, deploy_role) -> None:
    writes = record_writes(session)
    args = upsert_args("--role", EXECUTION_ROLE, "--deploy-role-arn", deploy_role, "--serverless-memory-mb", "1000")
    with pytest.raises(CommandError, match="SERVERLESS_MEMORY_MB"):
        deploy_infra.upsert_from_args(args, session, GROUP)
    assert writes == []


def test_skip_deploy_wiring(session) -> None:
    assert deploy_infra.upsert_from_args(upsert_args("--skip-deploy-wiring"), session, GROUP) == {"skipped": True}


def test_function_zip_holds_only_the_handler_and_is_reproducible() -> None:
    package = deploy_infra.build_function_zip()
    with zipfile.ZipFile(io.BytesIO(package)) as archive:
        assert archive.namelist() == ["deploy.py"]
        assert archive.read("deploy.py") == Path(deploy.__file__).read_bytes()
    assert deploy_infra.build_function_zip() == package


# --- the IAM policy -------------------------------------------------------------------------------------------


def render(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "region": REGION,
        "account_id": DEFAULT_ACCOUNT_ID,
        "execution_role_arn": EXECUTION_ROLE,
        "model_package_group": GROUP,
    }
    arguments.update(overrides)
    return deploy_infra.render_deploy_policy(**arguments)


def _resources(statement: dict[str, Any]) -> list[str]:
    resource = statement["Resource"]
    return [resource] if isinstance(resource, str) else list(resource)


def _actions(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)


def allowed(policy: dict[str, Any], action: str, resource: str) -> bool:
    return any(
        action in _actions(statement)
        and any(fnmatch.fnmatchcase(resource, pattern) for pattern in _resources(statement))
        for statement in policy["Statement"]
    )


@pytest.mark.parametrize(
    ("autoscaling", "alarms"), [(False, ()), (True, ()), (False, ("imgclf-5xx",)), (True, ("a", "b"))]
)
def test_policy_is_least_privilege(autoscaling: bool, alarms: tuple[str, ...]) -> None:
    policy = render(autoscaling=autoscaling, rollback_alarm_names=alarms)
    statements = policy["Statement"]

    for statement in statements:
        assert statement["Effect"] == "Allow"
        for action in _actions(statement):
            assert "*" not in action, f"wildcard action {action} in {statement['Sid']}"
        if "*" in _resources(statement):
            # Only where AWS offers no resource-level permission (see deploy_infra.STATEMENTS_NEEDING_ANY_RESOURCE).
            assert statement["Sid"] in deploy_infra.STATEMENTS_NEEDING_ANY_RESOURCE
            assert all(action.startswith("application-autoscaling:") for action in _actions(statement))
        for resource in _resources(statement):
            assert resource == "*" or resource.startswith("arn:aws:"), resource
            assert "${" not in resource
    (pass_role,) = [statement for statement in statements if "iam:PassRole" in _actions(statement)]
    assert _resources(pass_role) == [EXECUTION_ROLE]
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}
    sids = {statement["Sid"] for statement in statements}
    assert any(sid.startswith("Autoscaling") for sid in sids) == autoscaling
    assert ("RollbackAlarmsDescribe" in sids) == bool(alarms)
    if not autoscaling:
        assert all("*" not in _resources(statement) for statement in statements)
    for alarm in alarms:
        assert allowed(
            policy, "cloudwatch:DescribeAlarms", f"arn:aws:cloudwatch:{REGION}:{DEFAULT_ACCOUNT_ID}:alarm:{alarm}"
        )


def test_policy_covers_every_call_the_handler_makes_on_the_names_it_uses() -> None:
    policy = render(autoscaling=True)
    source = Path(deploy.__file__).read_text(encoding="utf-8")
    sagemaker_calls = set(re.findall(r"clients\.sagemaker\.(\w+)\(", source))
    autoscaling_calls = set(re.findall(r"clients\.autoscaling\.(\w+)\(", source))
    assert {"create_model", "create_endpoint_config", "create_endpoint", "update_endpoint"} <= sagemaker_calls

    settings = deploy.DeploySettings(model_package_group=GROUP, execution_role_arn=EXECUTION_ROLE)
    model = deploy.model_name_for(settings, 7)
    endpoint_config = deploy.endpoint_config_name_for(settings, 7, deploy.endpoint_config_request(settings, model))
    arn = f"arn:aws:sagemaker:{REGION}:{DEFAULT_ACCOUNT_ID}"
    resource_for = {
        "DescribeModelPackage": f"{arn}:model-package/{GROUP.lower()}/7",
        "CreateModel": f"{arn}:model/{model}",
        "DescribeModel": f"{arn}:model/{model}",
        "CreateEndpointConfig": f"{arn}:endpoint-config/{endpoint_config}",
        "DescribeEndpointConfig": f"{arn}:endpoint-config/{endpoint_config}",
        "CreateEndpoint": f"{arn}:endpoint/{settings.resolved_endpoint_name}",
        "UpdateEndpoint": f"{arn}:endpoint/{settings.resolved_endpoint_name}",
        "DescribeEndpoint": f"{arn}:endpoint/{settings.resolved_endpoint_name}",
    }
    for call in sagemaker_calls:
        action = "".join(part.capitalize() for part in call.split("_"))
        assert allowed(policy, f"sagemaker:{action}", resource_for[action]), action
    assert allowed(policy, "sagemaker:AddTags", f"{arn}:model/{model}")  # tags on create need AddTags
    for call in autoscaling_calls:
        action = "".join(part.capitalize() for part in call.split("_"))
        assert allowed(policy, f"application-autoscaling:{action}", "*"), action
    # ... and nothing beyond those names: another model, config or endpoint is out of reach.
    assert not allowed(policy, "sagemaker:CreateModel", f"{arn}:model/someone-elses-model")
    assert not allowed(policy, "sagemaker:UpdateEndpoint", f"{arn}:endpoint/production-endpoint")
    assert not allowed(policy, "sagemaker:DescribeModelPackage", f"{arn}:model-package/othergroup/1")
    assert not allowed(policy, "iam:PassRole", f"arn:aws:iam::{DEFAULT_ACCOUNT_ID}:role/admin")


def test_policy_follows_a_custom_endpoint_name_and_function_name() -> None:
    policy = render(endpoint_name="Image-Classifier", function_name="my-deployer")
    arn = f"arn:aws:sagemaker:{REGION}:{DEFAULT_ACCOUNT_ID}"
    assert allowed(policy, "sagemaker:UpdateEndpoint", f"{arn}:endpoint/image-classifier")
    assert allowed(
        policy,
        "logs:PutLogEvents",
        f"arn:aws:logs:{REGION}:{DEFAULT_ACCOUNT_ID}:log-group:/aws/lambda/my-deployer:log-stream:2025/01/01/x",
    )
    assert not allowed(
        policy, "logs:PutLogEvents", f"arn:aws:logs:{REGION}:{DEFAULT_ACCOUNT_ID}:log-group:/aws/lambda/other:*"
    )


def test_policy_template_holds_no_account_ids_and_renders_other_partitions() -> None:
    template = (Path(deploy.__file__).parent / deploy_infra.POLICY_TEMPLATE).read_text(encoding="utf-8")
    assert not re.search(r"\d{12}", template)
    china = render(region="cn-north-1")
    assert all(
        resource == "*" or resource.startswith("arn:aws-cn:")
        for statement in china["Statement"]
        for resource in _resources(statement)
        if not resource.startswith(EXECUTION_ROLE)
    )
    with pytest.raises(ValueError, match="12 digits"):
        render(account_id="123")


def test_trust_policy_lets_only_lambda_assume_the_role() -> None:
    (statement,) = deploy_infra.trust_policy()["Statement"]
    assert statement["Principal"] == {"Service": "lambda.amazonaws.com"}
    assert statement["Action"] == "sts:AssumeRole"


def test_policy_command_prints_the_rendered_policy(capsys) -> None:
    code = main(
        ["iam", "deploy-policy", "--role", EXECUTION_ROLE, "--region", REGION, "--account-id", DEFAULT_ACCOUNT_ID,
         "--min-capacity", "1", "--max-capacity", "2", "--rollback-alarm-names", "imgclf-5xx"]
    )  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == render(autoscaling=True, rollback_alarm_names=["imgclf-5xx"])
    assert main(["iam", "deploy-trust-policy"]) == 0
    assert json.loads(capsys.readouterr().out) == deploy_infra.trust_policy()
