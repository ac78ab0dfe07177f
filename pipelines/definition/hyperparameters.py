"""Hyperparameters as the definition holds them and the training toolkit reads them, and tuning ranges as plain
data (the builder turns them into the SDK's ranges; the local tuner samples a definition's)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class HyperparameterRange:
    """A tuning range in plain data: the pipeline turns it into SDK parameter ranges, the local tuner samples it."""

    kind: Literal["continuous", "integer", "categorical"]
    min_value: float | None = None
    max_value: float | None = None
    values: tuple[str, ...] = field(default_factory=tuple)
    scaling: Literal["Auto", "Linear", "Logarithmic"] = "Auto"


def decode_hyperparameter(value: str) -> object:
    """How the training toolkit reads hyperparameters.json: JSON where it parses, the raw string otherwise."""
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def hyperparameter_flags(decoded: Mapping[str, object]) -> list[str]:
    """``sagemaker_training.mapping.to_cmd_args``: sorted keys, ``--key value`` (``-k`` for one letter)."""
    arguments: list[str] = []
    for key in sorted(decoded):
        value = decoded[key]
        arguments.append(f"--{key}" if len(key) > 1 else f"-{key}")
        if isinstance(value, Mapping):
            arguments.append(",".join(f"{k}={v}" for k, v in sorted(value.items())))
        else:
            arguments.append(str(value))
    return arguments
