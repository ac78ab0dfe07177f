"""The deploy Lambda (steps/deploy.py) under moto: approvals become endpoints, everything else is ignored; the
pipeline's Deploy step (a LambdaStep payload) deploys an Approved package or answers awaiting-approval.

moto implements models, endpoint configs, endpoints, model package groups/packages and application
autoscaling, but not UpdateEndpoint: that one call is answered by a botocore ``before-call`` hook that records
its parameters (and, like SageMaker once the new fleet is healthy, moves the endpoint to the new config).
The handler builds its clients from boto3's default session, so the hooks go on that session.
"""

from __future__ import annotations

import ast
import json
import logging
import sys
import types
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sagemaker.models import sagemaker_backends

from pipelines import config
from steps import deploy

REGION = "us-east-1"
GROUP = config.MODEL_PACKAGE_GROUP
EXECUTION_ROLE = f"arn:aws:iam::{DEFAULT_ACCOUNT_ID}:role/sagemaker-execution"
WRITE_OPERATIONS = {"CreateModel", "CreateEndpointConfig", "CreateEndpoint", "UpdateEndpoint"}


class SageMakerRecorder:
    """Records every SageMaker operation the code calls; answers UpdateEndpoint, which moto lacks."""

    def __init__(self, complete_updates: bool = True) -> None:
        self.operations: list[str] = []
        self.update_calls: list[dict[str, Any]] = []
        self.complete_updates = complete_updates
        self.status_after_update: str | None = None  # e.g. "Updating": SageMaker's status while the new fleet starts

    def record(self, model: Any, **_: Any) -> None:
        self.operations.append(model.name)

    def update_endpoint(self, params: dict[str, Any], **_: Any) -> tuple[Any, dict[str, Any]]:
        request = json.loads(params["body"])
        self.update_calls.append(request)
        endpoint = sagemaker_backends[DEFAULT_ACCOUNT_ID][REGION].endpoints[request["EndpointName"]]
        if self.complete_updates:
            endpoint.endpoint_config_name = request["EndpointConfigName"]
        if self.status_after_update:
            endpoint.endpoint_status = self.status_after_update
        return types.SimpleNamespace(status_code=200, headers={}), {"EndpointArn": endpoint.arn}

    def writes(self) -> list[str]:
        return [name for name in self.operations if name in WRITE_OPERATIONS]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
        boto3.setup_default_session(region_name=REGION)
        yield boto3.DEFAULT_SESSION


@pytest.fixture
def recorder(aws) -> SageMakerRecorder:
    recorder = SageMakerRecorder()
    aws.events.register("before-call.sagemaker", recorder.record)
    aws.events.register("before-call.sagemaker.UpdateEndpoint", recorder.update_endpoint)
    return recorder


@pytest.fixture
def sagemaker(aws):
    client = aws.client("sagemaker")
    client.create_model_package_group(ModelPackageGroupName=GROUP)
    client.create_model_package_group(ModelPackageGroupName="SomeOtherModels")
    return client


@pytest.fixture
def function_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment upsert gives the function (the defaults of pipelines.aws.deploy_infra)."""
    for name in ("ENDPOINT_NAME", "SERVERLESS_MEMORY_MB", "MIN_CAPACITY", "MAX_CAPACITY", "ROLLBACK_ALARM_NAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODEL_PACKAGE_GROUP_NAME", GROUP)
    monkeypatch.setenv("EXECUTION_ROLE_ARN", EXECUTION_ROLE)
    monkeypatch.setenv("RESOURCE_NAME_PREFIX", config.ENDPOINT_NAME_PREFIX)
    monkeypatch.setenv("ENDPOINT_WAIT_SECONDS", "0")


def register_package(sagemaker_client: Any, group: str = GROUP, status: str = "PendingManualApproval") -> str:
    return sagemaker_client.create_model_package(
        ModelPackageGroupName=group,
        InferenceSpecification={
            "Containers": [{"Image": "pytorch-inference:2.6", "ModelDataUrl": "s3://bucket/model.tar.gz"}],
            "SupportedContentTypes": ["image/jpeg", "application/json"],
            "SupportedResponseMIMETypes": ["application/json"],
        },
        ModelApprovalStatus=status,
    )["ModelPackageArn"]


def state_change_event(sagemaker_client: Any, arn: str, **detail_overrides: Any) -> dict[str, Any]:
    """The event EventBridge delivers: the package's description as detail."""
    package = sagemaker_client.describe_model_package(ModelPackageName=arn)
    detail = {
        key: package[key]
        for key in ("ModelPackageGroupName", "ModelPackageVersion", "ModelApprovalStatus", "ModelPackageStatus")
    }
    detail.update(
        ModelPackageArn=arn, ModelPackageName=package.get("ModelPackageName", package["ModelPackageGroupName"])
    )
    detail.update(detail_overrides)
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "SageMaker Model Package State Change",
        "source": "aws.sagemaker",
        "account": DEFAULT_ACCOUNT_ID,
        "time": "2025-01-01T00:00:00Z",
        "region": REGION,
        "resources": [arn],
        "detail": detail,
    }


def approve(sagemaker_client: Any, arn: str) -> dict[str, Any]:
    sagemaker_client.update_model_package(ModelPackageArn=arn, ModelApprovalStatus="Approved")
    return state_change_event(sagemaker_client, arn)


def endpoint_backend(name: str) -> Any:
    return sagemaker_backends[DEFAULT_ACCOUNT_ID][REGION].endpoints[name]


def default_endpoint_name() -> str:
    return f"{config.ENDPOINT_NAME_PREFIX}-{GROUP.lower()}"


# --- created / updated / unchanged ----------------------------------------------------------------------------


def test_approval_creates_model_config_and_endpoint(sagemaker, recorder, function_env) -> None:
    arn = register_package(sagemaker)
    result = deploy.handler(approve(sagemaker, arn), None)

    assert result["action"] == "created"
    assert result["endpoint_name"] == default_endpoint_name()
    model = sagemaker.describe_model(ModelName=result["model_name"])
    assert model["PrimaryContainer"] == {"ModelPackageName": arn}
    assert model["ExecutionRoleArn"] == EXECUTION_ROLE
    endpoint_config = sagemaker.describe_endpoint_config(EndpointConfigName=result["endpoint_config_name"])
    (variant,) = endpoint_config["ProductionVariants"]
    assert variant["ModelName"] == result["model_name"]
    assert variant["InstanceType"] == deploy.SETTINGS_BY_NAME["endpoint_instance_type"].default
    assert variant["InitialInstanceCount"] == deploy.SETTINGS_BY_NAME["endpoint_instance_count"].default
    assert "DataCaptureConfig" not in endpoint_config or not endpoint_config["DataCaptureConfig"]
    endpoint = sagemaker.describe_endpoint(EndpointName=result["endpoint_name"])
    assert endpoint["EndpointConfigName"] == result["endpoint_config_name"]
    for name in (result["model_name"], result["endpoint_config_name"], result["endpoint_name"]):
        assert len(name) <= 63 and deploy.NAME_PATTERN.match(name)
    assert "-v1" in result["model_name"]
    assert recorder.writes() == ["CreateModel", "CreateEndpointConfig", "CreateEndpoint"]


def test_same_event_twice_creates_nothing_more(sagemaker, recorder, function_env) -> None:
    event = approve(sagemaker, register_package(sagemaker))
    first = deploy.handler(event, None)
    writes_after_first = list(recorder.writes())
    second = deploy.handler(event, None)

    assert first["action"] == "created"
    assert second["action"] == "unchanged"
    assert (second["model_name"], second["endpoint_config_name"]) == (
        first["model_name"],
        first["endpoint_config_name"],
    )
    assert second["model_created"] is False and second["endpoint_config_created"] is False
    assert recorder.writes() == writes_after_first  # no Create*/Update* on the second delivery
    assert len(sagemaker.list_models()["Models"]) == 1
    assert len(sagemaker.list_endpoint_configs()["EndpointConfigs"]) == 1
    assert len(sagemaker.list_endpoints()["Endpoints"]) == 1


def test_newer_approval_updates_endpoint_blue_green(sagemaker, recorder, function_env, monkeypatch) -> None:
    monkeypatch.setenv("ROLLBACK_ALARM_NAMES", "imgclf-5xx, imgclf-latency")
    monkeypatch.setenv("TRAFFIC_ROUTING", "CANARY")
    monkeypatch.setenv("TRAFFIC_STEP_PERCENT", "25")
    monkeypatch.setenv("TRAFFIC_WAIT_SECONDS", "600")
    monkeypatch.setenv("TERMINATION_WAIT_SECONDS", "120")
    monkeypatch.setenv("MAX_EXECUTION_TIMEOUT_SECONDS", "3600")
    first = deploy.handler(approve(sagemaker, register_package(sagemaker)), None)
    second_event = approve(sagemaker, register_package(sagemaker))
    second = deploy.handler(second_event, None)

    assert second["action"] == "updated"
    assert second["previous_endpoint_config_name"] == first["endpoint_config_name"]
    (update,) = recorder.update_calls
    assert update["EndpointName"] == first["endpoint_name"]
    assert update["EndpointConfigName"] == second["endpoint_config_name"] != first["endpoint_config_name"]
    assert update["RetainAllVariantProperties"] is False
    assert update["DeploymentConfig"] == {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {
                "Type": "CANARY",
                "WaitIntervalInSeconds": 600,
                "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 25},
            },
            "TerminationWaitInSeconds": 120,
            "MaximumExecutionTimeoutInSeconds": 3600,
        },
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "imgclf-5xx"}, {"AlarmName": "imgclf-latency"}]},
    }
    # The new config serves the new version's model; the old config (still serving until the switch) is intact.
    new_config = sagemaker.describe_endpoint_config(EndpointConfigName=update["EndpointConfigName"])
    assert new_config["ProductionVariants"][0]["ModelName"] == second["model_name"]
    assert second["model_name"].endswith("-v2")
    old_config = sagemaker.describe_endpoint_config(EndpointConfigName=first["endpoint_config_name"])
    assert old_config["ProductionVariants"][0]["ModelName"] == first["model_name"]
    assert "DeleteEndpointConfig" not in recorder.operations and "DeleteModel" not in recorder.operations

    # The same approval delivered again once the update is done: nothing more happens.
    again = deploy.handler(second_event, None)
    assert again["action"] == "unchanged"
    assert len(recorder.update_calls) == 1


def test_update_defaults_to_all_at_once_blue_green_without_alarms(sagemaker, recorder, function_env) -> None:
    deploy.handler(approve(sagemaker, register_package(sagemaker)), None)
    deploy.handler(approve(sagemaker, register_package(sagemaker)), None)

    (update,) = recorder.update_calls
    assert update["DeploymentConfig"] == {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0},
            "TerminationWaitInSeconds": 0,
        }
    }


def test_redelivery_while_our_update_is_pending_is_unchanged(sagemaker, aws, function_env) -> None:
    recorder = SageMakerRecorder(complete_updates=False)
    aws.events.register("before-call.sagemaker", recorder.record)
    aws.events.register("before-call.sagemaker.UpdateEndpoint", recorder.update_endpoint)
    deploy.handler(approve(sagemaker, register_package(sagemaker)), None)
    event = approve(sagemaker, register_package(sagemaker))
    updated = deploy.handler(event, None)
    # SageMaker now shows the update in progress, with our config pending.
    endpoint = endpoint_backend(updated["endpoint_name"])
    endpoint.endpoint_status = "Updating"
    endpoint.pending_deployment_summary = {"EndpointConfigName": updated["endpoint_config_name"]}

    again = deploy.handler(event, None)

    assert again["action"] == "unchanged"
    assert len(recorder.update_calls) == 1


def test_changed_settings_deploy_a_new_config_for_the_same_version(sagemaker, recorder, function_env, monkeypatch):
    event = approve(sagemaker, register_package(sagemaker))
    first = deploy.handler(event, None)
    monkeypatch.setenv("INSTANCE_TYPE", "ml.c5.xlarge")
    monkeypatch.setenv("DATA_CAPTURE_S3_URI", "s3://bucket/capture")
    second = deploy.handler(event, None)

    assert second["action"] == "updated"
    assert second["model_name"] == first["model_name"] and second["model_created"] is False
    assert second["endpoint_config_name"] != first["endpoint_config_name"]
    new_config = sagemaker.describe_endpoint_config(EndpointConfigName=second["endpoint_config_name"])
    assert new_config["ProductionVariants"][0]["InstanceType"] == "ml.c5.xlarge"
    assert new_config["DataCaptureConfig"]["DestinationS3Uri"] == "s3://bucket/capture"
    assert new_config["DataCaptureConfig"]["InitialSamplingPercentage"] == 100


def test_serverless_endpoint_config(sagemaker, recorder, function_env, monkeypatch) -> None:
    monkeypatch.setenv("SERVERLESS_MEMORY_MB", "3072")
    monkeypatch.setenv("SERVERLESS_MAX_CONCURRENCY", "8")
    result = deploy.handler(approve(sagemaker, register_package(sagemaker)), None)

    (variant,) = sagemaker.describe_endpoint_config(EndpointConfigName=result["endpoint_config_name"])[
        "ProductionVariants"
    ]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 3072, "MaxConcurrency": 8}
    assert "InstanceType" not in variant and "InitialInstanceCount" not in variant


@pytest.mark.slow
def test_autoscaling_registered_when_min_and_max_capacity_are_set(aws, sagemaker, recorder, function_env, monkeypatch):
    monkeypatch.setenv("MIN_CAPACITY", "1")
    monkeypatch.setenv("MAX_CAPACITY", "4")
    monkeypatch.setenv("TARGET_INVOCATIONS_PER_INSTANCE", "150")
    result = deploy.handler(approve(sagemaker, register_package(sagemaker)), None)

    autoscaling = aws.client("application-autoscaling")
    (target,) = autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    resource_id = f"endpoint/{result['endpoint_name']}/variant/AllTraffic"
    assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == (resource_id, 1, 4)
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    (policy,) = autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert policy["PolicyType"] == "TargetTrackingScaling" and policy["ResourceId"] == resource_id
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 150.0
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"
    assert result["autoscaling"]["resource_id"] == resource_id


def test_no_autoscaling_without_capacity(aws, sagemaker, recorder, function_env) -> None:
    result = deploy.handler(approve(sagemaker, register_package(sagemaker)), None)
    assert result["autoscaling"] is None
    assert (
        aws.client("application-autoscaling").describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
        == []
    )


# --- the pipeline's Deploy step (LambdaStep payload) ----------------------------------------------------------


def test_deploy_step_payload_deploys_an_approved_package(sagemaker, recorder, function_env) -> None:
    arn = register_package(sagemaker, status="Approved")  # the run's ModelApprovalStatus parameter was Approved
    result = deploy.handler({"model_package_arn": arn}, None)

    assert result["action"] == "created"
    for output in config.DEPLOY_STEP_OUTPUTS:  # the step's LambdaOutputs, all strings
        assert isinstance(result[output], str), output
    assert result["model_package_arn"] == arn and result["endpoint_name"] == default_endpoint_name()
    endpoint = sagemaker.describe_endpoint(EndpointName=result["endpoint_name"])
    assert endpoint["EndpointConfigName"] == result["endpoint_config_name"]
    assert recorder.writes() == ["CreateModel", "CreateEndpointConfig", "CreateEndpoint"]
    # the approval event for the same version, arriving too, changes nothing
    assert deploy.handler(state_change_event(sagemaker, arn), None)["action"] == "unchanged"


def test_deploy_step_payload_for_a_pending_package_awaits_approval_and_starts_nothing(
    sagemaker, recorder, function_env
) -> None:
    arn = register_package(sagemaker)  # the default ModelApprovalStatus: PendingManualApproval
    result = deploy.handler({"model_package_arn": arn}, None)

    assert result["action"] == "awaiting-approval"
    assert result["model_package_arn"] == arn and result["endpoint_name"] == default_endpoint_name()
    assert recorder.writes() == []
    assert sagemaker.list_endpoints()["Endpoints"] == [] and sagemaker.list_models()["Models"] == []
    # approving it later deploys it through the EventBridge event, with the same function
    assert deploy.handler(approve(sagemaker, arn), None)["action"] == "created"


def test_deploy_step_never_waits_for_in_service(aws, sagemaker, recorder, function_env, monkeypatch) -> None:
    monkeypatch.setenv("MIN_CAPACITY", "1")
    monkeypatch.setenv("MAX_CAPACITY", "2")
    monkeypatch.setattr(deploy, "_wait_until_in_service", lambda *args, **kwargs: pytest.fail("waited for InService"))
    first = deploy.handler({"model_package_arn": register_package(sagemaker, status="Approved")}, None)
    assert first["action"] == "created" and first["autoscaling"]["max_capacity"] == 2  # InService already: registered

    recorder.status_after_update = "Updating"  # the update has started; the new fleet is not serving yet
    second = deploy.handler({"model_package_arn": register_package(sagemaker, status="Approved")}, None)

    assert second["action"] == "updated" and len(recorder.update_calls) == 1
    assert second["autoscaling"].startswith("pending")


def test_deploy_step_wait_for_a_busy_endpoint_stays_within_the_step_limit(monkeypatch) -> None:
    monkeypatch.setenv("MODEL_PACKAGE_GROUP_NAME", GROUP)
    monkeypatch.setenv("EXECUTION_ROLE_ARN", EXECUTION_ROLE)
    monkeypatch.setenv("ENDPOINT_WAIT_SECONDS", "600")
    seen: dict[str, float] = {}

    def fake_invoke(event: Any, settings: Any, clients: Any, *, deadline: float) -> dict[str, Any]:
        seen["wait"] = deadline - deploy.time.monotonic()
        return {}

    monkeypatch.setattr(deploy, "invoke", fake_invoke)
    monkeypatch.setattr(deploy, "create_clients", lambda: None)
    context = types.SimpleNamespace(get_remaining_time_in_millis=lambda: 900_000)
    deploy.handler({"model_package_arn": "arn:aws:sagemaker:us-east-1:1:model-package/g/1"}, context)
    assert seen["wait"] <= deploy.PIPELINE_STEP_WAIT_SECONDS
    deploy.handler({"source": "aws.sagemaker"}, context)  # an EventBridge event may wait the full 600 s
    assert deploy.PIPELINE_STEP_WAIT_SECONDS < seen["wait"] <= 600


@pytest.mark.parametrize("payload", [{"model_package_arn": ""}, {"model_package_arn": "arn:aws:s3:::bucket/model"}])
def test_deploy_step_payload_without_a_package_arn_fails_the_step(recorder, function_env, payload) -> None:
    with pytest.raises(deploy.DeployError, match=r"not a model package ARN.*Register step"):
        deploy.handler(payload, None)
    assert recorder.writes() == []


# --- ignored --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "group", "overrides", "reason"),
    [
        ("PendingManualApproval", GROUP, {}, "PendingManualApproval"),
        ("Rejected", GROUP, {}, "Rejected"),
        ("Approved", "SomeOtherModels", {}, "SomeOtherModels"),
        ("Approved", GROUP, {"detail-type": "SageMaker Model State Change"}, "not a model package state change"),
        ("Approved", GROUP, {"source": "my.app"}, "not a model package state change"),
    ],
)
def test_other_events_are_ignored(sagemaker, recorder, function_env, caplog, status, group, overrides, reason):
    arn = register_package(sagemaker, group=group, status=status)
    event = {**state_change_event(sagemaker, arn), **overrides}
    with caplog.at_level(logging.INFO, logger="deploy"):
        result = deploy.handler(event, None)

    assert result["action"] == "ignored"
    assert reason in result["reason"]
    assert recorder.writes() == []
    assert sagemaker.list_endpoints()["Endpoints"] == []
    assert any("ignored" in record.getMessage() and reason in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("event", [None, "text", {}, {"source": "aws.sagemaker"}])
def test_malformed_events_are_ignored(recorder, function_env, event) -> None:
    assert deploy.handler(event, None)["action"] == "ignored"
    assert recorder.writes() == []


def test_approval_withdrawn_before_the_handler_runs_is_ignored(sagemaker, recorder, function_env) -> None:
    arn = register_package(sagemaker)
    event = approve(sagemaker, arn)
    sagemaker.update_model_package(ModelPackageArn=arn, ModelApprovalStatus="Rejected")

    result = deploy.handler(event, None)

    assert result["action"] == "ignored" and "Rejected" in result["reason"]
    assert recorder.writes() == []


# --- busy, failed, AWS errors ---------------------------------------------------------------------------------


def test_endpoint_being_updated_raises_retryable_error(sagemaker, recorder, function_env) -> None:
    first = deploy.handler(approve(sagemaker, register_package(sagemaker)), None)
    endpoint_backend(first["endpoint_name"]).endpoint_status = "Updating"
    event = approve(sagemaker, register_package(sagemaker))

    with pytest.raises(deploy.EndpointBusyError, match=r"is Updating.*retried") as caught:
        deploy.handler(event, None)

    assert first["endpoint_name"] in str(caught.value)
    assert recorder.update_calls == []
    # The retry, once the endpoint is InService again, deploys the new version (reusing what the first try made).
    endpoint_backend(first["endpoint_name"]).endpoint_status = "InService"
    retried = deploy.handler(event, None)
    assert retried["action"] == "updated" and retried["model_created"] is False
    assert len(recorder.update_calls) == 1


def test_busy_endpoint_is_waited_for_within_the_time_given(sagemaker, recorder, function_env, monkeypatch) -> None:
    monkeypatch.setenv("ENDPOINT_WAIT_SECONDS", "600")
    first = deploy.handler(approve(sagemaker, register_package(sagemaker)), None)
    endpoint = endpoint_backend(first["endpoint_name"])
    endpoint.endpoint_status = "Creating"
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            endpoint.endpoint_status = "InService"

    event = approve(sagemaker, register_package(sagemaker))
    result = deploy.handle_event(event, deploy.DeploySettings.from_env(), deploy.create_clients(), sleep=fake_sleep)

    assert result["action"] == "updated"
    assert sleeps == [deploy.SETTINGS_BY_NAME["endpoint_poll_seconds"].default] * 2


def test_lambda_remaining_time_bounds_the_wait(sagemaker, recorder, function_env, monkeypatch) -> None:
    monkeypatch.setenv("ENDPOINT_WAIT_SECONDS", "600")
    first = deploy.handler(approve(sagemaker, register_package(sagemaker)), None)
    endpoint_backend(first["endpoint_name"]).endpoint_status = "SystemUpdating"
    # 70 s left of the function's time: less than a poll after the one-minute margin, so it fails at once.
    context = types.SimpleNamespace(get_remaining_time_in_millis=lambda: 70_000)

    with pytest.raises(deploy.EndpointBusyError, match="SystemUpdating"):
        deploy.handler(approve(sagemaker, register_package(sagemaker)), context)


def test_failed_endpoint_raises_with_what_to_do(sagemaker, recorder, function_env) -> None:
    first = deploy.handler(approve(sagemaker, register_package(sagemaker)), None)
    endpoint = endpoint_backend(first["endpoint_name"])
    endpoint.endpoint_status = "Failed"
    endpoint.failure_reason = "image pull failed"

    with pytest.raises(deploy.EndpointFailedError, match=r"image pull failed.*delete-endpoint"):
        deploy.handler(approve(sagemaker, register_package(sagemaker)), None)
    assert recorder.update_calls == []


def test_aws_error_is_logged_with_the_package_arn_and_reraised(sagemaker, recorder, function_env, caplog) -> None:
    arn = register_package(sagemaker)
    event = approve(sagemaker, arn)

    def refuse(**_: Any) -> None:
        raise ClientError(
            {"Error": {"Code": "AccessDeniedException", "Message": "not allowed to CreateEndpoint"}}, "CreateEndpoint"
        )

    boto3.DEFAULT_SESSION.events.register("before-call.sagemaker.CreateEndpoint", refuse)
    with caplog.at_level(logging.ERROR, logger="deploy"), pytest.raises(ClientError, match="not allowed"):
        deploy.handler(event, None)

    (record,) = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert arn in record.getMessage() and "AccessDeniedException" in record.getMessage()


# --- settings and names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"MODEL_PACKAGE_GROUP_NAME": None}, "MODEL_PACKAGE_GROUP_NAME is not set"),
        ({"EXECUTION_ROLE_ARN": None}, "EXECUTION_ROLE_ARN is not set"),
        ({"EXECUTION_ROLE_ARN": "my-role"}, "not an IAM role ARN"),
        ({"SERVERLESS_MEMORY_MB": "1500"}, "multiple of 1024"),
        ({"INSTANCE_COUNT": "zero"}, "INSTANCE_COUNT='zero' is not an integer"),
        ({"MIN_CAPACITY": "1"}, "set both or neither"),
        ({"MIN_CAPACITY": "4", "MAX_CAPACITY": "2"}, "greater than MAX_CAPACITY"),
        ({"TRAFFIC_ROUTING": "LINEAR"}, "needs TRAFFIC_STEP_PERCENT"),
        ({"TRAFFIC_ROUTING": "SOMETIMES"}, "must be one of"),
        ({"DATA_CAPTURE_S3_URI": "/tmp/capture"}, "s3://"),
        ({"ENDPOINT_NAME": "bad_name!"}, "not a valid endpoint name"),
        ({"SERVERLESS_MEMORY_MB": "2048", "MIN_CAPACITY": "1", "MAX_CAPACITY": "2"}, "serverless"),
    ],
)
def test_invalid_settings_name_the_variable(changes: dict[str, str | None], message: str) -> None:
    environment = {"MODEL_PACKAGE_GROUP_NAME": GROUP, "EXECUTION_ROLE_ARN": EXECUTION_ROLE}
    environment.update(changes)
    environment = {name: value for name, value in environment.items() if value is not None}
    with pytest.raises(deploy.ConfigurationError, match=message):
        deploy.DeploySettings.from_env(environment)


def test_valid_settings_parse() -> None:
    settings = deploy.DeploySettings.from_env(
        {
            "MODEL_PACKAGE_GROUP_NAME": GROUP,
            "EXECUTION_ROLE_ARN": EXECUTION_ROLE,
            "INSTANCE_COUNT": "3",
            "ROLLBACK_ALARM_NAMES": " a, ,b ",
            "TRAFFIC_ROUTING": "linear",
            "TRAFFIC_STEP_PERCENT": "10",
            "MIN_CAPACITY": "2",
            "MAX_CAPACITY": "6",
        }
    )
    assert settings.endpoint_instance_count == 3
    assert settings.rollback_alarm_names == ("a", "b")
    assert settings.traffic_routing == "LINEAR"
    assert settings.autoscaling and (settings.min_capacity, settings.max_capacity) == (2, 6)
    assert deploy.deployment_config(settings)["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"] == {
        "Type": "LINEAR",
        "WaitIntervalInSeconds": deploy.DEFAULT_BAKING_SECONDS_WITH_ALARMS,
        "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 10},
    }


def test_names_stay_valid_unique_and_stable_for_long_groups() -> None:
    groups = ["A" * 63, "A" * 62 + "B", "My_Group.With Spaces--and__Symbols" * 2]
    names = set()
    for group in groups:
        settings = deploy.DeploySettings(model_package_group=group, execution_role_arn=EXECUTION_ROLE)
        request = deploy.endpoint_config_request(settings, deploy.model_name_for(settings, 123456))
        model = deploy.model_name_for(settings, 123456)
        endpoint_config = deploy.endpoint_config_name_for(settings, 123456, request)
        for name in (model, endpoint_config, settings.resolved_endpoint_name):
            assert len(name) <= 63, name
            assert deploy.NAME_PATTERN.match(name), name
            assert name == name.lower()  # as SageMaker writes it in ARNs, which the IAM policy matches
        assert endpoint_config == deploy.endpoint_config_name_for(settings, 123456, request)  # stable
        names.add(settings.resolved_endpoint_name)
    assert len(names) == len(groups)


def test_handler_module_imports_only_the_standard_library_and_boto3() -> None:
    tree = ast.parse(Path(deploy.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the zipped handler has no package to import relatively from"
            imported.add((node.module or "").split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"boto3", "botocore"}


# --- the deploy command ---------------------------------------------------------------------------------------


def test_deploy_command_runs_the_same_logic(sagemaker, recorder, capsys, monkeypatch) -> None:
    from pipelines import run

    monkeypatch.setenv(config.ENV_ROLE_ARN, EXECUTION_ROLE)
    arn = register_package(sagemaker)
    sagemaker.update_model_package(ModelPackageArn=arn, ModelApprovalStatus="Approved")

    assert run.main(["deploy", "--model-package-arn", arn, "--region", REGION, "--endpoint-instance-count", "2"]) == 0

    result = json.loads(capsys.readouterr().out)
    assert result["action"] == "created"
    endpoint_config = sagemaker.describe_endpoint_config(EndpointConfigName=result["endpoint_config_name"])
    assert endpoint_config["ProductionVariants"][0]["InitialInstanceCount"] == 2
    assert sagemaker.describe_endpoint(EndpointName=result["endpoint_name"])["EndpointStatus"] == "InService"


def test_deploy_command_refuses_an_unapproved_package(sagemaker, recorder, capsys, monkeypatch) -> None:
    from pipelines import run

    monkeypatch.setenv(config.ENV_ROLE_ARN, EXECUTION_ROLE)
    arn = register_package(sagemaker)

    assert run.main(["deploy", "--model-package-arn", arn, "--region", REGION]) == 2

    error = capsys.readouterr().err
    assert "not deployed" in error and "PendingManualApproval" in error and "approve" in error
    assert recorder.writes() == []


def test_deploy_command_reports_bad_flags_before_calling_aws(recorder, capsys, monkeypatch) -> None:
    from pipelines import run

    monkeypatch.setenv(config.ENV_ROLE_ARN, EXECUTION_ROLE)
    arn = f"arn:aws:sagemaker:{REGION}:{DEFAULT_ACCOUNT_ID}:model-package/x/1"
    assert run.main(["deploy", "--model-package-arn", arn, "--region", REGION, "--serverless-memory-mb", "100"]) == 2
    assert "SERVERLESS_MEMORY_MB" in capsys.readouterr().err
    assert recorder.operations == []
