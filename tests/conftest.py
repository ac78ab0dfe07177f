"""Shared test settings: every run is shrunk to seconds on a 2-core CPU and nothing reaches the network."""

from __future__ import annotations

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
