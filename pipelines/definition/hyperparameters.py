"""Hyperparameters as the definition holds them and the training toolkit reads them (decoded, split into the
toolkit's own and the script's, passed as flags), and tuning ranges as plain data (the builder turns them into the
SDK's ranges; the local tuner samples a definition's)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

# Hyperparameters the training toolkit keeps for itself: never passed to the script as flags.
TOOLKIT_PARAMETERS = frozenset(
    {
        "sagemaker_program",
        "sagemaker_submit_directory",
        "sagemaker_enable_cloudwatch_metrics",
        "sagemaker_region",
        "sagemaker_container_log_level",
        "sagemaker_job_name",
        "default_user_module_name",
        "_tuning_objective_metric",
        "sagemaker_s3_output",
    }
)
TOOLKIT_PREFIX = "sagemaker_"
TUNING_METRIC_PARAMETER = "_tuning_objective_metric"


@dataclass(frozen=True)
class HyperparameterRange:
    """A tuning range in plain data: the pipeline turns it into SDK parameter ranges, the local tuner samples it."""

    kind: Literal["continuous", "integer", "categorical"]
    min_value: float | None = None
    max_value: float | None = None
    values: tuple[str, ...] = field(default_factory=tuple)
    scaling: Literal["Auto", "Linear", "Logarithmic"] = "Auto"


def decode_hyperparameter(value: object) -> object:
    """How the training toolkit reads hyperparameters.json: JSON where it parses, the raw string otherwise."""
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def split_hyperparameters(hyperparameters: Mapping[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """(the toolkit's own, the script's): decoded as the toolkit decodes them."""
    decoded = {key: decode_hyperparameter(value) for key, value in hyperparameters.items()}
    toolkit = {k: v for k, v in decoded.items() if k in TOOLKIT_PARAMETERS or k.startswith(TOOLKIT_PREFIX)}
    return toolkit, {k: v for k, v in decoded.items() if k not in toolkit}


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
