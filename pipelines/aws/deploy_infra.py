"""The wiring of deployment on approval: the deploy Lambda, its EventBridge rule, target and invoke permission.

``python -m pipelines.run upsert`` calls :func:`add_deploy_arguments` on its parser and
:func:`upsert_from_args` after upserting the pipeline. Every step describes first and changes only what
differs, so running it twice changes nothing (same code SHA-256, one rule, one target, one permission).

The endpoint's flags are made from the settings table of ``steps/deploy.py`` (:func:`add_endpoint_arguments`):
each flag is named after the setting it fills, and goes through the same checks the function makes, in two hops:
the flags become the function's environment, which is parsed into the settings the function will see.

The function's role is not created here (creating IAM roles needs more rights than deploying does): render
its least-privilege policy with ``python -m pipelines.run iam deploy-policy`` and create the role once, as
docs/iam.md shows.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.resources
import io
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipelines import config
from pipelines.aws.iam import check_placeholders_filled, mlflow_statement
from pipelines.definition.names import partition_for_region
from pipelines.util.errors import CommandError
from steps import deploy

HANDLER = "deploy.handler"  # the zip holds deploy.py at its root
POLICY_TEMPLATE = "deploy_policy.json"
TRUST_POLICY = "deploy_trust_policy.json"
# Statements of the policy template that only some deployments need (see render_deploy_policy).
AUTOSCALING_SID_PREFIX = "Autoscaling"
ROLLBACK_ALARMS_SID_PREFIX = "RollbackAlarms"
# The one statement that has to say "Resource": "*": Application Auto Scaling's Describe* actions support no
# resource-level permissions, and a scalable target's ARN carries an ID assigned when it is registered, so
# RegisterScalableTarget/PutScalingPolicy cannot name it in advance either.
STATEMENTS_NEEDING_ANY_RESOURCE = ("AutoscalingRegisterTargetAndPolicy",)
# Only with MLflow tracking: the two REST calls the function makes to tag the package's run (runs/get for the
# parent, runs/set-tag), on that tracking server alone.
MLFLOW_SID = "TagTheRegisteredModelsMlflowRun"
MLFLOW_TAG_ACTIONS = ("sagemaker-mlflow:GetRun", "sagemaker-mlflow:SetTag")


# --- arguments: made from the settings table of steps/deploy.py -----------------------------------------------


def _flag_type(setting: deploy.Setting) -> Callable[[str], Any]:
    """The flag's argparse type: the setting's own conversion (argparse names the flag when it fails)."""

    def convert(text: str) -> Any:
        try:
            return setting.convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r} {error}") from None

    return convert


def _flag_help(setting: deploy.Setting) -> str:
    text = f"{setting.help} [{setting.describe()}; the function's {setting.env}]"
    return f"{text} (default: {setting.describe_default()})".replace("%", "%%")  # argparse formats help with %


def add_endpoint_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """One flag per deploy setting that has a flag of its own: ``--<setting>``, typed as the function reads it.
    Shared by ``upsert`` (into the function's environment), ``deploy`` (run by hand) and ``iam deploy-policy``.
    A flag not given is left out of the environment, so the function takes the setting's default."""
    for setting in deploy.SETTINGS:
        if setting.has_own_flag:
            parser.add_argument(
                setting.flag_name,
                type=_flag_type(setting),
                choices=setting.choices or None,
                default=None,
                help=_flag_help(setting),
            )


def add_deploy_step_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The flags that also shape the definition (the Deploy step invokes the function by name): ``definition``,
    ``upsert`` and ``local`` take them."""
    parser.add_argument(
        "--deploy-function-name",
        default=config.DEPLOY_FUNCTION_NAME,
        help="name of the deploy Lambda that the Deploy step invokes and EventBridge targets (default: %(default)s)",
    )
    parser.add_argument(
        "--skip-deploy-wiring",
        action="store_true",
        default=False,
        help="build the pipeline without the Deploy step, and do not create or update the deploy Lambda and its "
        "rule (default: the DAG ends in the Deploy step, and upsert creates or updates the function and rule)",
    )


def add_deploy_arguments(parser: argparse.ArgumentParser, *, with_step_arguments: bool = True) -> None:
    """Flags of the deploy wiring for ``upsert``: the function's role and names, and the endpoint settings
    (``with_step_arguments=False`` when the parser has :func:`add_deploy_step_arguments` already)."""
    group = parser.add_argument_group("deployment on approval (the deploy Lambda and its EventBridge rule)")
    group.add_argument(
        "--deploy-role-arn",
        default=None,
        help=f"IAM role of the deploy Lambda (default: ${config.ENV_DEPLOY_ROLE_ARN}); "
        "create it with `python -m pipelines.run iam deploy-policy` as docs/iam.md shows",
    )
    group.add_argument(
        "--deploy-rule-name",
        default=config.DEPLOY_RULE_NAME,
        help="name of the EventBridge rule (default: %(default)s)",
    )
    if with_step_arguments:
        add_deploy_step_arguments(group)
    add_endpoint_arguments(group)


def flag_environment(args: argparse.Namespace, model_package_group: str, execution_role_arn: str) -> dict[str, str]:
    """The first hop: the flags' values as the function's environment variables. Flags not given (or missing
    from ``args``) are left out; the group and the role come from the command's own flags."""
    given = {"model_package_group": model_package_group, "execution_role_arn": execution_role_arn}
    environment = {}
    for setting in deploy.SETTINGS:
        value = getattr(args, setting.name, None) if setting.has_own_flag else given.get(setting.name)
        if value is not None:
            environment[setting.env] = setting.format(value)
    return environment


def _flag_label(setting: deploy.Setting) -> str:
    return setting.flag_name or setting.env


def settings_from_args(
    args: argparse.Namespace, model_package_group: str, execution_role_arn: str
) -> tuple[dict[str, str], deploy.DeploySettings]:
    """The function's environment and the settings it will parse from it (flags -> environment -> settings).

    Raises:
        CommandError: naming each bad value by its flag and the function's variable.
    """
    try:
        settings = deploy.DeploySettings.from_env(
            flag_environment(args, model_package_group, execution_role_arn), label=_flag_label
        )
    except deploy.ConfigurationError as error:
        variables = ", ".join(dict.fromkeys(setting.env for setting in error.settings))
        raise CommandError(f"{error} (the deploy function reads them as {variables})") from error
    return settings.to_env(), settings


def settings_table_markdown() -> str:
    """The settings table of docs/deployment.md, made from steps/deploy.py's table."""
    lines = [
        "| flag | function's variable | type | default | what it sets |",
        "| --- | --- | --- | --- | --- |",
    ]
    for setting in deploy.SETTINGS:
        flag = f"`{setting.flag_name}`" if setting.flag_name else "none (fixed)"
        default = setting.describe_default()
        if not (setting.required or setting.default_help) or "<" in default:
            default = f"`{default}`"  # a value (or a pattern of one), not words
        lines.append(f"| {flag} | `{setting.env}` | {setting.describe()} | {default} | {setting.help} |")
    return "\n".join(lines) + "\n"


def execution_role_from_args(args: argparse.Namespace) -> str:
    role = getattr(args, "role", None) or os.environ.get(config.ENV_ROLE_ARN)
    if not role:
        raise CommandError(
            f"no SageMaker execution role for the deployed model: pass --role or set {config.ENV_ROLE_ARN}"
        )
    return role


# --- the code -------------------------------------------------------------------------------------------------


def handler_source() -> bytes:
    return (importlib.resources.files("steps") / "deploy.py").read_bytes()


def build_function_zip() -> bytes:
    """A zip of ``deploy.py`` alone, byte-for-byte the same for the same source (fixed time stamp and mode),
    so the function's CodeSha256 changes only when the code does."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        info = zipfile.ZipInfo("deploy.py", date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, handler_source())
    return buffer.getvalue()


def code_sha256(zip_bytes: bytes) -> str:
    """What Lambda reports as CodeSha256: base64 of the SHA-256 of the deployment package."""
    return base64.b64encode(hashlib.sha256(zip_bytes).digest()).decode()


def event_pattern(model_package_group: str, tracking: bool = False) -> dict[str, Any]:
    """Approvals of this group only: any other group, and any status but Approved, never reaches the function.
    With MLflow tracking, rejections too: the function tags the package's run with its new status."""
    statuses = list(deploy.TRACKED_STATUSES) if tracking else [deploy.APPROVED]
    return {
        "source": [deploy.EVENT_SOURCE],
        "detail-type": [deploy.EVENT_DETAIL_TYPE],
        "detail": {"ModelPackageGroupName": [model_package_group], "ModelApprovalStatus": statuses},
    }


# --- AWS upserts ----------------------------------------------------------------------------------------------


def _error_code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def _wait(lambda_client: Any, waiter_name: str, function_name: str) -> None:
    lambda_client.get_waiter(waiter_name).wait(
        FunctionName=function_name, WaiterConfig={"Delay": 2, "MaxAttempts": 150}
    )


def upsert_function(
    lambda_client: Any,
    *,
    function_name: str,
    role_arn: str,
    zip_bytes: bytes,
    environment: Mapping[str, str],
    description: str,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Create the function, or update its code and configuration where they differ."""
    from botocore.exceptions import ClientError

    desired: dict[str, Any] = {
        "Runtime": config.DEPLOY_LAMBDA_RUNTIME,
        "Role": role_arn,
        "Handler": HANDLER,
        "Timeout": config.DEPLOY_LAMBDA_TIMEOUT_SECONDS,
        "MemorySize": config.DEPLOY_LAMBDA_MEMORY_MB,
        "Description": description,
        "Environment": {"Variables": dict(environment)},
    }
    sha = code_sha256(zip_bytes)
    try:
        current = lambda_client.get_function_configuration(FunctionName=function_name)
    except ClientError as error:
        if _error_code(error) != "ResourceNotFoundException":
            raise
        current = None

    if current is None:
        for attempt in range(8):
            try:
                created = lambda_client.create_function(
                    FunctionName=function_name, Code={"ZipFile": zip_bytes}, **desired
                )
                break
            except ClientError as error:
                # A role created moments ago may not be assumable yet (IAM is eventually consistent).
                if "cannot be assumed" not in str(error) or attempt == 7:
                    raise
                print(f"waiting for the new role {role_arn} to become usable by Lambda...", file=sys.stderr)
                sleep(5)
        _wait(lambda_client, "function_active_v2", function_name)
        return {
            "name": function_name,
            "arn": created["FunctionArn"],
            "action": "created",
            "code_sha256": created["CodeSha256"],
        }

    changed: list[str] = []
    _wait(lambda_client, "function_updated_v2", function_name)  # a previous update may still be in progress
    if current.get("CodeSha256") != sha:
        lambda_client.update_function_code(FunctionName=function_name, ZipFile=zip_bytes)
        _wait(lambda_client, "function_updated_v2", function_name)
        changed.append("code")
    current_values = {
        **{key: current.get(key) for key in desired},
        "Description": current.get("Description", ""),
        "Environment": {"Variables": (current.get("Environment") or {}).get("Variables", {})},
    }
    changed_settings = [key for key, value in desired.items() if current_values[key] != value]
    if changed_settings:
        lambda_client.update_function_configuration(FunctionName=function_name, **desired)
        _wait(lambda_client, "function_updated_v2", function_name)
        changed.extend(changed_settings)
    final = lambda_client.get_function_configuration(FunctionName=function_name)
    return {
        "name": function_name,
        "arn": final["FunctionArn"],
        "action": "updated" if changed else "unchanged",
        "changed": changed,
        "code_sha256": final["CodeSha256"],
    }


def upsert_rule(
    events_client: Any, *, rule_name: str, model_package_group: str, tracking: bool = False
) -> dict[str, Any]:
    from botocore.exceptions import ClientError

    pattern = event_pattern(model_package_group, tracking)
    statuses = "Approved and rejected" if tracking else "Approved"
    description = f"{statuses} model packages of {model_package_group} -> deploy Lambda"
    try:
        current = events_client.describe_rule(Name=rule_name)
    except ClientError as error:
        if _error_code(error) != "ResourceNotFoundException":
            raise
        current = None
    if (
        current is not None
        and json.loads(current.get("EventPattern") or "{}") == pattern
        and current.get("State") == "ENABLED"
        and current.get("Description", "") == description
    ):
        return {"name": rule_name, "arn": current["Arn"], "action": "unchanged", "event_pattern": pattern}
    response = events_client.put_rule(
        Name=rule_name, EventPattern=json.dumps(pattern), State="ENABLED", Description=description
    )
    return {
        "name": rule_name,
        "arn": response["RuleArn"],
        "action": "created" if current is None else "updated",
        "event_pattern": pattern,
    }


def ensure_rule_target(events_client: Any, *, rule_name: str, function_arn: str) -> dict[str, Any]:
    """Point the rule's target (ours, by its Id; other targets are left alone) at the function."""
    targets = events_client.list_targets_by_rule(Rule=rule_name).get("Targets", [])
    ours = next((target for target in targets if target["Id"] == config.DEPLOY_RULE_TARGET_ID), None)
    if ours is not None and ours.get("Arn") == function_arn:
        return {"id": config.DEPLOY_RULE_TARGET_ID, "arn": function_arn, "action": "unchanged"}
    response = events_client.put_targets(
        Rule=rule_name, Targets=[{"Id": config.DEPLOY_RULE_TARGET_ID, "Arn": function_arn}]
    )
    if response.get("FailedEntryCount"):
        raise CommandError(f"EventBridge refused the target of rule {rule_name}: {response.get('FailedEntries')}")
    return {
        "id": config.DEPLOY_RULE_TARGET_ID,
        "arn": function_arn,
        "action": "created" if ours is None else "updated",
    }


def _statement_source_arn(statement: Mapping[str, Any]) -> str | None:
    condition = statement.get("Condition") or {}
    for operator in ("ArnLike", "ArnEquals"):
        source = (condition.get(operator) or {}).get("AWS:SourceArn")
        if source:
            return str(source)
    return None


def ensure_invoke_permission(
    lambda_client: Any, *, function_name: str, rule_arn: str, rule_name: str
) -> dict[str, Any]:
    """Let EventBridge invoke the function for this rule only (SourceArn = the rule's ARN)."""
    from botocore.exceptions import ClientError

    statement_id = f"{rule_name}-invoke"
    try:
        policy = lambda_client.get_policy(FunctionName=function_name)["Policy"]
        statements = (json.loads(policy) if isinstance(policy, str) else policy).get("Statement", [])
    except ClientError as error:
        if _error_code(error) != "ResourceNotFoundException":
            raise
        statements = []
    ours = next((statement for statement in statements if statement.get("Sid") == statement_id), None)
    principal = (ours or {}).get("Principal") or {}
    principal_service = principal.get("Service") if isinstance(principal, Mapping) else principal
    if ours is not None and _statement_source_arn(ours) == rule_arn and principal_service == "events.amazonaws.com":
        return {"statement_id": statement_id, "source_arn": rule_arn, "action": "unchanged"}
    if ours is not None:
        lambda_client.remove_permission(FunctionName=function_name, StatementId=statement_id)
    lambda_client.add_permission(
        FunctionName=function_name,
        StatementId=statement_id,
        Action="lambda:InvokeFunction",
        Principal="events.amazonaws.com",
        SourceArn=rule_arn,
    )
    return {"statement_id": statement_id, "source_arn": rule_arn, "action": "created" if ours is None else "updated"}


def _boto3_session(boto_session: Any) -> Any:
    """Accept a boto3 Session or a sagemaker.Session (which carries one)."""
    return getattr(boto_session, "boto_session", None) or boto_session


def upsert_from_args(args: argparse.Namespace, boto_session: Any, model_package_group: str) -> dict[str, Any]:
    """Create or update the deploy Lambda, its EventBridge rule, the rule's target and the invoke permission.

    Returns what it did per resource (``action``: created / updated / unchanged) and the function's settings.
    """
    if getattr(args, "skip_deploy_wiring", False):
        return {"skipped": True}
    role_arn = getattr(args, "deploy_role_arn", None) or os.environ.get(config.ENV_DEPLOY_ROLE_ARN)
    if not role_arn:
        raise CommandError(
            f"no role for the deploy Lambda: pass --deploy-role-arn or set {config.ENV_DEPLOY_ROLE_ARN} "
            "(docs/iam.md shows how to create it), "
            "or pass --skip-deploy-wiring"
        )
    execution_role_arn = execution_role_from_args(args)
    environment, settings = settings_from_args(args, model_package_group, execution_role_arn)
    function_name = getattr(args, "deploy_function_name", None) or config.DEPLOY_FUNCTION_NAME
    rule_name = getattr(args, "deploy_rule_name", None) or config.DEPLOY_RULE_NAME

    session = _boto3_session(boto_session)
    lambda_client = session.client("lambda")
    events_client = session.client("events")
    function = upsert_function(
        lambda_client,
        function_name=function_name,
        role_arn=role_arn,
        zip_bytes=build_function_zip(),
        environment=environment,
        description=f"Deploys approved packages of {model_package_group} to {settings.resolved_endpoint_name}"[:256],
    )
    tracking = bool(getattr(args, "mlflow_tracking_arn", None))  # rejections then reach the run too
    rule = upsert_rule(events_client, rule_name=rule_name, model_package_group=model_package_group, tracking=tracking)
    target = ensure_rule_target(events_client, rule_name=rule_name, function_arn=function["arn"])
    permission = ensure_invoke_permission(
        lambda_client, function_name=function_name, rule_arn=rule["arn"], rule_name=rule_name
    )
    return {
        "function": function,
        "rule": rule,
        "target": target,
        "permission": permission,
        "endpoint_name": settings.resolved_endpoint_name,
        "environment": environment,
        "changed": any(part["action"] != "unchanged" for part in (function, rule, target, permission)),
    }


# --- the IAM policy -------------------------------------------------------------------------------------------


def render_deploy_policy(
    *,
    region: str,
    account_id: str,
    execution_role_arn: str,
    model_package_group: str,
    endpoint_name: str | None = None,
    function_name: str = config.DEPLOY_FUNCTION_NAME,
    resource_name_prefix: str = config.ENDPOINT_NAME_PREFIX,
    autoscaling: bool = False,
    rollback_alarm_names: Sequence[str] = (),
    partition: str | None = None,
    mlflow_tracking_arn: str | None = None,
) -> dict[str, Any]:
    """The deploy function's least-privilege policy: steps/deploy_policy.json with its placeholders filled in,
    keeping the autoscaling statements only with ``autoscaling`` and the alarm statement only with alarms; with
    ``mlflow_tracking_arn`` (a SageMaker MLflow tracking server or app), the run-tagging calls on it alone."""
    if not (account_id.isdigit() and len(account_id) == 12):
        raise ValueError(f"account ID {account_id!r} is not 12 digits")
    base_name = deploy.resource_base_name(resource_name_prefix, model_package_group)
    endpoint = endpoint_name or base_name
    values = {
        "${AWS::Partition}": partition or partition_for_region(region),
        "${AWS::Region}": region,
        "${AWS::AccountId}": account_id,
        "${ExecutionRoleArn}": execution_role_arn,
        # SageMaker writes resource names in lower case in its ARNs.
        "${ModelPackageGroupArnName}": model_package_group.lower(),
        "${ResourceBaseName}": base_name,
        "${EndpointArnName}": endpoint.lower(),
        "${EndpointName}": endpoint,
        "${FunctionName}": function_name,
    }
    alarm_arn = "arn:${AWS::Partition}:cloudwatch:${AWS::Region}:${AWS::AccountId}:alarm:"

    def fill(text: str) -> str:
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        return text

    template = json.loads((importlib.resources.files("steps") / POLICY_TEMPLATE).read_text(encoding="utf-8"))
    statements = []
    for statement in template["Statement"]:
        sid = statement.get("Sid", "")
        if sid.startswith(AUTOSCALING_SID_PREFIX) and not autoscaling:
            continue
        if sid.startswith(ROLLBACK_ALARMS_SID_PREFIX):
            if not rollback_alarm_names:
                continue
            statement = {**statement, "Resource": [alarm_arn + name for name in rollback_alarm_names]}
        statements.append(json.loads(fill(json.dumps(statement))))
    if mlflow_tracking_arn is not None:
        statements.append(mlflow_statement(mlflow_tracking_arn, MLFLOW_TAG_ACTIONS, MLFLOW_SID))
    policy = {"Version": template["Version"], "Statement": statements}
    check_placeholders_filled(policy, "the deploy policy")
    return policy


def trust_policy() -> dict[str, Any]:
    return json.loads((importlib.resources.files("steps") / TRUST_POLICY).read_text(encoding="utf-8"))
