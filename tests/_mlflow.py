"""A real MLflow tracking server for the tests: ``mlflow server`` on 127.0.0.1 (a free port) over a SQLite store."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_TEMPLATE: list[Path] = []


def fresh_store(path: Path) -> str:
    """The URI of a new SQLite tracking store at ``path``, its tables already made: a copy of one store migrated
    once per test process (MLflow's schema migrations cost seconds for every new store)."""
    if not _TEMPLATE:
        from mlflow.tracking import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        MlflowClient(f"sqlite:///{folder / 'template.db'}").search_experiments()  # creates and migrates it
        _TEMPLATE.append(folder / "template.db")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_TEMPLATE[0], path)
    return f"sqlite:///{path}"


class MlflowServer:
    """``mlflow server`` in its own process group; ``stop()`` ends it (and its workers) at once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = folder / "server.log"

    def start(self, timeout: float = 120.0) -> MlflowServer:
        pytest.importorskip("mlflow.server", reason="the tests' MLflow server comes with the full mlflow package")
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            fresh_store(self.folder / "server.db"),
            "--artifacts-destination",
            str(self.folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with open(self.log, "wb") as log:
            # No job runner: MLflow 3's server starts a handful of huey consumer processes (about 250 MB and a
            # little CPU each) for features these tests never use.
            env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):  # its own group: the server and its workers, nothing else
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
