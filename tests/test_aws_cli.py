"""The SageMaker commands of ``python -m pipelines.run`` against moto (the CodeBuild spec: test_stack_template.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipelines import config
from pipelines.run import build_parser, main

REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/PipelineRole"
BUCKET = "cli-test-bucket"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto for every AWS call, with region, roles and bucket in the environment as CodeBuild sets them."""
    from moto import mock_aws

    monkeypatch.setenv(config.ENV_REGION, REGION)
    monkeypatch.setenv(config.ENV_ROLE_ARN, ROLE)
    monkeypatch.setenv(config.ENV_BUCKET, BUCKET)
    with mock_aws():
        import boto3

        session = boto3.Session(region_name=REGION)
        session.client("s3").create_bucket(Bucket=BUCKET)
        trust = {"Version": "2012-10-17", "Statement": []}
        deploy_role = session.client("iam").create_role(RoleName="deploy", AssumeRolePolicyDocument=json.dumps(trust))
        monkeypatch.setenv(config.ENV_DEPLOY_ROLE_ARN, deploy_role["Role"]["Arn"])
        yield session


def _approval_rule_groups(session: Any) -> dict[str, list[str]]:
    """EventBridge rule name -> the model package groups its pattern sends to the deploy Lambda."""
    events = session.client("events")
    return {
        rule["Name"]: json.loads(rule["EventPattern"])["detail"]["ModelPackageGroupName"]
        for rule in events.list_rules()["Rules"]
    }


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("missing", "flag"),
    [(config.ENV_REGION, "--region"), (config.ENV_ROLE_ARN, "--role"), (config.ENV_BUCKET, "--bucket")],
)
def test_missing_setting_names_flag_and_environment_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], missing: str, flag: str
) -> None:
    for name, value in ((config.ENV_REGION, REGION), (config.ENV_ROLE_ARN, ROLE), (config.ENV_BUCKET, BUCKET)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(missing)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    code, out, err = _run(capsys, "definition")
    assert code == 2
    assert flag in err and missing in err
    assert out == ""


def test_malformed_role_and_bucket_are_refused(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "definition", "--role", "PipelineRole")
    assert code == 2 and "IAM role ARN" in err
    code, _, err = _run(capsys, "definition", "--bucket", f"s3://{BUCKET}/prefix")
    assert code == 2 and "bucket name" in err


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("definition", "upsert", "start", "status", "models", "approve", "reject"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--region" in capsys.readouterr().out
    upsert_help = build_parser()._subparsers._group_actions[0].choices["upsert"].format_help()
    for flag in ("--no-debugger", "--tuning-strategy", "--use-spot-instances", "--kms-key", "--subnets"):
        assert flag in upsert_help
    for flag in ("--security-group-ids", "--network-isolation", "--pipeline-name", "--model-package-group", "--tag"):
        assert flag in upsert_help


@pytest.mark.slow
def test_definition_writes_a_checked_definition(aws: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out" / "definition.json"
    output.parent.mkdir()  # a command writes into a folder that exists, as any shell redirection does
    int8 = ("--no-int8", "--serving-wheels-uri", "s3://wheels-bucket/wheelhouse/")
    code, _, err = _run(capsys, "definition", "--no-debugger", "--tuning-strategy", "Random", *int8, "-o", str(output))
    assert code == 0, err
    definition = json.loads(output.read_text())
    steps = {step["Name"]: step for step in definition["Steps"]}
    assert "DebugRuleConfigurations" not in steps["Train"]["Arguments"]
    evaluate_flags = steps["Evaluate"]["Arguments"]["AppSpecification"]["ContainerArguments"]
    assert "--int8 off" in " ".join(evaluate_flags) and "--wheels" in evaluate_flags
    assert steps["Tune"]["Arguments"]["HyperParameterTuningJobConfig"]["Strategy"] == "Random"
    assert not list(tmp_path.rglob("*.tmp"))
    assert aws.client("s3").list_objects_v2(Bucket=BUCKET)["KeyCount"] == 0  # nothing uploaded

    code, out, _ = _run(capsys, "definition")
    assert code == 0 and json.loads(out)["Steps"][0]["Name"] == "Preprocess"


@pytest.mark.slow
def test_definition_refuses_a_bad_option(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "definition", "--network-isolation")
    assert code == 2 and "weights URI" in err


# --- upsert -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_upsert_creates_then_updates(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    sagemaker = aws.client("sagemaker")
    code, out, err = _run(capsys, "upsert", "--tag", "team=vision")
    assert code == 0, err
    assert f"pipeline {config.PIPELINE_NAME}: created" in out
    assert f"model package group {config.MODEL_PACKAGE_GROUP}: created" in out
    described = sagemaker.describe_pipeline(PipelineName=config.PIPELINE_NAME)
    assert described["RoleArn"] == ROLE
    definition = json.loads(described["PipelineDefinition"])
    assert "DebugRuleConfigurations" in {s["Name"]: s for s in definition["Steps"]}["Train"]["Arguments"]
    tags = {t["Key"]: t["Value"] for t in sagemaker.list_tags(ResourceArn=described["PipelineArn"])["Tags"]}
    assert tags["team"] == "vision" and tags["PipelineName"] == config.PIPELINE_NAME
    sagemaker.describe_model_package_group(ModelPackageGroupName=config.MODEL_PACKAGE_GROUP)

    # The code objects the definition names are in S3, byte for byte.
    from pipelines.packaging import code_artifacts

    s3 = aws.client("s3")
    for artifact in code_artifacts(BUCKET, config.PIPELINE_NAME).all():
        assert artifact.s3_uri in described["PipelineDefinition"]
        key = artifact.s3_uri.removeprefix(f"s3://{BUCKET}/")
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == artifact.body

    # The deploy wiring sends approvals of this group, and only this one, to the Lambda.
    assert _approval_rule_groups(aws) == {config.DEPLOY_RULE_NAME: [config.MODEL_PACKAGE_GROUP]}
    function = aws.client("lambda").get_function(FunctionName=config.DEPLOY_FUNCTION_NAME)["Configuration"]
    assert "deploy trigger:" in out and '"action": "created"' in out
    # ... and the pipeline's Deploy step invokes that very function
    deploy_step = next(s for s in definition["Steps"][-1]["Arguments"]["IfSteps"] if s["Type"] == "Lambda")
    assert deploy_step["FunctionArn"] == function["FunctionArn"]
    assert "-> Deploy" in described["PipelineDescription"]

    code, out, err = _run(capsys, "upsert", "--no-debugger", "--no-deploy-trigger")
    assert code == 0, err
    assert f"pipeline {config.PIPELINE_NAME}: updated" in out
    assert f"model package group {config.MODEL_PACKAGE_GROUP}: exists" in out
    assert "deploy trigger: skipped" in out
    updated = json.loads(sagemaker.describe_pipeline(PipelineName=config.PIPELINE_NAME)["PipelineDefinition"])
    assert "DebugRuleConfigurations" not in {s["Name"]: s for s in updated["Steps"]}["Train"]["Arguments"]
    assert [s["Type"] for s in updated["Steps"][-1]["Arguments"]["IfSteps"]] == ["RegisterModel"]  # no Deploy step
    assert len(sagemaker.list_pipelines()["PipelineSummaries"]) == 1


@pytest.mark.slow
def test_upsert_refuses_a_role_of_another_account(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "upsert", "--role", "arn:aws:iam::210987654321:role/PipelineRole")
    assert code == 2 and "account 210987654321" in err and "123456789012" in err and "nothing was changed" in err
    assert aws.client("sagemaker").list_pipelines()["PipelineSummaries"] == []


@pytest.mark.slow
def test_definition_takes_the_demo_preset_and_fixed_hyperparameters(
    aws: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "definition", "--preset", "demo", "--hp", "lr=0.005", "--skip-deploy-wiring")
    assert code == 0, err
    definition = json.loads(out)
    defaults = {p["Name"]: p["DefaultValue"] for p in definition["Parameters"]}
    assert defaults["ImageSize"] == config.DEMO_IMAGE_SIZE and defaults["Architecture"] == "resnet18"
    tune = definition["Steps"][1]["Arguments"]
    assert tune["TrainingJobDefinition"]["StaticHyperParameters"]["lr"] == "0.005"
    tuned = {r["Name"] for kind in tune["HyperParameterTuningJobConfig"]["ParameterRanges"].values() for r in kind}
    assert "lr" not in tuned and tuned
    assert "Deploy" not in json.dumps(definition["Steps"][-1]["Arguments"]["IfSteps"])
    with pytest.raises(SystemExit) as exit_info:
        main(["definition", "--hp", "architecture"])
    assert exit_info.value.code == 2 and "expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_upsert_uses_the_names_given(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(
        capsys,
        "upsert",
        "--pipeline-name",
        "VisionPipeline",
        "--model-package-group",
        "VisionModels",
        "--preset",
        "demo",
    )
    assert code == 0, err
    sagemaker = aws.client("sagemaker")
    definition = json.loads(sagemaker.describe_pipeline(PipelineName="VisionPipeline")["PipelineDefinition"])
    parameters = {p["Name"]: p for p in definition["Parameters"]}
    assert parameters["ModelPackageGroupName"]["DefaultValue"] == "VisionModels"
    assert parameters["ImageSize"]["DefaultValue"] == config.DEMO_IMAGE_SIZE  # the demo, upserted as a smoke test
    sagemaker.describe_model_package_group(ModelPackageGroupName="VisionModels")
    assert _approval_rule_groups(aws) == {config.DEPLOY_RULE_NAME: ["VisionModels"]}


@pytest.mark.slow
def test_upsert_without_a_deploy_role_changes_nothing(
    aws: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(config.ENV_DEPLOY_ROLE_ARN)
    code, out, err = _run(capsys, "upsert")
    assert code == 2
    assert "--deploy-role-arn" in err and config.ENV_DEPLOY_ROLE_ARN in err and "--skip-deploy-wiring" in err
    assert "nothing was changed" in err and out == ""
    assert aws.client("sagemaker").list_pipelines()["PipelineSummaries"] == []
    assert aws.client("s3").list_objects_v2(Bucket=BUCKET)["KeyCount"] == 0


# --- start / status ---------------------------------------------------------------------------------------------


@pytest.fixture
def upserted(aws: Any, capsys: pytest.CaptureFixture[str]) -> Any:
    code, _, err = _run(capsys, "upsert", "--no-deploy-trigger")
    assert code == 0, err
    return aws


def test_start_with_overrides(upserted: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(
        capsys,
        "start",
        "--param",
        "MaxTuningJobs=3",
        "--param",
        "ModelApprovalStatus=Approved",
        "--display-name",
        "ci-1",
    )
    assert code == 0, err
    execution_arn = out.strip()
    assert re.fullmatch(
        rf"arn:aws:sagemaker:{REGION}:\d{{12}}:pipeline/{config.PIPELINE_NAME}/execution/\w+", execution_arn
    )
    sagemaker = upserted.client("sagemaker")
    parameters = sagemaker.list_pipeline_parameters_for_execution(PipelineExecutionArn=execution_arn)
    assert {p["Name"]: p["Value"] for p in parameters["PipelineParameters"]} == {
        "MaxTuningJobs": "3",
        "ModelApprovalStatus": "Approved",
    }
    described = sagemaker.describe_pipeline_execution(PipelineExecutionArn=execution_arn)
    assert described["PipelineExecutionDisplayName"] == "ci-1"


@pytest.mark.slow
def test_start_refuses_bad_overrides(upserted: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ("MaxTuningJob=3", "no such pipeline parameter; the parameters are InputDataUri"),
        ("MaxTuningJobs=three", "takes an integer"),
        ("AccuracyThreshold=high", "takes a number"),
        ("ModelApprovalStatus=Yes", "takes one of PendingManualApproval, Approved, Rejected"),
    ]
    for override, message in cases:
        code, out, err = _run(capsys, "start", "--param", override)
        assert code == 2 and out == "", override
        assert message in err, (override, err)
    with pytest.raises(SystemExit) as exit_info:  # not Name=Value: argparse refuses it
        main(["start", "--param", "MaxTuningJobs"])
    assert exit_info.value.code == 2 and "expected Name=Value" in capsys.readouterr().err
    sagemaker = upserted.client("sagemaker")
    assert sagemaker.list_pipeline_executions(PipelineName=config.PIPELINE_NAME)["PipelineExecutionSummaries"] == []
    code, _, err = _run(capsys, "status")
    assert code == 2 and "no executions yet" in err


def test_start_needs_an_upserted_pipeline(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "start", "--pipeline-name", "Missing")
    assert code == 2 and "does not exist" in err and "upsert" in err


class ScriptedExecution:
    """Stands in for the SageMaker client: each poll returns the next scripted state."""

    def __init__(self, states: list[tuple[str, list[dict[str, Any]]]]) -> None:
        self.states = states
        self.polls = 0
        self.step_requests: list[dict[str, Any]] = []

    def _state(self) -> tuple[str, list[dict[str, Any]]]:
        return self.states[min(self.polls, len(self.states) - 1)]

    def describe_pipeline_execution(self, PipelineExecutionArn: str) -> dict[str, Any]:
        status, _ = self._state()
        return {"PipelineExecutionStatus": status, "FailureReason": "Step failure" if status == "Failed" else ""}

    def list_pipeline_execution_steps(self, **request: Any) -> dict[str, Any]:
        self.step_requests.append(request)
        _, steps = self._state()
        self.polls += 1
        # two pages, to exercise NextToken
        if "NextToken" not in request:
            return (
                {"PipelineExecutionSteps": steps[:1], "NextToken": "page-2"}
                if len(steps) > 1
                else {"PipelineExecutionSteps": steps}
            )
        self.polls -= 1  # the second page belongs to the same poll
        return {"PipelineExecutionSteps": steps[1:]}


def test_follow_execution_prints_changes_and_returns_the_final_status(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from pipelines.cli import sagemaker as aws_cli

    monkeypatch.setattr(aws_cli, "_sleep", lambda seconds: None)
    fake = ScriptedExecution(
        [
            ("Executing", [{"StepName": "Preprocess", "StepStatus": "Executing"}]),
            ("Executing", [{"StepName": "Preprocess", "StepStatus": "Executing"}]),
            (
                "Failed",
                [
                    {
                        "StepName": "Preprocess",
                        "StepStatus": "Succeeded",
                        "Metadata": {"ProcessingJob": {"Arn": "arn:aws:sagemaker:us-east-1:1:processing-job/p"}},
                    },
                    {"StepName": "Tune", "StepStatus": "Failed", "FailureReason": "ResourceLimitExceeded"},
                ],
            ),
        ]
    )
    out = io.StringIO()
    assert aws_cli.follow_execution(fake, "arn:execution", poll_seconds=0, out=out) == "Failed"
    lines = out.getvalue().splitlines()
    assert sum("Preprocess" in line and "Executing" in line for line in lines) == 1  # printed once, on change
    assert any("Preprocess" in line and "Succeeded" in line and "processing-job/p" in line for line in lines)
    assert any("Tune" in line and "Failed" in line for line in lines)
    assert "reason: ResourceLimitExceeded" in out.getvalue()
    assert lines[-2].startswith("execution Failed")
    assert fake.step_requests[0]["SortOrder"] == "Ascending"
    assert any(request.get("NextToken") == "page-2" for request in fake.step_requests)


def test_follow_execution_gives_up_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from pipelines.cli import sagemaker as aws_cli
    from pipelines.util.errors import CommandError

    monkeypatch.setattr(aws_cli, "_sleep", lambda seconds: None)
    fake = ScriptedExecution([("Executing", [])])
    with pytest.raises(CommandError, match="the execution goes on"):
        aws_cli.follow_execution(fake, "arn:execution", poll_seconds=0, timeout_seconds=-1, out=io.StringIO())


@pytest.mark.slow
def test_start_wait_and_status_against_moto(
    upserted: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto has no ListPipelineExecutionSteps: that one call is stubbed, everything else is moto's."""
    from pipelines.cli import sagemaker as aws_cli

    asked: list[str] = []

    def steps(client: Any, execution_arn: str) -> list[dict[str, Any]]:
        asked.append(execution_arn)
        return [
            {
                "StepName": "Preprocess",
                "StepStatus": "Succeeded",
                "CacheHitResult": {"SourcePipelineExecutionArn": "x"},
            },
            {"StepName": "CheckAccuracy", "StepStatus": "Succeeded", "Metadata": {"Condition": {"Outcome": "True"}}},
        ]

    monkeypatch.setattr(aws_cli, "list_execution_steps", steps)
    monkeypatch.setattr(aws_cli, "_sleep", lambda seconds: None)
    code, out, err = _run(capsys, "start", "--wait", "--poll-seconds", "0")
    assert code == 0, err  # moto's executions succeed at once
    execution_arn = out.strip()
    assert asked == [execution_arn]
    assert "Preprocess" in err and "(cached)" in err and "execution Succeeded" in err

    code, out, err = _run(capsys, "status")
    assert code == 0, err
    assert f"execution {execution_arn}" in out and "Succeeded" in out
    assert "CheckAccuracy" in out and "outcome True" in out
    code, out, _ = _run(capsys, "status", "--execution-arn", execution_arn)
    assert code == 0 and execution_arn in out


# --- model registry ---------------------------------------------------------------------------------------------


def _register(session: Any, group: str, accuracy: float | None) -> str:
    s3, sagemaker = session.client("s3"), session.client("sagemaker")
    request: dict[str, Any] = {
        "ModelPackageGroupName": group,
        "ModelApprovalStatus": "PendingManualApproval",
        "InferenceSpecification": {
            "Containers": [{"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/x:1", "ModelDataUrl": "s3://b/m"}],
            "SupportedContentTypes": ["image/jpeg"],
            "SupportedResponseMIMETypes": ["application/json"],
        },
    }
    if accuracy is not None:
        key = f"evaluation/{accuracy}/evaluation.json"
        report = {"multiclass_classification_metrics": {"accuracy": {"value": accuracy, "standard_deviation": "NaN"}}}
        s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(report).encode())
        request["ModelMetrics"] = {
            "ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": f"s3://{BUCKET}/{key}"}}
        }
    return sagemaker.create_model_package(**request)["ModelPackageArn"]


@pytest.mark.slow
def test_models_approve_reject(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    group = "VisionModels"
    sagemaker = aws.client("sagemaker")
    sagemaker.create_model_package_group(ModelPackageGroupName=group)
    first = _register(aws, group, 0.81)
    second = _register(aws, group, 0.9375)
    third = _register(aws, group, None)

    code, out, err = _run(capsys, "models", "--model-package-group", group, "--json")
    assert code == 0, err
    rows = {row["arn"]: row for row in json.loads(out)}
    assert rows[first]["accuracy"] == pytest.approx(0.81) and rows[first]["version"] == 1
    assert rows[second]["accuracy"] == pytest.approx(0.9375)
    assert rows[third]["accuracy"] is None and rows[third]["note"] == "no model metrics"
    assert {row["status"] for row in rows.values()} == {"PendingManualApproval"}

    code, out, err = _run(capsys, "approve", "2", "--model-package-group", group, "--description", "looks good")
    assert code == 0, err
    assert f"{second}: Approved" in out
    described = sagemaker.describe_model_package(ModelPackageName=second)
    assert described["ModelApprovalStatus"] == "Approved"

    code, out, err = _run(capsys, "reject", "latest", "--model-package-group", group)
    assert code == 0, err
    assert sagemaker.describe_model_package(ModelPackageName=third)["ModelApprovalStatus"] == "Rejected"

    code, _, err = _run(capsys, "approve", first)
    assert code == 0, err
    assert sagemaker.describe_model_package(ModelPackageName=first)["ModelApprovalStatus"] == "Approved"

    code, out, _ = _run(capsys, "models", "--model-package-group", group)
    assert code == 0
    table = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "Approved" in table["1"] and "0.8100" in table["1"]
    assert "Approved" in table["2"] and "0.9375" in table["2"]
    assert "Rejected" in table["3"] and " - " in table["3"]

    code, _, err = _run(capsys, "approve", "7", "--model-package-group", group)
    assert code == 2 and "has no version 7" in err
    code, _, err = _run(capsys, "approve", "newest", "--model-package-group", group)
    assert code == 2 and "'latest'" in err


def test_aws_refusals_become_one_line_errors(aws: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "approve", f"arn:aws:sagemaker:{REGION}:123456789012:model-package/none/1")
    assert code == 2 and err.splitlines()[-1].startswith("error: AWS refused UpdateModelPackage: ValidationException")


@pytest.mark.slow
def test_upsert_with_tracking_and_a_wheelhouse_uploads_the_code_the_definition_names(
    aws: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The training source directory then installs MLflow from the tracking channel: upsert must upload that one,
    not the one tracking alone would make."""
    import io
    import tarfile

    arn = f"arn:aws:sagemaker:{REGION}:123456789012:mlflow-tracking-server/team"
    wheels = "s3://wheels-bucket/wheelhouse/"
    code, _, err = _run(
        capsys, "upsert", "--skip-deploy-wiring", "--mlflow-tracking-arn", arn, "--serving-wheels-uri", wheels
    )
    assert code == 0, err
    described = aws.client("sagemaker").describe_pipeline(PipelineName=config.PIPELINE_NAME)
    listed = aws.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=f"{config.PIPELINE_NAME}/code/")["Contents"]
    sourcedirs = [item["Key"] for item in listed if item["Key"].endswith("/sourcedir.tar.gz")]
    assert len(sourcedirs) == 1 and f"s3://{BUCKET}/{sourcedirs[0]}" in described["PipelineDefinition"]
    body = aws.client("s3").get_object(Bucket=BUCKET, Key=sourcedirs[0])["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        requirements = archive.extractfile("requirements.txt").read().decode()
    assert "--no-index" in requirements.splitlines() and "--find-links /opt/ml/input/data/tracking" in requirements
