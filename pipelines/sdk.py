"""The SageMaker SDK's side effects, switched off where the builder runs it: telemetry and build-time chatter."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def telemetry_off() -> Iterator[None]:
    """No usage telemetry from the SDK while building offline (it would call STS and an S3 URL).

    The SDK's documented switch (TelemetryOptOut in an SDK defaults config) makes the SDK re-validate that
    config against its JSON schema on every lookup, some 30 s per build, so the sender is switched off here
    for the duration of the build instead.
    """
    try:
        from sagemaker.telemetry import telemetry_logging
    except ImportError:  # an SDK without telemetry
        yield
        return
    original = telemetry_logging._send_telemetry_request
    telemetry_logging._send_telemetry_request = lambda *args, **kwargs: None
    try:
        yield
    finally:
        telemetry_logging._send_telemetry_request = original


def quiet() -> None:
    """Keep the SDK's build-time chatter (config lookups, "pipeline variable" notes) off the terminal."""
    import logging
    import warnings

    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    for name in ("sagemaker", "sagemaker.config"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"sagemaker(\..*)?")
