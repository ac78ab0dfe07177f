"""Executors of the steps that run no container: Condition, Fail, RegisterModel, Model and Lambda.

- **Condition**: every one of ``Conditions`` evaluated (``JsonGet`` on property files included); the outcome
  picks ``IfSteps`` or ``ElseSteps``.
- **Fail**: the run fails with the evaluated ``ErrorMessage``.
- **RegisterModel**: ``CreateModelPackage`` of the local SageMaker (:mod:`.sagemaker`): always a new version in
  its registry, with copies of the files its arguments name (model artifact, metrics reports). The step is never
  cached: a rerun whose jobs all come from the cache still registers a version of its own, as on SageMaker.
- **Model**: ``CreateModel`` of the local SageMaker, named as the pipeline service names a Model step's model;
  its ``ModelName`` is what a later step reads. Never cached, as on SageMaker.
- **Lambda**: the function the ``FunctionArn`` names, run in-process with the step's resolved ``Arguments`` as
  its event and its log in the step's folder; the declared ``OutputParameters`` are read from its answer. Only
  functions the runner hands over run (the deploy function, against the local registry and endpoint:
  :mod:`.deploy_function`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from pipelines.definition.expressions import as_text
from pipelines.local.executor import LocalExecution, StepContext, StepExecutor, StepFailure, StepResult
from pipelines.local.objectstore import s3_uris

LambdaFunction = Callable[[Any, Path], Mapping[str, Any]]  # (event, log file) -> the function's answer
_OUTPUT_TYPES: dict[str, Callable[[Any], Any]] = {
    "String": as_text,
    "Integer": int,
    "Float": float,
    "Boolean": lambda value: value if isinstance(value, bool) else str(value).lower() == "true",
}


def _short(value: Any) -> str:
    """A value as a progress line shows it: numbers to 4 decimals, ARNs by their resource part."""
    if isinstance(value, float):
        return f"{value:.4f}"
    text = as_text(value)
    return text.rsplit(":", 1)[-1] if text.startswith("arn:") else text


class ConditionExecutor(StepExecutor):
    step_type = "Condition"

    def run(self, context: StepContext) -> StepResult:
        arguments = context.step["Arguments"]
        readings = [context.execution.scope.condition(item) for item in arguments.get("Conditions", [])]
        outcome = all(result for result, _ in readings)
        branch = [step["Name"] for step in arguments.get("IfSteps" if outcome else "ElseSteps", [])]
        shown = " and ".join(_readable(text) for _, text in readings)
        return StepResult(
            metadata={"Condition": {"Outcome": str(outcome)}},
            detail=f"{shown} is {str(outcome).lower()}: {', '.join(branch) or 'nothing runs'}",
            outcome=outcome,
        )


def _readable(text: str) -> str:
    """Long floats in a condition's reading cut to 4 decimals ("0.97765363 >= 0.9" -> "0.9777 >= 0.9")."""
    words = []
    for word in text.split(" "):
        try:
            words.append(_short(float(word)) if "." in word and len(word) > 6 else word)
        except ValueError:
            words.append(word)
    return " ".join(words)


class FailExecutor(StepExecutor):
    step_type = "Fail"

    def run(self, context: StepContext) -> StepResult:
        message = as_text(context.resolve(context.step.get("Arguments", {}).get("ErrorMessage", "")))
        raise StepFailure(message or "the pipeline reached a Fail step")


class RegisterModelExecutor(StepExecutor):
    step_type = "RegisterModel"
    provides = frozenset(
        {
            "ModelPackageArn",
            "ModelPackageVersion",
            "ModelPackageGroupName",
            "ModelApprovalStatus",
            "ModelPackageStatus",
            "ModelPackageDescription",
            "InferenceSpecification",
            "ModelMetrics",
            "CreationTime",
            "CustomerMetadataProperties",
        }
    )

    def __init__(self, sagemaker: Any) -> None:
        self.sagemaker = sagemaker  # a LocalSageMaker

    def check(self, step: dict[str, Any], execution: LocalExecution) -> list[str]:
        containers = step.get("Arguments", {}).get("InferenceSpecification", {}).get("Containers", [])
        if not containers or "ModelDataUrl" not in containers[0]:
            return [f"{step['Name']}: the first container names no ModelDataUrl (the local registry keeps the model)"]
        return []

    def run(self, context: StepContext) -> StepResult:
        request = dict(context.arguments)
        for uri in s3_uris(request):  # a missing file fails here, naming what it is
            context.local_path(uri, "a file of the model package")
        metadata = {**request.get("CustomerMetadataProperties", {}), "run": context.execution.run_id}
        try:
            created = self.sagemaker.create_model_package(**{**request, "CustomerMetadataProperties": metadata})
            package = self.sagemaker.describe_model_package(ModelPackageName=created["ModelPackageArn"])
        except ClientError as error:
            raise StepFailure(error.response["Error"]["Message"]) from error
        package = {**package, "CreationTime": package["CreationTime"].isoformat()}
        version, status = package["ModelPackageVersion"], package["ModelApprovalStatus"]
        summary = {key: package[key] for key in ("ModelPackageArn", "ModelPackageVersion", "ModelApprovalStatus")}
        return StepResult(
            properties={key: package[key] for key in self.provides if key in package},
            metadata={"RegisterModel": {"Arn": package["ModelPackageArn"]}},
            detail=f"{package['ModelPackageGroupName']} version {version} ({status})",
            summary={"model_package": summary},
        )


class ModelExecutor(StepExecutor):
    """``CreateModel`` (the SDK's ModelStep over ``model.create()``) in the local SageMaker, under a name made as
    the pipeline service makes one (the step's arguments name none): a later step reads it by ``ModelName``."""

    step_type = "Model"
    provides = frozenset({"ModelName", "ModelArn", "PrimaryContainer", "Containers", "ExecutionRoleArn"})

    def __init__(self, sagemaker: Any) -> None:
        self.sagemaker = sagemaker  # a LocalSageMaker

    def run(self, context: StepContext) -> StepResult:
        request = dict(context.arguments)
        name = request.pop("ModelName", None) or model_name(context.execution.run_id, context.name)
        try:
            self.sagemaker.create_model(ModelName=name, **request)
            model = self.sagemaker.describe_model(ModelName=name)
        except ClientError as error:
            raise StepFailure(error.response["Error"]["Message"]) from error
        return StepResult(
            properties={key: model[key] for key in self.provides if key in model},
            metadata={"Model": {"Arn": model["ModelArn"]}},
            detail=name,
        )


def model_name(run_id: str, step_name: str) -> str:
    """A SageMaker ModelName (letters, digits and hyphens, at most 63) for a Model step of a run."""
    return re.sub(r"[^a-zA-Z0-9]+", "-", f"pipelines-{run_id}-{step_name}")[:63].strip("-")


def function_name(arn: str) -> str:
    return arn.split(":function:", 1)[-1].split(":", 1)[0]


class LambdaExecutor(StepExecutor):
    step_type = "Lambda"
    provides = frozenset({"OutputParameters"})

    def __init__(self, functions: Mapping[str, LambdaFunction]) -> None:
        self.functions = dict(functions)

    def check(self, step: dict[str, Any], execution: LocalExecution) -> list[str]:
        arn = str(step.get("FunctionArn", ""))
        if function_name(arn) not in self.functions:
            known = ", ".join(sorted(self.functions)) or "none"
            return [
                f"{step['Name']}: FunctionArn {arn} names a function the local executor cannot run (it runs: {known})"
            ]
        return []

    def run(self, context: StepContext) -> StepResult:
        arn = context.step["FunctionArn"]
        function = self.functions[function_name(arn)]
        log_path = context.folder / "log.txt"
        try:
            response = function(context.arguments, log_path)
        except Exception as error:  # the function's own failure is the step's, as on SageMaker
            reason = f"the function {function_name(arn)} raised {type(error).__name__}: {error}"
            raise StepFailure(reason, log_path) from error
        outputs = []
        for declared in context.step.get("OutputParameters", []):
            name = declared["OutputName"]
            if name not in response:
                raise StepFailure(f"the function {function_name(arn)} returned no {name!r}, an output of the step")
            outputs.append({"Name": name, "Value": _OUTPUT_TYPES.get(declared["OutputType"], as_text)(response[name])})
        return StepResult(
            properties={"OutputParameters": {o["Name"]: o["Value"] for o in outputs}},  # read by name
            metadata={
                "Lambda": {"Arn": arn, "OutputParameters": [{**o, "Value": as_text(o["Value"])} for o in outputs]}
            },
            detail=" ".join(f"{o['Name']}={_short(o['Value'])}" for o in outputs) or "done",
            outputs={"log": log_path},
            summary={"lambda": {context.name: dict(response)}},
        )
