"""The deploy path and the serving image (steps/deploy.py under moto): what the Ray Serve image cannot serve is
refused before anything is created, its CUDA build gets its host AMI, and a failed smoke test after an update
rolls the endpoint back to the previous approved version."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import test_deploy
from test_deploy import EXECUTION_ROLE, GROUP, REGION, approve

from pipelines import config, images
from pipelines.cli import deploy as deploy_cli
from steps import deploy

# The moto fixtures of the deploy Lambda's own tests.
aws, recorder, sagemaker, function_env = (
    test_deploy.aws,
    test_deploy.recorder,
    test_deploy.sagemaker,
    test_deploy.function_env,
)

RAY_CPU = images.ray_serve_image_uri(REGION, "ml.m5.large")
RAY_CUDA = images.ray_serve_image_uri(REGION, "ml.g5.xlarge")
LEGACY = images.legacy_pytorch_image_uri(REGION, "ml.m5.large")


def register(sagemaker_client: Any, image: str = RAY_CPU) -> str:
    return sagemaker_client.create_model_package(
        ModelPackageGroupName=GROUP,
        InferenceSpecification={
            "Containers": [{"Image": image, "ModelDataUrl": "s3://bucket/model.tar.gz"}],
            "SupportedContentTypes": ["image/jpeg", "application/json"],
            "SupportedResponseMIMETypes": ["application/json"],
        },
        ModelApprovalStatus="PendingManualApproval",
    )["ModelPackageArn"]


def test_the_lambda_recognises_the_images_the_builder_makes() -> None:
    assert deploy.RAY_SERVE_IMAGE_MARKER == images.RAY_SERVE_TAG_MARKER
    assert deploy.RAY_SERVE_IMAGE_MARKER in RAY_CPU and deploy.LEGACY_IMAGE_MARKER in LEGACY
    assert deploy.RAY_SERVE_GPU_AMI_VERSION == config.RAY_SERVE_GPU_AMI_VERSION
    assert deploy.LEGACY_END_OF_PATCHES == config.LEGACY_INFERENCE_END_OF_PATCHES


def test_a_serverless_deployment_of_a_ray_serve_package_is_refused_before_anything_is_made(
    sagemaker, recorder, function_env, monkeypatch
) -> None:
    monkeypatch.setenv("SERVERLESS_MEMORY_MB", "4096")
    with pytest.raises(deploy.UnsupportedServingImageError, match="does not support on serverless"):
        deploy.handler(approve(sagemaker, register(sagemaker)), None)
    assert recorder.writes() == []
    result = deploy.handler(approve(sagemaker, register(sagemaker, LEGACY)), None)  # the legacy image may
    assert result["action"] == "created"


def test_the_cuda_build_needs_a_gpu_instance_and_gets_its_host_ami(sagemaker, recorder, function_env, monkeypatch):
    with pytest.raises(deploy.UnsupportedServingImageError, match=r"CUDA build but INSTANCE_TYPE=ml\.m5\.large"):
        deploy.handler(approve(sagemaker, register(sagemaker, RAY_CUDA)), None)
    assert recorder.writes() == []
    monkeypatch.setenv("INSTANCE_TYPE", "ml.g5.xlarge")
    settings = deploy.DeploySettings.from_env()
    request = deploy.endpoint_config_request(settings, "model")
    deploy.apply_serving_image(request, RAY_CUDA, settings)
    assert request["ProductionVariants"][0]["InferenceAmiVersion"] == config.RAY_SERVE_GPU_AMI_VERSION
    with pytest.raises(deploy.UnsupportedServingImageError, match=r"CPU build but INSTANCE_TYPE=ml\.g5\.xlarge"):
        deploy.apply_serving_image(deploy.endpoint_config_request(settings, "model"), RAY_CPU, settings)


def test_the_legacy_image_deploys_with_an_end_of_patches_warning(sagemaker, recorder, function_env, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="deploy"):
        result = deploy.handler(approve(sagemaker, register(sagemaker, LEGACY)), None)
    assert result["action"] == "created"
    assert "past end of patches" in caplog.text and config.LEGACY_INFERENCE_END_OF_PATCHES in caplog.text


# --- rolling back -----------------------------------------------------------------------------------------------


def test_roll_back_serves_the_previous_approved_version_and_rejects_the_failed_one(
    sagemaker, recorder, function_env
) -> None:
    first = deploy.handler(approve(sagemaker, register(sagemaker)), None)
    approve(sagemaker, register(sagemaker))  # version 2: approved, never served; the newest before 3
    third_arn = register(sagemaker)
    third = deploy.handler(approve(sagemaker, third_arn), None)
    assert third["action"] == "updated"
    settings = deploy.DeploySettings.from_env()
    clients = deploy.create_clients()

    result = deploy_cli.roll_back(third_arn, "endpoint-test failed", settings, clients)

    assert result["model_package_version"] == 2 and result["rolled_back_from"] == third_arn
    assert recorder.update_calls[-1]["EndpointConfigName"] == result["endpoint_config_name"]
    failed = sagemaker.describe_model_package(ModelPackageName=third_arn)
    assert failed["ModelApprovalStatus"] == "Rejected" and failed["ApprovalDescription"] == "endpoint-test failed"
    assert first["model_package_version"] == 1


def test_roll_back_without_an_earlier_approved_version_says_so_and_changes_nothing(
    sagemaker, recorder, function_env
) -> None:
    arn = register(sagemaker)
    deploy.handler(approve(sagemaker, arn), None)
    writes = recorder.writes()
    with pytest.raises(deploy.DeployError, match="no Approved version before 1"):
        deploy_cli.roll_back(arn, "bad", deploy.DeploySettings.from_env(), deploy.create_clients())
    assert sagemaker.describe_model_package(ModelPackageName=arn)["ModelApprovalStatus"] == "Approved"
    assert recorder.writes() == writes


@pytest.mark.parametrize("failure", ["the deploy", "the wait for InService"])
def test_a_roll_back_whose_deploy_fails_leaves_the_tested_version_approved(
    sagemaker, recorder, function_env, monkeypatch, failure: str
) -> None:
    from botocore.exceptions import ClientError

    from pipelines.util.errors import CommandError

    deploy.handler(approve(sagemaker, register(sagemaker)), None)
    tested = register(sagemaker)
    deploy.handler(approve(sagemaker, tested), None)
    settings, clients = deploy.DeploySettings.from_env(), deploy.create_clients()
    wait = None
    if failure == "the deploy":
        refused = ClientError({"Error": {"Code": "ValidationException", "Message": "no model data"}}, "CreateModel")
        monkeypatch.setattr(deploy, "deploy_model_package", lambda *args, **kwargs: (_ for _ in ()).throw(refused))
    else:

        def wait(config_name: str) -> None:
            raise CommandError(f"endpoint is Failed on {config_name}: the model did not load")

    with pytest.raises(
        deploy.DeployError, match=r"^no rollback: .*/1 could not be served .* version 2 stays Approved$"
    ):
        deploy_cli.roll_back(tested, "endpoint-test failed", settings, clients, wait=wait)
    assert sagemaker.describe_model_package(ModelPackageName=tested)["ModelApprovalStatus"] == "Approved"


@pytest.mark.slow
@pytest.mark.parametrize("smoke_test_passes", [True, False])
def test_deploy_with_a_smoke_test_rolls_back_when_it_fails(
    aws, sagemaker, recorder, capsys, monkeypatch, smoke_test_passes: bool
) -> None:
    import boto3

    from pipelines import run
    from pipelines.cli import endpoint_test

    monkeypatch.setenv(config.ENV_ROLE_ARN, EXECUTION_ROLE)
    monkeypatch.setattr(boto3.session, "Session", lambda **_: aws)  # the session whose UpdateEndpoint is answered
    tested: list[str] = []

    def fake_endpoint_test(args) -> int:  # version 1 passes; version 2 as the case says
        tested.append(args.endpoint_name)
        return 0 if smoke_test_passes or len(tested) == 1 else 1

    monkeypatch.setattr(endpoint_test, "run_endpoint_test", fake_endpoint_test)
    first, second = register(sagemaker), register(sagemaker)
    for arn in (first, second):
        sagemaker.update_model_package(ModelPackageArn=arn, ModelApprovalStatus="Approved")
    command = ["deploy", "--region", REGION, "--smoke-test-dir", "s3://bucket/test"]
    assert run.main([*command, "--model-package-arn", first]) == 0
    capsys.readouterr()

    code = run.main([*command, "--model-package-arn", second])

    assert tested == [f"{config.ENDPOINT_NAME_PREFIX}-{GROUP.lower()}"] * 2
    status = sagemaker.describe_model_package(ModelPackageName=second)["ModelApprovalStatus"]
    endpoint = sagemaker.describe_endpoint(EndpointName=tested[0])
    if smoke_test_passes:
        assert code == 0 and status == "Approved"
        assert "-v2-" in endpoint["EndpointConfigName"]
    else:
        assert code == 2 and status == "Rejected"
        assert "rolled back to" in capsys.readouterr().err
        assert "-v1-" in endpoint["EndpointConfigName"]  # serving version 1 again
