"""``python -m pipelines.run bootstrap`` against moto, its refusals of bad input, and the stack-following logic.

moto plays CloudFormation, IAM, S3, SageMaker, CodeBuild and CodePipeline; the four resource types its
CloudFormation lacks are added by ``_cloudformation.register_moto_resource_types`` (each checks its properties
against botocore's shapes first). moto has no CodeConnections: GetConnection is answered by a botocore hook.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import pytest
from _cloudformation import patch_moto_cloudformation, rendered_pipeline_role_policy

from pipelines import config
from pipelines.aws import cloudformation, stack_template
from pipelines.cli import bootstrap
from pipelines.run import main

REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's
CONNECTION = f"arn:aws:codeconnections:{REGION}:{ACCOUNT}:connection/0f0e0d0c-1111-2222-3333-444455556666"
STACK = "imgclf-mlops"
CREATE = ("bootstrap", "--connection-arn", CONNECTION, "--repository", "owner/repo")


class Connections:
    """CodeConnections' GetConnection, which moto lacks: ARN -> (status, provider)."""

    def __init__(self) -> None:
        self.connections = {CONNECTION: ("AVAILABLE", "GitHub")}

    def get_connection(self, params: dict[str, Any], **_: Any) -> tuple[Any, dict[str, Any]]:
        arn = json.loads(params["body"])["ConnectionArn"]
        if arn not in self.connections:
            error = {"Error": {"Code": "ResourceNotFoundException", "Message": f"Connection {arn} not found"}}
            return types.SimpleNamespace(status_code=400, headers={}), error
        status, provider = self.connections[arn]
        connection = {"ConnectionArn": arn, "ConnectionName": "github", "ConnectionStatus": status}
        return types.SimpleNamespace(status_code=200, headers={}), {
            "Connection": {**connection, "ProviderType": provider}
        }


class Calls:
    """Every AWS operation made through clients of patched sessions: (service prefix, operation, parameters)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def record(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.calls.append((model.service_model.signing_name, model.name, params))


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from moto import mock_aws

    patch_moto_cloudformation(monkeypatch)
    monkeypatch.setenv(config.ENV_REGION, REGION)
    for variable in (config.ENV_ROLE_ARN, config.ENV_BUCKET, config.ENV_DEPLOY_ROLE_ARN):
        monkeypatch.delenv(variable, raising=False)
    with mock_aws():
        session = boto3.Session(region_name=REGION)
        connections = Connections()
        for service in ("codeconnections", "codestar-connections"):
            session.events.register(f"before-call.{service}.GetConnection", connections.get_connection)
        session.connections = connections  # type: ignore[attr-defined]
        monkeypatch.setattr(bootstrap, "_session", lambda args: (session, REGION))
        yield session


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _outputs(session: Any) -> dict[str, str]:
    stack = session.client("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]
    return cloudformation.stack_outputs(stack)


def _no_stack(session: Any) -> bool:
    return not [s for s in session.client("cloudformation").list_stacks()["StackSummaries"] if s["StackName"] == STACK]


# --- create, then nothing to change ----------------------------------------------------------------------------


@pytest.mark.slow
def test_bootstrap_creates_the_stack_and_a_second_run_changes_nothing(
    aws: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, *CREATE)
    assert code == 0, err
    assert f"change set for stack {STACK} (CREATE)" in out
    assert "+ Add     ArtifactBucket (AWS::S3::Bucket)" in out and "+ Add     CodePipeline (" in out
    assert f"CREATE_COMPLETE                      AWS::CloudFormation::Stack           {STACK}" in out  # an event
    assert f"stack {STACK}: created (CREATE_COMPLETE)" in out
    assert f"aws codepipeline start-pipeline-execution --name imgclf --region {REGION}" in out

    outputs = _outputs(aws)
    assert set(outputs) == set(stack_template.skeleton()["Outputs"])
    for key, value in outputs.items():
        assert f"{key}  " in out and value in out  # every output is printed
    names = stack_template.names_for("imgclf")
    assert outputs["SageMakerPipelineName"] == names["PipelineName"] == "imgclf-pipeline"
    assert outputs["CodePipelineConsoleUrl"].startswith(f"https://{REGION}.console.aws.amazon.com/codesuite/")

    # The resources are there, as the template says.
    bucket = outputs["ArtifactBucketName"]
    s3 = aws.client("s3")
    s3.head_bucket(Bucket=bucket)  # its settings are moto's to skip: the template tests check them
    assert "DenyRequestsWithoutTls" in s3.get_bucket_policy(Bucket=bucket)["Policy"]
    group = aws.client("sagemaker").describe_model_package_group(ModelPackageGroupName=outputs["ModelPackageGroupName"])
    assert group["ModelPackageGroupName"] == "imgclf-models"
    project = aws.client("codebuild").batch_get_projects(names=[outputs["CodeBuildProjectName"]])["projects"][0]
    variables = {v["name"]: v["value"] for v in project["environment"]["environmentVariables"]}
    assert variables[config.ENV_ROLE_ARN] == outputs["PipelineExecutionRoleArn"]
    assert variables[config.ENV_BUCKET] == bucket
    assert variables[config.ENV_DEPLOY_ROLE_ARN] == outputs["DeployFunctionRoleArn"]
    pipeline = aws.client("codepipeline").get_pipeline(name=outputs["CodePipelineName"])["pipeline"]
    source = pipeline["stages"][0]["actions"][0]["configuration"]
    assert (source["ConnectionArn"], source["FullRepositoryId"], source["BranchName"]) == (
        CONNECTION,
        "owner/repo",
        "main",
    )

    # The pipeline role holds the policy pipelines.aws.iam renders for this bucket, these names and this role.
    role_arn = outputs["PipelineExecutionRoleArn"]
    granted = _role_policy(aws, role_arn)
    expected = rendered_pipeline_role_policy(
        region=REGION, account_id=ACCOUNT, bucket=bucket, project="imgclf", role_arn=role_arn
    )
    assert _normalised(granted) == _normalised(expected)

    events_before = aws.client("cloudformation").describe_stack_events(StackName=STACK)["StackEvents"]
    code, out, err = _run(capsys, "bootstrap")  # on an existing stack, left-out flags keep their values
    assert code == 0, err
    assert f"stack {STACK}: no changes (CREATE_COMPLETE)" in out
    assert "executing" not in out
    cf = aws.client("cloudformation")
    left = [s for s in cf.list_change_sets(StackName=STACK)["Summaries"] if s["ExecutionStatus"] != "EXECUTE_COMPLETE"]
    assert left == []  # the empty change set was deleted
    assert cf.describe_stack_events(StackName=STACK)["StackEvents"] == events_before
    assert _outputs(aws) == outputs


def _role_policy(session: Any, role_arn: str) -> dict[str, Any]:
    """The role's one inline policy."""
    iam_client, role_name = session.client("iam"), role_arn.rsplit("/", 1)[1]
    (policy_name,) = iam_client.list_role_policies(RoleName=role_name)["PolicyNames"]
    document = iam_client.get_role_policy(RoleName=role_name, PolicyName=policy_name)["PolicyDocument"]
    if isinstance(document, str):  # moto keeps a role's CloudFormation-made policies as Python reprs
        import ast

        return ast.literal_eval(document)
    return document


def _normalised(policy: dict[str, Any]) -> list[dict[str, Any]]:
    """Statements with Resource lists as sets (IAM reads them so; the template orders image repositories by name)."""
    return [
        {**statement, "Resource": sorted(statement["Resource"])} if "Resource" in statement else statement
        for statement in policy["Statement"]
    ]


@pytest.mark.slow
def test_a_changed_template_shows_its_changes_and_updates_the_stack(
    aws: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _run(capsys, *CREATE)[0] == 0
    rendered = stack_template.render_template()
    rendered["Resources"]["BuildProject"]["Properties"]["TimeoutInMinutes"] = 90
    monkeypatch.setattr(stack_template, "template_text", lambda template=None: stack_template.dump_yaml(rendered))
    code, out, err = _run(capsys, "bootstrap", "--branch", "release/2.x")
    assert code == 0, err
    assert f"change set for stack {STACK} (UPDATE)" in out
    assert "~ Modify  BuildProject (AWS::CodeBuild::Project)" in out
    assert f"stack {STACK}: updated (UPDATE_COMPLETE)" in out
    project = aws.client("codebuild").batch_get_projects(names=["imgclf-build"])["projects"][0]
    assert project["timeoutInMinutes"] == 90
    parameters = aws.client("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]["Parameters"]
    values = {p["ParameterKey"]: p["ParameterValue"] for p in parameters}
    assert values["Branch"] == "release/2.x" and values["Repository"] == "owner/repo"  # kept from the first run


@pytest.mark.slow
def test_no_execute_leaves_the_change_set_for_review(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, *CREATE, "--no-execute")
    assert code == 0, err
    assert "the change set is left for review: execute it with `aws cloudformation execute-change-set" in out
    assert f"aws cloudformation delete-stack --stack-name {STACK} --region {REGION}" in out
    cf = aws.client("cloudformation")
    assert cf.describe_stacks(StackName=STACK)["Stacks"][0]["StackStatus"] == "REVIEW_IN_PROGRESS"
    (summary,) = cf.list_change_sets(StackName=STACK)["Summaries"]
    assert summary["ExecutionStatus"] == "AVAILABLE"


# --- the build the stack sets up: upsert and start with the stack's values and role ----------------------------


_NO_PERMISSION_NEEDED = {("sts", "GetCallerIdentity")}
# Operations whose IAM action has another name.
_IAM_ACTIONS = {("s3", "HeadBucket"): "s3:ListBucket", ("s3", "HeadObject"): "s3:GetObject"}
# What the build role allows that upsert and start do not call here, and why it is there.
_ALLOWED_FOR_OTHER_REASONS = {
    # CodeBuild itself: the build's logs, the pytest report, the source CodePipeline hands over, the pip cache.
    "logs:CreateLogGroup",
    "logs:CreateLogStream",
    "logs:PutLogEvents",
    "codebuild:CreateReportGroup",
    "codebuild:CreateReport",
    "codebuild:UpdateReport",
    "codebuild:BatchPutTestCases",
    "s3:GetObject",
    "s3:GetObjectVersion",
    "s3:GetBucketAcl",
    "s3:GetBucketLocation",
    # upsert: replacing the invoke permission when the rule's ARN changed.
    "lambda:RemovePermission",
    # Checked below, per role and service.
    "iam:PassRole",
}


def _build_environment(session: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """The variables CodeBuild gives the build: the project's (as the stack set them) and CodeBuild's own."""
    outputs = _outputs(session)
    project = session.client("codebuild").batch_get_projects(names=[outputs["CodeBuildProjectName"]])["projects"][0]
    environment = {v["name"]: v["value"] for v in project["environment"]["environmentVariables"]}
    environment.update(CODEBUILD_BUILD_ID="imgclf-build:1", CODEBUILD_BUILD_NUMBER="1")
    environment["CODEBUILD_RESOLVED_SOURCE_VERSION"] = "0123abcd"
    return environment, project


def _run_build_phase(capsys: pytest.CaptureFixture[str], environment: dict[str, str]) -> list[str]:
    """The buildspec's build phase, its `python -m pipelines.run` lines run in-process; returns their outputs."""
    import re
    import shlex

    import yaml

    spec = yaml.safe_load((stack_template.PROJECT_ROOT / "buildspec.yml").read_text())
    printed = []
    for command in spec["phases"]["build"]["commands"]:
        match = re.search(r"python -m pipelines\.run ([^)]*)", command)
        if match:
            expanded = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: environment[m.group(1) or m.group(2)], match.group(1))
            code, out, err = _run(capsys, *shlex.split(expanded))
            assert code == 0, err
            printed.append(out)
    return printed


@pytest.mark.slow
def test_the_builds_upsert_and_start_need_nothing_the_build_role_lacks(
    aws: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The buildspec's upsert and start, twice (create, then update with new code and settings), with the variables
    the stack sets on the CodeBuild project: every AWS call they make is an action the build role allows, the role
    allows nothing else without a reason, each role passed is one it may pass to that service, and the model
    package group the stack made is found, not made again."""
    from pipelines.aws import deploy_infra

    assert _run(capsys, *CREATE)[0] == 0
    # moto applies a bucket policy's Deny statements without their conditions, so the TLS-only policy would deny
    # moto's every request: the test goes on without it (test_stack_template checks the policy itself).
    aws.client("s3").delete_bucket_policy(Bucket=_outputs(aws)["ArtifactBucketName"])
    environment, project = _build_environment(aws)
    calls = Calls()
    original_client = boto3.session.Session.client

    def recording_client(self: Any, *args: Any, **kwargs: Any) -> Any:
        client = original_client(self, *args, **kwargs)
        client.meta.events.register("before-parameter-build", calls.record)  # params: the call's own arguments
        return client

    monkeypatch.setattr(boto3.session.Session, "client", recording_client)
    first = _run_build_phase(capsys, environment)
    assert "model package group imgclf-models: exists" in first[0]  # the stack's, not a second one
    handler = deploy_infra.handler_source() + b"\n# changed\n"
    monkeypatch.setattr(deploy_infra, "handler_source", lambda: handler)
    _run_build_phase(capsys, {**environment, "UPSERT_ARGUMENTS": "--endpoint-instance-count 2"})
    build_calls = list(calls.calls)

    statements = _role_policy(aws, project["serviceRole"])["Statement"]
    allowed = {action for statement in statements for action in statement["Action"]}
    made = {(service, operation) for service, operation, _ in build_calls} - _NO_PERMISSION_NEEDED
    needed = {_IAM_ACTIONS.get(call, f"{call[0]}:{call[1]}") for call in made}
    assert {"sagemaker:UpdatePipeline", "lambda:UpdateFunctionCode", "lambda:UpdateFunctionConfiguration"} <= needed
    assert needed - allowed == set()
    assert allowed - needed - _ALLOWED_FOR_OTHER_REASONS == set()

    passes = {
        statement["Resource"][0]: statement["Condition"]["StringEquals"]["iam:PassedToService"]
        for statement in statements
        if statement["Action"] == ["iam:PassRole"]
    }
    passed = {("sagemaker", "CreatePipeline"): "RoleArn", ("sagemaker", "UpdatePipeline"): "RoleArn"}
    passed.update({("lambda", "CreateFunction"): "Role", ("lambda", "UpdateFunctionConfiguration"): "Role"})
    services = {"sagemaker": "sagemaker.amazonaws.com", "lambda": "lambda.amazonaws.com"}
    for service, operation, params in build_calls:
        if (service, operation) in passed:
            assert passes[params[passed[service, operation]]] == services[service]
    groups = aws.client("sagemaker").list_model_package_groups()["ModelPackageGroupSummaryList"]
    assert [group["ModelPackageGroupName"] for group in groups] == ["imgclf-models"]


# --- bad input: one line that says what to do, and no stack ----------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--repository", "owner/repo"), f"--connection-arn is needed to create stack {STACK} (there is none of that"),
        (("--connection-arn", "0f0e0d0c-1111", "--repository", "o/r"), "give the connection's full ARN"),
        (
            ("--connection-arn", f"arn:aws:codeconnections:{REGION}:{ACCOUNT}:connection/x", "--repository", "o/r"),
            "give the ARN of a CodeConnections connection",
        ),
        (("--connection-arn", CONNECTION.replace("0f0e", "9f9e"), "--repository", "o/r"), "does not exist"),
        (
            ("--connection-arn", CONNECTION.replace(REGION, "us-east-1"), "--repository", "o/r"),
            f"is a connection in us-east-1, but the stack goes to {REGION}",
        ),
        (
            ("--connection-arn", CONNECTION, "--repository", "https://github.com/owner/repo.git"),
            "give the repository as owner/name (owner/repo), not its URL",
        ),
        (
            ("--connection-arn", CONNECTION, "--repository", "group/team/repo"),
            "GitHub repositories are owner/name, one slash",
        ),
        (
            ("--connection-arn", CONNECTION, "--repository", "o/r", "--branch", "refs/heads/main"),
            "give the branch name (main), not the ref refs/heads/main",
        ),
        (("--connection-arn", CONNECTION, "--repository", "o/r", "--branch", "fix..it"), "give a branch name as git"),
        (("--connection-arn", CONNECTION, "--repository", "o/r", "--project-name", "Vision"), "lower-case letters"),
        (("--connection-arn", CONNECTION, "--repository", "o/r", "--artifact-retention-days", "0"), "from 1 to 3650"),
        (
            ("--connection-arn", CONNECTION, "--repository", "o/r", "--upsert-arguments=--spot --role arn:x"),
            "the build sets --role from the stack already; leave them out",
        ),
        (
            ("--connection-arn", CONNECTION, "--repository", "o/r", "--upsert-arguments=--no-such-flag"),
            "upsert says: unrecognized arguments: --no-such-flag",
        ),
    ],
)
@pytest.mark.slow
def test_bad_input_gets_one_line_and_makes_no_stack(
    aws: Any, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    code, _, err = _run(capsys, "bootstrap", *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert message in err
    assert _no_stack(aws)


@pytest.mark.slow
def test_a_connection_still_pending_says_to_finish_the_handshake(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    aws.connections.connections[CONNECTION] = ("PENDING", "GitHub")
    code, _, err = _run(capsys, *CREATE)
    assert code == 2 and "is PENDING, not AVAILABLE: finish its handshake with GitHub" in err
    assert f"connections?region={REGION}" in err
    assert _no_stack(aws)


@pytest.mark.slow
def test_a_gitlab_repository_may_sit_in_subgroups(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    aws.connections.connections[CONNECTION] = ("AVAILABLE", "GitLab")
    code, out, err = _run(capsys, "bootstrap", "--connection-arn", CONNECTION, "--repository", "group/team/repo")
    assert code == 0, err
    assert "group/team/repo@main through GitLab" in out


@pytest.mark.slow
def test_a_stack_in_rollback_complete_says_how_to_remove_it(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from moto.cloudformation.models import cloudformation_backends

    assert _run(capsys, *CREATE)[0] == 0
    (stack,) = [s for s in cloudformation_backends[ACCOUNT][REGION].stacks.values() if s.name == STACK]
    stack.status = "ROLLBACK_COMPLETE"
    code, _, err = _run(capsys, "bootstrap")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"stack {STACK} is in ROLLBACK_COMPLETE" in err
    assert f"aws cloudformation delete-stack --stack-name {STACK} --region {REGION}" in err


def test_names_taken_outside_the_stack_stop_it_before_any_change(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    role = aws.client("iam").create_role(
        RoleName="someone-elses-build",
        AssumeRolePolicyDocument=json.dumps(
            {
                "Statement": [
                    {"Effect": "Allow", "Principal": {"Service": "codebuild.amazonaws.com"}, "Action": "sts:AssumeRole"}
                ]
            }
        ),
    )["Role"]["Arn"]
    aws.client("codebuild").create_project(
        name="imgclf-build",
        source={"type": "NO_SOURCE", "buildspec": "version: 0.2", "location": "none"},
        artifacts={"type": "NO_ARTIFACTS"},
        environment={
            "type": "LINUX_CONTAINER",
            "image": "aws/codebuild/standard:7.0",
            "computeType": "BUILD_GENERAL1_SMALL",
        },
        serviceRole=role,
    )
    code, _, err = _run(capsys, *CREATE)
    assert code == 2
    assert "a CodeBuild project named imgclf-build (delete it: aws codebuild delete-project --name imgclf-build)" in err
    assert "or pass another --project-name. Nothing was changed" in err
    assert _no_stack(aws)


@pytest.mark.slow
def test_a_model_package_group_made_by_upsert_is_taken_over_not_made_twice(
    aws: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    aws.client("sagemaker").create_model_package_group(ModelPackageGroupName="imgclf-models")
    requests: list[dict[str, Any]] = []
    aws.events.register("before-call.cloudformation.CreateChangeSet", lambda params, **_: requests.append(params))
    code, out, err = _run(capsys, *CREATE)
    assert code == 0, err
    assert "model package group imgclf-models exists outside the stack (an earlier upsert makes one)" in out
    assert requests[0]["body"]["ImportExistingResources"] in ("true", True)
    groups = aws.client("sagemaker").list_model_package_groups()["ModelPackageGroupSummaryList"]
    assert len(groups) == 1


# --- following a stack that fails (a scripted CloudFormation: moto makes every stack succeed) -----------------


class ScriptedCloudFormation:
    """A CloudFormation client whose stack goes through the given statuses while events appear."""

    def __init__(self, statuses: list[str], events: list[dict[str, Any]], existing: bool = False) -> None:
        self.statuses, self.events, self.existing = statuses, events, existing
        self.shown = 0  # how many events exist so far
        self.requests: dict[str, Any] = {}

    def describe_stacks(self, StackName: str) -> dict[str, Any]:
        if not self.existing and StackName == STACK:
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": "ValidationError", "Message": "Stack with id x does not exist"}}, "D")
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        self.shown = min(len(self.events), self.shown + 2)
        return {"Stacks": [{"StackName": STACK, "StackId": "stack-id", "StackStatus": status, "Outputs": []}]}

    def describe_stack_events(self, StackName: str, **_: Any) -> dict[str, Any]:
        return {"StackEvents": list(reversed(self.events[: self.shown]))}

    def create_change_set(self, **request: Any) -> dict[str, str]:
        self.requests = request
        return {"Id": "change-set-id", "StackId": "stack-id"}

    def describe_change_set(self, **_: Any) -> dict[str, Any]:
        change = {"Action": "Add", "LogicalResourceId": "CodePipeline", "ResourceType": "AWS::CodePipeline::Pipeline"}
        return {"Status": "CREATE_COMPLETE", "Changes": [{"ResourceChange": change}]}

    def execute_change_set(self, **_: Any) -> None:
        self.existing = True


def _event(number: int, logical_id: str, kind: str, status: str, reason: str = "") -> dict[str, Any]:
    stamp = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc) + timedelta(seconds=number)
    event = {"EventId": f"e{number}", "Timestamp": stamp, "LogicalResourceId": logical_id, "ResourceType": kind}
    return {**event, "ResourceStatus": status, **({"ResourceStatusReason": reason} if reason else {})}


def _failing_events(first: str, then: str) -> list[dict[str, Any]]:
    pipeline, bucket = "AWS::CodePipeline::Pipeline", "AWS::S3::Bucket"
    return [
        _event(1, STACK, "AWS::CloudFormation::Stack", f"{first}_IN_PROGRESS", "User Initiated"),
        _event(2, "ArtifactBucket", bucket, f"{first}_IN_PROGRESS"),
        _event(
            3,
            "CodePipeline",
            pipeline,
            f"{first}_FAILED",
            "Connection arn:... is not AVAILABLE (Service: CodePipeline)",
        ),
        _event(4, "ArtifactBucket", bucket, f"{first}_FAILED", "Resource creation cancelled"),
        _event(5, STACK, "AWS::CloudFormation::Stack", then, "The following resource(s) failed: [CodePipeline]"),
    ]


@pytest.mark.parametrize(
    ("existing", "statuses", "first", "then", "after"),
    [
        (
            False,
            ["CREATE_IN_PROGRESS", "DELETE_IN_PROGRESS", "DELETE_COMPLETE"],
            "CREATE",
            "DELETE_COMPLETE",
            "the stack was deleted again, nothing is left of it",
        ),
        (
            True,
            ["UPDATE_COMPLETE", "UPDATE_IN_PROGRESS", "UPDATE_ROLLBACK_COMPLETE"],
            "UPDATE",
            "UPDATE_ROLLBACK_COMPLETE",
            "rolled back to its previous state and works as before",
        ),
    ],
)
def test_a_failed_stack_names_its_first_failing_resource_and_reason(
    existing: bool, statuses: list[str], first: str, then: str, after: str
) -> None:
    import io

    client = ScriptedCloudFormation(statuses, _failing_events(first, then), existing=existing)
    request = cloudformation.StackRequest(stack_name=STACK, template_body="{}", parameters={"A": "b"}, tags={})
    out = io.StringIO()
    with pytest.raises(cloudformation.StackError) as raised:
        cloudformation.deploy(client, request, region=REGION, out=out, poll_seconds=0, sleep=lambda _: None)
    message = str(raised.value)
    assert "first failure: CodePipeline (AWS::CodePipeline::Pipeline)" in message
    assert f"{first}_FAILED: Connection arn:... is not AVAILABLE" in message and after in message
    printed = out.getvalue().splitlines()
    assert "  + Add     CodePipeline (AWS::CodePipeline::Pipeline)" in printed
    event_lines = [line for line in printed if line[:2].isdigit()]
    # One line per event from the execution on (an existing stack's older events were there before it).
    assert len(event_lines) == (3 if existing else 5)
    assert any(line.startswith("12:00:03  ") and "CodePipeline" in line for line in event_lines)
    assert client.requests.get("OnStackFailure") == ("DELETE" if first == "CREATE" else None)


def test_the_first_failure_skips_knock_on_cancellations() -> None:
    events = _failing_events("CREATE", "ROLLBACK_COMPLETE")
    events.insert(
        2, _event(9, "BuildProject", "AWS::CodeBuild::Project", "CREATE_FAILED", "Resource creation cancelled")
    )
    failure = cloudformation.first_failure(events, STACK)
    assert failure is not None and failure["LogicalResourceId"] == "CodePipeline"


# --- the template for people who deploy with their own tooling -------------------------------------------------


@pytest.mark.slow
def test_print_template_writes_the_complete_template_without_aws(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bootstrap, "_session", lambda args: pytest.fail("--print-template made an AWS session"))
    target = tmp_path / "deploy" / "project.yml"
    target.parent.mkdir()  # a command writes into a folder that exists, as any shell redirection does
    code, _, err = _run(capsys, "bootstrap", "--print-template", str(target))
    assert code == 0 and f"wrote {target}" in err
    assert target.read_text() == stack_template.template_text()
    assert not list(target.parent.glob("*.tmp"))
    code, out, _ = _run(capsys, "bootstrap", "--print-template")
    assert code == 0 and out == target.read_text()
    printed = stack_template.load_yaml(out)
    assert "PolicyDocument" in json.dumps(printed) and "pipelines/aws/iam" not in json.dumps(printed["Resources"])
    # In a process of its own (the SDK logs to standard output when first imported), standard output is the
    # template alone, ready to be redirected to a file.
    import subprocess
    import sys

    clean = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}  # no AWS at all
    clean["PYTHONPATH"] = str(stack_template.PROJECT_ROOT)  # the code under test, from any folder
    fresh = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "bootstrap", "--print-template"],
        capture_output=True,
        text=True,
        check=True,
        env=clean,
        cwd=tmp_path,
    )
    assert fresh.stdout == out
