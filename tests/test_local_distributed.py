"""The local Training executor under SageMaker's torch_distributed launcher: the training toolkit's own command and
environment, the instance counts it refuses before any step, the parameter that only a pipeline built with
``--torch-distributed`` has, and that flag on `definition`. (A two-process Train step runs in the end-to-end chain
of tests/test_local_pipeline.py; the definition's launcher and Debugger settings are in tests/test_pipeline.py.)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from test_aws_cli import aws  # noqa: F401  (a fixture: moto, with region, role and bucket in the environment)

from pipelines.local import containers

# What the PyTorch training image runs: the toolkit's environment and its TorchDistributedRunner's command line.
TOOLKIT = """
import json, os
from sagemaker_training import environment, runner

env = environment.Environment()
command = runner.get(runner.TorchDistributedRunnerType)._create_command()
nccl = {name: os.environ.get(name) for name in ("NCCL_SOCKET_IFNAME", "NCCL_PROTO")}
print(json.dumps({"command": command, "env": env.to_env_vars(), "nccl": nccl}))
"""


def _job(root: Path, instance_count: int = 1, **toolkit: str) -> containers.TrainingJob:
    return containers.TrainingJob(
        job_name="imgclf-train-run-0001",
        root=root,
        source_tarball=root / "sourcedir.tar.gz",
        entry_point="train.py",
        hyperparameters={
            "epochs": "2",
            "lr": "0.01",
            "architecture": '"resnet18"',
            "sagemaker_program": '"train.py"',
            "sagemaker_submit_directory": '"s3://bucket/code/sourcedir.tar.gz"',
            "sagemaker_region": '"us-east-1"',
            "sagemaker_container_log_level": "20",
            "sagemaker_torch_distributed_enabled": "true",
            "sagemaker_instance_type": "ml.m5.xlarge",
            **toolkit,
        },
        channels={"train": root / "train", "valid": root / "valid"},
        cpus=os.cpu_count() or 1,  # what the toolkit counts in its own process
        instance_count=instance_count,
    )


def _toolkit_view(job: containers.TrainingJob) -> dict[str, Any]:
    """The toolkit's environment and command, computed by the toolkit from the config files the job writes."""
    pytest.importorskip("sagemaker_training", reason="sagemaker-training is a dev requirement (setup.py)")
    env, _ = job.environment()
    opt = job.root / "opt/ml"
    (opt / "input/config").mkdir(parents=True)
    (opt / "code").mkdir()
    (opt / "code" / job.entry_point).write_text("")
    for name, text in (
        ("hyperparameters.json", json.dumps(job.hyperparameters)),
        ("resourceconfig.json", env["SM_RESOURCE_CONFIG"]),
        ("inputdataconfig.json", env["SM_INPUT_DATA_CONFIG"]),
    ):
        (opt / "input/config" / name).write_text(text)
    container = {name: env[name] for name in ("TRAINING_JOB_NAME", "SAGEMAKER_TRAINING_MODULE")}  # the image's
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "SAGEMAKER_", "NCCL_"))}
    done = subprocess.run(
        [sys.executable, "-c", TOOLKIT],
        env={**clean, **container, "SAGEMAKER_BASE_DIR": str(opt)},
        cwd=job.root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_torch_distributed_job_gets_the_training_toolkits_command_and_environment(tmp_path: Path) -> None:
    job = _job(tmp_path / "job", sagemaker_mpi_num_of_processes_per_host="2")
    toolkit = _toolkit_view(job)
    env, arguments = job.environment()

    # every variable the toolkit exports, with the toolkit's value
    exported = {name for name in toolkit["env"] if name != "SM_TRAINING_ENV"}
    assert {name: env.get(name) for name in exported} == {name: toolkit["env"][name] for name in exported}
    assert json.loads(env["SM_TRAINING_ENV"]) == json.loads(toolkit["env"]["SM_TRAINING_ENV"])
    assert {name for name in env if name.startswith("SM_")} == set(toolkit["env"])  # and no other
    assert json.loads(env["SM_TRAINING_ENV"])["distribution_hosts"] == ["algo-1"]
    assert {name: env[name] for name in toolkit["nccl"]} == toolkit["nccl"]  # what TorchDistributedRunner sets

    # the runner's torchrun command line: this Python's torch.distributed.run, a free rendezvous port
    assert toolkit["command"] == ["torchrun", "--nnodes", "1", "--nproc_per_node", "2", "train.py", *arguments]
    command = job.command(arguments)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert [item for item in command[3:] if item != "--standalone"] == toolkit["command"][1:]

    # several instances: all their ranks on this machine's one host, one per CPU instance
    assert _job(tmp_path / "three", instance_count=3).command(arguments)[3:7] == [
        "--nnodes", "1", "--nproc_per_node", "3"
    ]  # fmt: skip
    plain = containers.TrainingJob(**{**job.__dict__, "hyperparameters": {"epochs": "2", "lr": "0.01"}})
    assert plain.command(arguments) == [sys.executable, "train.py", *arguments]
    assert "NCCL_PROTO" not in plain.environment()[0]
    assert json.loads(plain.environment()[0]["SM_TRAINING_ENV"])["distribution_hosts"] == []


def test_instance_counts_the_toolkit_cannot_launch_are_refused() -> None:
    launcher = {"sagemaker_torch_distributed_enabled": "true"}
    assert containers.launch_problem(launcher, 4) is None
    assert containers.launch_problem({}, 1) is None
    assert "with no distribution launcher" in containers.launch_problem({}, 2)
    assert "--torch-distributed" in containers.launch_problem({}, 2)
    assert "at least 1" in containers.launch_problem(launcher, 0)
    assert "only torch_distributed runs locally" in containers.launch_problem({"sagemaker_mpi_enabled": "true"}, 1)
    assert containers.ranks(launcher, 3) == 3
    assert containers.ranks({**launcher, "sagemaker_mpi_num_of_processes_per_host": "2"}, 3) == 6
    assert containers.ranks({}, 1) == 1


@pytest.fixture(scope="module")
def distributed_demo() -> tuple[dict[str, Any], Any, Any]:
    """The demo definition with ``--torch-distributed``, as `local` builds it."""
    from pipelines.local.runner import LocalRunOptions, build_definition

    return build_definition(LocalRunOptions(preset="demo", torch_distributed=True))


def _problems(definition: dict[str, Any], artifacts: Any, workdir: Path, training_instance_count: int) -> list[str]:
    """What stops the definition before its first step, with its code and input data in the local store."""
    from test_local_executor import _execution

    execution = _execution(definition, workdir)
    execution.scope.parameters["TrainingInstanceCount"] = training_instance_count  # as --param gives it
    for artifact in artifacts.all():
        execution.store.put_bytes(artifact.s3_uri, artifact.body)
    execution.store.put_bytes(execution.scope.parameters["InputDataUri"] + "digits.zip", b"zip")
    return execution.problems()


def test_a_training_instance_count_the_executor_cannot_run_stops_the_run_before_its_first_step(
    distributed_demo: tuple[dict[str, Any], Any, Any], tmp_path: Path
) -> None:
    definition, artifacts, _ = distributed_demo
    assert _problems(definition, artifacts, tmp_path / "two", 2) == []
    (problem,) = _problems(definition, artifacts, tmp_path / "none", 0)
    assert problem.startswith("Train: InstanceCount 0: a training job needs a whole number of instances")


@pytest.mark.slow
def test_training_instance_count_without_torch_distributed_is_refused_with_the_flag_to_use(
    tmp_path: Path,
) -> None:
    from pipelines.run import main

    data = tmp_path / "data.zip"
    data.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: never read, nothing runs
    workdir = tmp_path / "runs"
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = main(["local", "--workdir", str(workdir), "--data", str(data), "--param", "TrainingInstanceCount=2"])
    assert code == 2
    assert "--param TrainingInstanceCount: TrainingInstanceCount is a parameter only of a pipeline built with " \
        "torch_distributed (--torch-distributed" in err.getvalue()  # fmt: skip
    assert not list(workdir.glob("run-*"))


@pytest.mark.slow
@pytest.mark.usefixtures("aws")
def test_definition_takes_the_flag_as_local_does(tmp_path: Path) -> None:
    from pipelines.run import main

    output = tmp_path / "definition.json"
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        assert main(["definition", "--torch-distributed", "--output", str(output)]) == 0
    definition = json.loads(output.read_text())
    (train,) = [step for step in definition["Steps"] if step["Name"] == "Train"]
    assert train["Arguments"]["ResourceConfig"]["InstanceCount"] == {"Get": "Parameters.TrainingInstanceCount"}
    assert json.loads(train["Arguments"]["HyperParameters"]["sagemaker_torch_distributed_enabled"]) is True
