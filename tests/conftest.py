"""Shared test settings: every run is shrunk to seconds on a 2-core CPU and nothing reaches the network."""

from __future__ import annotations

import gc
import os

import pytest

# Set before the SDK or torch is imported by any test module.
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_SECURITY_TOKEN", "testing")
os.environ.setdefault("AWS_SESSION_TOKEN", "testing")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _no_sagemaker_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK phones home on many calls; tests never reach out."""
    try:
        import sagemaker.telemetry.telemetry_logging as telemetry
    except ImportError:  # pragma: no cover - the SDK is a runtime dependency
        return
    monkeypatch.setattr(telemetry, "_send_telemetry_request", lambda *args, **kwargs: None)


# The files that take longest, longest first (quiet 2-core machine). The suite runs on two pytest-xdist workers,
# a whole file to a worker (`--dist loadfile`, so a module's fixtures are made once); handing out the longest
# files first keeps one worker from starting a long file while the other has nothing left.
LONGEST_FIRST = (
    "test_local_pipeline.py",
    "test_local_signals.py",
    "test_train.py",
    "test_tracking.py",
    "test_ray_serving.py",
    "test_int8_serving.py",
    "test_distributed_training.py",
    "test_local_executor.py",
    "test_pipeline.py",
    "test_local_guards.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file, which its module fixtures may rely on, is kept


# The collector: the imports leave about 400,000 objects (the SDK, torch, moto, MLflow) that every full collection
# walks again, about 0.6 s a time, some 35 times a worker: a quarter of the fast tests' time was the collector's.
# What the imports made, and after each file what its tests built to last, is frozen (out of the collector's sight,
# once the garbage is collected), and the oldest generation is collected a hundredth as often; a file's cycles are
# still collected when it ends.
def _collect_and_freeze() -> None:
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session: pytest.Session) -> None:
    _collect_and_freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1000)


@pytest.hookimpl(trylast=True)  # after the file's module fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if nextitem is None or nextitem.path != item.path:
        _collect_and_freeze()
