"""The Ray Serve container's start sequence, run on this machine for ``--ray`` local endpoints.

AWS's Ray Serve inference container (``scripts/docker/ray/sagemaker_entrypoint.sh`` in aws/deep-learning-containers)
puts ``/opt/ml/model`` and ``/opt/ml/model/code`` on ``PYTHONPATH``, pip-installs ``code/requirements.txt``,
then runs ``ray start --head``, ``serve start`` and ``serve run /opt/ml/model/config.yaml`` and waits for Ray's
health check. :class:`RayServeCluster` does the same with the extracted artifact, with three differences that
keep it a good neighbour on a shared machine: requirements go into a folder of the endpoint (put on
``PYTHONPATH``) instead of the interpreter's site-packages; every port is a free one and everything listens
on 127.0.0.1; the object store is small. It waits until the app itself answers (its replica has loaded the model
and run its warm-up), not only Ray's health check. Stopping ends ``serve run`` with SIGINT (it shuts the app
down), then every process the cluster started, by PID: this process adopts Ray's detached daemons (it is
their subreaper), so they are all its descendants.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from entrypoints import contract
from pipelines.serving.errors import HandlerSetupError
from pipelines.util import processes, urls

START_TIMEOUT_S = 240.0
STOP_GRACE_S = 5.0
OBJECT_STORE_BYTES = 150 * 1024 * 1024  # the app passes no large objects; Ray's default is 30% of the RAM
RAY_PORT_FLAGS = (
    "--port",
    "--ray-client-server-port",
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)


class RayHostError(HandlerSetupError):
    """The Ray Serve sequence failed: the message names the step and what to do."""


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, distinct (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            handle = socket.socket()
            handle.bind(("127.0.0.1", 0))
            sockets.append(handle)
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


# The entry points of Ray's own `ray` and `serve` console scripts. Run through this interpreter, not found on
# PATH: another package can install a script of the same name (sagemaker-pytorch-inference ships a `serve` too),
# and which one wins depends on install order.
_RAY_CLIS = {"ray": ("ray.scripts.scripts", "main"), "serve": ("ray.serve.scripts", "cli")}


def _tool(name: str) -> list[str]:
    """The command line that runs Ray's ``ray`` / ``serve`` CLI with this interpreter."""
    module, function = _RAY_CLIS[name]
    if importlib.util.find_spec("ray") is None:
        raise RayHostError(
            f"`{name}` is not installed: --ray needs ray[serve] (pip install -e '.[ray]', which pins the version "
            "of AWS's Ray Serve image), or serve without --ray"
        )
    return [
        sys.executable,
        "-c",
        f"import sys; from {module} import {function}; sys.argv[0] = {name!r}; sys.exit({function}())",
    ]


def gpu_count() -> int:
    """GPUs as the container counts them (``nvidia-smi --list-gpus``)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    result = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, check=False)
    return len(result.stdout.splitlines()) if result.returncode == 0 else 0


class RayServeCluster:
    """A one-node Ray cluster serving one artifact's ``config.yaml``, started and stopped as the container does."""

    def __init__(self, model_dir: Path, work_dir: Path) -> None:
        self.model_dir = model_dir
        self.work_dir = work_dir
        self.site_dir = work_dir / "site-packages"
        self.temp_dir: str | None = None
        self.serve_run: subprocess.Popen | None = None
        processes.become_subreaper()

    def _environment(self, gcs_port: int) -> dict[str, str]:
        environment = dict(os.environ)
        path = [str(self.model_dir), str(self.model_dir / contract.CODE_DIR), str(self.site_dir)]
        environment["PYTHONPATH"] = os.pathsep.join(path)
        environment["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"  # never "auto": another cluster may run here
        environment["RAY_USAGE_STATS_ENABLED"] = "0"
        return environment

    def _run(self, step: str, command: list[str], environment: dict[str, str], timeout: float) -> None:
        print(f"[ray host] {step}: {' '.join(command)}", file=sys.stderr, flush=True)
        try:
            result = subprocess.run(command, env=environment, stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RayHostError(f"{step} did not finish in {timeout:.0f} s") from None
        if result.returncode != 0:
            raise RayHostError(f"{step} failed with exit status {result.returncode}; see the lines above")

    def install_requirements(self, environment: dict[str, str]) -> None:
        """``pip install -r code/requirements.txt``, as the container does at every start (into our folder)."""
        requirements = self.model_dir / contract.CODE_DIR / "requirements.txt"
        if requirements.is_file():
            command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
            command += ["--target", str(self.site_dir), "-r", str(requirements)]
            self._run("pip install -r code/requirements.txt", command, environment, 600)

    def start(self, should_stop: Callable[[], bool] = lambda: False) -> str:
        """Run the sequence; return the URL of Ray Serve's HTTP proxy once the app answers."""
        config = self.model_dir / contract.RAY_SERVE_CONFIG_FILE
        if not config.is_file():
            raise RayHostError(f"{config} is missing: the artifact has no Ray Serve app")
        ray, serve = _tool("ray"), _tool("serve")
        *ray_ports, http_port = free_ports(len(RAY_PORT_FLAGS) + 1)
        environment = self._environment(ray_ports[0])
        self.install_requirements(environment)
        # Short, whatever TMPDIR says: Ray's socket paths below it must stay under 108 bytes.
        short_root = "/tmp" if os.path.isdir("/tmp") else None  # noqa: S108 - mkdtemp makes a private folder there
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir=short_root)
        cpus = contract.available_cpus()
        command = [*ray, "start", "--head", "--include-dashboard=False", f"--num-gpus={gpu_count()}"]
        command += [f"{flag}={port}" for flag, port in zip(RAY_PORT_FLAGS, ray_ports, strict=True)]
        command += ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", f"--temp-dir={self.temp_dir}"]
        command += ["--min-worker-port=0", "--max-worker-port=0", f"--object-store-memory={OBJECT_STORE_BYTES}"]
        command += ["--disable-usage-stats"]
        self._run("ray start", command, environment, 180)
        self._run(
            "serve start", [*serve, "start", "--http-host=127.0.0.1", f"--http-port={http_port}"], environment, 180
        )
        print(f"[ray host] serve run {config}", file=sys.stderr, flush=True)
        self.serve_run = subprocess.Popen([*serve, "run", str(config)], env=environment, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{http_port}"
        self._wait_until_serving(url, should_stop)
        return url

    def _wait_until_serving(self, url: str, should_stop: Callable[[], bool]) -> None:
        """Ray's health check, then the app's own answer at ``GET /`` (its replica is up and warmed)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not should_stop():
            if self.serve_run is not None and self.serve_run.poll() is not None:
                raise RayHostError(f"serve run exited with status {self.serve_run.returncode}; see the lines above")
            if urls.status_of(f"{url}/-/healthz") == 200 and urls.status_of(f"{url}/") == 200:
                return
            time.sleep(0.5)
        if not should_stop():
            raise RayHostError(
                f"the Ray Serve app did not answer within {START_TIMEOUT_S:.0f} s (a replica that fails to load "
                "its model is retried by Ray); see the log above for the replica's error"
            )

    def stop(self) -> list[int]:
        """End ``serve run`` (SIGINT: it shuts the app down), then every process started, by PID."""
        if self.serve_run is not None and self.serve_run.poll() is None:
            self.serve_run.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.serve_run.wait(STOP_GRACE_S)
        stopped = processes.terminate(processes.descendants(os.getpid()), STOP_GRACE_S)
        processes.reap_children()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return stopped
