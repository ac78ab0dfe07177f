"""Local endpoints: a detached server process per endpoint name, recorded in the workdir.

Deploying (what the deploy Lambda does on SageMaker when a version is approved) extracts the version's
``model.tar.gz`` into ``<workdir>/endpoints/<name>/<version>/model`` (refusing entries that would land outside
it), stops the endpoint's previous server if any, and starts ``python -m pipelines.serving.server`` in its own
session, so it outlives the command that started it. The server runs the artifact's Ray Serve app: in its own
process (the light host, the default), or with ``ray=True`` on a local Ray cluster started the way AWS's Ray
Serve container starts one. ``<workdir>/endpoints/<name>.json`` records its pid, URL, host, model package and
log file; ``python -m pipelines.run endpoint stop`` ends it and every process it started, by process ID.

The name is a SageMaker endpoint name (never a path), and every path made from it is proven to lie inside the
workdir before anything is written or deleted. Deploys and stops hold the workdir's lock, so two at once run one
after the other: the second deploy of the version already served changes nothing and says so. A damaged record
is reported; stopping then finds the endpoint's servers by the model folder they serve (their command line names
it), stops them and sets the record aside.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.definition import names
from pipelines.util import fsutil, processes, urls

ENDPOINTS_DIR = "endpoints"
SERVER_MODULE = "pipelines.serving.server"
START_TIMEOUT_S = 180.0
RAY_START_TIMEOUT_S = 420.0  # pip, ray start, serve start, serve run and the model: minutes on a busy machine
STOP_TIMEOUT_S = 30.0  # a Ray host shuts its app and cluster down in this time

# Servers started by this process: reaped on stop so they do not linger as zombies while we run.
_children: dict[int, subprocess.Popen] = {}


class EndpointError(Exception):
    """The endpoint could not start (the message carries the server log's last lines) or be found."""


class DamagedRecord(EndpointError):
    """The endpoint's record cannot be read as one: the message names it and what to do."""


def _checked_name(name: str) -> str:
    try:
        return names.check_name("endpoint", name)
    except ValueError as error:
        raise EndpointError(str(error)) from error


def _inside(workdir: Path, path: Path) -> Path:
    try:
        return fsutil.contained(workdir, path)
    except fsutil.OutsideWorkdir as error:
        raise EndpointError(str(error)) from error


def record_path(workdir: Path, name: str) -> Path:
    return _inside(workdir, workdir / ENDPOINTS_DIR / f"{_checked_name(name)}.json")


def endpoint_folder(workdir: Path, name: str) -> Path:
    """``<workdir>/endpoints/<name>``: the model folders, logs and ready files of the endpoint's servers."""
    return _inside(workdir, workdir / ENDPOINTS_DIR / _checked_name(name))


def record_problem(data: Any) -> str | None:
    """What keeps ``data`` from being an endpoint record, or None."""
    if not isinstance(data, dict):
        return "it is not a JSON object"
    for key, kind in (("pid", int), ("url", str), ("ModelPackageArn", str), ("ModelPackageVersion", int)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            return f"its {key} is missing or not {'a number' if kind is int else 'text'}"
    if data["pid"] < 1 or not data["url"].startswith("http://"):
        return "its pid or url is not one of a local server"
    return None


def read_record(workdir: Path, name: str) -> dict[str, Any] | None:
    """The endpoint's record, None without one; DamagedRecord if it cannot be read as one."""
    remedy = f"'python -m pipelines.run endpoint stop --name {name}' stops what it finds of the endpoint"
    try:
        return fsutil.read_state(record_path(workdir, name), record_problem, remedy)
    except fsutil.StateFileError as error:
        raise DamagedRecord(str(error)) from error


def _arguments(pid: int) -> list[str]:
    """The command line of ``pid`` (empty once it has gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_our_server(pid: int) -> bool:
    """True when ``pid`` is alive and is one of our endpoint servers (not a recycled pid)."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    return processes.is_alive(pid) and SERVER_MODULE in _arguments(pid)


def ping(url: str, timeout: float = 2.0) -> bool:
    return urls.status_of(f"{url}/ping", timeout) == 200


def status(workdir: Path, name: str) -> dict[str, Any] | None:
    """The endpoint's record with ``EndpointStatus`` InService (process alive) or OutOfService."""
    record = read_record(workdir, name)
    if record is None:
        return None
    alive = _is_our_server(int(record["pid"]))
    record["EndpointStatus"] = "InService" if alive and ping(record["url"]) else "OutOfService"
    return record


def servers_of(workdir: Path, name: str) -> list[int]:
    """PIDs of the live servers serving a model folder of this endpoint (read from /proc: no record needed)."""
    folder = endpoint_folder(workdir, name).resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not _is_our_server(int(entry.name)):
            continue
        arguments = _arguments(int(entry.name))
        model_dir = arguments[arguments.index("--model-dir") + 1] if "--model-dir" in arguments[:-1] else ""
        if model_dir and Path(model_dir).resolve().is_relative_to(folder):
            found.append(int(entry.name))
    return sorted(found)


def _stop_server(pid: int, session: bool) -> list[int]:
    """SIGTERM (the server shuts its app down, a Ray host its cluster too), SIGKILL after a grace period; then
    whatever is left of its session, by PID. Returns the PIDs of the session's other processes stopped."""
    if _is_our_server(pid):  # the server alone first: it shuts down what it started
        processes.terminate([pid], STOP_TIMEOUT_S)
    child = _children.pop(pid, None)
    if child is not None:
        child.wait(timeout=STOP_TIMEOUT_S)
    return processes.terminate(processes.session_members(pid), STOP_TIMEOUT_S / 3) if session else []


def stop(workdir: Path, name: str) -> dict[str, Any] | None:
    """Stop the endpoint's server and every process it started; remove its record.

    The server leads its own session, so the session ID is its PID: whatever is left of the session is stopped
    by PID, nothing is found or signalled by name. With a damaged record, the servers of the endpoint's model
    folders are stopped instead, and the record is set aside (``<name>.json.damaged-<time>``) with ``damaged``
    saying so.
    """
    with fsutil.workdir_lock(workdir, f"stopping endpoint {name}"):
        try:
            record = read_record(workdir, name)
        except DamagedRecord as error:
            return _stop_unrecorded(workdir, name, str(error))
        if record is None:
            return None
        pid = int(record["pid"])
        record["stopped_pids"] = _stop_server(pid, session=record.get("session") == pid)
        record_path(workdir, name).unlink(missing_ok=True)
        return record


def _stop_unrecorded(workdir: Path, name: str, damage: str) -> dict[str, Any]:
    pids = servers_of(workdir, name)
    stopped = [pid for server in pids for pid in [server, *_stop_server(server, session=True)]]
    aside = fsutil.set_aside(record_path(workdir, name))
    return {"EndpointName": name, "pid": pids[0] if pids else None, "stopped_pids": stopped, "damaged": damage,
            "set_aside": str(aside)}  # fmt: skip


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
    which). Re-deploying the package an endpoint already serves, on the same host, leaves it running and says so
    (``unchanged``). A damaged record is reported on standard error and replaced, after its servers are stopped.
    """
    with fsutil.workdir_lock(workdir, f"deploying version {package['ModelPackageVersion']} to endpoint {name}"):
        try:
            current = status(workdir, name)
        except DamagedRecord as error:
            stopped = _stop_unrecorded(workdir, name, str(error))
            print(f"{error}: stopped its servers {stopped['stopped_pids']} and set it aside as {stopped['set_aside']}",
                  file=sys.stderr, flush=True)  # fmt: skip
            current = None
        if (
            current
            and current["EndpointStatus"] == "InService"
            and current["ModelPackageArn"] == package["ModelPackageArn"]
            and current.get("host", "light") == ("ray" if ray else "light")
        ):
            current["unchanged"] = True
            return current
        version = package["ModelPackageVersion"]
        folder = _inside(workdir, endpoint_folder(workdir, name) / str(version))
        _extract_model(package, folder)
        if current is not None:
            stop(workdir, name)
        process = _start_server(folder, package, host, port, threads, ray)
        ready = _wait_until_ready(process, folder, name, RAY_START_TIMEOUT_S if ray else START_TIMEOUT_S)
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
            "model_dir": str(folder / "model"),
            "log": str(folder / "server.log"),
            "CreationTime": fsutil.utc_now(),
        }
        fsutil.write_json_atomic(record_path(workdir, name), record)
        record["EndpointStatus"] = "InService"
        return record


def _extract_model(package: dict[str, Any], folder: Path) -> None:
    """The version's model.tar.gz extracted into ``folder/model``, whole: an archive that cannot be read, a file
    that is gone, or a full disk removes what was extracted and raises EndpointError (one line). The endpoint's
    current server is left running: it is stopped only once the new model is in place."""
    import tarfile
    import zlib

    version = package["ModelPackageVersion"]
    model_data = package["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
    try:
        tarball = fsutil.file_uri_path(model_data)
        fsutil.remove_path(folder)
        fsutil.safe_extract_tarball(tarball, folder / "model")
    except (OSError, tarfile.TarError, EOFError, zlib.error, ValueError) as error:
        fsutil.remove_path(folder)
        reason = f"{error.strerror} ({error.filename})" if isinstance(error, OSError) and error.strerror else error
        raise EndpointError(f"version {version}'s model {model_data} cannot be extracted: {reason}") from error


def _start_server(
    folder: Path, package: dict[str, Any], host: str, port: int, threads: int | None, ray: bool
) -> subprocess.Popen:
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
        str(folder / "model"),
        "--host",
        host,
        "--port",
        str(port),
        "--port-fallback",
        "--ready-file",
        str(folder / "ready.json"),
        *(["--ray"] if ray else []),
    ]
    with (folder / "server.log").open("w") as log:
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
    return process


def _wait_until_ready(process: subprocess.Popen, folder: Path, name: str, timeout: float) -> dict[str, Any]:
    """The server's ready file once it serves. If it exits, does not get ready in time, or this command is
    interrupted meanwhile, the server and its session are stopped: no server is left without a record."""
    ready_file, log_path = folder / "ready.json", folder / "server.log"
    deadline = time.monotonic() + timeout
    try:
        while not ready_file.is_file():
            if process.poll() is not None:
                tail = "\n".join(fsutil.tail_lines(log_path, 15))
                raise EndpointError(f"endpoint {name} exited while starting (status {process.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                raise EndpointError(f"endpoint {name} did not become ready in {timeout:.0f} s; see {log_path}")
            time.sleep(0.05)
        return json.loads(ready_file.read_text())
    except BaseException:
        _stop_server(process.pid, session=True)
        raise
