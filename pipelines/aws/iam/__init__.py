"""The SageMaker pipeline execution role's least-privilege IAM documents.

The role passed as ``--role`` / ``$SAGEMAKER_PIPELINE_ROLE_ARN`` to ``python -m pipelines.run upsert`` is the one
the pipeline service and every job it starts run as: processing, tuning (and its trial training jobs), the
final training (checkpoints, TensorBoard, Debugger rules and profiler), and the model registration.
``pipeline_role_policy.json`` (next to this file) is its permissions template (with ``lambda:InvokeFunction`` on
the one deploy function, for the pipeline's Deploy step); :func:`render_pipeline_role_policy`
fills in account, region, bucket and names, keeps the KMS / VPC / extra-input statements only when they are
asked for, and names the container image repositories of the region (the AWS Deep Learning Containers
registry is a different account in each region, so the template holds no account ID).

``python -m pipelines.run iam pipeline-policy`` prints the rendered policy, ``python -m pipelines.run iam
pipeline-trust-policy`` the trust policy (sagemaker.amazonaws.com only). docs/iam.md shows how to create the role
with both.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines import config
from pipelines.definition.names import LAMBDA_FUNCTION_NAME, partition_for_region

POLICY_TEMPLATE = "pipeline_role_policy.json"
TRUST_POLICY = "pipeline_role_trust_policy.json"
DEFAULT_ROLE_NAME = f"{config.BASE_JOB_PREFIX}-sagemaker-pipeline"

# Statements kept only when the matching option is given (see render_pipeline_role_policy).
KMS_SID_PREFIX = "Kms"
VPC_SID_PREFIX = "Vpc"
EXTRA_INPUTS_SID_PREFIX = "ReadExtraInputs"
DEPLOY_STEP_SID_PREFIX = "InvokeTheDeployFunction"
# Added only with an MLflow tracking server (--mlflow-tracking-arn): the jobs' MLflow calls on that server alone.
MLFLOW_SID = "TrackRunsOnTheMlflowTrackingServer"
MLFLOW_ARN = re.compile(r"arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:\d{12}:(mlflow-tracking-server|mlflow-app)/[a-zA-Z0-9-]+")
MLFLOW_JOB_ACTIONS = ("sagemaker-mlflow:*",)  # the jobs' MLflow client: experiments, runs, metrics, artifacts
# An MLflow app's REST API is also gated by this SageMaker action (the plugin signs an app's requests for the
# service "sagemaker"): granted on the app alone, and only for an app's ARN.
MLFLOW_APP_ACTION = "sagemaker:CallMlflowAppApi"
# The statements that say "Resource": "*", each because AWS offers no resource-level permission for its actions:
#   ecr:GetAuthorizationToken   - the registry login token is account-wide, it names no repository;
#   cloudwatch:PutMetricData    - metrics have no ARN; the statement pins the cloudwatch:namespace instead;
#   ec2:Describe* (VPC jobs)    - EC2's Describe calls support no resource-level permission;
#   ec2:DeleteNetworkInterfacePermission - takes a permission ID, not an interface, so it has no ARN to name.
STATEMENTS_NEEDING_ANY_RESOURCE = {
    "AnyResourceEcrGetAuthorizationTokenHasNoResourceLevelPermission": ("ecr:GetAuthorizationToken",),
    "AnyResourceCloudWatchPutMetricDataHasNoResourceLevelPermissionSoTheNamespaceIsPinned": (
        "cloudwatch:PutMetricData",
    ),
    "VpcAnyResourceDescribeCallsAndDeleteNetworkInterfacePermissionHaveNoResourceLevelPermission": (
        "ec2:DescribeNetworkInterfaces",
        "ec2:DescribeVpcs",
        "ec2:DescribeDhcpOptions",
        "ec2:DescribeSubnets",
        "ec2:DescribeSecurityGroups",
        "ec2:DeleteNetworkInterfacePermission",
    ),
}

# SageMaker names (pipelines, job prefixes): letters, digits and single hyphens, so no IAM wildcard sneaks in.
_SAGEMAKER_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*")
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_ROLE_ARN = re.compile(r"arn:aws(-cn|-us-gov)?:iam::\d{12}:role/[\w+=,.@/-]+")
_KMS_KEY_ARN = re.compile(r"arn:aws(-cn|-us-gov)?:kms:[a-z0-9-]+:\d{12}:key/[a-zA-Z0-9-]+")
_ECR_IMAGE = re.compile(
    r"(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?/(?P<repo>[^:@]+)"
)


def pipeline_image_uris(
    region: str,
    serving_image: str = config.SERVING_IMAGE,
    serving_image_uri: str | None = None,
    serving_instance_type: str = config.SERVING_INSTANCE_TYPE,
) -> list[str]:
    """The container images the pipeline's jobs and its registered model run in this region, found the way
    pipelines/pipeline.py finds them: the PyTorch training image (processing and training), the serving image
    (the registered model: the Ray Serve image, or the legacy PyTorch one) and the Debugger rule image (the Train
    step's rule and profiler jobs). The role is also the model's execution role, which pulls the serving image."""
    from sagemaker.debugger import get_rule_container_image_uri

    from pipelines import images
    from pipelines.pipeline import framework_image_uri

    training = framework_image_uri(region, "training", config.PROCESSING_INSTANCE_TYPE)
    serving = images.serving_image_uri(region, serving_instance_type, serving_image, serving_image_uri)
    return [training, serving, get_rule_container_image_uri("ProfilerReport", region)]


def ecr_repository_arn(image_uri: str, partition: str) -> str:
    """``<account>.dkr.ecr.<region>.amazonaws.com/<repo>:<tag>`` -> the repository's ARN."""
    match = _ECR_IMAGE.match(image_uri)
    if match is None:
        raise ValueError(f"{image_uri!r} is not an ECR image URI (<account>.dkr.ecr.<region>.amazonaws.com/<repo>)")
    return f"arn:{partition}:ecr:{match['region']}:{match['account']}:repository/{match['repo']}"


def _s3_parts(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"extra input {uri!r} is not an s3:// URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not _BUCKET_NAME.fullmatch(bucket) or "*" in key or "?" in key:
        raise ValueError(f"extra input {uri!r}: give s3://<bucket>/<prefix> without wildcards")
    return bucket, key


def _check_name(value: str, what: str) -> None:
    if not _SAGEMAKER_NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} may hold only letters, digits and hyphens (a SageMaker name)")


def _check_key_and_network(kms_key: str | None, subnets: Sequence[str], security_group_ids: Sequence[str]) -> None:
    """The KMS key and VPC settings as IAM can name them: a key ARN, subnet and security group IDs (both or
    neither)."""
    if kms_key is not None and not _KMS_KEY_ARN.fullmatch(kms_key):
        raise ValueError(
            f"KMS key {kms_key!r} is not a key ARN (arn:aws:kms:<region>:<account>:key/<id>): "
            "IAM policies name keys by ARN, not by ID or alias"
        )
    if bool(subnets) != bool(security_group_ids):
        raise ValueError("VPC settings need both subnets and security groups (or neither)")
    for subnet in subnets:
        if not re.fullmatch(r"subnet-[0-9a-f]+", subnet):
            raise ValueError(f"{subnet!r} is not a subnet ID (subnet-...)")
    for group in security_group_ids:
        if not re.fullmatch(r"sg-[0-9a-f]+", group):
            raise ValueError(f"{group!r} is not a security group ID (sg-...)")


def render_pipeline_role_policy(
    *,
    region: str,
    account_id: str,
    bucket: str,
    pipeline_name: str = config.PIPELINE_NAME,
    model_package_group: str = config.MODEL_PACKAGE_GROUP,
    base_job_prefix: str = config.BASE_JOB_PREFIX,
    deploy_function_name: str | None = config.DEPLOY_FUNCTION_NAME,
    role: str | None = None,
    role_name: str = DEFAULT_ROLE_NAME,
    kms_key: str | None = None,
    subnets: Sequence[str] = (),
    security_group_ids: Sequence[str] = (),
    extra_input_s3_uris: Sequence[str] = (),
    image_uris: Sequence[str] | None = None,
    partition: str | None = None,
    serving_image: str = config.SERVING_IMAGE,
    serving_image_uri: str | None = None,
    serving_instance_type: str = config.SERVING_INSTANCE_TYPE,
    mlflow_tracking_arn: str | None = None,
) -> dict[str, Any]:
    """The pipeline execution role's least-privilege policy: pipeline_role_policy.json filled in.

    Args:
        region / account_id: where the pipeline runs.
        bucket: the artifact bucket; the role reads and writes ``s3://<bucket>/<pipeline_name>/`` only.
        pipeline_name / model_package_group / base_job_prefix: as given to ``upsert`` (defaults from config).
        deploy_function_name: the deploy Lambda the Deploy step invokes (``upsert --deploy-function-name``); None
            for a pipeline built without the Deploy step (``--skip-deploy-wiring``).
        role: the role's own ARN (for iam:PassRole on itself); default ``role/<role_name>`` in the account.
        kms_key: the KMS key given to ``upsert --kms-key``, as its ARN (keeps the Kms* statements).
        subnets / security_group_ids: the VPC settings given to ``upsert`` (keep the Vpc* statements).
        extra_input_s3_uris: s3:// prefixes outside the pipeline's prefix that jobs read (an ``InputDataUri``,
            ``--weights-uri`` or ``--serving-wheels-uri`` elsewhere); read-only, one statement set each.
        image_uris: the container images to allow pulling (default: :func:`pipeline_image_uris` of the region).
        partition: the ARN partition (default: the region's).
        serving_image / serving_image_uri / serving_instance_type: as given to ``upsert`` (its --serving-* flags).
        mlflow_tracking_arn: the SageMaker MLflow tracking server (or app) given to ``upsert
            --mlflow-tracking-arn``: adds ``sagemaker-mlflow:*`` on that ARN alone (default: no such statement).

    Raises:
        ValueError: naming the bad argument.
    """
    if not (account_id.isdigit() and len(account_id) == 12):
        raise ValueError(f"account ID {account_id!r} is not 12 digits")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise ValueError(f"bucket {bucket!r} is not an S3 bucket name (give the name, not an s3:// URI)")
    _check_name(pipeline_name, "pipeline name")
    _check_name(model_package_group, "model package group")
    _check_name(base_job_prefix, "job prefix")
    if deploy_function_name is not None and not LAMBDA_FUNCTION_NAME.fullmatch(deploy_function_name):
        raise ValueError(f"deploy function name {deploy_function_name!r} may hold only letters, digits, - and _")
    partition = partition or partition_for_region(region)
    role = role or f"arn:{partition}:iam::{account_id}:role/{role_name}"
    if not _ROLE_ARN.fullmatch(role):
        raise ValueError(f"role {role!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    _check_key_and_network(kms_key, subnets, security_group_ids)
    images = (
        list(image_uris)
        if image_uris is not None
        else pipeline_image_uris(region, serving_image, serving_image_uri, serving_instance_type)
    )
    ec2_arn = f"arn:{partition}:ec2:{region}:{account_id}"
    scalars = {
        "${AWS::Partition}": partition,
        "${AWS::Region}": region,
        "${AWS::AccountId}": account_id,
        "${ArtifactBucket}": bucket,
        "${PipelineName}": pipeline_name,  # S3 keys keep the name's case
        # SageMaker writes resource names in lower case in its ARNs.
        "${PipelineArnName}": pipeline_name.lower(),
        "${ModelPackageGroupName}": model_package_group.lower(),
        "${JobPrefix}": base_job_prefix.lower(),
        "${DeployFunctionName}": deploy_function_name or "",
        "${PipelineRoleArn}": role,
        "${KmsKeyArn}": kms_key or "",
    }
    lists = {  # placeholders that stand for a list: a list item that is exactly one becomes the list's items
        "${EcrRepositoryArns}": sorted({ecr_repository_arn(image, partition) for image in images}),
        "${SubnetArns}": [f"{ec2_arn}:subnet/{subnet}" for subnet in subnets],
        "${SecurityGroupArns}": [f"{ec2_arn}:security-group/{group}" for group in security_group_ids],
    }

    def fill(value: Any, extra: Mapping[str, str]) -> Any:
        if isinstance(value, str):
            for placeholder, text in {**scalars, **extra}.items():
                value = value.replace(placeholder, text)
            return value
        if isinstance(value, Mapping):
            return {key: fill(item, extra) for key, item in value.items()}
        if isinstance(value, list):
            items = []
            for item in value:
                items.extend(lists[item] if item in lists else [fill(item, extra)])
            return items
        return value

    template = json.loads(_read(POLICY_TEMPLATE))
    statements = []
    for statement in template["Statement"]:
        sid = statement["Sid"]
        if sid.startswith(KMS_SID_PREFIX) and kms_key is None:
            continue
        if sid.startswith(VPC_SID_PREFIX) and not subnets:
            continue
        if sid.startswith(DEPLOY_STEP_SID_PREFIX) and deploy_function_name is None:
            continue
        if sid.startswith(EXTRA_INPUTS_SID_PREFIX):
            for number, uri in enumerate(extra_input_s3_uris, start=1):
                input_bucket, prefix = _s3_parts(uri)
                extra = {
                    "${ExtraInputObjectArn}": f"arn:{partition}:s3:::{input_bucket}/{prefix}*",
                    "${ExtraInputBucketArn}": f"arn:{partition}:s3:::{input_bucket}",
                    "${ExtraInputPrefix}": prefix,
                }
                statements.append({**fill(statement, extra), "Sid": f"{sid}{number}"})
            continue
        statements.append(fill(statement, {}))
    if mlflow_tracking_arn is not None:
        statements.append(mlflow_statement(mlflow_tracking_arn))
    policy = {"Version": template["Version"], "Statement": statements}
    check_placeholders_filled(policy, "the pipeline role policy")
    return policy


def mlflow_statement(
    tracking_arn: str, actions: Sequence[str] = MLFLOW_JOB_ACTIONS, sid: str = MLFLOW_SID
) -> dict[str, Any]:
    """The one statement that lets a role use a SageMaker MLflow tracking server or app: ``actions`` on that ARN
    alone (plus the app's own gate for an app). The pipeline role, the deploy function's role and the bootstrap
    stack's roles all take it from here.

    Raises:
        ValueError: the ARN is not a tracking server's or an app's (a wildcard included).
    """
    if not MLFLOW_ARN.fullmatch(tracking_arn):
        raise ValueError(
            f"MLflow tracking ARN {tracking_arn!r} is not a SageMaker MLflow tracking server or app ARN "
            "(arn:aws:sagemaker:<region>:<account>:mlflow-tracking-server/<name>)"
        )
    app = ":mlflow-app/" in tracking_arn
    return {
        "Sid": sid,
        "Effect": "Allow",
        "Action": [*actions, *([MLFLOW_APP_ACTION] if app else [])],
        "Resource": [tracking_arn],
    }


def _read(name: str) -> str:
    return (importlib.resources.files("pipelines.aws.iam") / name).read_text(encoding="utf-8")


def check_placeholders_filled(policy: Mapping[str, Any], what: str) -> None:
    """Raise ValueError naming every ``${...}`` placeholder a rendered policy still holds."""
    leftover = [text for text in _strings(policy) if "${" in text]
    if leftover:
        raise ValueError(f"unfilled placeholders in {what}: {leftover}")


def resolve_region_and_account(region: str | None, account_id: str | None) -> tuple[str, str]:
    """The region (argument, else the AWS configuration's) and account ID (argument, else the caller's, from STS).

    Raises:
        ValueError: when no region is given or configured.
    """
    if region is not None and account_id is not None:
        return region, account_id
    import boto3

    session = boto3.session.Session(region_name=region)
    region = region or session.region_name
    if region is None:
        raise ValueError(f"no AWS region: pass --region or set {config.ENV_REGION}")
    return region, account_id or session.client("sts").get_caller_identity()["Account"]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return []


def pipeline_role_policy_template() -> dict[str, Any]:
    """The unrendered template (placeholders and all)."""
    return json.loads(_read(POLICY_TEMPLATE))


def pipeline_role_trust_policy() -> dict[str, Any]:
    """The role's trust policy: only SageMaker may assume it."""
    return json.loads(_read(TRUST_POLICY))
