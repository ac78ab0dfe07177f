"""Commands that work with SageMaker: definition, upsert, start, status, models, approve, reject.

``python -m pipelines.run <command> --help`` shows each one's flags. Region, role and bucket come from flags or
the environment (``AWS_REGION``, ``SAGEMAKER_PIPELINE_ROLE_ARN``, ``ARTIFACT_BUCKET``). The SageMaker SDK and
boto3 are imported inside the commands, so ``python -m pipelines.run local`` starts without them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from entrypoints.contract import accuracy_from_report
from pipelines import config, images, sdk, validation
from pipelines.cli import backend
from pipelines.definition import hyperparameters, names
from pipelines.local.runs import format_step
from pipelines.util import fsutil
from pipelines.util.errors import CommandError

TERMINAL_EXECUTION_STATUSES = ("Succeeded", "Failed", "Stopped")
DEFAULT_POLL_SECONDS = 30
DEFAULT_WAIT_TIMEOUT_SECONDS = 48 * 3600
DEFAULT_TAGS = {"Project": "image-classification-pipeline"}


# --- argument plumbing ----------------------------------------------------------------------------------------


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _key_value(text: str) -> tuple[str, str]:
    name, separator, value = text.partition("=")
    if not separator or not name.strip():
        raise argparse.ArgumentTypeError(f"expected Name=Value, got {text!r}")
    return name.strip(), value


def _hyperparameter(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value read as JSON where it parses (0.01, 64, false), else as text (resnet34)."""
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (for example lr=0.01), got {text!r}")
    return key.strip().lstrip("-"), hyperparameters.decode_hyperparameter(value.strip())


def add_shape_arguments(parser: argparse.ArgumentParser, preset_help: str) -> None:
    """Flags that shape the definition and that ``definition``, ``upsert`` and ``local`` share, so that the three
    build the same definition from the same flags."""
    from pipelines.aws import deploy_infra

    parser.add_argument("--preset", choices=config.PRESETS, default=None, help=preset_help)
    parser.add_argument(
        "--hp",
        dest="hyperparameters",
        type=_hyperparameter,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fix a hyperparameter of entrypoints/train.py for every job, repeatable (a tuned one leaves the "
        "search), e.g. --hp lr=0.01; Architecture and the epochs are pipeline parameters (--param)",
    )
    parser.add_argument(
        "--no-debugger",
        dest="debugger",
        action="store_false",
        default=True,
        help="leave out SageMaker Debugger rules, hook and profiler (default: on)",
    )
    parser.add_argument(
        "--torch-distributed",
        action="store_true",
        help="run the final Train step under SageMaker's torch_distributed launcher (torchrun, one process per GPU) "
        "on TrainingInstanceCount instances, a parameter this adds (--param TrainingInstanceCount=2); tuning "
        "trials stay on one instance; that step then has no Debugger hook",
    )
    parser.add_argument(
        "--no-int8",
        dest="int8_serving",
        action="store_false",
        default=True,
        help="register fp32 only: Evaluate builds no int8 network (default: int8 is built, scored beside fp32 on the "
        "test split and served when within a point of it; always off for GPU serving)",
    )
    deploy_infra.add_deploy_step_arguments(parser)


def add_param_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--param Name=Value`` (repeatable): a run's parameter values, for `start` and `local` alike; checked
    against the definition by :func:`pipelines.validation.parameter_overrides`."""
    parser.add_argument(
        "--param", dest="params", type=_key_value, action="append", default=[], metavar="NAME=VALUE", help=help_text
    )


def options_from_args(args: argparse.Namespace, preset: str, **changes: Any) -> Any:
    """The PipelineOptions of the shape flags (see add_shape_arguments) and ``changes``; bad values become a
    CommandError."""
    from pipelines.pipeline import preset_options

    try:
        options = preset_options(
            preset,
            debugger=args.debugger,
            torch_distributed=args.torch_distributed,
            int8_serving=args.int8_serving,
            deploy_step=not args.skip_deploy_wiring,
            deploy_function_name=args.deploy_function_name,
            **changes,
        ).with_hyperparameters(dict(args.hyperparameters))
        options.validate()
    except ValueError as error:
        raise CommandError(str(error)) from error
    return options


def _add_aws_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--region", default=None, help=f"AWS region (default: ${config.ENV_REGION}, then $AWS_DEFAULT_REGION)"
    )
    parser.add_argument("--profile", default=None, help="AWS named profile for credentials (default: boto3's chain)")


def _add_pipeline_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline-name", default=config.PIPELINE_NAME, help="the SageMaker pipeline's name (default: %(default)s)"
    )


def add_tag_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--tag KEY=VALUE``, repeatable, into ``args.tags``."""
    parser.add_argument(
        "--tag", dest="tags", type=_key_value, action="append", default=[], metavar="KEY=VALUE", help=help
    )


def add_hidden_alias(parser: argparse.ArgumentParser, alias: str, dest: str, **kwargs: Any) -> None:
    """An older name of a flag, kept working but out of ``--help``: it fills ``dest`` as the flag does."""
    parser.add_argument(alias, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def add_model_package_group_argument(
    parser: argparse.ArgumentParser, help_text: str, dest: str = "model_package_group"
) -> None:
    """``--model-package-group`` (the one name of the group on every command; ``--group`` still works), checked
    against SageMaker's pattern for the name, since it also names local folders."""
    group_name = names.name_argument("model package group")
    parser.add_argument(
        "--model-package-group", dest=dest, type=group_name, default=config.MODEL_PACKAGE_GROUP, help=help_text
    )
    add_hidden_alias(parser, "--group", dest, type=group_name)


def _add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that shape the definition (the same for `definition` and `upsert`, so both build the same one)."""
    _add_aws_arguments(parser)
    _add_pipeline_name(parser)
    add_model_package_group_argument(parser, "model package group the pipeline registers into (default: %(default)s)")
    parser.add_argument(
        "--role", default=None, help=f"IAM role ARN the pipeline and its jobs run as (default: ${config.ENV_ROLE_ARN})"
    )
    parser.add_argument(
        "--bucket", default=None, help=f"S3 bucket for code, data and artifacts (default: ${config.ENV_BUCKET})"
    )
    parser.add_argument(
        "--base-job-prefix", default=config.BASE_JOB_PREFIX, help="prefix of every job's name (default: %(default)s)"
    )
    parser.add_argument(
        "--input-data-uri",
        default=None,
        help="default of the InputDataUri parameter (default: s3://<bucket>/<pipeline-name>/input/)",
    )
    parser.add_argument(
        "--training-instance-type",
        default=None,
        help="default of TrainingInstanceType; also picks the CPU or GPU training image (default: the preset's, "
        f"{config.TRAINING_INSTANCE_TYPE} or with --preset demo {config.DEMO_TRAINING_INSTANCE_TYPE})",
    )
    parser.add_argument(
        "--processing-instance-type",
        default=None,
        help=f"default of ProcessingInstanceType (default: {config.PROCESSING_INSTANCE_TYPE})",
    )
    add_shape_arguments(
        parser,
        "builder options: 'default' (the production pipeline) or 'demo' (a small CNN from random weights on small "
        "images, config.DEMO_*: the local demo, or a cheap smoke test of the cloud setup) (default: default)",
    )
    parser.add_argument(
        "--tuning-strategy",
        choices=config.TUNING_STRATEGIES,
        default=config.TUNING_STRATEGY,
        help="hyperparameter search strategy (default: %(default)s)",
    )
    parser.add_argument(
        "--warm-start-parent",
        default=None,
        help="name of a finished tuning job to warm-start the search from (default: none)",
    )
    parser.add_argument(
        "--use-spot-instances",
        action="store_true",
        default=False,
        help="managed spot training for trials and the final training",
    )
    add_hidden_alias(parser, "--spot", "use_spot_instances", action="store_true")
    parser.add_argument(
        "--kms-key", default=None, help="KMS key for job volumes, outputs and uploaded code (default: S3/EBS defaults)"
    )
    parser.add_argument(
        "--subnets", type=_comma_list, default=(), help="comma-separated VPC subnet ids for every job (default: none)"
    )
    parser.add_argument(
        "--security-group-ids",
        type=_comma_list,
        default=(),
        help="comma-separated security group ids for every job (default: none; needs --subnets)",
    )
    add_hidden_alias(parser, "--security-groups", "security_group_ids", type=_comma_list)
    parser.add_argument(
        "--serving-wheels-uri",
        default=None,
        help="s3:// prefix of a serving wheelhouse (python -m pipelines.run wheelhouse): ONNX Runtime for the "
        "evaluation job and, for int8, inside the registered artifact; with --mlflow-tracking-arn also the MLflow "
        "client, which the jobs then install from it with no package index (default: none: int8 needs onnxruntime "
        "in the evaluation image, an image without it serves fp32, and the jobs install MLflow from PyPI)",
    )
    parser.add_argument(
        "--network-isolation",
        action="store_true",
        default=False,
        help="no network access inside the jobs' containers (needs --weights-uri for pretrained weights)",
    )
    parser.add_argument(
        "--weights-uri",
        default=None,
        help="s3:// URI of a torchvision state_dict .pth given to training as the 'weights' channel (default: none)",
    )
    parser.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        default=True,
        help=f"turn step caching off (default: cache expensive steps for {config.CACHE_EXPIRE_AFTER})",
    )
    parser.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        default=True,
        help="skip checking the definition against SageMaker's API shapes (default: check, and stop on problems)",
    )
    parser.add_argument(
        "--mlflow-tracking-arn",
        default=None,
        help="track the Tune, Train and Evaluate jobs in this SageMaker MLflow tracking server or app (its ARN): "
        "sets MLFLOW_TRACKING_URI and the experiment (the pipeline's name) in exactly those jobs; the pipeline "
        "role needs sagemaker-mlflow:* on it (iam pipeline-policy --mlflow-tracking-arn), and the deploy function, "
        "which tags the registered version's run, its own statement (iam deploy-policy --mlflow-tracking-arn) "
        "(default: no tracking)",
    )
    images.add_serving_arguments(parser)


def add_commands(subparsers: Any) -> None:
    """Add definition, upsert, start, status, models, approve and reject to ``python -m pipelines.run``."""
    formatter = argparse.ArgumentDefaultsHelpFormatter

    parser = subparsers.add_parser(
        "definition",
        help="write the pipeline's JSON definition (offline: no AWS account or network needed)",
        description="Build the pipeline and write its JSON definition to a file or stdout. Makes no AWS call: "
        "code objects are only named (by content hash), not uploaded; `upsert` uploads them.",
    )
    _add_build_arguments(parser)
    parser.add_argument("--output", "-o", default="-", help="file to write, or - for stdout (default: -)")
    parser.set_defaults(func=cmd_definition)

    parser = subparsers.add_parser(
        "upsert",
        help="create or update the pipeline (and the deploy-on-approval Lambda and rule)",
        description="Check the definition, create the model package group if missing, upload the code, create or "
        "update the pipeline with tags, then create or update the deploy Lambda and its EventBridge rule.",
    )
    _add_build_arguments(parser)
    add_tag_argument(parser, f"tag for the pipeline and the model package group, repeatable (always: {DEFAULT_TAGS})")
    parser.add_argument(
        "--description", default=None, help="pipeline description (default: one naming the DAG and the group)"
    )
    _add_deploy_trigger_arguments(parser)
    parser.set_defaults(func=cmd_upsert)

    parser = subparsers.add_parser(
        "start",
        help="start an execution, optionally waiting for it and following its steps",
        description="Start an execution of the pipeline and print its ARN on stdout. With --wait, follow the "
        "steps' statuses on stderr and exit 0 if it succeeds, 1 if it fails or stops.",
    )
    _add_aws_arguments(parser)
    _add_pipeline_name(parser)
    add_param_argument(parser, "override a pipeline parameter, repeatable, e.g. --param MaxTuningJobs=4")
    parser.add_argument("--display-name", default=None, help="execution display name (default: none)")
    parser.add_argument("--wait", action="store_true", default=False, help="wait for the execution to finish")
    parser.add_argument(
        "--poll-seconds", type=float, default=DEFAULT_POLL_SECONDS, help="seconds between polls (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout-seconds",
        type=float,
        default=DEFAULT_WAIT_TIMEOUT_SECONDS,
        help="stop waiting after this long; the execution goes on (default: %(default)s)",
    )
    parser.set_defaults(func=cmd_start)

    parser = subparsers.add_parser(
        "status",
        help="show an execution's steps with their status and failure reasons",
        formatter_class=formatter,
    )
    _add_aws_arguments(parser)
    _add_pipeline_name(parser)
    parser.add_argument("--execution-arn", default=None, help="the execution (default: the pipeline's latest)")
    backend.add_backend_arguments(parser, "the local runs'")
    parser.set_defaults(func=cmd_status)

    parser = subparsers.add_parser(
        "models",
        help="list the group's model packages with accuracy and approval status",
        formatter_class=formatter,
    )
    _add_aws_arguments(parser)
    add_model_package_group_argument(parser, "model package group")
    parser.add_argument("--max", type=int, default=20, help="show at most this many packages, newest first")
    parser.add_argument("--json", action="store_true", default=False, help="print JSON instead of a table")
    backend.add_backend_arguments(parser, "the local registry's")
    parser.set_defaults(func=cmd_models)

    for name, status in (("approve", "Approved"), ("reject", "Rejected")):
        parser = subparsers.add_parser(
            name,
            help=f"mark a model package {status}" + (" (this triggers the deployment)" if status == "Approved" else ""),
            formatter_class=formatter,
        )
        _add_aws_arguments(parser)
        add_model_package_group_argument(parser, "model package group (for a version number or 'latest')")
        parser.add_argument("model_package", help="the package: its ARN, its version number in the group, or 'latest'")
        parser.add_argument("--description", default=None, help="approval description recorded with the change")
        backend.add_backend_arguments(parser, "the local registry's")
        if status == "Approved":
            backend.add_local_deploy_arguments(parser)
        parser.set_defaults(func=cmd_set_approval, approval_status=status)


def _add_deploy_trigger_arguments(parser: argparse.ArgumentParser) -> None:
    """The deploy wiring's flags; --no-deploy-trigger is an older name of --skip-deploy-wiring."""
    from pipelines.aws import deploy_infra

    deploy_infra.add_deploy_arguments(parser, with_step_arguments=False)
    add_hidden_alias(parser, "--no-deploy-trigger", "skip_deploy_wiring", action="store_true")


# --- settings from flags and environment ----------------------------------------------------------------------


def _from_flag_or_env(value: str | None, env_name: str, flag: str, what: str) -> str:
    resolved = value or os.environ.get(env_name)
    if not resolved:
        raise CommandError(f"no {what}: pass {flag} or set {env_name}")
    return resolved


def resolve_region(args: argparse.Namespace) -> str:
    region = args.region or os.environ.get(config.ENV_REGION) or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise CommandError(f"no AWS region: pass --region or set {config.ENV_REGION}")
    return region


def resolve_role(args: argparse.Namespace) -> str:
    role = _from_flag_or_env(args.role, config.ENV_ROLE_ARN, "--role", "IAM role for the pipeline")
    if not role.startswith("arn:"):
        raise CommandError(f"--role / {config.ENV_ROLE_ARN} must be an IAM role ARN (arn:aws:iam::...), got {role!r}")
    return role


def resolve_bucket(args: argparse.Namespace) -> str:
    bucket = _from_flag_or_env(args.bucket, config.ENV_BUCKET, "--bucket", "S3 bucket for artifacts")
    if bucket.startswith("s3://") or "/" in bucket:
        raise CommandError(f"--bucket / {config.ENV_BUCKET} takes a bucket name (no s3://, no folder), got {bucket!r}")
    return bucket


def make_boto_session(args: argparse.Namespace) -> Any:
    import boto3

    return boto3.Session(region_name=resolve_region(args), profile_name=getattr(args, "profile", None))


def pipeline_options(args: argparse.Namespace) -> Any:
    from pipelines.aws.iam import MLFLOW_ARN

    if args.mlflow_tracking_arn is not None and not MLFLOW_ARN.fullmatch(args.mlflow_tracking_arn):
        raise CommandError(
            f"--mlflow-tracking-arn {args.mlflow_tracking_arn!r} is not a SageMaker MLflow tracking server or app ARN "
            "(arn:aws:sagemaker:<region>:<account>:mlflow-tracking-server/<name>)"
        )
    instance_types = {
        name: value
        for name, value in (
            ("training_instance_type", args.training_instance_type),
            ("processing_instance_type", args.processing_instance_type),
        )
        if value is not None
    }
    return options_from_args(
        args,
        args.preset or "default",
        pipeline_name=args.pipeline_name,
        model_package_group=args.model_package_group,
        base_job_prefix=args.base_job_prefix,
        tuning_strategy=args.tuning_strategy,
        warm_start_parent=args.warm_start_parent,
        use_spot_instances=args.use_spot_instances,
        kms_key=args.kms_key,
        subnets=tuple(args.subnets),
        security_group_ids=tuple(args.security_group_ids),
        network_isolation=args.network_isolation,
        weights_uri=args.weights_uri,
        serving_wheels_uri=args.serving_wheels_uri,
        input_data_uri=args.input_data_uri,
        cache_expire_after=config.CACHE_EXPIRE_AFTER if args.cache else None,
        mlflow_tracking_uri=args.mlflow_tracking_arn,
        **images.serving_options(args),
        **instance_types,
    )


def build_from_args(args: argparse.Namespace, boto_session: Any, offline: bool) -> tuple[Any, str]:
    """The Pipeline and its definition JSON, checked unless --no-check. Raises CommandError on problems."""
    sdk.quiet()
    from sagemaker.workflow.pipeline_context import PipelineSession

    from pipelines.definition.check import check_definition
    from pipelines.pipeline import get_pipeline

    role, bucket = resolve_role(args), resolve_bucket(args)
    session = PipelineSession(boto_session=boto_session, default_bucket=bucket)
    options = pipeline_options(args)
    with sdk.telemetry_off():  # offline or not: its sender's errors would bury the command's own
        try:
            pipeline = get_pipeline(session, role=role, bucket=bucket, options=options)
        except (ValueError, FileNotFoundError) as error:
            raise CommandError(str(error)) from error
        definition = pipeline.definition()
    if args.check:
        parsed = json.loads(definition)
        problems = check_definition(parsed)
        values = validation.parameter_values(parsed, [])
        problems += validation.run_problems(parsed, values, dict(args.hyperparameters), local=False)
        if problems:
            for problem in problems:
                print(f"definition problem: {problem}", file=sys.stderr)
            raise CommandError(f"the definition has {len(problems)} problem(s) (listed above); nothing was changed")
    return pipeline, definition


def _aws_errors(function: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn AWS client errors (no credentials, access denied, not found...) into one-line CommandErrors."""

    def wrapper(args: argparse.Namespace) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return function(args)
        except ClientError as error:
            details = error.response.get("Error", {})
            who = "the local SageMaker" if getattr(args, "local", False) else "AWS"
            raise CommandError(
                f"{who} refused {error.operation_name}: {details.get('Code')}: {details.get('Message')}"
            ) from error
        except BotoCoreError as error:
            raise CommandError(f"AWS call failed: {error}") from error
        except OSError as error:  # the local backend's workdir: a full disk, no permission
            if not getattr(args, "local", False):
                raise
            from pipelines.cli import backend

            raise CommandError(backend.disk_error_line(error, args.workdir)) from error

    wrapper.__name__ = function.__name__
    wrapper.__doc__ = function.__doc__
    return wrapper


# --- definition / upsert --------------------------------------------------------------------------------------


@_aws_errors
def cmd_definition(args: argparse.Namespace) -> int:
    """Write the definition; no AWS call (code objects are named by content hash, not uploaded)."""
    require_build_values(args)
    if args.output != "-":
        _checked_output(args.output)  # before the build: a wrong path costs no time
    _, definition = build_from_args(args, make_boto_session(args), offline=True)
    text = json.dumps(json.loads(definition), indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        try:
            path = fsutil.write_output(Path(args.output), text)  # whole or not at all, never through a link
        except fsutil.OutputPathError as error:
            raise CommandError(f"--output: {error}") from error
        print(f"wrote {path} ({len(text)} bytes)", file=sys.stderr)
    return 0


def _checked_output(output: str) -> Path:
    try:
        return fsutil.check_output_path(Path(output))
    except fsutil.OutputPathError as error:
        raise CommandError(f"--output: {error}") from error


def require_build_values(args: argparse.Namespace) -> None:
    """Every value the build needs from the account (region, role, bucket), all named in one refusal.

    The definition names the role and bucket, so it is refused rather than written with stand-ins: a file that
    looks deployable but names an account that is not the user's would fail far from its cause.
    """
    region = args.region or os.environ.get(config.ENV_REGION) or os.environ.get("AWS_DEFAULT_REGION")
    wanted = (
        (region, f"the AWS region (--region or {config.ENV_REGION})"),
        (
            args.role or os.environ.get(config.ENV_ROLE_ARN),
            f"the pipeline's IAM role ARN (--role or {config.ENV_ROLE_ARN})",
        ),
        (args.bucket or os.environ.get(config.ENV_BUCKET), f"the S3 bucket (--bucket or {config.ENV_BUCKET})"),
    )
    missing = [what for value, what in wanted if not value]
    if missing:
        raise CommandError(f"{len(missing)} value(s) missing: {'; '.join(missing)}; nothing was done")


def _tags(args: argparse.Namespace) -> list[dict[str, str]]:
    tags = {**DEFAULT_TAGS, "PipelineName": args.pipeline_name, **dict(args.tags)}
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def ensure_model_package_group(sagemaker_client: Any, name: str, tags: list[dict[str, str]]) -> str:
    """Create the model package group if it does not exist. Returns "created" or "exists"."""
    from botocore.exceptions import ClientError

    try:
        sagemaker_client.describe_model_package_group(ModelPackageGroupName=name)
        return "exists"
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("ValidationException", "ResourceNotFound"):
            raise
    sagemaker_client.create_model_package_group(
        ModelPackageGroupName=name,
        ModelPackageGroupDescription="Image classifiers registered by the image-classification pipeline",
        Tags=tags,
    )
    return "created"


def _pipeline_exists(sagemaker_client: Any, name: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        sagemaker_client.describe_pipeline(PipelineName=name)
        return True
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("ValidationException", "ResourceNotFound"):
            return False
        raise


@_aws_errors
def cmd_upsert(args: argparse.Namespace) -> int:
    """Create or update the pipeline, its model package group, its code objects and the deploy trigger."""
    from pipelines.packaging import upload_code_artifacts
    from pipelines.pipeline import pipeline_code

    require_build_values(args)
    boto_session = make_boto_session(args)
    pipeline, _ = build_from_args(args, boto_session, offline=False)
    bucket, role, tags = resolve_bucket(args), resolve_role(args), _tags(args)
    from pipelines.aws import deploy_infra

    if not args.skip_deploy_wiring:
        _check_deploy_settings(deploy_infra, args)  # before anything changes, not halfway through
        _check_role_account(boto_session, role)
    sagemaker_client = boto_session.client("sagemaker")

    group_state = ensure_model_package_group(sagemaker_client, args.model_package_group, tags)
    print(f"model package group {args.model_package_group}: {group_state}")
    artifacts = pipeline_code(bucket, pipeline_options(args))  # exactly what the definition names
    uploaded = upload_code_artifacts(boto_session, artifacts, kms_key=args.kms_key)
    for uri in uploaded:
        print(f"code: {uri}")

    existed = _pipeline_exists(sagemaker_client, args.pipeline_name)
    deploy = "" if args.skip_deploy_wiring else " -> Deploy"
    description = args.description or (
        f"Preprocess -> Tune -> Train -> Evaluate -> CheckAccuracy -> Register into {args.model_package_group}"
        f"{deploy} (image classification, torchvision)"
    )
    with sdk.telemetry_off():
        response = pipeline.upsert(role_arn=role, description=description, tags=tags)
    print(f"pipeline {args.pipeline_name}: {'updated' if existed else 'created'} {response['PipelineArn']}")

    if args.skip_deploy_wiring:
        print("deploy trigger: skipped (--no-deploy-trigger)")
        return 0
    result = deploy_infra.upsert_from_args(args, boto_session, args.model_package_group)
    print("deploy trigger: " + json.dumps(_summarise_deploy(result), default=str))
    return 0


def _check_deploy_settings(deploy_infra: Any, args: argparse.Namespace) -> None:
    """The deploy wiring's own checks of its flags (roles, endpoint settings), run before any change."""
    if not (getattr(args, "deploy_role_arn", None) or os.environ.get(config.ENV_DEPLOY_ROLE_ARN)):
        raise CommandError(
            f"no role for the deploy Lambda: pass --deploy-role-arn or set {config.ENV_DEPLOY_ROLE_ARN} "
            "(docs/iam.md shows how to create it), or pass --skip-deploy-wiring; nothing was changed"
        )
    deploy_infra.settings_from_args(args, args.model_package_group, deploy_infra.execution_role_from_args(args))


def _check_role_account(boto_session: Any, role: str) -> None:
    """The Deploy step invokes the function in the role's account (the definition says so); the credentials'
    account (STS) is where upsert creates it: they must be the same."""
    from pipelines.pipeline import account_of_role

    caller = boto_session.client("sts").get_caller_identity()["Account"]
    if account_of_role(role) != caller:
        raise CommandError(
            f"the role {role} belongs to account {account_of_role(role)}, but these credentials are of account "
            f"{caller}: SageMaker runs a pipeline with a role of its own account, and the Deploy step invokes the "
            "deploy function there; pass a role of this account; nothing was changed"
        )


def _summarise_deploy(result: dict[str, Any]) -> dict[str, Any]:
    summary = {}
    for key, value in result.items():
        if isinstance(value, dict) and "action" in value:
            summary[key] = {k: value[k] for k in ("action", "arn", "name") if k in value}
        elif key != "environment":
            summary[key] = value
    return summary


# --- start / status -------------------------------------------------------------------------------------------


def _pipeline_definition(sagemaker_client: Any, pipeline_name: str, region: str) -> dict[str, Any]:
    from botocore.exceptions import ClientError

    try:
        described = sagemaker_client.describe_pipeline(PipelineName=pipeline_name)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("ValidationException", "ResourceNotFound"):
            raise CommandError(
                f"pipeline {pipeline_name!r} does not exist in {region}: create it with `upsert` first"
            ) from error
        raise
    return json.loads(described.get("PipelineDefinition") or "{}")


def list_execution_steps(sagemaker_client: Any, execution_arn: str) -> list[dict[str, Any]]:
    """The execution's steps, oldest first (ListPipelineExecutionSteps, all pages)."""
    steps: list[dict[str, Any]] = []
    request: dict[str, Any] = {"PipelineExecutionArn": execution_arn, "SortOrder": "Ascending"}
    while True:
        page = sagemaker_client.list_pipeline_execution_steps(**request)
        steps.extend(page.get("PipelineExecutionSteps", []))
        if not page.get("NextToken"):
            return steps
        request["NextToken"] = page["NextToken"]


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def follow_execution(
    sagemaker_client: Any,
    execution_arn: str,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    timeout_seconds: float = DEFAULT_WAIT_TIMEOUT_SECONDS,
    out: TextIO | None = None,
) -> str:
    """Print each step's status as it changes until the execution ends. Returns the final execution status."""
    out = out or sys.stderr
    seen: dict[str, str] = {}
    started = time.monotonic()
    while True:
        status = sagemaker_client.describe_pipeline_execution(PipelineExecutionArn=execution_arn)
        execution_status = status["PipelineExecutionStatus"]
        for step in list_execution_steps(sagemaker_client, execution_arn):
            name, step_status = step.get("StepName", "?"), step.get("StepStatus", "?")
            if seen.get(name) != step_status:
                seen[name] = step_status
                print(f"{datetime.now():%H:%M:%S} {format_step(step)}", file=out, flush=True)
        if execution_status in TERMINAL_EXECUTION_STATUSES:
            print(f"execution {execution_status}: {execution_arn}", file=out, flush=True)
            if status.get("FailureReason"):
                print(f"    reason: {status['FailureReason']}", file=out, flush=True)
            return execution_status
        if time.monotonic() - started > timeout_seconds:
            raise CommandError(
                f"stopped waiting after {timeout_seconds:.0f} s; the execution goes on ({execution_status}): "
                f"see `python -m pipelines.run status --execution-arn {execution_arn}`"
            )
        _sleep(poll_seconds)


@_aws_errors
def cmd_start(args: argparse.Namespace) -> int:
    """Start an execution; print its ARN on stdout; with --wait, exit 0 only if it succeeds."""
    region = resolve_region(args)
    sagemaker_client = make_boto_session(args).client("sagemaker")
    definition = _pipeline_definition(sagemaker_client, args.pipeline_name, region)
    request: dict[str, Any] = {
        "PipelineName": args.pipeline_name,
        "PipelineParameters": validation.parameter_overrides(definition, args.params),
    }
    values = validation.parameter_values(definition, request["PipelineParameters"])
    problems = validation.parameter_problems(definition, values) + validation.script_argument_problems(
        definition, values, {}, local=False
    )
    if problems:
        raise CommandError(f"the run's values are refused, nothing was started: {'; '.join(problems)}")
    if args.display_name:
        request["PipelineExecutionDisplayName"] = args.display_name
    execution_arn = sagemaker_client.start_pipeline_execution(**request)["PipelineExecutionArn"]
    print(execution_arn, flush=True)
    for parameter in request["PipelineParameters"]:
        print(f"  {parameter['Name']} = {parameter['Value']}", file=sys.stderr)
    if not args.wait:
        return 0
    final = follow_execution(sagemaker_client, execution_arn, args.poll_seconds, args.timeout_seconds)
    return 0 if final == "Succeeded" else 1


def _client_and_region(args: argparse.Namespace) -> tuple[Any, str]:
    """SageMaker's client and region, or with --local the workdir's LocalSageMaker and its region."""
    if args.local:
        client = backend.local_client(args)
        return client, client.region
    return make_boto_session(args).client("sagemaker"), resolve_region(args)


def _local_pipeline_runs(local_client: Any, args: argparse.Namespace) -> None:
    from botocore.exceptions import ClientError

    try:
        local_client.describe_pipeline(PipelineName=args.pipeline_name)
    except ClientError as error:
        raise CommandError(
            f"pipeline {args.pipeline_name!r} has no local run in {args.workdir}: start one with "
            f"`python -m pipelines.run local --workdir {args.workdir}`"
        ) from error


def latest_execution_arn(sagemaker_client: Any, pipeline_name: str) -> str:
    executions = sagemaker_client.list_pipeline_executions(
        PipelineName=pipeline_name, SortBy="CreationTime", SortOrder="Descending", MaxResults=1
    ).get("PipelineExecutionSummaries", [])
    if not executions:
        raise CommandError(f"pipeline {pipeline_name!r} has no executions yet: start one with `start`")
    return max(executions, key=lambda summary: summary["StartTime"])["PipelineExecutionArn"]


@_aws_errors
def cmd_status(args: argparse.Namespace) -> int:
    """Print an execution's status and its steps (status, job, failure reason)."""
    sagemaker_client, region = _client_and_region(args)
    if args.execution_arn:
        execution_arn = args.execution_arn
    else:
        if args.local:  # a clear error if it has no run
            _local_pipeline_runs(sagemaker_client, args)
        else:
            _pipeline_definition(sagemaker_client, args.pipeline_name, region)  # a clear error if it does not exist
        execution_arn = latest_execution_arn(sagemaker_client, args.pipeline_name)
    execution = sagemaker_client.describe_pipeline_execution(PipelineExecutionArn=execution_arn)
    print(f"execution {execution_arn}")
    print(f"status    {execution['PipelineExecutionStatus']}")
    if execution.get("CreationTime"):
        print(f"started   {execution['CreationTime']}")
    if execution.get("FailureReason"):
        print(f"reason    {execution['FailureReason']}")
    steps = list_execution_steps(sagemaker_client, execution_arn)
    print("steps:" if steps else "steps:    none started yet")
    for step in steps:
        print(f"  {format_step(step)}")
    return 0


# --- model registry -------------------------------------------------------------------------------------------


def _read_s3_json(s3_client: Any, uri: str) -> dict[str, Any]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return json.loads(body)


def model_package_summaries(session: Any, group: str, limit: int) -> list[dict[str, Any]]:
    """Newest first: version, approval status, accuracy (from the ModelMetrics report), creation time, ARN."""
    s3_client = session.client("s3")
    return package_summaries(session.client("sagemaker"), lambda uri: _read_s3_json(s3_client, uri), group, limit)


def package_summaries(
    sagemaker_client: Any, read_report: Callable[[str], dict[str, Any]], group: str, limit: int
) -> list[dict[str, Any]]:
    """What ``models`` shows, from a SageMaker client (boto3's or the local one) and a reader of report URIs."""
    from botocore.exceptions import ClientError

    request: dict[str, Any] = {"ModelPackageGroupName": group, "SortBy": "CreationTime", "SortOrder": "Descending"}
    packages: list[dict[str, Any]] = []
    while len(packages) < limit:
        page = sagemaker_client.list_model_packages(**request)
        packages.extend(page.get("ModelPackageSummaryList", []))
        if not page.get("NextToken"):
            break
        request["NextToken"] = page["NextToken"]
    rows = []
    for package in packages[:limit]:
        arn = package["ModelPackageArn"]
        described = sagemaker_client.describe_model_package(ModelPackageName=arn)
        metrics_uri = described.get("ModelMetrics", {}).get("ModelQuality", {}).get("Statistics", {}).get("S3Uri")
        accuracy, note = None, ""
        if metrics_uri:
            try:
                accuracy = accuracy_from_report(read_report(metrics_uri))
            except (ClientError, ValueError) as error:
                note = f"metrics unreadable: {error}"
        else:
            note = "no model metrics"
        rows.append(
            {
                "version": described.get("ModelPackageVersion", package.get("ModelPackageVersion")),
                "status": described.get("ModelApprovalStatus", package.get("ModelApprovalStatus")),
                "accuracy": accuracy,
                "created": str(described.get("CreationTime", package.get("CreationTime", ""))),
                "arn": arn,
                "note": note,
            }
        )
    return rows


@_aws_errors
def cmd_models(args: argparse.Namespace) -> int:
    """Print the group's packages: version, approval status, accuracy, created, ARN."""
    if args.local:
        reader = backend.local_report_reader(args.workdir)
        rows = package_summaries(backend.local_client(args), reader, args.model_package_group, args.max)
    else:
        rows = model_package_summaries(make_boto_session(args), args.model_package_group, args.max)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no model packages in {args.model_package_group} yet")
        return 0
    print(f"{'VERSION':>7}  {'STATUS':<22} {'ACCURACY':>8}  {'CREATED':<26} ARN")
    for row in rows:
        accuracy = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "-"
        line = f"{row['version']!s:>7}  {row['status']!s:<22} {accuracy:>8}  {row['created'][:26]:<26} {row['arn']}"
        print(line + (f"  ({row['note']})" if row["note"] else ""))
    return 0


def resolve_model_package(sagemaker_client: Any, group: str, reference: str) -> str:
    """An ARN as is; a version number or 'latest' looked up in the group."""
    if reference.startswith("arn:"):
        return reference
    if reference != "latest" and not reference.isdigit():
        raise CommandError(f"model package {reference!r}: give its ARN, its version number in {group}, or 'latest'")
    request: dict[str, Any] = {"ModelPackageGroupName": group, "SortBy": "CreationTime", "SortOrder": "Descending"}
    while True:
        page = sagemaker_client.list_model_packages(**request)
        summaries = page.get("ModelPackageSummaryList", [])
        if reference == "latest" and summaries:
            return max(summaries, key=lambda s: s.get("ModelPackageVersion", 0))["ModelPackageArn"]
        for summary in summaries:
            if str(summary.get("ModelPackageVersion")) == reference:
                return summary["ModelPackageArn"]
        if not page.get("NextToken"):
            break
        request["NextToken"] = page["NextToken"]
    raise CommandError(f"model package group {group} has no version {reference}: see `models`")


def _tag_mlflow_run(sagemaker_client: Any, arn: str) -> None:
    """The version's MLflow run (named in the package's metadata) learns its new status, on either executor; with
    MLflow missing or the server out of reach, tracking says so in one line and the approval stands."""
    from entrypoints import tracking

    tracking.tag_registered_version(sagemaker_client.describe_model_package(ModelPackageName=arn))


@_aws_errors
def cmd_set_approval(args: argparse.Namespace) -> int:
    """Set a package's approval status (approve / reject); with --local an approval also deploys, as the deploy
    function does on SageMaker when EventBridge sends it the approval."""
    sagemaker_client = backend.local_client(args) if args.local else make_boto_session(args).client("sagemaker")
    arn = resolve_model_package(sagemaker_client, args.model_package_group, args.model_package)
    request = {"ModelPackageArn": arn, "ModelApprovalStatus": args.approval_status}
    if args.description:
        request["ApprovalDescription"] = args.description
    sagemaker_client.update_model_package(**request)
    print(f"{arn}: {args.approval_status}")
    _tag_mlflow_run(sagemaker_client, arn)
    if args.local and args.approval_status == "Approved" and not args.no_deploy:
        backend.deploy_on_approval(args, sagemaker_client, arn)
    return 0
