"""The pipeline execution role's IAM policy (pipelines/aws/iam) against the pipeline definition it has to run."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipelines import config
from pipelines.aws import iam
from pipelines.run import main

ACCOUNT_ID = "123456789012"
OTHER_ACCOUNT_ID = "210987654321"


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    """The default definition and the one with every option, built once (the way tests/test_pipeline.py does)."""
    from test_pipeline import ALL_OPTIONS, BUCKET, REGION, ROLE, _build, offline_aws

    with offline_aws():
        definitions = {"default": _build(), "all_options": _build(**ALL_OPTIONS)}
    return {
        "definitions": definitions,
        "options": ALL_OPTIONS,
        "bucket": BUCKET,
        "region": REGION,
        "role": ROLE,
    }


def render(built: dict[str, Any], *, all_options: bool = False, **overrides: Any) -> dict[str, Any]:
    options = built["options"]
    arguments: dict[str, Any] = {
        "region": built["region"],
        "account_id": ACCOUNT_ID,
        "bucket": built["bucket"],
        "role": built["role"],
    }
    if all_options:
        arguments.update(
            kms_key=options["kms_key"],
            subnets=options["subnets"],
            security_group_ids=options["security_group_ids"],
            extra_input_s3_uris=[options["weights_uri"], options["serving_wheels_uri"]],
        )
    arguments.update(overrides)
    return iam.render_pipeline_role_policy(**arguments)


def _list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def allowed(policy: dict[str, Any], action: str, resource: str) -> bool:
    """Whether some statement allows action on resource (IAM's "*" matches any characters, "/" included)."""
    return any(
        action in _list(statement["Action"])
        and any(fnmatch.fnmatchcase(resource, pattern) for pattern in _list(statement["Resource"]))
        for statement in policy["Statement"]
    )


def _statement(policy: dict[str, Any], action: str) -> dict[str, Any]:
    (found,) = [statement for statement in policy["Statement"] if action in _list(statement["Action"])]
    return found


def _sagemaker_arn(region: str) -> str:
    return f"arn:aws:sagemaker:{region}:{ACCOUNT_ID}"


# --- shape ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("all_options", [False, True])
def test_policy_is_least_privilege(built: dict[str, Any], all_options: bool) -> None:
    policy = render(built, all_options=all_options)
    text = json.dumps(policy)
    assert "${" not in text
    assert json.loads(text) == policy
    # an inline role policy holds at most 10,240 characters (whitespace not counted)
    assert len(json.dumps(policy, separators=(",", ":"))) < 10_240
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert re.fullmatch(r"[A-Za-z0-9]+", statement["Sid"]), statement["Sid"]
        for action in _list(statement["Action"]):
            assert "*" not in action, f"wildcard action {action} in {statement['Sid']}"
        resources = _list(statement["Resource"])
        if "*" in resources:
            # Only the statements of actions with no resource-level permission, each named with its reason.
            assert resources == ["*"]
            assert statement["Sid"] in iam.STATEMENTS_NEEDING_ANY_RESOURCE, statement["Sid"]
            assert sorted(_list(statement["Action"])) == sorted(iam.STATEMENTS_NEEDING_ANY_RESOURCE[statement["Sid"]])
        for resource in resources:
            assert resource == "*" or resource.startswith(("arn:aws:", built["role"])), resource
            # a wildcard may end a name, never stand for a whole account, region or service
            assert ":*:" not in resource and "::*" not in resource, resource
    sids = {statement["Sid"] for statement in policy["Statement"]}
    assert any(sid.startswith(iam.KMS_SID_PREFIX) for sid in sids) == all_options
    assert any(sid.startswith(iam.VPC_SID_PREFIX) for sid in sids) == all_options
    assert any(sid.startswith(iam.EXTRA_INPUTS_SID_PREFIX) for sid in sids) == all_options
    metrics = _statement(policy, "cloudwatch:PutMetricData")
    assert set(metrics["Condition"]["StringEquals"]["cloudwatch:namespace"]) == {
        "/aws/sagemaker/TrainingJobs",
        "/aws/sagemaker/ProcessingJobs",
    }


@pytest.mark.slow
def test_deploy_step_may_invoke_exactly_the_deploy_function(built: dict[str, Any]) -> None:
    (deploy,) = [step for step in _iter_steps(built["definitions"]["default"]) if step["Type"] == "Lambda"]
    function_arn = f"arn:aws:lambda:{built['region']}:{ACCOUNT_ID}:function:{config.DEPLOY_FUNCTION_NAME}"
    assert deploy["FunctionArn"] == function_arn
    policy = render(built)
    invoke = _statement(policy, "lambda:InvokeFunction")
    assert _list(invoke["Action"]) == ["lambda:InvokeFunction"] and _list(invoke["Resource"]) == [function_arn]
    lambda_actions = {a for st in policy["Statement"] for a in _list(st["Action"]) if a.startswith("lambda:")}
    assert lambda_actions == {"lambda:InvokeFunction"}
    for other in (f"{function_arn}-2", function_arn.replace(ACCOUNT_ID, OTHER_ACCOUNT_ID), f"{function_arn}:live"):
        assert not allowed(policy, "lambda:InvokeFunction", other), other
    renamed = render(built, deploy_function_name="team-deploy")
    assert _list(_statement(renamed, "lambda:InvokeFunction")["Resource"]) == [function_arn.replace(
        config.DEPLOY_FUNCTION_NAME, "team-deploy"
    )]  # fmt: skip
    without_step = render(built, deploy_function_name=None)  # upsert --skip-deploy-wiring: no Deploy step
    assert not any(a.startswith("lambda:") for st in without_step["Statement"] for a in _list(st["Action"]))
    with pytest.raises(ValueError, match="deploy function name"):
        render(built, deploy_function_name="deploy*")


def _iter_steps(definition: dict[str, Any]) -> list[dict[str, Any]]:
    from pipelines.definition.check import iter_steps

    return iter_steps(definition)


def test_pass_role_is_this_role_to_sagemaker_only(built: dict[str, Any]) -> None:
    policy = render(built, all_options=True)
    pass_role = _statement(policy, "iam:PassRole")
    assert _list(pass_role["Resource"]) == [built["role"]]
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}
    assert not allowed(policy, "iam:PassRole", f"arn:aws:iam::{ACCOUNT_ID}:role/admin")
    # without an ARN the role is named in the account being rendered
    default_role = _statement(render(built, role=None), "iam:PassRole")
    assert _list(default_role["Resource"]) == [f"arn:aws:iam::{ACCOUNT_ID}:role/{iam.DEFAULT_ROLE_NAME}"]


# --- coverage of what the built pipeline does --------------------------------------------------------------------


def _job_arns(step: dict[str, Any], region: str) -> list[tuple[str, str]]:
    """(resource type, ARN) of the jobs a step starts, named the way SageMaker names them at run time."""
    arguments = step["Arguments"]
    arn = _sagemaker_arn(region)
    if step["Type"] == "Processing":
        return [("processing-job", f"{arn}:processing-job/{arguments['ProcessingJobName'].lower()}-a1b2c3d4e5")]
    if step["Type"] == "Training":
        job = f"{arguments['TrainingJobName'].lower()}-a1b2c3d4e5"
        arns = [("training-job", f"{arn}:training-job/{job}")]
        for rule in arguments.get("DebugRuleConfigurations", []) + arguments.get("ProfilerRuleConfigurations", []):
            # Debugger runs each rule as a processing job named after the training job
            arns.append(("processing-job", f"{arn}:processing-job/{job}-{rule['RuleConfigurationName'].lower()}-1a2b"))
        return arns
    if step["Type"] == "Tuning":
        tuning = f"{arguments['HyperParameterTuningJobName'].lower()}-a1b2c3d4e5"
        return [
            ("hyper-parameter-tuning-job", f"{arn}:hyper-parameter-tuning-job/{tuning}"),
            ("training-job", f"{arn}:training-job/{tuning}-001-0a1b2c3d"),  # the trials
        ]
    raise AssertionError(f"no job ARN known for a {step['Type']} step")


@pytest.mark.parametrize("variant", ["default", "all_options"])
def test_every_sagemaker_call_of_the_built_pipeline_is_allowed(built: dict[str, Any], variant: str) -> None:
    from pipelines.definition.check import STEP_API_OPERATIONS, iter_steps

    definition = built["definitions"][variant]
    policy = render(built, all_options=variant == "all_options")
    steps = iter_steps(definition)
    # a new kind of step must come with its permissions (and this test learns its ARN)
    assert {step["Type"] for step in steps} <= {*STEP_API_OPERATIONS, "Condition", "Fail", "Lambda"}
    job_actions = {
        "processing-job": ("CreateProcessingJob", "DescribeProcessingJob", "StopProcessingJob", "AddTags"),
        "training-job": ("CreateTrainingJob", "DescribeTrainingJob", "StopTrainingJob", "AddTags"),
        "hyper-parameter-tuning-job": (
            "CreateHyperParameterTuningJob",
            "DescribeHyperParameterTuningJob",
            "StopHyperParameterTuningJob",
            "ListTrainingJobsForHyperParameterTuningJob",
            "AddTags",
        ),
    }
    seen_creates = set()
    arn = _sagemaker_arn(built["region"])
    group = next(p for p in definition["Parameters"] if p["Name"] == "ModelPackageGroupName")["DefaultValue"]
    for step in steps:
        if step["Type"] == "Lambda":  # the Deploy step invokes the deploy function, and nothing else
            assert allowed(policy, "lambda:InvokeFunction", step["FunctionArn"]), step["FunctionArn"]
            continue
        operations = STEP_API_OPERATIONS.get(step["Type"])
        if operations is None:
            continue
        create, describe = operations
        seen_creates.add(create)
        if step["Type"] == "RegisterModel":
            assert step["Arguments"]["ModelPackageGroupName"] == {"Get": "Parameters.ModelPackageGroupName"}
            package = f"{arn}:model-package/{group.lower()}/3"
            for action in (create, describe, "AddTags"):
                assert allowed(policy, f"sagemaker:{action}", package), action
            assert allowed(policy, "sagemaker:CreateModelPackage", f"{arn}:model-package-group/{group.lower()}")
            assert not allowed(policy, "sagemaker:CreateModelPackage", f"{arn}:model-package/othergroup/1")
            continue
        for resource_type, job_arn in _job_arns(step, built["region"]):
            for action in job_actions[resource_type]:
                assert allowed(policy, f"sagemaker:{action}", job_arn), (action, job_arn)
    assert seen_creates == {
        "CreateProcessingJob",
        "CreateTrainingJob",
        "CreateHyperParameterTuningJob",
        "CreateModelPackage",
    }
    # Pipelines tracks each run as a trial of the pipeline's experiment.
    assert definition["PipelineExperimentConfig"]["ExperimentName"] == {"Get": "Execution.PipelineName"}
    assert allowed(policy, "sagemaker:CreateExperiment", f"{arn}:experiment/{config.PIPELINE_NAME.lower()}")
    assert allowed(policy, "sagemaker:CreateTrial", f"{arn}:experiment-trial/abcdef123456")
    # ... and nothing outside the job prefix
    assert not allowed(policy, "sagemaker:CreateTrainingJob", f"{arn}:training-job/someone-elses-job")
    assert not allowed(policy, "sagemaker:StopProcessingJob", f"{arn}:processing-job/production-etl")
    assert not allowed(
        policy, "sagemaker:CreateTrainingJob", f"arn:aws:sagemaker:eu-west-1:{ACCOUNT_ID}:training-job/imgclf-x"
    )


def _s3_uris(value: Any, bucket: str) -> list[str]:
    """Literal s3:// URIs, and the fixed head of ``Std:Join`` URIs (``s3:/``, bucket, ... up to a reference)."""
    found: list[str] = []
    if isinstance(value, str) and value.startswith("s3://"):
        found.append(value)
    elif isinstance(value, dict):
        join = value.get("Std:Join")
        if isinstance(join, dict) and join.get("Values", [None])[0] == "s3:/":
            head = []
            for part in join["Values"][1:]:
                if not isinstance(part, str):
                    break
                head.append(part)
            assert head and head[0] == bucket, join
            found.append("s3://" + "/".join(head) + "/")
        for item in value.values():
            found.extend(_s3_uris(item, bucket))
    elif isinstance(value, list):
        for item in value:
            found.extend(_s3_uris(item, bucket))
    return found


def _object_arn(uri: str) -> str:
    return "arn:aws:s3:::" + uri.removeprefix("s3://").rstrip("/") + "/object-key"


@pytest.mark.slow
def test_every_s3_location_of_the_definition_is_reachable_and_only_those(built: dict[str, Any]) -> None:
    bucket = built["bucket"]
    read_only = (built["options"]["weights_uri"], built["options"]["serving_wheels_uri"])
    for variant, definition in built["definitions"].items():
        policy = render(built, all_options=variant == "all_options")
        uris = set(_s3_uris(definition, bucket))
        assert any("/checkpoints" in uri for uri in uris) and any("/tensorboard" in uri for uri in uris)
        for uri in uris:
            if uri.startswith(read_only):  # read-only, through --extra-input-s3-uri
                assert allowed(policy, "s3:GetObject", "arn:aws:s3:::" + uri.removeprefix("s3://"))
                assert not allowed(policy, "s3:PutObject", "arn:aws:s3:::" + uri.removeprefix("s3://"))
                continue
            assert uri.startswith(f"s3://{bucket}/{config.PIPELINE_NAME}/"), uri
            for action in ("s3:GetObject", "s3:PutObject"):
                assert allowed(policy, action, _object_arn(uri)), (action, uri)
    policy = render(built)
    listing = _statement(policy, "s3:ListBucket")
    assert _list(listing["Resource"]) == [f"arn:aws:s3:::{bucket}"]
    assert listing["Condition"]["StringLike"]["s3:prefix"] == [config.PIPELINE_NAME, f"{config.PIPELINE_NAME}/*"]
    assert not allowed(policy, "s3:GetObject", f"arn:aws:s3:::{bucket}/OtherPipeline/secret.csv")
    assert not allowed(policy, "s3:GetObject", f"arn:aws:s3:::other-bucket/{config.PIPELINE_NAME}/x")
    assert not allowed(policy, "s3:DeleteObject", f"arn:aws:s3:::{bucket}/{config.PIPELINE_NAME}/x")


def _images(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value} if ".dkr.ecr." in value else set()
    if isinstance(value, dict):
        return {image for item in value.values() for image in _images(item)}
    if isinstance(value, list):
        return {image for item in value for image in _images(item)}
    return set()


def test_every_container_image_of_the_definition_can_be_pulled(built: dict[str, Any]) -> None:
    policy = render(built)  # the repositories come from the SDK's image lookup for the region
    images = _images(built["definitions"]["default"]) | _images(built["definitions"]["all_options"])
    assert any("/sagemaker-debugger-rules" in image for image in images)
    assert any("/ray:serve-ml-sagemaker-" in image for image in images)  # the serving image
    for image in images:
        repository = iam.ecr_repository_arn(image, "aws")
        for action in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"):
            assert allowed(policy, action, repository), (action, repository)
        # the same repository name in another account is not the AWS one
        assert not allowed(policy, "ecr:BatchGetImage", re.sub(r":\d{12}:", f":{OTHER_ACCOUNT_ID}:", repository))
    # the registry account differs by region: another region gets its own, from the same lookup
    other = render(built, region="ap-east-1")
    (pull,) = [s for s in other["Statement"] if s["Sid"] == "PullTheDeepLearningContainerAndDebuggerImages"]
    assert all(arn.startswith("arn:aws:ecr:ap-east-1:") for arn in pull["Resource"])
    assert not set(pull["Resource"]) & set(_statement(policy, "ecr:BatchGetImage")["Resource"])


def test_job_logs_and_optional_kms_and_vpc(built: dict[str, Any]) -> None:
    policy = render(built, all_options=True)
    region, options = built["region"], built["options"]
    logs = f"arn:aws:logs:{region}:{ACCOUNT_ID}:log-group:/aws/sagemaker"
    assert allowed(policy, "logs:PutLogEvents", f"{logs}/TrainingJobs:log-stream:imgclf-train-a1b2/algo-1-1700")
    assert allowed(policy, "logs:CreateLogStream", f"{logs}/ProcessingJobs:log-stream:imgclf-preprocess-a1/algo-1")
    assert allowed(policy, "logs:CreateLogGroup", f"{logs}/TrainingJobs")
    assert not allowed(policy, "logs:PutLogEvents", f"{logs}/TrainingJobs:log-stream:other-job/algo-1")
    assert not allowed(policy, "logs:PutLogEvents", f"arn:aws:logs:{region}:{ACCOUNT_ID}:log-group:/aws/lambda/x:*")

    key = options["kms_key"]
    for action in ("kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:CreateGrant"):
        assert allowed(policy, action, key), action
    assert _statement(policy, "kms:CreateGrant")["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": "true"}}
    assert not allowed(policy, "kms:Decrypt", key.replace("1234abcd", "9999ffff"))

    ec2 = f"arn:aws:ec2:{region}:{ACCOUNT_ID}"
    (subnet,), (group,) = options["subnets"], options["security_group_ids"]
    for resource in (f"{ec2}:subnet/{subnet}", f"{ec2}:security-group/{group}", f"{ec2}:network-interface/eni-1"):
        assert allowed(policy, "ec2:CreateNetworkInterface", resource)
    assert not allowed(policy, "ec2:CreateNetworkInterface", f"{ec2}:subnet/subnet-0fffffffffffffff0")
    manage = _statement(policy, "ec2:DeleteNetworkInterface")
    assert manage["Condition"] == {"ArnEquals": {"ec2:Subnet": [f"{ec2}:subnet/{subnet}"]}}
    for action in ("ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs", "ec2:DescribeSubnets"):
        assert allowed(policy, action, "*")


# --- template, rendering, errors, command line ------------------------------------------------------------------


def test_template_holds_no_account_ids_and_renders_other_partitions(built: dict[str, Any]) -> None:
    template_text = (Path(iam.__file__).parent / iam.POLICY_TEMPLATE).read_text(encoding="utf-8")
    assert not re.search(r"\d{12}", template_text)
    for placeholder in (
        "${AWS::Partition}",
        "${AWS::Region}",
        "${AWS::AccountId}",
        "${ArtifactBucket}",
        "${PipelineName}",
        "${ModelPackageGroupName}",
        "${JobPrefix}",
        "${PipelineRoleArn}",
        "${DeployFunctionName}",
    ):
        assert placeholder in template_text, placeholder
    china = render(built, region="cn-north-1", role=None)
    for statement in china["Statement"]:
        for resource in _list(statement["Resource"]):
            assert resource == "*" or resource.startswith("arn:aws-cn:"), resource


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"account_id": "123"}, "12 digits"),
        ({"bucket": "s3://my-bucket"}, "bucket name"),
        ({"base_job_prefix": "imgclf*"}, "letters, digits and hyphens"),
        ({"kms_key": "alias/my-key"}, "key ARN"),
        ({"subnets": ["subnet-0abc"]}, "both subnets and security groups"),
        ({"extra_input_s3_uris": ["s3://other-bucket/data/*"]}, "without wildcards"),
        ({"role": "my-role"}, "IAM role ARN"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(
    built: dict[str, Any], overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render(built, **overrides)


def test_trust_policy_lets_only_sagemaker_assume_the_role() -> None:
    (statement,) = iam.pipeline_role_trust_policy()["Statement"]
    assert statement["Effect"] == "Allow"
    assert statement["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    assert statement["Action"] == "sts:AssumeRole"


@pytest.mark.slow
def test_command_prints_the_rendered_policy(built: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    options = built["options"]
    argv = [
        "iam", "pipeline-policy",
        "--account-id", ACCOUNT_ID,
        "--region", built["region"],
        "--bucket", built["bucket"],
        "--role", built["role"],
        "--kms-key", options["kms_key"],
        "--subnets", ",".join(options["subnets"]),
        "--security-group-ids", ",".join(options["security_group_ids"]),
        "--extra-input-s3-uri", options["weights_uri"],
        "--extra-input-s3-uri", options["serving_wheels_uri"],
    ]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == render(built, all_options=True)
    renamed = [*argv[:10], "--deploy-function-name", "team-deploy"]
    assert main(renamed) == 0
    assert json.loads(capsys.readouterr().out) == render(built, deploy_function_name="team-deploy")
    assert main([*argv[:10], "--skip-deploy-wiring"]) == 0
    assert json.loads(capsys.readouterr().out) == render(built, deploy_function_name=None)
    assert main(["iam", "pipeline-trust-policy"]) == 0
    assert json.loads(capsys.readouterr().out) == iam.pipeline_role_trust_policy()
    bad = [
        "iam",
        "pipeline-policy",
        "--account-id",
        ACCOUNT_ID,
        "--region",
        built["region"],
        "--bucket",
        built["bucket"],
    ]
    assert main([*bad, "--kms-key", "alias/x"]) == 2
    assert "key ARN" in capsys.readouterr().err
