"""Print the SageMaker pipeline execution role's IAM documents.

python -m pipelines.iam pipeline-policy --account-id 123456789012 --region eu-west-1 --bucket my-bucket
python -m pipelines.iam trust-policy
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipelines import config, images
from pipelines.iam import (
    DEFAULT_ROLE_NAME,
    pipeline_role_trust_policy,
    render_pipeline_role_policy,
    resolve_region_and_account,
)


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.iam",
        description="Print the IAM documents of the role the SageMaker pipeline and its jobs run as.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    policy = commands.add_parser("pipeline-policy", help="the role's least-privilege permissions policy (JSON)")
    policy.add_argument("--account-id", default=None, help="AWS account ID (default: the caller's, from STS)")
    policy.add_argument(
        "--region", default=os.environ.get(config.ENV_REGION), help=f"AWS region (default: ${config.ENV_REGION})"
    )
    policy.add_argument(
        "--bucket",
        default=os.environ.get(config.ENV_BUCKET),
        help=f"artifact bucket name (default: ${config.ENV_BUCKET})",
    )
    policy.add_argument(
        "--pipeline-name", default=config.PIPELINE_NAME, help="pipeline name, its S3 prefix (default: %(default)s)"
    )
    policy.add_argument(
        "--model-package-group",
        default=config.MODEL_PACKAGE_GROUP,
        help="model package group the pipeline registers into (default: %(default)s)",
    )
    policy.add_argument(
        "--job-prefix", default=config.BASE_JOB_PREFIX, help="prefix of every job name (default: %(default)s)"
    )
    policy.add_argument(
        "--deploy-function-name",
        default=config.DEPLOY_FUNCTION_NAME,
        help="the deploy Lambda the pipeline's Deploy step invokes, as given to upsert (default: %(default)s)",
    )
    policy.add_argument(
        "--skip-deploy-wiring",
        action="store_true",
        help="the pipeline was upserted with --skip-deploy-wiring (no Deploy step): no lambda:InvokeFunction",
    )
    policy.add_argument(
        "--role-arn",
        default=os.environ.get(config.ENV_ROLE_ARN),
        help=f"the role's own ARN, for iam:PassRole on itself (default: ${config.ENV_ROLE_ARN}, "
        "else role/<--role-name> in the account)",
    )
    policy.add_argument(
        "--role-name", default=DEFAULT_ROLE_NAME, help="the role's name when no ARN is given (default: %(default)s)"
    )
    policy.add_argument(
        "--kms-key-arn", default=None, help="KMS key ARN given to upsert --kms-key (default: no KMS statements)"
    )
    policy.add_argument(
        "--subnets", type=_csv, default=[], help="comma-separated subnet IDs of VPC jobs (default: no VPC statements)"
    )
    policy.add_argument(
        "--security-group-ids",
        type=_csv,
        default=[],
        help="comma-separated security group IDs of VPC jobs (default: no VPC statements)",
    )
    policy.add_argument(
        "--extra-input-s3-uri",
        action="append",
        default=[],
        help="an s3:// prefix outside s3://<bucket>/<pipeline>/ that jobs read, e.g. an InputDataUri or "
        "--weights-uri elsewhere; repeat for more (default: none)",
    )
    policy.add_argument(
        "--serving-image",
        choices=images.SERVING_IMAGES,
        default=config.SERVING_IMAGE,
        help="the serving image given to upsert (default: %(default)s)",
    )
    policy.add_argument("--serving-image-uri", default=None, help="the --serving-image-uri given to upsert")
    policy.add_argument("--output", default=None, help="write the policy to this file (default: standard output)")
    commands.add_parser("trust-policy", help="the role's trust policy (only sagemaker.amazonaws.com may assume it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "trust-policy":
        print(json.dumps(pipeline_role_trust_policy(), indent=2))
        return 0
    if not args.bucket:
        print(f"error: pass --bucket or set {config.ENV_BUCKET}", file=sys.stderr)
        return 2
    try:
        region, account_id = resolve_region_and_account(args.region, args.account_id)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        policy = render_pipeline_role_policy(
            region=region,
            account_id=account_id,
            bucket=args.bucket,
            pipeline_name=args.pipeline_name,
            model_package_group=args.model_package_group,
            job_prefix=args.job_prefix,
            deploy_function_name=None if args.skip_deploy_wiring else args.deploy_function_name,
            role_arn=args.role_arn,
            role_name=args.role_name,
            kms_key_arn=args.kms_key_arn,
            subnets=args.subnets,
            security_group_ids=args.security_group_ids,
            extra_input_s3_uris=args.extra_input_s3_uri,
            serving_image=args.serving_image,
            serving_image_uri=args.serving_image_uri,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(policy, indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
