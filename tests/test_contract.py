"""The small helpers of entrypoints/contract.py that code on both sides of the container boundary shares."""

from __future__ import annotations

import os

import pytest

from entrypoints import contract


def test_accuracy_is_read_at_the_path_the_condition_step_reads() -> None:
    report = {"multiclass_classification_metrics": {"accuracy": {"value": 0.91, "standard_deviation": "NaN"}}}
    assert contract.ACCURACY_JSON_PATH == "multiclass_classification_metrics.accuracy.value"
    assert contract.accuracy_from_report(report) == pytest.approx(0.91)
    assert contract.accuracy_from_report({"multiclass_classification_metrics": {"accuracy": {"value": 1}}}) == 1.0


@pytest.mark.parametrize(
    "report",
    [
        {},
        {"multiclass_classification_metrics": {"accuracy": {}}},
        {"multiclass_classification_metrics": {"accuracy": {"value": "0.9"}}},  # text is not a measured accuracy
        {"multiclass_classification_metrics": {"accuracy": {"value": True}}},
        {"multiclass_classification_metrics": ["accuracy"]},
        None,
    ],
)
def test_a_report_without_an_accuracy_gives_none(report: object) -> None:
    assert contract.accuracy_from_report(report) is None


def test_value_at_follows_a_dotted_path_and_stops_where_it_ends() -> None:
    document = {"a": {"b": {"c": [1, 2]}}, "x": 0}
    assert contract.value_at(document, "a.b.c") == [1, 2]
    assert contract.value_at(document, "a.b") == {"c": [1, 2]}
    assert contract.value_at(document, "x") == 0
    assert contract.value_at(document, "a.missing.c") is None
    assert contract.value_at(document, "x.y") is None  # 0 is not an object


def test_available_cpus_is_this_process_share() -> None:
    cpus = contract.available_cpus()
    assert cpus >= 1
    if hasattr(os, "sched_getaffinity"):
        assert cpus == len(os.sched_getaffinity(0))
