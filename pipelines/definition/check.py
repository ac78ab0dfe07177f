"""Checking a pipeline definition against SageMaker's own API shapes, offline.

SageMaker validates a pipeline's job arguments only when a step runs, hours into an execution. These checks read
botocore's SageMaker service model instead, so a wrong member name, a missing required member, a bad enum value or
a reference to something that does not exist fails ``definition``/``upsert`` and the tests. The helpers that walk
a definition (``iter_steps``, ``iter_references``, ``step_dependencies``) serve the local
executor too. Nothing here imports the SageMaker SDK.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from pipelines.definition.expressions import is_expression, split_property_path

# Step type -> (the API call its Arguments are the request of, the Describe call its properties come from).
STEP_API_OPERATIONS = {
    "Processing": ("CreateProcessingJob", "DescribeProcessingJob"),
    "Training": ("CreateTrainingJob", "DescribeTrainingJob"),
    "Tuning": ("CreateHyperParameterTuningJob", "DescribeHyperParameterTuningJob"),
    "RegisterModel": ("CreateModelPackage", "DescribeModelPackage"),
    "Model": ("CreateModel", "DescribeModel"),
}
# Properties the pipeline service fills from a second call: a tuning step's top training jobs (the SDK's
# TuningStep reads both shapes, get_top_model_s3_uri the TrainingJobSummaries).
SECOND_PROPERTY_OPERATIONS = {"Tuning": "ListTrainingJobsForHyperParameterTuningJob"}
# Names the pipeline service fills in (the SDK leaves them out unless custom prefixes are on).
SERVICE_FILLED_MEMBERS = {"ProcessingJobName", "TrainingJobName", "HyperParameterTuningJobName", "ModelName"}
EXECUTION_VARIABLE_NAMES = {
    "CurrentDateTime",
    "StartDateTime",
    "PipelineArn",
    "PipelineName",
    "PipelineExecutionArn",
    "PipelineExecutionId",
    "ProcessingJobName",
    "TrainingJobName",
}
_PARAMETER_VALUE_TYPES = {"String": "string", "Integer": "integer", "Float": "float", "Boolean": "boolean"}
_LAMBDA_OUTPUT_TYPES = _PARAMETER_VALUE_TYPES  # a LambdaOutput's OutputType takes the same four names
# Which expression value types each botocore scalar type accepts ("any" = unknown until run time).
_ACCEPTED_TYPES = {
    "string": {"string", "any"},
    "integer": {"integer", "any"},
    "long": {"integer", "any"},
    "float": {"float", "integer", "any"},
    "double": {"float", "integer", "any"},
    "boolean": {"boolean", "any"},
}


@functools.lru_cache(maxsize=1)
def _sagemaker_service_model() -> Any:
    """botocore's SageMaker API model (loading it takes a second: once per process)."""
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker")


def iter_steps(definition: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step of a definition, the ones nested in condition branches included."""
    found = []
    pending = list(definition.get("Steps", []))
    while pending:
        step = pending.pop(0)
        found.append(step)
        if step.get("Type") == "Condition":
            pending.extend(step["Arguments"].get("IfSteps", []))
            pending.extend(step["Arguments"].get("ElseSteps", []))
    return found


def iter_references(value: Any) -> list[str]:
    """All ``{"Get": ...}`` reference strings anywhere inside value."""
    found = []
    if isinstance(value, dict):
        if set(value) == {"Get"} and isinstance(value["Get"], str):
            return [value["Get"]]
        for item in value.values():
            found.extend(iter_references(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(iter_references(item))
    return found


class DefinitionChecker:
    """Checks a pipeline definition (as a dict) and collects problems as readable lines."""

    def __init__(self, definition: dict[str, Any], unused_parameters: bool = True) -> None:
        self.definition = definition
        self.unused_parameters = unused_parameters
        self.model = _sagemaker_service_model()
        self.steps = {step["Name"]: step for step in iter_steps(definition)}
        self.parameters = {p["Name"]: p for p in definition.get("Parameters", [])}
        self.problems: list[str] = []

    # -- entry point --------------------------------------------------------------------------------------------
    def check(self) -> list[str]:
        names = [step["Name"] for step in iter_steps(self.definition)]
        for name in {n for n in names if names.count(n) > 1}:
            self.problems.append(f"step name {name!r} is used more than once")
        for step in self.steps.values():
            operations = STEP_API_OPERATIONS.get(step.get("Type"))
            if operations:  # the shape walk checks every expression it meets, references included
                shape = self.model.operation_model(operations[0]).input_shape
                self._check_value(step.get("Arguments", {}), shape, f"{step['Name']}.Arguments", top_level=True)
            else:
                for reference in iter_references(own_arguments(step)):
                    self._expression_type({"Get": reference}, f"{step['Name']}.Arguments")
            for dependency in step.get("DependsOn", []):
                if dependency not in self.steps:
                    self.problems.append(f"{step['Name']} depends on unknown step {dependency!r}")
            if step.get("Type") == "Lambda":
                self._check_lambda_step(step)
        if self.unused_parameters:
            self._check_parameters_used()
        self._check_acyclic()
        return self.problems

    def _check_parameters_used(self) -> None:
        used = {ref.split(".", 1)[1] for ref in iter_references(self.definition) if ref.startswith("Parameters.")}
        for name in self.parameters:
            if name not in used:
                self.problems.append(f"parameter {name} is declared but never used")

    def _check_lambda_step(self, step: dict[str, Any]) -> None:
        arn = step.get("FunctionArn")
        if not (isinstance(arn, str) and re.fullmatch(r"arn:aws[a-z-]*:lambda:[a-z0-9-]+:\d{12}:function:[\w-]+", arn)):
            self.problems.append(f"{step['Name']}: FunctionArn {arn!r} is not the ARN of a Lambda function")
        names = [output.get("OutputName") for output in step.get("OutputParameters", [])]
        for name in {n for n in names if names.count(n) > 1}:
            self.problems.append(f"{step['Name']}: output {name!r} is declared more than once")
        for output in step.get("OutputParameters", []):
            if output.get("OutputType") not in _LAMBDA_OUTPUT_TYPES:
                self.problems.append(f"{step['Name']}: output {output.get('OutputName')!r} has an unknown type")

    # -- shapes -------------------------------------------------------------------------------------------------
    def _check_value(self, value: Any, shape: Any, where: str, top_level: bool = False) -> None:
        kind = shape.type_name
        if is_expression(value):
            value_type = self._expression_type(value, where)
            if kind not in _ACCEPTED_TYPES:
                self.problems.append(f"{where}: an expression cannot stand for a {kind} ({shape.name})")
            elif value_type not in _ACCEPTED_TYPES[kind]:
                wanted = {"integer": "an integer", "long": "an integer", "boolean": "true/false"}.get(kind, f"a {kind}")
                self.problems.append(f"{where}: expression gives a {value_type} where {shape.name} needs {wanted}")
            return
        if kind == "structure":
            if not isinstance(value, dict):
                self.problems.append(f"{where}: expected an object ({shape.name}), got {type(value).__name__}")
                return
            for member in value:
                if member not in shape.members:
                    self.problems.append(f"{where}: unknown member {member!r} of {shape.name}")
            for member in shape.required_members:
                if member not in value and not (top_level and member in SERVICE_FILLED_MEMBERS):
                    self.problems.append(f"{where}: missing required member {member!r} of {shape.name}")
            for member, item in value.items():
                if member in shape.members:
                    self._check_value(item, shape.members[member], f"{where}.{member}")
        elif kind == "list":
            if not isinstance(value, list):
                self.problems.append(f"{where}: expected a list ({shape.name}), got {type(value).__name__}")
                return
            self._check_size(len(value), shape, where)
            for index, item in enumerate(value):
                self._check_value(item, shape.member, f"{where}[{index}]")
        elif kind == "map":
            if not isinstance(value, dict):
                self.problems.append(f"{where}: expected a map ({shape.name}), got {type(value).__name__}")
                return
            self._check_size(len(value), shape, where)
            for key, item in value.items():
                self._check_value(key, shape.key, f"{where}[key {key!r}]")
                self._check_value(item, shape.value, f"{where}[{key!r}]")
        elif kind == "string":
            if not isinstance(value, str):
                self.problems.append(f"{where}: expected a string ({shape.name}), got {value!r}")
                return
            if shape.enum and value not in shape.enum:
                self.problems.append(f"{where}: {value!r} is not one of {shape.name}'s values {shape.enum}")
            self._check_size(len(value), shape, where)
            self._check_pattern(value, shape, where)
        elif kind in ("integer", "long"):
            if isinstance(value, bool) or not isinstance(value, int):
                self.problems.append(f"{where}: expected an integer ({shape.name}), got {value!r}")
                return
            self._check_size(value, shape, where)
        elif kind in ("float", "double"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.problems.append(f"{where}: expected a number ({shape.name}), got {value!r}")
        elif kind == "boolean" and not isinstance(value, bool):
            self.problems.append(f"{where}: expected true/false ({shape.name}), got {value!r}")
        # timestamps and blobs do not occur in pipeline job arguments

    def _check_size(self, size: int, shape: Any, where: str) -> None:
        low, high = shape.metadata.get("min"), shape.metadata.get("max")
        if low is not None and size < low:
            self.problems.append(f"{where}: {size} is below the minimum {low} of {shape.name}")
        if high is not None and size > high:
            self.problems.append(f"{where}: {size} is above the maximum {high} of {shape.name}")

    def _check_pattern(self, value: str, shape: Any, where: str) -> None:
        pattern = shape.metadata.get("pattern")
        if not pattern:
            return
        try:
            compiled = re.compile(pattern)
        except re.error:  # Java-only syntax (\p{L}, \uD800 ranges): checked by the service alone
            return
        if not compiled.fullmatch(value):
            self.problems.append(f"{where}: {value!r} does not match {shape.name}'s pattern {pattern}")

    # -- expressions and references -----------------------------------------------------------------------------
    def _expression_type(self, expression: dict[str, Any], where: str) -> str:
        ((function, body),) = expression.items()
        if function == "Std:Join":
            for item in body.get("Values", []):
                if is_expression(item):
                    self._expression_type(item, where)
            return "string"
        if function == "Std:JsonGet":
            self._expression_type(body.get("PropertyFile", {}), where)
            return "any"
        return self._reference_type(body, where)

    def _reference_type(self, reference: str, where: str) -> str:
        root, _, rest = reference.partition(".")
        if root == "Parameters":
            parameter = self.parameters.get(rest)
            if parameter is None:
                self.problems.append(f"{where}: reference {reference} names no declared parameter")
                return "any"
            return _PARAMETER_VALUE_TYPES.get(parameter["Type"], "any")
        if root == "Execution":
            if rest not in EXECUTION_VARIABLE_NAMES:
                self.problems.append(f"{where}: reference {reference} names no execution variable")
            return "string"
        if root == "Steps":
            step_name, _, path = rest.partition(".")
            step = self.steps.get(step_name)
            if step is None:
                self.problems.append(f"{where}: reference {reference} names no step")
                return "any"
            return self._step_property_type(step, path, reference, where)
        self.problems.append(f"{where}: reference {reference} is neither a parameter, a step nor an execution variable")
        return "any"

    def _step_property_type(self, step: dict[str, Any], path: str, reference: str, where: str) -> str:
        tokens = split_property_path(path)
        if tokens[:1] == ["PropertyFiles"]:
            declared = {p["PropertyFileName"] for p in step.get("PropertyFiles", [])}
            if len(tokens) != 2 or tokens[1] not in declared:
                self.problems.append(f"{where}: reference {reference} names no property file of {step['Name']}")
            return "any"
        if step.get("Type") == "Lambda":
            outputs = {o.get("OutputName"): o.get("OutputType") for o in step.get("OutputParameters", [])}
            if len(tokens) != 2 or tokens[0] != "OutputParameters" or tokens[1] not in outputs:
                self.problems.append(f"{where}: reference {reference} names no output of {step['Name']}")
                return "any"
            return _LAMBDA_OUTPUT_TYPES.get(outputs[tokens[1]], "any")
        operations = STEP_API_OPERATIONS.get(step.get("Type"))
        if operations is None:
            self.problems.append(f"{where}: reference {reference}: a {step.get('Type')} step has no properties")
            return "any"
        shape = self.model.operation_model(operations[1]).output_shape
        second = SECOND_PROPERTY_OPERATIONS.get(step.get("Type"))
        listed = self.model.operation_model(second).output_shape if second else None
        if listed is not None and tokens and tokens[0] in listed.members:
            shape = listed
        for position, token in enumerate(tokens):
            if isinstance(token, int):
                if shape.type_name != "list":
                    self.problems.append(f"{where}: reference {reference}: {shape.name} is not a list")
                    return "any"
                shape = shape.member
            elif shape.type_name == "structure":
                if token not in shape.members:
                    self.problems.append(f"{where}: reference {reference}: {shape.name} has no member {token!r}")
                    return "any"
                shape = shape.members[token]
            elif shape.type_name == "map":
                shape = shape.value
            elif shape.type_name == "list":  # a list indexed by name: processing outputs by OutputName
                if tokens[position - 1] == "Outputs" and step.get("Type") == "Processing":
                    outputs = step["Arguments"].get("ProcessingOutputConfig", {}).get("Outputs", [])
                    if token not in {output.get("OutputName") for output in outputs}:
                        self.problems.append(f"{where}: reference {reference}: {step['Name']} has no output {token!r}")
                shape = shape.member
            else:
                self.problems.append(f"{where}: reference {reference}: cannot index a {shape.type_name}")
                return "any"
        return {"integer": "integer", "long": "integer", "float": "float", "double": "float"}.get(
            shape.type_name, "string" if shape.type_name in ("string", "timestamp") else "any"
        )

    def _check_acyclic(self) -> None:
        graph = step_dependencies(self.definition)
        state: dict[str, int] = {}

        def visit(name: str, trail: list[str]) -> None:
            if state.get(name) == 1:
                self.problems.append(f"steps form a cycle: {' -> '.join([*trail, name])}")
                return
            if state.get(name) == 2:
                return
            state[name] = 1
            for upstream in sorted(graph.get(name, ())):
                visit(upstream, [*trail, name])
            state[name] = 2

        for name in sorted(graph):
            visit(name, [])


def own_arguments(step: dict[str, Any]) -> Any:
    """A step's arguments without the steps nested in it (a condition's branches are steps of their own)."""
    arguments = step.get("Arguments", {})
    if step.get("Type") == "Condition":
        return {key: value for key, value in arguments.items() if key not in ("IfSteps", "ElseSteps")}
    return arguments


def step_dependencies(definition: dict[str, Any]) -> dict[str, set[str]]:
    """Step name -> the steps it waits for (property references, DependsOn, and the enclosing condition)."""
    graph: dict[str, set[str]] = {}
    for step in iter_steps(definition):
        upstream = set(step.get("DependsOn", []))
        for reference in iter_references(own_arguments(step)):
            if reference.startswith("Steps."):
                upstream.add(reference.split(".")[1])
        upstream.discard(step["Name"])
        graph.setdefault(step["Name"], set()).update(upstream)
        if step.get("Type") == "Condition":
            for branch in ("IfSteps", "ElseSteps"):
                for nested in step["Arguments"].get(branch, []):
                    graph.setdefault(nested["Name"], set()).add(step["Name"])
    return graph


def check_definition(definition: dict[str, Any] | str, unused_parameters: bool = True) -> list[str]:
    """Problems found in a pipeline definition (dict or JSON text); an empty list means it passed.

    ``unused_parameters``: a parameter no step reads is a problem. It is a slip in a builder's output, but SageMaker
    runs such a definition (AWS's own samples declare some), so an engine that runs any definition passes False.
    """
    parsed = json.loads(definition) if isinstance(definition, str) else definition
    return DefinitionChecker(parsed, unused_parameters).check()
