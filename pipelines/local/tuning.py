"""The local tuner: trials sampled from the tuning step's ranges, the objective read like SageMaker reads it.

Ranges: the definition's ``ParameterRanges`` (:func:`ranges_from_definition`). Sampling: a seeded Latin
hypercube over them, seeded with the step's ``RandomSeed`` (continuous ranges on
their Logarithmic or Linear scale, integer ranges rounded, categorical values picked by stratum), so that even
two or three trials span each range instead of clustering; SageMaker's Random strategy samples independently
and its Bayesian strategy starts the same way, then models the results (which a handful of local trials cannot
feed). ``Auto`` scaling is treated as Linear.

Values are written the way the tuner writes them into each training job's ``HyperParameters``: continuous
values as the shortest decimal of the float, integers as decimals, categorical values as the range lists them
(the SDK JSON-encodes them for framework estimators; the toolkit decodes them before building the flags).

Objective: SageMaker's tuner ranks a training job by the *latest* value of the objective metric it emitted
(``FinalHyperParameterTuningJobObjectiveMetric``), found in the log with the metric definition's regex, so the
local tuner takes the last value of the objective's metric, read with the definition's own ``MetricDefinitions``
(``jobs.final_metrics``, the job's FinalMetricDataList). Ties go to the earlier trial.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipelines.definition.hyperparameters import HyperparameterRange


def _scaled(spec: HyperparameterRange, unit: float) -> float:
    assert spec.min_value is not None and spec.max_value is not None
    low, high = float(spec.min_value), float(spec.max_value)
    if spec.scaling == "Logarithmic":
        if low <= 0:
            raise ValueError(f"a Logarithmic range needs a positive minimum, got {low}")
        return math.exp(math.log(low) + unit * (math.log(high) - math.log(low)))
    return low + unit * (high - low)


def ranges_from_definition(parameter_ranges: Mapping[str, Any]) -> dict[str, HyperparameterRange]:
    """A tuning step's ``ParameterRanges`` (Continuous/Integer/CategoricalParameterRanges) as plain ranges."""
    ranges: dict[str, HyperparameterRange] = {}
    for item in parameter_ranges.get("ContinuousParameterRanges", []):
        scaling = item.get("ScalingType", "Auto")
        ranges[item["Name"]] = HyperparameterRange(
            "continuous", float(item["MinValue"]), float(item["MaxValue"]), scaling=scaling
        )
    for item in parameter_ranges.get("IntegerParameterRanges", []):
        scaling = item.get("ScalingType", "Auto")
        ranges[item["Name"]] = HyperparameterRange(
            "integer", int(item["MinValue"]), int(item["MaxValue"]), scaling=scaling
        )
    for item in parameter_ranges.get("CategoricalParameterRanges", []):
        ranges[item["Name"]] = HyperparameterRange("categorical", values=tuple(str(v) for v in item["Values"]))
    return ranges


def encode_value(spec: HyperparameterRange, unit: float) -> str:
    """One value of ``spec`` at position ``unit`` in [0, 1), written as the tuner writes it."""
    if spec.kind == "categorical":
        if not spec.values:
            raise ValueError("a categorical range needs at least one value")
        index = min(int(unit * len(spec.values)), len(spec.values) - 1)
        return spec.values[index]
    if spec.kind == "integer":
        assert spec.min_value is not None and spec.max_value is not None
        low, high = int(spec.min_value), int(spec.max_value)
        # Widen by one step so both ends are as likely as the values between them.
        widened = HyperparameterRange("continuous", low, high + 1, scaling=spec.scaling)
        return str(min(high, max(low, math.floor(_scaled(widened, unit)))))
    if spec.kind == "continuous":
        value = _scaled(spec, unit)
        return repr(min(float(spec.max_value), max(float(spec.min_value), value)))  # type: ignore[arg-type]
    raise ValueError(f"unknown range kind {spec.kind!r}")


def sample_trials(ranges: Mapping[str, HyperparameterRange], trials: int, seed: int) -> list[dict[str, str]]:
    """``trials`` assignments of every tuned hyperparameter (strings, as in each trial's HyperParameters)."""
    if trials < 1:
        raise ValueError(f"the number of trials must be at least 1, got {trials}")
    generator = random.Random(seed)  # noqa: S311 - reproducible sampling, not security
    columns: dict[str, list[float]] = {}
    for name in sorted(ranges):
        strata = [(index + generator.random()) / trials for index in range(trials)]
        generator.shuffle(strata)
        columns[name] = strata
    return [{name: encode_value(ranges[name], columns[name][row]) for name in sorted(ranges)} for row in range(trials)]


@dataclass
class TrialOutcome:
    name: str
    tuned: dict[str, str]
    objective: float | None
    status: str  # Completed | Failed
    failure_reason: str | None = None
    duration_s: float = 0.0
    signal: str | None = None  # the signal that ended a failed trial (a stop from outside, not its values)


def ranked_trials(outcomes: list[TrialOutcome], objective_type: str = "Maximize") -> list[TrialOutcome]:
    """The completed trials, best final objective first; ties go to the earlier trial."""
    scored = [o for o in outcomes if o.status == "Completed" and o.objective is not None]
    sign = 1.0 if objective_type == "Maximize" else -1.0
    return sorted(scored, key=lambda o: (-sign * o.objective, outcomes.index(o)))  # type: ignore[operator]


def best_trial(outcomes: list[TrialOutcome], objective_type: str = "Maximize") -> TrialOutcome | None:
    """The completed trial with the best final objective; ties go to the earlier trial."""
    ranked = ranked_trials(outcomes, objective_type)
    return ranked[0] if ranked else None
