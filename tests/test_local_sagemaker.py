"""The engine's LocalSageMaker (boto3's SageMaker client, answered from a workdir) and the CLI's ``--local``.

The CLI tests run the same commands on moto and on a workdir holding the same registry, and compare what they
print: one code path, two clients.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from pipelines import config
from pipelines.local import deploy_function
from pipelines.local.sagemaker import ACCOUNT_ID, REGION, ROLE_ARN, LocalSageMaker, arn
from pipelines.run import main
from pipelines.util import fsutil

GROUP = "VisionModels"
BUCKET = "cli-test-bucket"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/x:1"
REPORT = "multiclass_classification_metrics"


def _request(accuracy: float | None, status: str = "PendingManualApproval") -> dict[str, Any]:
    request: dict[str, Any] = {
        "ModelPackageGroupName": GROUP,
        "ModelApprovalStatus": status,
        "InferenceSpecification": {
            "Containers": [{"Image": IMAGE, "ModelDataUrl": "s3://models-bucket/m"}],
            "SupportedContentTypes": ["image/jpeg"],
            "SupportedResponseMIMETypes": ["application/json"],
        },
    }
    if accuracy is not None:
        uri = f"s3://{BUCKET}/evaluation/{accuracy}/evaluation.json"
        request["ModelMetrics"] = {"ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": uri}}}
    return request


def _report(accuracy: float) -> bytes:
    return json.dumps({REPORT: {"accuracy": {"value": accuracy, "standard_deviation": "NaN"}}}).encode()


def _local(workdir: Path, *accuracies: float | None) -> LocalSageMaker:
    client = LocalSageMaker(workdir)
    client.store.put_bytes("s3://models-bucket/m", b"the same model bytes")
    for accuracy in accuracies:
        if accuracy is not None:
            client.store.put_bytes(f"s3://{BUCKET}/evaluation/{accuracy}/evaluation.json", _report(accuracy))
        client.create_model_package(**_request(accuracy))
    return client


def _error(call: Any, **request: Any) -> dict[str, str]:
    with pytest.raises(ClientError) as raised:
        call(**request)
    return raised.value.response["Error"]


# --- the client -------------------------------------------------------------------------------------------------


def test_every_create_adds_a_version_and_only_update_changes_a_status(tmp_path: Path) -> None:
    client = _local(tmp_path, 0.9)
    first = client.list_model_packages(ModelPackageGroupName=GROUP)["ModelPackageSummaryList"][0]
    client.update_model_package(ModelPackageArn=first["ModelPackageArn"], ModelApprovalStatus="Rejected")
    second = client.create_model_package(**_request(0.9, "Approved"))["ModelPackageArn"]  # the same bytes again

    summaries = client.list_model_packages(ModelPackageGroupName=GROUP)["ModelPackageSummaryList"]
    assert [(s["ModelPackageVersion"], s["ModelApprovalStatus"]) for s in summaries] == [
        (1, "Rejected"),
        (2, "Approved"),
    ]
    assert second == arn("model-package", f"{GROUP}/2")
    one, two = (client.describe_model_package(ModelPackageName=s["ModelPackageArn"]) for s in summaries)
    assert one["CustomerMetadataProperties"]["ModelSha256"] == two["CustomerMetadataProperties"]["ModelSha256"]
    # each version holds copies of its own, read-only, with their sha256 recorded
    model = Path(two["InferenceSpecification"]["Containers"][0]["ModelDataUrl"].removeprefix("file://"))
    assert model.read_bytes() == b"the same model bytes" and model.stat().st_nlink == 1
    assert not model.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert set(two["FileSha256"]) == {model.as_uri(), two["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]}

    newest = client.list_model_packages(
        ModelPackageGroupName=GROUP, SortOrder="Descending", ModelApprovalStatus="Approved"
    )
    assert [s["ModelPackageVersion"] for s in newest["ModelPackageSummaryList"]] == [2]


def test_arns_are_of_one_region_and_account(tmp_path: Path) -> None:
    client = _local(tmp_path, None)
    package = client.describe_model_package(ModelPackageName=arn("model-package", f"{GROUP}/1"))
    client.create_model(ModelName="M", PrimaryContainer={"ModelPackageName": package["ModelPackageArn"]})
    client.create_training_job(TrainingJobName="train-run-0001", AlgorithmSpecification={})
    made = [
        package["ModelPackageArn"],
        client.describe_model_package_group(ModelPackageGroupName=GROUP)["ModelPackageGroupArn"],
        client.describe_model(ModelName="M")["ModelArn"],
        client.describe_training_job(TrainingJobName="train-run-0001")["TrainingJobArn"],
        client.create_endpoint_config(EndpointConfigName="C", ProductionVariants=[])["EndpointConfigArn"],
    ]
    assert all(made_arn.startswith(f"arn:aws:sagemaker:{REGION}:{ACCOUNT_ID}:") for made_arn in made), made
    assert made[0] == f"arn:aws:sagemaker:{REGION}:{ACCOUNT_ID}:model-package/visionmodels/1"
    assert f"arn:aws:iam::{ACCOUNT_ID}:role/local-pipeline" == ROLE_ARN


def test_describe_and_list_are_shaped_like_boto3s(tmp_path: Path) -> None:
    client = _local(tmp_path, 0.5, None)
    (summary, _) = client.list_model_packages(ModelPackageGroupName=GROUP)["ModelPackageSummaryList"]
    assert set(summary) == {
        "ModelPackageGroupName",
        "ModelPackageVersion",
        "ModelPackageArn",
        "CreationTime",
        "ModelPackageStatus",
        "ModelApprovalStatus",
    }
    assert isinstance(summary["CreationTime"], dt.datetime)  # boto3 answers times as datetimes
    assert client.get_paginator("list_model_packages").paginate(ModelPackageGroupName=GROUP).__next__() == {
        "ModelPackageSummaryList": client.list_model_packages(ModelPackageGroupName=GROUP)["ModelPackageSummaryList"]
    }

    client.create_training_job(TrainingJobName="train-run-0001", HyperParameters={"epochs": "1"})
    assert client.describe_training_job(TrainingJobName="train-run-0001")["TrainingJobStatus"] == "InProgress"
    client.end_job(
        "TrainingJob", "train-run-0001", "Completed", ModelArtifacts={"S3ModelArtifacts": "s3://models-bucket/m"}
    )
    described = client.describe_training_job(TrainingJobName="train-run-0001")
    assert described["TrainingJobStatus"] == "Completed" and described["HyperParameters"] == {"epochs": "1"}
    assert described["ModelArtifacts"] == {"S3ModelArtifacts": "s3://models-bucket/m"}
    (listed,) = client.list_training_jobs()["TrainingJobSummaries"]
    assert listed["TrainingJobName"] == "train-run-0001" and listed["TrainingJobStatus"] == "Completed"
    stop = _error(client.stop_training_job, TrainingJobName="train-run-0001")
    assert stop["Code"] == "ValidationException" and "status Completed" in stop["Message"]


def test_refusals_are_botocore_client_errors(tmp_path: Path) -> None:
    client = _local(tmp_path, None)
    missing = _error(client.describe_model_package, ModelPackageName=arn("model-package", f"{GROUP}/9"))
    assert missing["Code"] == "ValidationException" and missing["Message"].startswith("Could not find")
    bad = _error(
        client.update_model_package, ModelPackageArn=arn("model-package", f"{GROUP}/1"), ModelApprovalStatus="Maybe"
    )
    assert bad["Code"] == "ValidationException" and "Maybe" in bad["Message"]
    assert _error(client.describe_training_job, TrainingJobName="nope")["Message"] == "Could not find TrainingJob nope."
    assert "pattern" in _error(client.describe_training_job, TrainingJobName="../escape")["Message"]
    assert _error(client.describe_endpoint, EndpointName="e")["Message"] == 'Could not find endpoint "e".'
    served = _error(client.create_endpoint, EndpointName="e", EndpointConfigName="c")
    assert "no endpoint host" in served["Message"]
    assert _error(client.describe_pipeline, PipelineName="p")["Code"] == "ResourceNotFound"
    assert _error(client.create_model_package, **{**_request(None), "ModelPackageGroupName": "../x"})["Code"] == (
        "ValidationException"
    )
    assert _error(client.create_model_package, **{**_request(0.1)})["Message"].endswith("evaluation.json)")


# --- a registered file changed: deploy refuses ------------------------------------------------------------------


def test_deploy_refuses_a_version_whose_file_changed_after_registration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = _local(tmp_path, 0.75)
    package_arn = arn("model-package", f"{GROUP}/1")
    client.update_model_package(ModelPackageArn=package_arn, ModelApprovalStatus="Approved")
    recorded = client.describe_model_package(ModelPackageName=package_arn)["FileSha256"]
    report = next(fsutil.file_uri_path(uri) for uri in recorded if uri.endswith(".json"))
    os.chmod(report, 0o644)
    report.write_bytes(_report(0.99))  # edited in place after registration

    argv = [
        "deploy",
        "--local",
        "--workdir",
        str(tmp_path),
        "--model-package-arn",
        package_arn,
        "--model-package-group",
        GROUP,
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{GROUP} version 1 is not served: its file {report} changed after registration" in error
    assert main(["endpoint", "start", "--workdir", str(tmp_path), "--group", GROUP, "--version", "1"]) == 2
    assert f"its file {report} changed" in capsys.readouterr().err
    assert not (tmp_path / "endpoints").exists()  # nothing was started


# --- one CLI, two backends --------------------------------------------------------------------------------------


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Any:
    from moto import mock_aws

    monkeypatch.setenv(config.ENV_REGION, REGION)
    with mock_aws():
        import boto3

        session = boto3.Session(region_name=REGION)
        session.client("s3").create_bucket(Bucket=BUCKET)
        session.client("sagemaker").create_model_package_group(ModelPackageGroupName=GROUP)
        yield session


def _moto(session: Any, *accuracies: float | None) -> None:
    for accuracy in accuracies:
        if accuracy is not None:
            key = f"evaluation/{accuracy}/evaluation.json"
            session.client("s3").put_object(Bucket=BUCKET, Key=key, Body=_report(accuracy))
        session.client("sagemaker").create_model_package(**_request(accuracy))


def _both(capsys: pytest.CaptureFixture[str], workdir: Path, *argv: str) -> tuple[str, str]:
    """What one command prints against moto and against the workdir, ARNs and times masked."""
    printed = []
    for backend in ([], ["--local", "--workdir", str(workdir)]):
        code = main([*argv, *backend])
        out = capsys.readouterr().out
        assert code == 0, out
        out = re.sub(r"arn:aws:sagemaker:[a-z0-9-]+:\d{12}:", "<arn>:", out)
        printed.append(re.sub(r"\d{4}-\d\d-\d\d[ T][\d:.]+(\+00:00)? *", "<time> ", out))  # widths vary
    return printed[0], printed[1]


@pytest.mark.slow
def test_models_approve_reject_print_the_same_on_sagemaker_and_locally(
    aws: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _moto(aws, 0.81, 0.9375, None)
    _local(tmp_path, 0.81, 0.9375, None)
    group = ["--model-package-group", GROUP]
    sagemaker_out, local_out = _both(capsys, tmp_path, "approve", "2", *group, "--no-deploy")
    assert sagemaker_out == local_out == "<arn>:model-package/visionmodels/2: Approved\n"
    sagemaker_out, local_out = _both(capsys, tmp_path, "reject", "latest", *group)
    assert sagemaker_out == local_out == "<arn>:model-package/visionmodels/3: Rejected\n"
    sagemaker_out, local_out = _both(capsys, tmp_path, "models", *group)
    assert sagemaker_out == local_out
    lines = local_out.splitlines()
    assert lines[0].split() == ["VERSION", "STATUS", "ACCURACY", "CREATED", "ARN"]
    assert "Approved" in lines[2] and "0.9375" in lines[2] and "Rejected" in lines[1] and "no model metrics" in lines[1]
    sagemaker_out, local_out = _both(capsys, tmp_path, "models", *group, "--json")
    assert json.loads(sagemaker_out) == json.loads(local_out)
    assert main(["approve", "7", "--local", "--workdir", str(tmp_path), *group]) == 2
    assert "has no version 7" in capsys.readouterr().err


def test_status_local_prints_what_status_prints_for_an_execution(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = arn("pipeline", config.PIPELINE_NAME)
    run = tmp_path / "run-0001"
    run.mkdir()
    steps = [
        {"StepName": "Preprocess", "StepStatus": "Succeeded", "CacheHitResult": {"SourcePipelineExecutionArn": "x"}},
        {"StepName": "CheckAccuracy", "StepStatus": "Succeeded", "Metadata": {"Condition": {"Outcome": "True"}}},
    ]
    record = {
        "RunId": "run-0001",
        "RunFolder": str(run),
        "PipelineArn": pipeline,
        "PipelineExecutionArn": f"{pipeline}/execution/run-0001",
        "PipelineExecutionStatus": "Succeeded",
        "StartTime": "2026-01-02T03:04:05+00:00",
        "PipelineExecutionSteps": steps,
    }
    (run / "run.json").write_text(json.dumps(record))
    assert main(["status", "--local", "--workdir", str(tmp_path)]) == 0
    from pipelines.local.runs import format_step

    assert capsys.readouterr().out.splitlines() == [
        f"execution {pipeline}/execution/run-0001",
        "status    Succeeded",
        "started   2026-01-02 03:04:05+00:00",
        "steps:",
        *(f"  {format_step(step)}" for step in steps),
    ]
    assert main(["status", "--local", "--workdir", str(tmp_path / "empty")]) == 2
    assert "has no local run in" in capsys.readouterr().err


def test_deploy_local_runs_the_deploy_function_on_the_local_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[tuple[str, int]] = []

    def serve(self: Any, name: str, package: dict[str, Any]) -> dict[str, Any]:
        served.append((name, package["ModelPackageVersion"]))
        return {}

    def status(self: Any, name: str) -> dict[str, Any] | None:
        return {"EndpointStatus": "InService", "url": "http://127.0.0.1:1"} if served else None

    monkeypatch.setattr(deploy_function.EndpointHost, "serve", serve)
    monkeypatch.setattr(deploy_function.EndpointHost, "status", status)
    client = _local(tmp_path, 0.8)
    package_arn = arn("model-package", f"{GROUP}/1")
    argv = [
        "deploy",
        "--local",
        "--workdir",
        str(tmp_path),
        "--model-package-arn",
        package_arn,
        "--model-package-group",
        GROUP,
    ]
    assert main(argv) == 2  # not approved yet: the function ignores it, as on SageMaker
    assert "not deployed" in capsys.readouterr().err and not served
    client.update_model_package(ModelPackageArn=package_arn, ModelApprovalStatus="Approved")
    assert main([*argv, "--wait"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["action"] == "created" and result["endpoint_name"] == config.LOCAL_ENDPOINT_NAME
    assert result["endpoint_status"] == "InService"
    assert served == [(config.LOCAL_ENDPOINT_NAME, 1)]


def test_a_job_name_is_refused_while_its_job_is_in_progress(tmp_path: Path) -> None:
    client = LocalSageMaker(tmp_path)
    client.create_processing_job(ProcessingJobName="preprocess-run-0001", AppSpecification={"ImageUri": "a"})
    again = _error(client.create_processing_job, ProcessingJobName="preprocess-run-0001", AppSpecification={})
    assert again["Code"] == "ResourceInUse" and "delete that file" in again["Message"]
    client.end_job("ProcessingJob", "preprocess-run-0001", "Failed", FailureReason="exit status 1")
    assert client.describe_processing_job(ProcessingJobName="preprocess-run-0001")["FailureReason"] == "exit status 1"
    # a finished job's name comes back only with a deleted run's ID: its record is replaced
    client.create_processing_job(ProcessingJobName="preprocess-run-0001", AppSpecification={"ImageUri": "b"})
    described = client.describe_processing_job(ProcessingJobName="preprocess-run-0001")
    assert described["ProcessingJobStatus"] == "InProgress" and described["AppSpecification"] == {"ImageUri": "b"}
