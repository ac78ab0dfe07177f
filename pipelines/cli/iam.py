"""``python -m pipelines.run iam <document>``: the IAM documents of the project's two roles, for people who make
the roles themselves (``bootstrap`` makes them with the same policies).

    python -m pipelines.run iam pipeline-policy --bucket my-bucket [--region eu-west-1] [--account-id ...]
    python -m pipelines.run iam pipeline-trust-policy
    python -m pipelines.run iam deploy-policy [--min-capacity 1 --max-capacity 4] [--rollback-alarm-names a,b]
    python -m pipelines.run iam deploy-trust-policy

Each policy takes the flags, under the same names, that ``upsert`` takes for what the policy has to allow, so the
role is rendered for exactly the pipeline and the deployment that ``upsert`` makes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines import config, images, sdk
from pipelines.aws import deploy_infra
from pipelines.aws.iam import (
    DEFAULT_ROLE_NAME,
    pipeline_role_trust_policy,
    render_pipeline_role_policy,
    resolve_region_and_account,
)
from pipelines.cli.sagemaker import _comma_list
from pipelines.util import fsutil
from pipelines.util.errors import CommandError


def add_commands(subparsers: Any) -> None:
    """Add ``iam`` and its documents to ``python -m pipelines.run``."""
    parser = subparsers.add_parser(
        "iam",
        help="print the IAM policies of the pipeline's role and the deploy function's role (JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    documents = parser.add_subparsers(dest="document", required=True, metavar="<document>")
    _add_pipeline_policy(documents)
    documents.add_parser(
        "pipeline-trust-policy", help="the pipeline role's trust policy (only sagemaker.amazonaws.com may assume it)"
    ).set_defaults(func=cmd_pipeline_trust_policy)
    _add_deploy_policy(documents)
    documents.add_parser(
        "deploy-trust-policy", help="the deploy function role's trust policy (only lambda.amazonaws.com)"
    ).set_defaults(func=cmd_deploy_trust_policy)


def _add_account_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--account-id", default=None, help="AWS account ID (default: the caller's, from STS)")
    parser.add_argument(
        "--region", default=os.environ.get(config.ENV_REGION), help=f"AWS region (default: ${config.ENV_REGION})"
    )
    parser.add_argument("--output", default=None, help="write the policy to this file (default: standard output)")


def _add_pipeline_policy(documents: Any) -> None:
    policy = documents.add_parser(
        "pipeline-policy", help="the pipeline role's least-privilege permissions policy (JSON)"
    )
    _add_account_arguments(policy)
    plain_flags = {  # flag: (default, help)
        "--bucket": (os.environ.get(config.ENV_BUCKET), f"artifact bucket name (default: ${config.ENV_BUCKET})"),
        "--pipeline-name": (config.PIPELINE_NAME, "pipeline name, its S3 prefix (default: %(default)s)"),
        "--model-package-group": (
            config.MODEL_PACKAGE_GROUP,
            "model package group the pipeline registers into (default: %(default)s)",
        ),
        "--base-job-prefix": (config.BASE_JOB_PREFIX, "prefix of every job name (default: %(default)s)"),
        "--deploy-function-name": (
            config.DEPLOY_FUNCTION_NAME,
            "the deploy Lambda the pipeline's Deploy step invokes, as given to upsert (default: %(default)s)",
        ),
        "--role": (
            os.environ.get(config.ENV_ROLE_ARN),
            f"the role's own ARN, for iam:PassRole on itself (default: ${config.ENV_ROLE_ARN}, else "
            "role/<--role-name> in the account)",
        ),
        "--role-name": (DEFAULT_ROLE_NAME, "the role's name when no ARN is given (default: %(default)s)"),
        "--kms-key": (
            None,
            "the KMS key given to upsert --kms-key, as its ARN: IAM names keys by ARN (default: no KMS statements)",
        ),
        "--mlflow-tracking-arn": (
            None,
            "the SageMaker MLflow tracking server ARN given to upsert: sagemaker-mlflow:* on it (default: none)",
        ),
    }
    for flag, (default, help_text) in plain_flags.items():
        policy.add_argument(flag, default=default, help=help_text)
    policy.add_argument(
        "--skip-deploy-wiring",
        action="store_true",
        help="the pipeline was upserted with --skip-deploy-wiring (no Deploy step): no lambda:InvokeFunction",
    )
    for flag, what in (("--subnets", "subnet IDs"), ("--security-group-ids", "security group IDs")):
        policy.add_argument(
            flag, type=_comma_list, default=(), help=f"comma-separated {what} of VPC jobs (default: no VPC statements)"
        )
    policy.add_argument(
        "--extra-input-s3-uri",
        action="append",
        default=[],
        help="an s3:// prefix outside s3://<bucket>/<pipeline>/ that jobs read, e.g. an InputDataUri, "
        "--weights-uri or --serving-wheels-uri elsewhere; repeat for more (default: none)",
    )
    images.add_serving_arguments(policy)  # the serving image the model's role pulls, as upsert picks it
    policy.set_defaults(func=cmd_pipeline_policy)


def _add_deploy_policy(documents: Any) -> None:
    policy = documents.add_parser(
        "deploy-policy",
        help="the deploy function role's least-privilege permissions policy (JSON)",
        description="The deploy function's policy for the endpoint settings given: with --min-capacity and "
        "--max-capacity it may register autoscaling, with --rollback-alarm-names it may read those alarms.",
    )
    _add_account_arguments(policy)
    policy.add_argument(
        "--role",
        default=os.environ.get(config.ENV_ROLE_ARN),
        help=f"the SageMaker execution role the deployed model runs under, as given to upsert "
        f"(default: ${config.ENV_ROLE_ARN})",
    )
    policy.add_argument(
        "--model-package-group",
        default=config.MODEL_PACKAGE_GROUP,
        help="model package group deployed (default: %(default)s)",
    )
    policy.add_argument(
        "--deploy-function-name",
        default=config.DEPLOY_FUNCTION_NAME,
        help="name of the deploy Lambda (its log group) (default: %(default)s)",
    )
    policy.add_argument(
        "--mlflow-tracking-arn",
        default=None,
        help="the SageMaker MLflow tracking server ARN given to upsert: the function may tag the registered "
        "model's run on it (default: none)",
    )
    deploy_infra.add_endpoint_arguments(policy.add_argument_group("the endpoint settings given to upsert"))
    policy.set_defaults(func=cmd_deploy_policy)


def _print_policy(args: argparse.Namespace, render: Callable[..., dict[str, Any]], **values: Any) -> int:
    """``render(region=, account_id=, **values)`` for the region and account (flags, else the AWS configuration
    and STS), printed or written to ``--output``; a bad value becomes a CommandError that names it."""
    if args.output:
        _checked_output(args.output)  # before any AWS call: a wrong path costs nothing
    try:
        region, account_id = _region_and_account(args)
        policy = render(region=region, account_id=account_id, **values)
    except ValueError as error:
        raise CommandError(str(error)) from error
    return _print_document(policy, args.output)


def _region_and_account(args: argparse.Namespace) -> tuple[str, str]:
    """The region and account; without --account-id, the credentials' (STS), or one line saying what to pass."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return resolve_region_and_account(args.region, args.account_id)
    except (BotoCoreError, ClientError) as error:
        raise CommandError(f"cannot ask AWS for the account ID ({error}): pass --account-id") from error


def _checked_output(output: str) -> Path:
    try:
        return fsutil.check_output_path(Path(output))
    except fsutil.OutputPathError as error:
        raise CommandError(f"--output: {error}") from error


def _print_document(document: dict[str, Any], output: str | None = None) -> int:
    text = json.dumps(document, indent=2)
    if not output:
        print(text)
        return 0
    try:
        target = fsutil.write_output(Path(output), text + "\n")  # never half-written, never through a link
    except fsutil.OutputPathError as error:
        raise CommandError(f"--output: {error}") from error
    print(f"wrote {target}", file=sys.stderr)
    return 0


def cmd_pipeline_policy(args: argparse.Namespace) -> int:
    if not args.bucket:
        raise CommandError(f"pass --bucket or set {config.ENV_BUCKET}")
    sdk.quiet()  # the image URIs come from the SageMaker SDK's tables
    if args.output:
        _checked_output(args.output)  # before the serving image is checked, as before any AWS call
    try:
        serving = images.serving_options(args)
    except ValueError as error:
        raise CommandError(str(error)) from error
    return _print_policy(
        args,
        render_pipeline_role_policy,
        bucket=args.bucket,
        pipeline_name=args.pipeline_name,
        model_package_group=args.model_package_group,
        base_job_prefix=args.base_job_prefix,
        deploy_function_name=None if args.skip_deploy_wiring else args.deploy_function_name,
        role=args.role,
        role_name=args.role_name,
        kms_key=args.kms_key,
        subnets=args.subnets,
        security_group_ids=args.security_group_ids,
        extra_input_s3_uris=args.extra_input_s3_uri,
        mlflow_tracking_arn=args.mlflow_tracking_arn,
        **serving,
    )


def cmd_pipeline_trust_policy(args: argparse.Namespace) -> int:
    return _print_document(pipeline_role_trust_policy())


def cmd_deploy_policy(args: argparse.Namespace) -> int:
    """The policy for the endpoint settings given, checked as upsert checks them."""
    if not args.role:
        raise CommandError(f"pass --role or set {config.ENV_ROLE_ARN}: the deployed model's execution role")
    _, settings = deploy_infra.settings_from_args(args, args.model_package_group, args.role)
    return _print_policy(
        args,
        deploy_infra.render_deploy_policy,
        execution_role_arn=settings.execution_role_arn,
        model_package_group=settings.model_package_group,
        endpoint_name=settings.endpoint_name or None,
        function_name=args.deploy_function_name,
        resource_name_prefix=settings.resource_name_prefix,
        autoscaling=settings.autoscaling,
        rollback_alarm_names=settings.rollback_alarm_names,
        mlflow_tracking_arn=args.mlflow_tracking_arn,
    )


def cmd_deploy_trust_policy(args: argparse.Namespace) -> int:
    return _print_document(deploy_infra.trust_policy())
