"""``python -m pipelines.run bootstrap``: the project's whole AWS side as one CloudFormation stack.

The stack (``infra/project.yml``, completed by :mod:`pipelines.aws.stack_template`) holds the artifact bucket, the model
package group, the roles of the SageMaker pipeline, its deploy function and the build, the CodeBuild project that
runs ``buildspec.yml`` and the CodePipeline that runs it on every push. ``bootstrap`` checks its input (flags, the
CodeConnections connection, names taken outside the stack) before it changes anything, then creates or updates
the stack through a change set (:mod:`pipelines.aws.cloudformation`), and prints the outputs and the next command.
Its flags are the template's parameters (``--project-name`` fills ProjectName, and so on); on an existing stack a
flag left out keeps the stack's current value.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines import config
from pipelines.aws import cloudformation, stack_template
from pipelines.cli.sagemaker import _add_aws_arguments, _aws_errors, add_tag_argument, make_boto_session, resolve_region
from pipelines.util import fsutil
from pipelines.util.errors import CommandError

STACK_NAME_SUFFIX = "-mlops"
MAX_TEMPLATE_BODY_BYTES = 51_200  # CloudFormation's limit for a template passed inline
CONNECTIONS_CONSOLE = "https://console.aws.amazon.com/codesuite/settings/connections"
# Providers whose repositories are exactly owner/name (GitLab has subgroups: group/subgroup/name).
OWNER_SLASH_NAME_PROVIDERS = ("GitHub", "GitHubEnterpriseServer", "Bitbucket")


def _flag(parameter: str) -> str:
    """ProjectName -> --project-name: the flag fills the template parameter of the same name."""
    return "--" + re.sub(r"(?<!^)(?=[A-Z])", "-", parameter).lower()


def _dest(parameter: str) -> str:
    return _flag(parameter)[2:].replace("-", "_")


def add_commands(subparsers: Any) -> None:
    """Add ``bootstrap`` to ``python -m pipelines.run``."""
    parser = subparsers.add_parser(
        "bootstrap",
        help="create or update the project's AWS side: one CloudFormation stack (bucket, roles, model group, "
        "CodeBuild, CodePipeline)",
        description="Create or update the project's CloudFormation stack through a change set: show what it will "
        "change, follow the stack's events, then print its outputs and the next command. Run it again at any "
        "time: with nothing changed it reports 'no changes' and changes nothing.",
    )
    group = parser.add_argument_group("template parameters (on an existing stack, a flag left out keeps its value)")
    for name, spec in stack_template.skeleton()["Parameters"].items():
        default = f"default: {spec['Default']!r}" if "Default" in spec else "needed to create the stack"
        group.add_argument(_flag(name), dest=_dest(name), default=None, help=f"{spec.get('Description')} ({default})")
    parser.add_argument(
        "--stack-name", default=None, help=f"the stack's name (default: <project-name>{STACK_NAME_SUFFIX})"
    )
    _add_aws_arguments(parser)
    add_tag_argument(parser, "tag for the stack and every resource in it, repeatable (default: none)")
    parser.add_argument(
        "--no-execute",
        dest="execute",
        action="store_false",
        default=True,
        help="make and show the change set, but leave it for review instead of executing it",
    )
    parser.add_argument(
        "--print-template",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="write the complete template (YAML) to PATH or standard output and stop: for deploying with your own "
        "tooling (offline: no AWS call)",
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=5.0, help="seconds between looks at the stack (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout-seconds",
        type=float,
        default=3600.0,
        help="stop following the stack after this long; it goes on (default: %(default)s)",
    )
    parser.set_defaults(func=cmd_bootstrap)


# --- checking the input ----------------------------------------------------------------------------------------


def _likely_mistake(parameter: str, value: str) -> str | None:
    """A clearer message for the mistakes people make most with these values."""
    if parameter == "Repository":
        match = re.match(r"^(?:https?://[^/]+/|git@[^:]+:|ssh://[^/]+/)(?P<path>.+?)(?:\.git)?/?$", value)
        if match:
            return f"give the repository as owner/name ({match['path']}), not its URL"
        if value.endswith(".git"):
            return f"give the repository as owner/name ({value[:-4]}), without .git"
    if parameter == "Branch" and value.startswith("refs/"):
        return f"give the branch name ({value.removeprefix('refs/heads/')}), not the ref {value}"
    if parameter == "ConnectionArn" and not value.startswith("arn:"):
        return (
            "give the connection's full ARN (arn:aws:codeconnections:<region>:<account>:connection/<id>), as the "
            f"console lists it under Developer Tools > Settings > Connections ({CONNECTIONS_CONSOLE})"
        )
    return None


def check_parameter(parameter: str, spec: Mapping[str, Any], value: str) -> None:
    """The template's own constraints on a parameter, checked here so that a bad value fails before any change.

    Raises:
        CommandError: naming the flag, the value and what it should be.
    """
    flag = _flag(parameter)
    mistake = _likely_mistake(parameter, value)
    if mistake:
        raise CommandError(f"{flag} {value!r}: {mistake}")
    what = spec.get("ConstraintDescription") or spec.get("Description", "")
    if spec.get("Type") == "Number":
        try:
            number = float(value)
        except ValueError:
            raise CommandError(f"{flag} {value!r}: give a number") from None
        low, high = spec.get("MinValue"), spec.get("MaxValue")
        if (low is not None and number < float(low)) or (high is not None and number > float(high)):
            raise CommandError(f"{flag} {value!r}: give a number from {low} to {high}")
        return
    low, high = spec.get("MinLength"), spec.get("MaxLength")
    if (low is not None and len(value) < int(low)) or (high is not None and len(value) > int(high)):
        raise CommandError(f"{flag} {value!r}: {len(value)} characters; give {low or 0}-{high} ({what})")
    pattern = spec.get("AllowedPattern")
    if pattern and not re.fullmatch(pattern, value):
        raise CommandError(f"{flag} {value!r}: give {what}")
    if spec.get("AllowedValues") and value not in spec["AllowedValues"]:
        raise CommandError(f"{flag} {value!r}: give one of {', '.join(map(str, spec['AllowedValues']))}")


def parameter_values(
    args: argparse.Namespace, template: Mapping[str, Any], current: Mapping[str, str] | None, stack: str = "the stack"
) -> dict[str, str]:
    """Each template parameter's value: the flag, else the stack's current value, else the template's default.

    Raises:
        CommandError: a value breaks the template's constraints, or one with no default is missing.
    """
    values: dict[str, str] = {}
    for name, spec in template["Parameters"].items():
        given = getattr(args, _dest(name), None)
        if given is not None:
            value = str(given)
        elif current and name in current:
            value = current[name]
        elif "Default" in spec:
            value = str(spec["Default"])
        else:
            raise CommandError(f"{_flag(name)} is needed to create {stack}: {spec.get('Description')}")
        check_parameter(name, spec, value)
        if name == "UpsertArguments" and value:
            check_upsert_arguments(value)
        values[name] = value
    return values


def check_connection(session: Any, connection_arn: str, region: str, repository: str) -> str:
    """The connection exists, is in the stack's region, has finished its handshake, and fits the repository.

    Returns:
        The provider (GitHub, GitLab, Bitbucket, ...).
    Raises:
        CommandError: saying what is wrong and what to do.
    """
    from botocore.exceptions import ClientError

    service, arn_region = connection_arn.split(":")[2], connection_arn.split(":")[3]
    if arn_region != region:
        raise CommandError(
            f"--connection-arn is a connection in {arn_region}, but the stack goes to {region}: a pipeline can use "
            f"connections of its own region only; create one in {region} or pass --region {arn_region}"
        )
    try:
        connection = session.client(service).get_connection(ConnectionArn=connection_arn)["Connection"]
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code == "ResourceNotFoundException":
            raise CommandError(
                f"connection {connection_arn} does not exist in this account: copy its ARN from {CONNECTIONS_CONSOLE}"
                f"?region={region}, or create a connection there (GitHub, GitLab or Bitbucket)"
            ) from error
        raise
    status, provider = connection.get("ConnectionStatus"), str(connection.get("ProviderType", ""))
    if status != "AVAILABLE":
        raise CommandError(
            f"connection {connection.get('ConnectionName', connection_arn)} is {status}, not AVAILABLE: finish its "
            f"handshake with {provider or 'the provider'} in {CONNECTIONS_CONSOLE}?region={region} "
            "(Update pending connection), then run bootstrap again"
        )
    if provider in OWNER_SLASH_NAME_PROVIDERS and repository.count("/") != 1:
        raise CommandError(f"--repository {repository!r}: {provider} repositories are owner/name, one slash")
    return provider


def _owned(name: str, in_stack: set[str]) -> bool:
    """Whether a physical ID of the stack is that name, or an ARN ending in it (SageMaker's are lower case)."""
    return any(physical == name or physical.lower().endswith("/" + name.lower()) for physical in in_stack)


def names_taken_outside(session: Any, names: Mapping[str, str], in_stack: set[str]) -> tuple[list[str], list[str]]:
    """Named resources the stack would create that exist already and are not the stack's own (``in_stack``: the
    stack's physical resource IDs).

    Returns:
        (model package groups the stack can take over, other resources that block it, as messages).
    """
    from botocore.exceptions import ClientError

    adoptable, blocking = [], []
    group = names["ModelPackageGroupName"]
    if not _owned(group, in_stack):
        try:
            session.client("sagemaker").describe_model_package_group(ModelPackageGroupName=group)
            adoptable.append(group)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("ValidationException", "ResourceNotFound"):
                raise
    project = names["CodeBuildProjectName"]
    if not _owned(project, in_stack) and session.client("codebuild").batch_get_projects(names=[project])["projects"]:
        blocking.append(
            f"a CodeBuild project named {project} (delete it: aws codebuild delete-project --name {project})"
        )
    pipeline = names["CodePipelineName"]
    if not _owned(pipeline, in_stack):
        try:
            session.client("codepipeline").get_pipeline(name=pipeline)
            blocking.append(
                f"a CodePipeline named {pipeline} (delete it: aws codepipeline delete-pipeline --name {pipeline})"
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "PipelineNotFoundException":
                raise
    return adoptable, blocking


def check_upsert_arguments(value: str) -> argparse.Namespace:
    """The extra upsert flags parse as ``upsert`` flags and leave alone the ones the buildspec sets from the stack;
    returns them parsed.

    Raises:
        CommandError: naming the flags that are wrong and why.
    """
    import contextlib
    import io
    import shlex

    from pipelines.run import build_parser

    try:
        words = shlex.split(value)
    except ValueError as error:
        raise CommandError(f"--upsert-arguments {value!r}: {error}") from error
    parser = build_parser()
    upsert = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["upsert"]
    repeatable = {
        flag
        for action in upsert._actions
        if isinstance(action, argparse._AppendAction)
        for flag in action.option_strings
    }
    taken = sorted(({word.split("=", 1)[0] for word in words} & buildspec_upsert_flags()) - repeatable)
    if taken:
        raise CommandError(
            f"--upsert-arguments {value!r}: the build sets {', '.join(taken)} from the stack already; leave them out"
        )
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            return parser.parse_args(["upsert", *words])
    except SystemExit:
        reason = messages.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise CommandError(f"--upsert-arguments {value!r}: upsert says: {reason}") from None


def upsert_mlflow_tracking_arn(upsert_arguments: str | None) -> str | None:
    """The ``--mlflow-tracking-arn`` that the stack's UpsertArguments give the build's upsert (parsed as upsert
    parses it), or None: the stack's roles get the MLflow statements only with it."""
    if not upsert_arguments:
        return None
    return getattr(check_upsert_arguments(upsert_arguments), "mlflow_tracking_arn", None)


def _rendered_template_text(upsert_arguments: str | None) -> str:
    """The stack's template for these UpsertArguments (raises CommandError for a bad MLflow ARN)."""
    try:
        template = stack_template.render_template(mlflow_tracking_arn=upsert_mlflow_tracking_arn(upsert_arguments))
    except stack_template.TemplateError:
        raise
    except ValueError as error:
        raise CommandError(f"--upsert-arguments: {error}") from error
    return stack_template.template_text(template)


def buildspec_upsert_flags() -> set[str]:
    """The flags the buildspec's ``upsert`` line passes itself."""
    import yaml

    spec = yaml.safe_load((stack_template.PROJECT_ROOT / "buildspec.yml").read_text(encoding="utf-8"))
    commands = [command for phase in spec["phases"].values() for command in phase.get("commands", [])]
    upsert = next(command for command in commands if "pipelines.run upsert" in command)
    return set(re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", upsert))


# --- the command -----------------------------------------------------------------------------------------------


def _write_template(path: str, upsert_arguments: str | None = None) -> None:
    text = _rendered_template_text(upsert_arguments)
    if path == "-":
        sys.stdout.write(text)
        return
    try:
        target = fsutil.write_output(Path(path), text)  # never a half-written template, never through a link
    except fsutil.OutputPathError as error:
        raise CommandError(f"--print-template: {error}") from error
    print(f"wrote {target} ({len(text)} bytes)", file=sys.stderr)


def _session(args: argparse.Namespace) -> tuple[Any, str]:
    return make_boto_session(args), resolve_region(args)


def _stack_resources(cloudformation_client: Any, stack_name: str) -> set[str]:
    physical: set[str] = set()
    for page in cloudformation_client.get_paginator("list_stack_resources").paginate(StackName=stack_name):
        physical.update(item.get("PhysicalResourceId", "") for item in page.get("StackResourceSummaries", []))
    return physical


@_aws_errors
def cmd_bootstrap(args: argparse.Namespace) -> int:
    """Check the input, create or update the stack through a change set, print outputs and next steps."""
    if args.print_template is not None:
        _write_template(args.print_template, args.upsert_arguments)
        return 0
    try:
        return _bootstrap(args)
    except cloudformation.StackError as error:
        raise CommandError(str(error)) from error
    except stack_template.TemplateError as error:
        raise CommandError(f"the template cannot be completed: {error}") from error


def _bootstrap(args: argparse.Namespace) -> int:
    skeleton = stack_template.skeleton()
    project_given = args.project_name or str(skeleton["Parameters"]["ProjectName"]["Default"])
    stack_name = args.stack_name or f"{project_given}{STACK_NAME_SUFFIX}"
    session, region = _session(args)
    cloudformation_client = session.client("cloudformation")
    stack = cloudformation.describe_stack(cloudformation_client, stack_name)
    cloudformation.change_set_type(stack, region)  # a stack that cannot be updated stops here, before any check
    current = {p["ParameterKey"]: p["ParameterValue"] for p in (stack or {}).get("Parameters", [])}
    creating = f"stack {stack_name} (there is none of that name in {region}; to update another, pass its --stack-name)"
    values = parameter_values(args, skeleton, current, stack=creating)
    provider = check_connection(session, values["ConnectionArn"], region, values["Repository"])
    in_stack = _stack_resources(cloudformation_client, stack_name) if stack else set()
    adoptable, blocking = names_taken_outside(session, stack_template.names_for(values["ProjectName"]), in_stack)
    if blocking:
        raise CommandError(
            f"stack {stack_name} would create resources whose names are taken: {'; '.join(blocking)}; "
            "or pass another --project-name. Nothing was changed"
        )
    for group in adoptable:
        print(
            f"model package group {group} exists outside the stack (an earlier upsert makes one): the stack takes it "
            "over, versions and all"
        )
    body = _rendered_template_text(values.get("UpsertArguments"))
    if len(body.encode()) > MAX_TEMPLATE_BODY_BYTES:
        raise CommandError(
            f"the template is {len(body.encode())} bytes, over CloudFormation's {MAX_TEMPLATE_BODY_BYTES} for an "
            "inline template: deploy it from S3 with your own tooling (--print-template)"
        )
    print(f"stack {stack_name} in {region}: {values['Repository']}@{values['Branch']} through {provider}")
    request = cloudformation.StackRequest(
        stack_name=stack_name,
        template_body=body,
        parameters=values,
        tags=dict(args.tags),
        import_existing_resources=bool(adoptable),
    )
    result = cloudformation.deploy(
        cloudformation_client,
        request,
        region=region,
        execute=args.execute,
        poll_seconds=args.poll_seconds,
        timeout_seconds=args.timeout_seconds,
    )
    _report(result, values, region)
    return 0


def _report(result: cloudformation.Deployment, values: Mapping[str, str], region: str) -> None:
    if result.action.startswith("change set created"):
        print(
            f"the change set is left for review: execute it with `aws cloudformation execute-change-set "
            f"--change-set-name {result.change_set_id}`, or delete it with `aws cloudformation delete-change-set "
            f"--change-set-name {result.change_set_id}`"
            + (
                f" and the empty stack it made with `{cloudformation.delete_command(result.stack_name, region)}`"
                if result.kind == "CREATE"
                else ""
            )
        )
        return
    print(f"stack {result.stack_name}: {result.action} ({result.status})")
    outputs = result.outputs
    if outputs:
        print("outputs:")
        width = max(len(key) for key in outputs)
        for key, value in outputs.items():
            print(f"  {key:<{width}}  {value}")
    print(next_steps(outputs, values, region))


def next_steps(outputs: Mapping[str, str], values: Mapping[str, str], region: str) -> str:
    """What to run next: the build (a push, or start it now), and the pipeline commands with the stack's values."""
    code_pipeline = outputs.get("CodePipelineName", values["ProjectName"])
    environment = {
        config.ENV_REGION: region,
        config.ENV_ROLE_ARN: outputs.get("PipelineExecutionRoleArn", "<PipelineExecutionRoleArn>"),
        config.ENV_BUCKET: outputs.get("ArtifactBucketName", "<ArtifactBucketName>"),
        config.ENV_DEPLOY_ROLE_ARN: outputs.get("DeployFunctionRoleArn", "<DeployFunctionRoleArn>"),
    }
    flags = {
        "--pipeline-name": "SageMakerPipelineName",
        "--model-package-group": "ModelPackageGroupName",
        "--base-job-prefix": "JobPrefix",
        "--deploy-function-name": "DeployFunctionName",
        "--deploy-rule-name": "DeployRuleName",
    }
    upsert = " ".join(f"{flag} {outputs[key]}" for flag, key in flags.items() if key in outputs)
    if values.get("UpsertArguments"):
        upsert += " " + values["UpsertArguments"]
    return "\n".join(
        [
            "next:",
            f"  push to {values['Branch']} of {values['Repository']}, or run the build now:",
            f"    aws codepipeline start-pipeline-execution --name {code_pipeline} --region {region}",
            "  or run the pipeline commands from here with the stack's roles and bucket:",
            "    export " + " ".join(f"{key}={value}" for key, value in environment.items()),
            f"    python -m pipelines.run upsert {upsert}",
        ]
    )
