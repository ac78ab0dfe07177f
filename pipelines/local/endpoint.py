"""Local endpoints: a detached server process per endpoint name, recorded in the workdir.

Deploying (what the deploy Lambda does on SageMaker when a version is approved) extracts the version's
``model.tar.gz`` into ``<workdir>/endpoints/<name>/<version>/model`` (refusing entries that would land outside
it), stops the endpoint's previous server if any, and starts ``python -m pipelines.local.server`` in its own
session, so it outlives the command that started it. The server runs the artifact's Ray Serve app: in its own
process (the light host, the default), or with ``ray=True`` on a local Ray cluster started the way AWS's Ray
Serve container starts one. ``<workdir>/endpoints/<name>.json`` records its pid, URL, host, model package and
log file; ``python -m pipelines.run endpoint stop`` ends it and every process it started, by process ID.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipelines.local import fsutil, processes
from pipelines.local.registry import model_data_path

ENDPOINTS_DIR = "endpoints"
SERVER_MODULE = "pipelines.local.server"
START_TIMEOUT_S = 180.0
RAY_START_TIMEOUT_S = 420.0  # pip, ray start, serve start, serve run and the model: minutes on a busy machine
STOP_TIMEOUT_S = 30.0  # a Ray host shuts its app and cluster down in this time

# Servers started by this process: reaped on stop so they do not linger as zombies while we run.
_children: dict[int, subprocess.Popen] = {}


class EndpointError(Exception):
    """The endpoint could not start (the message carries the server log's last lines) or be found."""


def record_path(workdir: Path, name: str) -> Path:
    return workdir / ENDPOINTS_DIR / f"{name}.json"


def read_record(workdir: Path, name: str) -> dict[str, Any] | None:
    return fsutil.read_json(record_path(workdir, name))


def list_records(workdir: Path) -> list[dict[str, Any]]:
    folder = workdir / ENDPOINTS_DIR
    if not folder.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def _is_our_server(pid: int) -> bool:
    """True when ``pid`` is alive and is one of our endpoint servers (not a recycled pid)."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and SERVER_MODULE.encode() in cmdline


def ping(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=timeout) as response:  # noqa: S310 - a local http URL
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def status(workdir: Path, name: str) -> dict[str, Any] | None:
    """The endpoint's record with ``EndpointStatus`` InService (process alive) or OutOfService."""
    record = read_record(workdir, name)
    if record is None:
        return None
    alive = _is_our_server(int(record["pid"]))
    record["EndpointStatus"] = "InService" if alive and ping(record["url"]) else "OutOfService"
    return record


def stop(workdir: Path, name: str) -> dict[str, Any] | None:
    """Stop the endpoint's server and every process it started; remove its record.

    The server gets SIGTERM (it shuts its app down, a Ray host its cluster too), then SIGKILL after a grace
    period. Whatever is left of its session (the server runs as a session leader, so the session ID is its
    PID) is then stopped by PID: nothing is found or signalled by name.
    """
    record = read_record(workdir, name)
    if record is None:
        return None
    pid = int(record["pid"])
    if _is_our_server(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _is_our_server(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _is_our_server(pid):
            os.kill(pid, signal.SIGKILL)
    child = _children.pop(pid, None)
    if child is not None:
        child.wait(timeout=STOP_TIMEOUT_S)
    if record.get("session") == pid:  # recorded only for servers started as session leaders
        record["stopped_pids"] = processes.terminate(processes.session_members(pid), STOP_TIMEOUT_S / 3)
    record_path(workdir, name).unlink(missing_ok=True)
    return record


def deploy(
    workdir: Path,
    name: str,
    package: dict[str, Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    threads: int | None = None,
    ray: bool = False,
) -> dict[str, Any]:
    """Serve an approved model package at ``name``; returns the endpoint record (with ``url``).

    ``ray`` runs the artifact's app on a local Ray cluster (the container's ``ray start`` / ``serve start`` /
    ``serve run``), else in the server's own process. A busy ``port`` gives way to a free one (the record says
    which). Re-deploying the package an endpoint already serves, on the same host, leaves it running.
    """
    current = status(workdir, name)
    if (
        current
        and current["EndpointStatus"] == "InService"
        and current["ModelPackageArn"] == package["ModelPackageArn"]
        and current.get("host", "light") == ("ray" if ray else "light")
    ):
        current["unchanged"] = True
        return current
    version = package["ModelPackageVersion"]
    folder = workdir / ENDPOINTS_DIR / name / str(version)
    model_dir = folder / "model"
    fsutil.remove_path(folder)
    fsutil.safe_extract_tarball(model_data_path(package), model_dir)
    if current is not None:
        stop(workdir, name)
    ready_file = folder / "ready.json"
    log_path = folder / "server.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SM_", "SAGEMAKER_", "PYTHONPATH"))}
    env.update(package["InferenceSpecification"]["Containers"][0].get("Environment", {}))
    env["PYTHONUNBUFFERED"] = "1"
    env["TMPDIR"] = str(folder)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # the server module itself, not the model's code
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    command = [
        sys.executable,
        "-m",
        SERVER_MODULE,
        "--model-dir",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--port-fallback",
        "--ready-file",
        str(ready_file),
        *(["--ray"] if ray else []),
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command and its terminal's Ctrl-C
        )
    _children[process.pid] = process
    timeout = RAY_START_TIMEOUT_S if ray else START_TIMEOUT_S
    deadline = time.monotonic() + timeout
    while not ready_file.is_file():
        if process.poll() is not None:
            _children.pop(process.pid, None)
            processes.terminate(processes.session_members(process.pid), STOP_TIMEOUT_S / 3)
            tail = "\n".join(fsutil.tail_lines(log_path, 15))
            raise EndpointError(f"endpoint {name} exited while starting (status {process.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            _children.pop(process.pid, None)
            processes.terminate(processes.session_members(process.pid), STOP_TIMEOUT_S / 3)
            raise EndpointError(f"endpoint {name} did not become ready in {timeout:.0f} s; see {log_path}")
        time.sleep(0.05)
    ready = json.loads(ready_file.read_text())
    record = {
        "EndpointName": name,
        "url": ready["url"],
        "port": ready["port"],
        "pid": process.pid,
        "session": process.pid,  # the server is its session's leader: stop() ends the session's processes
        "host": "ray" if ray else "light",
        "ModelPackageArn": package["ModelPackageArn"],
        "ModelPackageGroupName": package["ModelPackageGroupName"],
        "ModelPackageVersion": version,
        "model_dir": str(model_dir),
        "log": str(log_path),
        "CreationTime": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    fsutil.write_json_atomic(record_path(workdir, name), record)
    record["EndpointStatus"] = "InService"
    return record
