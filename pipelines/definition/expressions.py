"""The definition's expressions, evaluated as SageMaker Pipelines evaluates them during an execution.

- ``{"Get": "Parameters.<name>"}``: the execution's parameter value (typed: Integer, Float, String, Boolean);
- ``{"Get": "Execution.<variable>"}``: PipelineExecutionId, PipelineName, ... of this run;
- ``{"Get": "Steps.<step>.<property path>"}``: a property of a step that has run (its Describe* response, or a
  Lambda step's ``OutputParameters``), with ``A.B['x'].C[0]`` paths;
- ``{"Std:Join": {"On": ..., "Values": [...]}}``: the values as text, joined;
- ``{"Std:JsonGet": {"PropertyFile": {"Get": "Steps.<step>.PropertyFiles.<name>"}, "Path": ...}}``: a value of a
  JSON file the step wrote to the output its property file names;
- conditions (``Equals``, ``GreaterThan(OrEqualTo)``, ``LessThan(OrEqualTo)``, ``In``, ``Not``, ``Or``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# A list indexed by name in a property path (processing outputs by OutputName, Lambda outputs by Name, ...).
_LIST_KEYS = ("OutputName", "InputName", "ChannelName", "Name", "MetricName")


def split_property_path(path: str) -> list[str | int]:
    """Split a property path: ``A.B['x'].C[0]`` gives ``["A", "B", "x", "C", 0]``."""
    tokens: list[str | int] = []
    for match in re.finditer(r"([^.\[\]]+)|\[(\d+)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]", path):
        name, index, quoted, double = match.groups()
        if index is not None:
            tokens.append(int(index))
        else:
            tokens.append(next(text for text in (name, quoted, double) if text is not None))
    return tokens


class ExpressionError(Exception):
    """An expression that cannot be evaluated: the message names the reference."""


def walk(value: Any, tokens: list[str | int], where: str) -> Any:
    """Follow a property path through Describe-shaped data; lists are indexed by position or by name."""
    for token in tokens:
        by_position = isinstance(token, int) and isinstance(value, list) and token < len(value)
        if by_position or (isinstance(value, Mapping) and token in value):
            value = value[token]
        elif isinstance(value, list) and isinstance(token, str):
            named = [item for item in value if isinstance(item, Mapping) and token in _names(item)]
            if not named:
                raise ExpressionError(f"{where}: no item named {token!r}")
            value = named[0]
        else:
            raise ExpressionError(f"{where}: {token!r} not found")
    return value


def _names(item: Mapping[str, Any]) -> set[Any]:
    return {item[key] for key in _LIST_KEYS if key in item}


def json_get(document: Any, path: str, where: str = "") -> Any:
    """``JsonGet``'s path (dotted names, ``[n]`` indices) in a parsed JSON document."""
    return walk(document, split_property_path(path), where or f"JsonGet {path}")


def as_text(value: Any) -> str:
    """How a value reads inside ``Std:Join`` and as a job argument."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def is_expression(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("Get", "Std:Join", "Std:JsonGet")


@dataclass
class Scope:
    """What expressions read: parameters, execution variables, the properties of the steps that have run."""

    parameters: dict[str, Any]
    execution: dict[str, str]
    properties: dict[str, Any] = field(default_factory=dict)  # step name -> its properties
    # (step name, property file name) -> the parsed file (the executor reads it from the step's output)
    read_property_file: Callable[[str, str], Any] | None = None

    def resolve(self, value: Any) -> Any:
        """``value`` with every expression in it evaluated (the step's Arguments as the service sends them)."""
        if is_expression(value):
            return self.evaluate(value)
        if isinstance(value, dict):
            return {key: self.resolve(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        return value

    def resolve_known(self, value: Any) -> Any:
        """``value`` with each expression this scope can read evaluated; one that reads anything else (a step that
        has not run, a parameter or execution variable the scope lacks) is left as it is."""
        if is_expression(value):
            try:
                return self.evaluate(value)
            except ExpressionError:
                return value
        if isinstance(value, dict):
            return {key: self.resolve_known(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.resolve_known(item) for item in value]
        return value

    def evaluate(self, expression: dict[str, Any]) -> Any:
        ((function, body),) = expression.items()
        if function == "Std:Join":
            return str(body.get("On", "")).join(as_text(self.resolve(item)) for item in body.get("Values", []))
        if function == "Std:JsonGet":
            reference = body.get("PropertyFile", {}).get("Get", "")
            step, file_name = self._property_file(reference)
            if self.read_property_file is None:
                raise ExpressionError(f"{reference}: property files cannot be read here")
            return json_get(self.read_property_file(step, file_name), body.get("Path", ""), f"JsonGet {reference}")
        return self.get(body)

    def get(self, reference: str) -> Any:
        root, _, rest = reference.partition(".")
        if root == "Parameters":
            if rest not in self.parameters:
                raise ExpressionError(f"{reference}: no such parameter")
            return self.parameters[rest]
        if root == "Execution":
            if rest not in self.execution:
                raise ExpressionError(f"{reference}: the local executor does not set this execution variable")
            return self.execution[rest]
        if root == "Steps":
            step, _, path = rest.partition(".")
            if step not in self.properties:
                raise ExpressionError(f"{reference}: step {step} has not run")
            return walk(self.properties[step], split_property_path(path), reference)
        raise ExpressionError(f"{reference}: neither a parameter, an execution variable nor a step property")

    @staticmethod
    def _property_file(reference: str) -> tuple[str, str]:
        parts = reference.split(".")
        if len(parts) != 4 or parts[0] != "Steps" or parts[2] != "PropertyFiles":
            raise ExpressionError(f"{reference!r} is not a property file reference (Steps.<step>.PropertyFiles.<name>)")
        return parts[1], parts[3]

    # --- conditions ---------------------------------------------------------------------------------------------
    def condition(self, condition: Mapping[str, Any]) -> tuple[bool, str]:
        """(outcome, how it read: "0.97 >= 0.9") of one condition of a ConditionStep."""
        kind = condition.get("Type")
        if kind == "Not":
            outcome, text = self.condition(condition["Condition"])
            return not outcome, f"not ({text})"
        if kind == "Or":
            results = [self.condition(item) for item in condition.get("Conditions", [])]
            return any(outcome for outcome, _ in results), " or ".join(f"({text})" for _, text in results)
        if kind == "In":
            value = self.resolve(condition["QueryValue"])
            values = [self.resolve(item) for item in condition.get("Values", [])]
            return value in values, f"{as_text(value)} in {values}"
        if kind not in _COMPARISONS:
            raise ExpressionError(f"condition type {kind!r} is not one the local executor knows")
        symbol, compare = _COMPARISONS[kind]
        left, right = self.resolve(condition["LeftValue"]), self.resolve(condition["RightValue"])
        try:
            outcome = compare(_comparable(left, right), _comparable(right, left))
        except TypeError as error:
            raise ExpressionError(f"cannot compare {left!r} {symbol} {right!r}") from error
        return bool(outcome), f"{as_text(left)} {symbol} {as_text(right)}"


def _comparable(value: Any, other: Any) -> Any:
    """Numbers compare as numbers even when one side is text (a JsonGet of "0.9" against a Float parameter)."""
    if isinstance(value, str) and isinstance(other, int | float) and not isinstance(other, bool):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_COMPARISONS: dict[str, tuple[str, Callable[[Any, Any], bool]]] = {
    "Equals": ("==", lambda a, b: a == b),
    "GreaterThan": (">", lambda a, b: a > b),
    "GreaterThanOrEqualTo": (">=", lambda a, b: a >= b),
    "LessThan": ("<", lambda a, b: a < b),
    "LessThanOrEqualTo": ("<=", lambda a, b: a <= b),
}
