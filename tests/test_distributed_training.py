"""The training script under torchrun: two CPU processes with gloo, as SageMaker's torch_distributed launcher
starts it (``python -m torch.distributed.run --nproc-per-node 2 train.py ...``), on tiny data.

The two-process runs are marked slow (each is a few seconds of start-up plus training); the units are not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _training import TRAIN_SCRIPT, run_toolkit, subprocess_env, toolkit_layout, train_argv, write_split

from entrypoints import checkpoints, contract, data, distributed, modeling, train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--monitor-interval", "0.1"]
RANKS_LINE = re.compile(r"processes 2 \(gloo, timeout \S+ s\): rank 0 pid (\d+) on \S+; rank 1 pid (\d+)")
FLAGS = ("--epochs", "3", "--dropout", "0.3", "--hidden-units", "8", "--lr-scaling", "linear", "--lr", "0.002")


@pytest.fixture(scope="module")
def channels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """16 training images (8 per rank, 2 steps of 4); 9 valid images, some of them half-way between the colours,
    split 5/4 between the ranks, so rank 0's share of the accuracy is not the whole set's."""
    root = tmp_path_factory.mktemp("channels")
    valid = write_split(root / "valid", 5, seed=2, blend=0.9)
    (valid / "blue" / "004.jpg").unlink()
    return write_split(root / "train", 8, seed=1), valid


def _launch(argv: list[str], out: Path, **env: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sm-output").mkdir(exist_ok=True)
    return subprocess.Popen(
        [*TORCHRUN, str(TRAIN_SCRIPT), *argv],
        env=subprocess_env(SM_OUTPUT_DIR=str(out / "sm-output"), **env),
        cwd=out,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group to clean up whatever the test's outcome
    )


def _finish(process: subprocess.Popen, timeout: float) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun still running after {timeout} s:\n{output[-4000:]}")
    return output


def _read_until(process: subprocess.Popen, pattern: re.Pattern) -> tuple[str, re.Match | None]:
    """The output up to and including the first line that matches (all of it if none does)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        match = pattern.search(line)
        if match:
            return "".join(lines), match
    return "".join(lines), None


def _run(argv: list[str], out: Path, timeout: float = 240) -> str:
    process = _launch(argv, out)
    output = _finish(process, timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def _gone(pid: int) -> bool:
    """The pid has ended and been reaped (torchrun's children are reparented and reaped when it exits)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def two_process_run(channels, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("two-processes")
    argv = train_argv(channels, out, *FLAGS, "--tensorboard-dir", str(out / "tb"))
    return out, _run(argv, out)


def _accuracy_and_loss(model: torch.nn.Module, config: modeling.ModelConfig, valid_dir: Path) -> tuple[float, float]:
    """Accuracy and mean label-smoothed loss of ``model`` over the whole valid set, through the training pipeline's
    own evaluation crops (resize + centre crop), one image at a time."""
    index = data.scan_channel(valid_dir, config.class_names)
    dataset = data.ImageDataset(index.samples, config.input_size, config.resize_size, train=False)
    normalize = data.BatchNormalizer(config.mean, config.std)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum")
    correct, loss = 0, 0.0
    model.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            image, label = dataset[i]
            logits = model(normalize(image.unsqueeze(0)))
            correct += int(logits.argmax(1).item() == label)
            loss += criterion(logits, torch.tensor([label])).item()
    return correct / len(dataset), loss / len(dataset)


@pytest.mark.slow
def test_two_processes_write_one_artifact_and_log_the_whole_validation_sets_accuracy(two_process_run, channels):
    out, log = two_process_run
    rows = contract.parse_metrics(log)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for definition in contract.METRIC_DEFINITIONS:  # rank 0 alone prints: one tuner line per epoch, per metric
        matching = [line for line in log.splitlines() if re.search(definition["Regex"], line)]
        assert len(matching) == 3, (definition["Name"], matching)
    assert "global batch 8 (4 per process x 2); learning rate 0.004 (--lr 0.002, --lr-scaling linear)" in log
    assert "Debugger: hook off with 2 processes" in log

    model, config = modeling.load_model(out / "model")  # the artifact of the contract: loads and predicts
    accuracy, loss = _accuracy_and_loss(model, config, channels[1])
    assert 0 < accuracy < 1  # a set where one rank's share would give another figure
    assert rows[-1]["valid_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert rows[-1]["valid_loss"] == pytest.approx(loss, abs=1e-4)
    (epoch_2,) = (out / "checkpoints").glob("checkpoint-*-epoch-0002.pt")  # and an earlier epoch, from its checkpoint
    model.load_state_dict(checkpoints.load(epoch_2)["model"])
    assert rows[1]["valid_accuracy"] == pytest.approx(_accuracy_and_loss(model, config, channels[1])[0], abs=1e-6)

    saved = json.loads((out / "model" / contract.HYPERPARAMETERS_FILE).read_text())
    assert (saved["processes"], saved["batch-size"], saved["global-batch-size"]) == (2, 4, 8)
    assert (saved["lr"], saved["lr-scaling"], saved["effective-lr"]) == (0.002, "linear", 0.004)
    for name in contract.SERVING_CODE_FILES:
        assert (out / "model" / contract.CODE_DIR / name).is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("accuracy/valid")] == [1, 2, 3]  # one writer, not one per rank


# What the PyTorch training container's toolkit runs for distribution={"torch_distributed": {"enabled": True}}:
# the sagemaker-training toolkit's TorchDistributedRunner (torchrun --nnodes 1 --nproc_per_node <N> train.py ...,
# N = SM_NUM_GPUS, or sagemaker_mpi_num_of_processes_per_host as here on CPUs).
TORCH_DISTRIBUTED_FRAMEWORK = """
from sagemaker_training import entry_point, environment, logging_config, runner


def main():
    env = environment.Environment()
    logging_config.configure_logger(env.log_level)
    entry_point.run(
        env.module_dir, env.user_entry_point, env.to_cmd_args(), env.to_env_vars(),
        runner_type=runner.TorchDistributedRunnerType, extra_opts={"sagemaker_mpi_num_of_processes_per_host": 2},
    )
"""


@pytest.mark.slow
def test_two_processes_resumed_by_sagemakers_launcher_end_where_the_uninterrupted_run_ended(
    two_process_run, channels, tmp_path
) -> None:
    """A spot interruption during epoch 3: SageMaker restores the checkpoint folder and relaunches the job, here
    through the training toolkit's own torch_distributed runner on an /opt/ml layout in tmp."""
    pytest.importorskip("sagemaker_training", reason="sagemaker-training is a dev requirement (setup.py)")
    straight, log = two_process_run
    argv = train_argv(channels, straight, *FLAGS)
    paths = ("--train-dir", "--valid-dir", "--model-dir", "--output-data-dir", "--checkpoint-dir")  # SM_* instead
    hyperparameters = {k.removeprefix("--"): v for k, v in zip(argv[::2], argv[1::2], strict=True) if k not in paths}
    base = toolkit_layout(tmp_path / "opt_ml", channels, hyperparameters)
    (epoch_2,) = (straight / "checkpoints").glob("checkpoint-*-epoch-0002.pt")
    (base / "checkpoints").mkdir()
    shutil.copy(epoch_2, base / "checkpoints")  # the toolkit environment's default checkpoint folder
    (tmp_path / "framework").mkdir()
    (tmp_path / "framework" / "torch_distributed_framework.py").write_text(TORCH_DISTRIBUTED_FRAMEWORK)
    code, resumed = run_toolkit(
        base,
        tmp_path,
        SAGEMAKER_TRAINING_MODULE="torch_distributed_framework:main",
        PYTHONPATH=str(tmp_path / "framework"),
    )
    assert code == 0, resumed[-4000:]
    assert "torchrun --nnodes 1 --nproc_per_node 2 train.py" in resumed  # the toolkit's own command line
    assert re.search(rf"resumed from {re.escape(str(base))}/checkpoints/\S+-epoch-0002\.pt: 2 of 3 epochs", resumed)
    assert contract.parse_metrics(resumed) == contract.parse_metrics(log)[2:]
    a = torch.load(straight / "model" / contract.WEIGHTS_FILE, weights_only=True)
    b = torch.load(base / "model" / contract.WEIGHTS_FILE, weights_only=True)
    for key in a:  # every rank resumed, with its own dropout stream: the same network
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_killing_one_rank_fails_the_run_within_the_timeout_with_that_ranks_error(channels, tmp_path) -> None:
    timeout = 30
    argv = train_argv(channels, tmp_path, "--epochs", "1000", "--checkpoint-dir", "none", "--dist-timeout", "30")
    process = _launch(argv, tmp_path)
    output, pids = _read_until(process, RANKS_LINE)
    output += _read_until(process, re.compile(r"^epoch=1 "))[0]
    assert pids, output[-3000:]
    rank_0, rank_1 = int(pids.group(1)), int(pids.group(2))
    killed = time.monotonic()
    os.kill(rank_1, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    output += _finish(process, timeout)
    assert process.returncode != 0 and time.monotonic() - killed < timeout, output[-3000:]
    failure = (tmp_path / "sm-output" / train.FAILURE_FILE).read_text()
    assert failure.startswith("rank 0 of 2") and f"rank 1 (pid {rank_1}) on host" in failure, failure
    assert "killed" in failure and "epoch 2 training" in failure
    assert _gone(rank_0) and _gone(rank_1)


@pytest.mark.slow
def test_a_stuck_rank_fails_the_run_after_the_collective_timeout(channels, tmp_path) -> None:
    stuck = tmp_path / "train"
    shutil.copytree(channels[0], stuck)
    (stuck / "red" / "003.jpg").unlink()
    os.mkfifo(stuck / "red" / "003.jpg")  # reading it blocks forever, as a hung network file system would
    argv = train_argv((stuck, channels[1]), tmp_path, "--epochs", "2", "--dist-timeout", "4")
    process = _launch(argv, tmp_path)
    output, pids = _read_until(process, RANKS_LINE)
    started = time.monotonic()  # the ranks have met; the first collective of training follows
    output += _finish(process, 60)
    elapsed = time.monotonic() - started
    assert process.returncode != 0 and pids, output[-3000:]
    assert 4 < elapsed < 4 + 30, elapsed
    failure = (tmp_path / "sm-output" / train.FAILURE_FILE).read_text()
    assert "no answer from the other ranks within the collective timeout of 4 s (--dist-timeout)" in failure
    assert re.search(r"still running on this host: rank [01] \(pid \d+\)", failure), failure
    assert _gone(int(pids.group(1))) and _gone(int(pids.group(2)))


# --- units ---------------------------------------------------------------------------------------------------


def test_training_shards_are_equal_and_validation_shards_cover_every_image_once() -> None:
    for length in (9, 10):
        padded = [data.EpochSampler(length, True, seed=3, num_replicas=2, rank=r, pad=True) for r in (0, 1)]
        exact = [data.EpochSampler(length, False, num_replicas=2, rank=r, pad=False) for r in (0, 1)]
        for sampler in padded:
            sampler.set_epoch(4)
        shards = [[i for i, epoch in sampler if epoch == 4] for sampler in padded]
        assert len(shards[0]) == len(shards[1]) == len(padded[0]) == (length + 1) // 2  # DDP: same steps per rank
        assert sorted(set(shards[0] + shards[1])) == list(range(length))
        split = [[i for i, _ in sampler] for sampler in exact]
        assert sorted(split[0] + split[1]) == list(range(length)) and [len(s) for s in split] == [len(e) for e in exact]
        single = data.EpochSampler(length, True, seed=3)  # one process: the whole shuffled order
        single.set_epoch(4)
        assert [i for i, _ in single][0::2] == shards[0][: len(range(0, length, 2))]


def test_the_launchers_environment_is_read_and_checked() -> None:
    assert distributed.from_environment({}) == distributed.World(host=distributed.World().host)
    world = distributed.from_environment(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "SM_CURRENT_HOST": "algo-2"}
    )
    assert (world.rank, world.world_size, world.local_rank, world.host, world.launched) == (3, 4, 1, "algo-2", True)
    with pytest.raises(distributed.LaunchError, match="LOCAL_RANK, LOCAL_WORLD_SIZE missing: start the script"):
        distributed.from_environment({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(distributed.LaunchError, match="inconsistent"):
        distributed.from_environment({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})


@pytest.fixture
def _under_torchrun(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    yield


@pytest.mark.usefixtures("_under_torchrun")
@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (("--sync-batchnorm",), "argument --sync-batchnorm: PyTorch's SyncBatchNorm runs on GPUs only"),
        (("--dist-backend", "nccl"), "argument --dist-backend: nccl needs GPUs"),
        (("--dist-timeout", "0"), "argument --dist-timeout: must be > 0"),
        (("--lr-scaling", "sqrt"), "argument --lr-scaling: choose one of none, linear"),
    ],
)
def test_distributed_flags_that_cannot_work_fail_at_start(channels, tmp_path, capsys, flags, says) -> None:
    assert train.main(train_argv(channels, tmp_path, *flags)) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_a_peer_that_ended_is_named_with_its_signal_and_a_stuck_one_after_a_timeout() -> None:
    world = distributed.World(rank=0, world_size=3, host="algo-1", launched=True)
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed.send_signal(signal.SIGKILL)
        while distributed._peer(1, killed.pid).state == "running":
            time.sleep(0.01)  # not reaped yet: a zombie whose exit status the kernel keeps
        state = distributed.Session(world, "gloo", 5, [("algo-1", os.getpid()), ("algo-1", killed.pid)])
        state.phase = "epoch 2 training"
        message = distributed.explain_collective_failure(state, RuntimeError("Connection reset by peer"))
        assert message.startswith(f"rank 1 (pid {killed.pid}) on host algo-1 was killed by SIGKILL during epoch 2")

        state.peers = [("algo-1", os.getpid()), ("algo-1", alive.pid), ("algo-2", 1)]
        message = distributed.explain_collective_failure(state, RuntimeError("Timed out waiting 5000ms for recv"))
        assert "within the collective timeout of 5 s (--dist-timeout) during epoch 2 training" in message
        assert f"still running on this host: rank 1 (pid {alive.pid})" in message and "rank 2" not in message
        assert distributed.explain_collective_failure(state, None) is None  # a plain stop: nothing to add
    finally:
        for process in (killed, alive):
            process.kill()
            process.wait()
