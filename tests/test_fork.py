"""The fork guide (docs/customizing.md), proven: a variant of the pipeline with one more ProcessingStep, a data
report after Preprocess, made through the builder alone and run locally end to end.

The variant is a small wrapper of ``get_pipeline`` (what a fork's edit of ``pipelines/pipeline.py`` does: one
more step that reads a property of Preprocess), and its script is the test's own
(``tests/fixtures/data_report.py``), put in the local object store as ``upsert`` uploads a fork's code objects.
Nothing of the local engine, serving or the AWS side knows of it.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipelines import config, demo_data
from pipelines import pipeline as builder
from pipelines.local.objectstore import ObjectStore
from pipelines.run import main

pytestmark = pytest.mark.slow

REPORT_SCRIPT = Path(__file__).resolve().parent / "fixtures" / "data_report.py"
REPORT_CODE = f"s3://{config.LOCAL_BUCKET}/{config.PIPELINE_NAME}/code/data-report/data_report.py"
SMALL = ["--preset", "demo", "--no-int8", "--trials", "1", "--tuning-epochs", "1", "--epochs", "1", "--threshold", "0"]


def with_data_report(get_pipeline: Callable[..., Any]) -> Callable[..., Any]:
    """``get_pipeline`` with a DataReport step after Preprocess, reading its train split."""
    from sagemaker.processing import ProcessingInput, ProcessingOutput, ScriptProcessor
    from sagemaker.workflow.execution_variables import ExecutionVariables
    from sagemaker.workflow.functions import Join
    from sagemaker.workflow.steps import ProcessingStep

    def build(session: Any, role: str, bucket: str | None = None, options: Any = None, **kwargs: Any) -> Any:
        pipeline = get_pipeline(session, role, bucket, options, **kwargs)
        preprocess = next(step for step in pipeline.steps if step.name == config.STEP_PREPROCESS)
        instance_type = next(p for p in pipeline.parameters if p.name == "ProcessingInstanceType")
        processor = ScriptProcessor(
            image_uri=builder.framework_image_uri(
                session.boto_region_name, "training", config.PROCESSING_INSTANCE_TYPE
            ),
            command=["python3"],
            role=role,
            instance_type=instance_type,
            instance_count=1,
            base_job_name=f"{config.BASE_JOB_PREFIX}-data-report",
            sagemaker_session=session,
        )
        where = [f"s3://{bucket}", pipeline.name, ExecutionVariables.PIPELINE_EXECUTION_ID, "DataReport", "report"]
        arguments = processor.run(
            code=REPORT_CODE,
            inputs=[
                ProcessingInput(
                    source=preprocess.properties.ProcessingOutputConfig.Outputs["train"].S3Output.S3Uri,
                    destination="/opt/ml/processing/train",
                    input_name="train",
                )
            ],
            outputs=[
                ProcessingOutput(
                    output_name="report", source="/opt/ml/processing/report", destination=Join(on="/", values=where)
                )
            ],
            arguments=["--train-dir", "/opt/ml/processing/train", "--output-dir", "/opt/ml/processing/report"],
        )
        pipeline.steps.insert(1, ProcessingStep(name="DataReport", step_args=arguments))
        return pipeline

    return build


@pytest.mark.timeout(600)  # a demo run, about 90 s alone; more on a busy machine
def test_a_variant_with_a_data_report_step_runs_locally_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builder, "get_pipeline", with_data_report(builder.get_pipeline))
    workdir = tmp_path / "runs"
    ObjectStore(workdir).put_bytes(REPORT_CODE, REPORT_SCRIPT.read_bytes())
    data = demo_data.write_digits_archive(tmp_path / "digits.zip", image_size=16, per_class_limit=6)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["local", "--data", str(data), "--workdir", str(workdir), *SMALL, "--image-size", "16"])
    assert code == 0, (out.getvalue(), err.getvalue())

    run = workdir / "run-0001"
    record = json.loads((run / "run.json").read_text())
    statuses = {step["StepName"]: step["StepStatus"] for step in record["PipelineExecutionSteps"]}
    assert statuses == {
        "Preprocess": "Succeeded",
        "DataReport": "Succeeded",
        "Tune": "Succeeded",
        "Train": "Succeeded",
        "Evaluate": "Succeeded",
        "CheckAccuracy": "Succeeded",
        "Register-RegisterModel": "Succeeded",
        "Deploy": "Succeeded",
    }
    steps = {step["StepName"]: step for step in record["PipelineExecutionSteps"]}
    report = json.loads((workdir / steps["DataReport"]["Local"]["Outputs"]["report"] / "report.json").read_text())
    train = workdir / steps["Preprocess"]["Local"]["Outputs"]["train"]
    labels = json.loads((train / "labels.json").read_text())
    assert report["classes"] == len(labels) == 10
    assert report["per_class"] == {label: len(list((train / label).iterdir())) for label in labels}
    assert report["images"] == sum(report["per_class"].values()) > 0
    definition = json.loads((run / "definition.json").read_text())
    added = next(step for step in definition["Steps"] if step["Name"] == "DataReport")
    assert added["Arguments"]["ProcessingInputs"][0]["S3Input"]["S3Uri"] == {
        "Get": "Steps.Preprocess.ProcessingOutputConfig.Outputs['train'].S3Output.S3Uri"
    }
