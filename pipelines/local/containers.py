"""SageMaker's processing and training container contract, emulated in a folder.

A job gets its own folder ``<job root>``; what the container sees as ``/opt/ml/...`` is ``<job root>/opt/ml/...``.
The script runs as a subprocess the way the container starts it:

- processing (``ScriptProcessor`` / ``FrameworkProcessor``): the ``ContainerEntrypoint`` (``python3
  /opt/ml/processing/input/code/<script>``) with the ``ContainerArguments``, inputs (the code is one of them) at
  their ``LocalPath``, outputs collected from theirs; ``/opt/ml/config/processingjobconfig.json`` and
  ``resourceconfig.json``.
- training (the ``sagemaker-training`` toolkit of the PyTorch images): ``sourcedir.tar.gz`` unpacked in
  ``/opt/ml/code``, ``/opt/ml/input/config/{hyperparameters,resourceconfig,inputdataconfig}.json``, channels in
  ``/opt/ml/input/data/<channel>``, the ``SM_*`` environment the toolkit exports, and
  ``python train.py --key value ...`` with the decoded hyperparameters in sorted order, ``sagemaker_*`` and
  ``_tuning_objective_metric`` left out as the toolkit leaves them out. The model folder is packed into a
  deterministic ``model.tar.gz`` afterwards, as SageMaker uploads it. With ``sagemaker_torch_distributed_enabled``
  the toolkit's ``TorchDistributedRunner`` command instead: ``torchrun --nnodes 1 --nproc_per_node <N> train.py
  ...``, where N is every instance's processes together (one per CPU instance), all on this machine as one host.

Scripts only ever see paths under the job root; arguments written with container paths (``/opt/ml/...``) are
mapped to the job root, so the pipeline's arguments are written once, the way the SageMaker steps pass them.

Every job process starts in a session of its own (:func:`run_logged`, the one place they start), so stopping a
job reaches all it started: its process group, and every process below it (a launcher's workers in sessions of
their own included). ``JOBS.stop_all`` stops them all at once (SIGTERM, SIGKILL after a grace period) and keeps
new ones from starting: what the runner does on SIGINT or SIGTERM.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.definition.hyperparameters import TOOLKIT_PARAMETERS, hyperparameter_flags, split_hyperparameters
from pipelines.util import fsutil, processes

CONTAINER_ROOT = "/opt/ml"
DEFAULT_CHECKPOINT_PATH = "/opt/ml/checkpoints"  # CheckpointConfig.LocalPath when a request leaves it out
CONTAINER_PYTHONS = ("python3", "python")  # the image's interpreter: this process's Python here
PROCESSING_WORKDIR = "/opt/ml/processing"
HOST = "algo-1"
LOG_TAIL_LINES = 25
# The toolkit's launcher switches (sagemaker_training.environment); torch_distributed is the one run here.
TORCH_DISTRIBUTED_PARAMETER = "sagemaker_torch_distributed_enabled"
PROCESSES_PER_HOST_PARAMETER = "sagemaker_mpi_num_of_processes_per_host"
OTHER_LAUNCHER_PARAMETERS = (
    "sagemaker_mpi_enabled",
    "sagemaker_parameter_server_enabled",
    "sagemaker_distributed_dataparallel_enabled",
    "sagemaker_pytorch_ddp_enabled",
    "sagemaker_pytorch_xla_multi_worker_enabled",
    "sagemaker_multi_worker_mirrored_strategy_enabled",
)
INSTANCE_GROUP = "homogeneousCluster"
CHANNEL_CONFIG = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
INSTANCE_TYPE = "local"  # as SageMaker's local mode writes it: the instance type says nothing about this machine
NETWORK_INTERFACE = "eth0"
FRAMEWORK_MODULE = "sagemaker_pytorch_container.training:main"  # the PyTorch training image's SAGEMAKER_TRAINING_MODULE
# The training environment's fields the toolkit exports one by one as SM_<NAME> (Environment.to_env_vars).
TOOLKIT_EXPORTED = (
    "hosts",
    "network_interface_name",
    "user_entry_point",
    "resource_config",
    "input_data_config",
    "output_data_dir",
    "current_host",
    "current_instance_type",
    "current_instance_group",
    "current_instance_group_hosts",
    "instance_groups",
    "instance_groups_dict",
    "distribution_instance_groups",
    "is_hetero",
    "module_name",
    "log_level",
    "framework_module",
    "input_dir",
    "input_config_dir",
    "output_dir",
    "num_cpus",
    "num_gpus",
    "num_neurons",
    "model_dir",
    "module_dir",
    "output_intermediate_dir",
)
# The training toolkit's runners start `torchrun`; here it is this Python's torch.distributed.run module.
TORCHRUN = ("-m", "torch.distributed.run")

LineCallback = Callable[[str], None]


class JobError(Exception):
    """A job's script exited non-zero (or could not start): names the job, the log and its last lines.

    ``signal_name`` is the signal that ended it (SIGKILL, or SIGTERM/SIGINT where the script exits 128+N on it
    as its handlers do), or None: a job ended by a signal says nothing about its hyperparameters.
    """

    def __init__(
        self,
        job_name: str,
        message: str,
        log_path: Path | None,
        tail: Sequence[str] = (),
        signal_name: str | None = None,
    ) -> None:
        super().__init__(message)
        self.job_name = job_name
        self.log_path = log_path
        self.tail = list(tail)
        self.signal_name = signal_name


def signal_of(returncode: int) -> str | None:
    """The signal behind an exit status: -N (killed by N), or 128+N (exited on N), for the stopping signals."""
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    try:
        name = signal.Signals(number).name
    except ValueError:
        return None
    return name if returncode < 0 or number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL) else None


class JobProcesses:
    """The job processes running now (each its session's leader), and whether new ones may start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, subprocess.Popen] = {}
        self.stopping: str | None = None  # why no job may start now (e.g. "the run was stopped by SIGTERM")
        self.signal_name: str | None = None  # the signal that stopped them

    def start(self, command: Sequence[str], **popen: object) -> subprocess.Popen:
        with self._lock:
            if self.stopping:
                raise OSError(f"not started: {self.stopping}")
            process = subprocess.Popen(list(command), start_new_session=True, **popen)  # type: ignore[call-overload]
            self._running[process.pid] = process
            return process

    def finish(self, process: subprocess.Popen, grace_seconds: float) -> None:
        """Stop what is left of a job whose main process ended or whose caller gave up on it."""
        with self._lock:
            self._running.pop(process.pid, None)
        stop_job(process, grace_seconds)

    def stop_all(self, signal_name: str, grace_seconds: float) -> None:
        """Keep new jobs from starting and stop every running job's process tree, in threads: this returns at
        once, so a signal handler may call it."""
        with self._lock:
            self.stopping, self.signal_name = f"the run was stopped by {signal_name}", signal_name
            running = list(self._running.values())
        for process in running:
            threading.Thread(target=stop_job, args=(process, grace_seconds), daemon=True).start()

    def allow(self) -> None:
        with self._lock:
            self.stopping = self.signal_name = None


JOBS = JobProcesses()


def stop_job(process: subprocess.Popen, grace_seconds: float) -> None:
    """SIGTERM to the job's process group and every process below it, SIGKILL after ``grace_seconds``."""
    processes.terminate(processes.tree(process.pid), grace_seconds, group=process.pid, reap=False)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_seconds)


@dataclass
class JobResult:
    job_name: str
    log_path: Path
    outputs: dict[str, Path] = field(default_factory=dict)


def _thread_environment(cpus: int) -> dict[str, str]:
    """Pin the math libraries to the job's share of the cores, as an instance of that size would."""
    value = str(max(1, cpus))
    return {name: value for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


# multiprocessing makes its AF_UNIX sockets at TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX, and a socket's path holds
# at most 107 bytes: past that, a job that shares tensors between processes (a DataLoader's workers) fails or
# waits forever. A container's TMPDIR is /tmp.
SOCKET_PATH_MAX = 107
SOCKET_NAME_BYTES = len("/pymp-XXXXXXXX/listener-XXXXXXXX")


@contextlib.contextmanager
def temporary_folder(root: Path) -> Iterator[dict[str, str]]:
    """The job's TMPDIR: its own folder (a run writes nothing outside its workdir), unless that path is too long
    for the sockets a job's processes open there; then a short folder of the system's, removed when the job ends."""
    folder = root / "tmp"
    if len(os.fsencode(folder)) + SOCKET_NAME_BYTES <= SOCKET_PATH_MAX:
        folder.mkdir(parents=True, exist_ok=True)
        yield {"TMPDIR": str(folder)}
        return
    with tempfile.TemporaryDirectory(prefix="job-") as short:  # mode 0700, as mkdtemp makes it
        yield {"TMPDIR": short}


def base_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without anything a container would not have (``SM_*``, ``PYTHONPATH``)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SM_", "SAGEMAKER_")) and key not in ("PYTHONPATH", "TRAINING_JOB_NAME")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if extra:
        env.update(extra)
    return env


def run_logged(
    command: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log_path: Path,
    job_name: str,
    on_line: LineCallback | None = None,
) -> float:
    """Run ``command``, copying its output (stdout and stderr together) to ``log_path`` line by line.

    ``on_line`` sees each line as it arrives (progress, metrics). Returns the duration; raises
    :class:`JobError` with the log's last lines when the command exits non-zero. Interrupting the caller
    stops the child.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    started = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n# cwd: {cwd}\n")
        log.flush()
        try:
            process = JOBS.start(
                command,
                cwd=cwd,
                env=dict(env),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
            )
        except OSError as error:  # the one place child processes start: a missing program is reported here
            raise JobError(
                job_name, f"could not start {command[0]}: {error}", log_path, signal_name=JOBS.signal_name
            ) from error
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                log.flush()
                stripped = line.rstrip("\n")
                tail.append(stripped)
                if on_line is not None:
                    on_line(stripped)
            returncode = process.wait()
        finally:  # ended or interrupted: leave no process of the job behind
            JOBS.finish(process, processes.STOP_GRACE_SECONDS)
    duration = time.perf_counter() - started
    if returncode != 0:
        signal_name = signal_of(returncode)
        reason = f"exit status {returncode}" + (f" ({signal_name})" if signal_name else "")
        if returncode < 0:
            reason = f"killed by {signal_name}"
        raise JobError(job_name, reason, log_path, list(tail), signal_name)
    return duration


def _run_job(
    root: Path, job_name: str, command: Sequence[str], cwd: Path, env: Mapping[str, str], on_line: LineCallback | None
) -> Path:
    """The log of a job's command run in its container folder ``root``, with its own TMPDIR; a failure
    names what the script wrote to /opt/ml/output/failure."""
    log_path = root / "log.txt"
    try:
        with temporary_folder(root) as tmp:
            full_env = base_environment({**tmp, **env})  # the job's Environment may name its own TMPDIR
            run_logged(command, cwd=cwd, env=full_env, log_path=log_path, job_name=job_name, on_line=on_line)
    except JobError as error:
        reason = _failure_reason(root)
        if reason:
            error.args = (f"{error.args[0]}: {reason}",)
        raise
    return log_path


def _failure_reason(root: Path) -> str | None:
    """What the script wrote to /opt/ml/output/failure (or message): SageMaker's FailureReason / ExitMessage."""
    for name in ("failure", "message"):
        path = root / "opt/ml/output" / name
        if path.is_file():
            text = path.read_text(errors="replace").strip()
            if text:
                return text.splitlines()[-1][:500]
    return None


@dataclass
class ProcessingInput:
    source: Path  # a local file or folder (what the S3 URI names, in the object store)
    destination: str  # the container path (LocalPath)
    input_name: str


@dataclass
class ProcessingOutput:
    source: str  # the container path, under /opt/ml/processing/output
    output_name: str


@dataclass
class ProcessingJob:
    """One processing job: CreateProcessingJob's entrypoint, arguments, inputs, outputs and environment."""

    job_name: str
    root: Path
    entrypoint: list[str]  # ContainerEntrypoint, e.g. ["python3", "/opt/ml/processing/input/code/preprocess.py"]
    inputs: list[ProcessingInput]
    outputs: list[ProcessingOutput]
    arguments: list[str]
    cpus: int = 1
    env: dict[str, str] = field(default_factory=dict)

    def container_path(self, path: str) -> Path:
        return container_path(self.root, path)

    def command(self) -> list[str]:
        """The entrypoint on this machine: the container's Python is this one, container paths lie under the root."""
        program, *rest = self.entrypoint
        if Path(program).name in CONTAINER_PYTHONS:
            program = sys.executable
        return [program, *(map_container_argument(self.root, item) for item in [*rest, *self.arguments])]

    def run(self, on_line: LineCallback | None = None) -> JobResult:
        fsutil.remove_path(self.root / "opt")
        for item in self.inputs:
            destination = self.container_path(item.destination)
            if item.source.is_dir():
                fsutil.link_tree(item.source, destination)
            else:  # an S3 object lands in the destination folder under its own name
                destination.mkdir(parents=True, exist_ok=True)
                fsutil.link_tree(item.source, destination / item.source.name)
        for item in self.outputs:
            self.container_path(item.source).mkdir(parents=True, exist_ok=True)
        config_dir = self.container_path("/opt/ml/config")
        fsutil.write_json_atomic(
            config_dir / "processingjobconfig.json",
            {
                "ProcessingJobName": self.job_name,
                "ProcessingInputs": [
                    {"InputName": i.input_name, "S3Input": {"LocalPath": i.destination}} for i in self.inputs
                ],
                "ProcessingOutputConfig": {
                    "Outputs": [
                        {"OutputName": o.output_name, "S3Output": {"LocalPath": o.source}} for o in self.outputs
                    ]
                },
                "AppSpecification": {"ContainerArguments": self.arguments},
                "Environment": self.env,
            },
        )
        fsutil.write_json_atomic(config_dir / "resourceconfig.json", {"current_host": HOST, "hosts": [HOST]})
        cwd = self.container_path(PROCESSING_WORKDIR)
        cwd.mkdir(parents=True, exist_ok=True)
        env = {**_thread_environment(self.cpus), **self.env}
        log_path = _run_job(self.root, self.job_name, self.command(), cwd, env, on_line)
        outputs = {item.output_name: self.container_path(item.source) for item in self.outputs}
        return JobResult(self.job_name, log_path, outputs)


def container_path(root: Path, path: str) -> Path:
    if not path.startswith(CONTAINER_ROOT):
        raise ValueError(f"{path!r} is not a container path under {CONTAINER_ROOT}")
    return root / path.lstrip("/")


def map_container_argument(root: Path, argument: str) -> str:
    """``/opt/ml/x`` -> ``<root>/opt/ml/x``; ``--flag=/opt/ml/x`` too; anything else unchanged."""
    flag, separator, value = argument.partition("=")
    if separator and flag.startswith("-") and value.startswith(CONTAINER_ROOT):
        return f"{flag}={container_path(root, value)}"
    if argument.startswith(CONTAINER_ROOT):
        return str(container_path(root, argument))
    return argument


def _env_value(value: object) -> str:
    """``sagemaker_training.mapping.to_env_vars``' formatting of a value."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


def torch_distributed(hyperparameters: Mapping[str, str]) -> bool:
    """The toolkit's TorchDistributedRunner starts the script (``distribution={"torch_distributed": ...}``)."""
    return bool(split_hyperparameters(hyperparameters)[0].get(TORCH_DISTRIBUTED_PARAMETER))


def ranks(hyperparameters: Mapping[str, str], instance_count: int) -> int:
    """The job's processes. torchrun starts ``sagemaker_mpi_num_of_processes_per_host`` processes on every
    instance, by default one per GPU, or one on an instance without GPUs, as every instance is here; the ranks of
    all the instances run on this machine as one host's. A job without a launcher is one process."""
    if not torch_distributed(hyperparameters):
        return 1
    per_host = split_hyperparameters(hyperparameters)[0].get(PROCESSES_PER_HOST_PARAMETER) or 1
    return instance_count * int(per_host)


def launch_problem(hyperparameters: Mapping[str, str], instance_count: object) -> str | None:
    """Why a training job with these hyperparameters and ``ResourceConfig.InstanceCount`` cannot run here."""
    toolkit, _ = split_hyperparameters(hyperparameters)
    others = [name for name in OTHER_LAUNCHER_PARAMETERS if toolkit.get(name)]
    if others:
        return f"{others[0]}: of the training toolkit's launchers only torch_distributed runs locally"
    if isinstance(instance_count, bool) or not isinstance(instance_count, int) or instance_count < 1:
        return f"InstanceCount {instance_count!r}: a training job needs a whole number of instances, at least 1"
    if instance_count > 1 and not toolkit.get(TORCH_DISTRIBUTED_PARAMETER):
        return (
            f"InstanceCount {instance_count} with no distribution launcher: SageMaker would run the script on "
            "each instance as an unrelated single-process job; give the estimator "
            "distribution={'torch_distributed': {'enabled': True}} (the pipeline's --torch-distributed)"
        )
    return None


@dataclass
class TrainingJob:
    """One training job (a tuning trial or the TrainingStep) under the PyTorch training container contract.

    ``hyperparameters`` are the strings of CreateTrainingJob's ``HyperParameters`` (static values JSON-encoded
    as the SDK's framework estimators encode them, tuned values as the tuner writes them); ``source_tarball``
    is the ``sourcedir.tar.gz`` that ``sagemaker_submit_directory`` names, ``entry_point`` its
    ``sagemaker_program``.
    """

    job_name: str
    root: Path
    source_tarball: Path
    entry_point: str
    hyperparameters: dict[str, str]
    channels: dict[str, Path]
    cpus: int = 1
    extra_arguments: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restore: dict[str, Path] = field(default_factory=dict)  # container folder -> files put there before the start
    instance_count: int = 1  # ResourceConfig.InstanceCount

    @property
    def model_tarball(self) -> Path:
        return self.root / "output" / "model.tar.gz"

    @property
    def torch_distributed(self) -> bool:
        return torch_distributed(self.hyperparameters)

    @property
    def processes(self) -> int:
        return ranks(self.hyperparameters, self.instance_count)

    def command(self, arguments: Sequence[str]) -> list[str]:
        """``python train.py <arguments>``, or under torch_distributed the toolkit's ``torchrun --nnodes 1
        --nproc_per_node <N> train.py <arguments>``. ``--standalone`` gives torchrun's rendezvous a free port:
        a container has a network of its own, this machine may have another torchrun on the default port."""
        if not self.torch_distributed:
            return [sys.executable, self.entry_point, *arguments]
        launcher = ["--nnodes", "1", "--nproc_per_node", str(self.processes), "--standalone"]
        return [sys.executable, *TORCHRUN, *launcher, self.entry_point, *arguments]

    def environment(self) -> tuple[dict[str, str], list[str]]:
        """The ``SM_*`` variables and the script's arguments, as the training toolkit computes them
        (``sagemaker_training.environment.Environment.to_env_vars``) from the job's config files."""
        opt = self.root / "opt/ml"
        toolkit, user = split_hyperparameters(self.hyperparameters)
        arguments = hyperparameter_flags(user)
        channels = sorted(self.channels)
        # With a launcher the toolkit counts the instance group among the distribution groups.
        distribution_groups = [INSTANCE_GROUP] if self.torch_distributed else []
        group = {"instance_group_name": INSTANCE_GROUP, "instance_type": INSTANCE_TYPE, "hosts": [HOST]}
        resource_config = {
            "current_host": HOST,
            "current_instance_type": INSTANCE_TYPE,
            "current_group_name": INSTANCE_GROUP,
            "hosts": [HOST],
            "instance_groups": [group],
            "network_interface_name": NETWORK_INTERFACE,
        }
        training_env: dict[str, object] = {
            "additional_framework_parameters": {k: v for k, v in toolkit.items() if k not in TOOLKIT_PARAMETERS},
            "channel_input_dirs": {name: str(opt / "input/data" / name) for name in channels},
            "current_host": HOST,
            "current_instance_group": INSTANCE_GROUP,
            "current_instance_group_hosts": [HOST],
            "current_instance_type": INSTANCE_TYPE,
            "distribution_hosts": [HOST] if distribution_groups else [],
            "distribution_instance_groups": distribution_groups,
            "framework_module": FRAMEWORK_MODULE,
            "hosts": [HOST],
            "hyperparameters": user,
            "input_config_dir": str(opt / "input/config"),
            "input_data_config": {name: dict(CHANNEL_CONFIG) for name in channels},
            "input_dir": str(opt / "input"),
            "instance_groups": [INSTANCE_GROUP],
            "instance_groups_dict": {INSTANCE_GROUP: group},
            "is_hetero": False,
            "is_master": True,
            "is_modelparallel_enabled": None,
            "is_smddpmprun_installed": False,
            "is_smddprun_installed": False,
            "job_name": self.job_name,
            "log_level": toolkit.get("sagemaker_container_log_level", 20),
            "master_hostname": HOST,
            "model_dir": str(opt / "model"),
            "module_dir": toolkit.get("sagemaker_submit_directory", str(opt / "code")),  # the code's S3 URI, if any
            "module_name": Path(self.entry_point).stem,
            "network_interface_name": NETWORK_INTERFACE,
            "num_cpus": self.cpus,
            "num_gpus": 0,
            "num_neurons": 0,
            "output_data_dir": str(opt / "output/data"),
            "output_dir": str(opt / "output"),
            "output_intermediate_dir": str(opt / "output/intermediate"),
            "resource_config": resource_config,
            "topology": [],
            "user_entry_point": self.entry_point,
        }
        exported = {key: training_env[key] for key in TOOLKIT_EXPORTED}
        exported.update(
            hps=user,
            framework_params=training_env["additional_framework_parameters"],
            channels=channels,
            training_env=training_env,
            user_args=arguments,
            **{f"channel_{name}": str(opt / "input/data" / name) for name in channels},
            **{f"hp_{key}": value for key, value in user.items()},
        )
        env = {f"SM_{key.upper()}": _env_value(value) for key, value in exported.items()}
        env["TRAINING_JOB_NAME"] = self.job_name
        env["SAGEMAKER_TRAINING_MODULE"] = FRAMEWORK_MODULE
        env["SAGEMAKER_REGION"] = ""
        if self.torch_distributed:  # what TorchDistributedRunner._setup exports for NCCL (gloo, on CPUs, ignores them)
            env.update(NCCL_SOCKET_IFNAME=NETWORK_INTERFACE, NCCL_PROTO="simple")
        return env, arguments

    def run(self, on_line: LineCallback | None = None) -> JobResult:
        problem = launch_problem(self.hyperparameters, self.instance_count)
        if problem:
            raise JobError(self.job_name, problem, None)
        opt = self.root / "opt/ml"
        fsutil.remove_path(self.root / "opt")
        fsutil.remove_path(self.root / "output")
        fsutil.safe_extract_tarball(self.source_tarball, opt / "code")
        for name, source in self.channels.items():
            fsutil.link_tree(source, opt / "input/data" / name)
        for folder in ("model", "output/data", "output/tensorboard", "checkpoints", "output/intermediate"):
            (opt / folder).mkdir(parents=True, exist_ok=True)
        for folder, source in self.restore.items():  # e.g. checkpoints SageMaker downloads to resume from
            fsutil.link_tree(source, container_path(self.root, folder))
        env, arguments = self.environment()
        config_dir = opt / "input/config"
        fsutil.write_json_atomic(config_dir / "hyperparameters.json", self.hyperparameters)
        fsutil.write_json_atomic(config_dir / "resourceconfig.json", json.loads(env["SM_RESOURCE_CONFIG"]))
        fsutil.write_json_atomic(config_dir / "inputdataconfig.json", json.loads(env["SM_INPUT_DATA_CONFIG"]))
        command = self.command(
            [*arguments, *(map_container_argument(self.root, argument) for argument in self.extra_arguments)]
        )
        threads = _thread_environment(self.cpus // self.processes)  # the processes share the job's cores
        log_path = _run_job(self.root, self.job_name, command, opt / "code", {**threads, **self.env, **env}, on_line)
        model_dir = opt / "model"
        if not any(model_dir.iterdir()):
            raise JobError(self.job_name, f"the script wrote nothing to SM_MODEL_DIR ({model_dir})", log_path)
        fsutil.make_tarball(model_dir, self.model_tarball)
        outputs = {"model": self.model_tarball}
        output_data = opt / "output/data"
        if any(output_data.iterdir()):
            outputs["output"] = fsutil.make_tarball(output_data, self.root / "output" / "output.tar.gz")
        return JobResult(self.job_name, log_path, outputs)
