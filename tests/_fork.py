"""The fork guide (docs/customizing.md), as a test builds it: a variant of the pipeline with one more
ProcessingStep, a data report after Preprocess, made through the builder alone.

The variant is a small wrapper of ``get_pipeline`` (what a fork's edit of ``pipelines/pipeline.py`` does: one
more step that reads a property of Preprocess), and its script is the test's own
(``tests/fixtures/data_report.py``), put in the local object store as ``upsert`` uploads a fork's code objects.
Nothing of the local engine, serving or the AWS side knows of it. test_local_pipeline.py runs it end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines import config
from pipelines import pipeline as builder

REPORT_SCRIPT = Path(__file__).resolve().parent / "fixtures" / "data_report.py"
REPORT_CODE = f"s3://{config.LOCAL_BUCKET}/{config.PIPELINE_NAME}/code/data-report/data_report.py"


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
