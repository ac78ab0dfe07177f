"""Checkpoints belong to the run that wrote them: settings and data in the key, no machine-wide default folder,
and a run that finds its work already done still prints its metrics. In-process runs of seconds each."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from _training import one_torch_thread, train_argv, write_split  # noqa: F401 - one thread for every test

from entrypoints import checkpoints, contract, train, train_args


@pytest.fixture(scope="module")
def channels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("channels")
    return write_split(root / "train", 6, seed=1), write_split(root / "valid", 3, seed=2)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model" / contract.WEIGHTS_FILE, weights_only=True)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _other_train_images(channels, tmp_path):
    return (write_split(tmp_path / "other" / "train", 6, seed=11), channels[1]), (), "train-data"


def _other_valid_images(channels, tmp_path):
    return (channels[0], write_split(tmp_path / "other" / "valid", 3, seed=12)), (), "valid-data"


def _one_more_train_image(channels, tmp_path):
    train_dir = tmp_path / "other" / "train"
    shutil.copytree(channels[0], train_dir)
    shutil.copy(train_dir / "red" / "000.jpg", train_dir / "red" / "999.jpg")
    return (train_dir, channels[1]), (), "train-data"


def _other_learning_rate(channels, tmp_path):
    return channels, ("--lr", "0.01"), "lr: 0.001 -> 0.01"


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant", [_other_train_images, _other_valid_images, _one_more_train_image, _other_learning_rate]
)
def test_a_second_run_in_the_same_folder_with_other_data_or_settings_starts_fresh_saying_why(
    channels, tmp_path, capsys, variant
) -> None:
    """The reported case (same hyperparameters, other data, all epochs "already done") and others of its kind."""
    first = tmp_path / "runs"
    assert train.main(train_argv(channels, first, "--epochs", "1")) == 0
    first_rows = contract.parse_metrics(capsys.readouterr().out)
    first_files = sorted((first / "checkpoints").iterdir())

    other_channels, flags, named = variant(channels, tmp_path)
    assert train.main(train_argv(other_channels, first, "--epochs", "1", *flags)) == 0  # all epochs "done"
    out = capsys.readouterr().out
    fresh_lines = [line for line in out.splitlines() if line.startswith("starting fresh")]
    assert len(fresh_lines) == 1 and named in fresh_lines[0] and "left in place" in fresh_lines[0], out
    assert "resumed from" not in out and "already done" not in out
    rows = contract.parse_metrics(out)
    assert [row["epoch"] for row in rows] == [1] and rows != first_rows  # trained and measured, not taken over
    assert all(path.exists() for path in first_files)  # the other run's checkpoints are not pruned or overwritten
    if variant is _other_train_images:  # the artifact is exactly what this data gives from scratch
        assert train.main(train_argv(other_channels, tmp_path / "alone", "--epochs", "1", *flags)) == 0
        assert _same(_weights(first), _weights(tmp_path / "alone"))


@pytest.mark.slow
def test_a_checkpoint_of_the_old_unkeyed_format_is_not_resumed(channels, tmp_path, capsys) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    legacy = {"format": 1, "epoch": 2, "fingerprint": {"lr": 0.001}, "model": {}, "history": {}}
    torch.save(legacy, folder / "checkpoint-epoch-0002.pt")  # what the script wrote before data was keyed in
    assert train.main(train_argv(channels, tmp_path, "--epochs", "1")) == 0
    out = capsys.readouterr().out
    assert re.search(r"starting fresh: checkpoint-epoch-0002\.pt .*train-data: \(not recorded\) -> '[0-9a-f]{12}'", out)
    assert (folder / "checkpoint-epoch-0002.pt").exists()


@pytest.mark.slow
def test_a_run_that_finds_every_epoch_done_prints_the_last_metrics_line_again(channels, tmp_path, capsys) -> None:
    assert train.main(train_argv(channels, tmp_path)) == 0
    first = capsys.readouterr().out
    weights = _weights(tmp_path)
    assert train.main(train_argv(channels, tmp_path)) == 0  # a retried job: same settings, same data
    again = capsys.readouterr().out
    assert "resumed from" in again and "all epochs were already done" in again
    assert contract.parse_metrics(again) == contract.parse_metrics(first)[-1:]  # the tuner still gets its objective
    last_line = [line for line in first.splitlines() if line.startswith("epoch=2 ")]
    assert [line for line in again.splitlines() if line.startswith("epoch=")] == last_line
    assert _same(_weights(tmp_path), weights)

    # Fewer epochs than every checkpoint holds: the longer run's files are not this run's result.
    (epoch_1,) = (tmp_path / "checkpoints").glob("checkpoint-*-epoch-0001.pt")
    epoch_1.unlink()
    assert train.main(train_argv(channels, tmp_path, "--epochs", "1")) == 0
    shorter = capsys.readouterr().out
    assert re.search(
        r"starting fresh: checkpoint-\w+-epoch-0002\.pt .*another run's checkpoint \(epochs: 2 -> 1\)", shorter
    )
    assert [row["epoch"] for row in contract.parse_metrics(shorter)] == [1]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert sorted(re.sub("-[0-9a-f]{16}-", "-", n) for n in names) == [
        "checkpoint-epoch-0001.pt",  # this run's (1 epoch)
        "checkpoint-epoch-0002.pt",  # the 2-epoch run's, left in place
    ]
    assert len({re.search("-([0-9a-f]{16})-", n).group(1) for n in names}) == 2


@pytest.mark.slow
def test_more_epochs_after_a_finished_run_train_afresh_and_the_same_settings_resume(channels, tmp_path, capsys) -> None:
    """A run of 2 epochs after one of 1 in the same checkpoint folder (what a cached Tune's best trial gives the
    Train step) trains 2 epochs from the start: 1 epoch carried on under a 2-epoch schedule are another model."""
    assert train.main(train_argv(channels, tmp_path / "runs", "--epochs", "1")) == 0
    capsys.readouterr()
    assert train.main(train_argv(channels, tmp_path / "runs", "--epochs", "2")) == 0
    longer = capsys.readouterr().out
    fresh = [line for line in longer.splitlines() if line.startswith("starting fresh")]
    assert len(fresh) == 1 and "(epochs: 1 -> 2)" in fresh[0] and "left in place" in fresh[0], longer
    assert "resumed from" not in longer
    assert [row["epoch"] for row in contract.parse_metrics(longer)] == [1, 2]
    assert train.main(train_argv(channels, tmp_path / "alone", "--epochs", "2")) == 0
    assert _same(_weights(tmp_path / "runs"), _weights(tmp_path / "alone"))  # exactly a 2-epoch training
    assert len(list((tmp_path / "runs" / "checkpoints").glob("checkpoint-*-epoch-0001.pt"))) == 2  # both kept

    # a job stopped after epoch 1 of 2 (a spot interruption): the same settings resume, saying why
    for path in (tmp_path / "runs" / "checkpoints").glob("checkpoint-*-epoch-0002.pt"):
        path.unlink()
    capsys.readouterr()
    assert train.main(train_argv(channels, tmp_path / "runs", "--epochs", "2")) == 0
    resumed = capsys.readouterr().out
    (line,) = [line for line in resumed.splitlines() if line.startswith("resumed from")]
    assert "epoch-0001.pt: 1 of 2 epochs done; the same training: its fingerprint" in line
    assert "epochs" in line and "lr" in line and "data train-data" in line and "code " in line
    assert [row["epoch"] for row in contract.parse_metrics(resumed)] == [2]
    assert _same(_weights(tmp_path / "runs"), _weights(tmp_path / "alone"))


def test_the_fingerprint_covers_the_code_and_the_starting_weights_file(tmp_path) -> None:
    code = tmp_path / "code"
    shutil.copytree(Path(checkpoints.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
    before = checkpoints.code_digest(code)
    assert before == checkpoints.code_digest(Path(checkpoints.__file__).parent)  # names and bytes, not the folder
    (code / "train.py").write_text((code / "train.py").read_text() + "\n# another schedule\n")
    assert checkpoints.code_digest(code) != before
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one")
    first = checkpoints.file_digest(weights)
    weights.write_bytes(b"two")
    assert checkpoints.file_digest(weights) != first and first.startswith("sha256:")


def _toolkit_env(monkeypatch: pytest.MonkeyPatch, base: Path | None, machine_base: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("SM_", "SAGEMAKER_")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(train_args, "SAGEMAKER_BASE_DIR", str(machine_base))  # no real /opt/ml is consulted
    if base is not None:  # what the training toolkit exports for SAGEMAKER_BASE_DIR=<base>
        monkeypatch.setenv("SM_INPUT_DIR", str(base / "input"))
        monkeypatch.setenv("SM_INPUT_CONFIG_DIR", str(base / "input" / "config"))
        monkeypatch.setenv("SM_OUTPUT_DIR", str(base / "output"))


@pytest.mark.slow
def test_a_plain_command_has_no_default_checkpoint_folder(channels, tmp_path, capsys, monkeypatch) -> None:
    _toolkit_env(monkeypatch, None, tmp_path / "no-opt-ml")
    monkeypatch.chdir(tmp_path)
    assert train.get_args_parser().parse_args([]).checkpoint_dir is None
    argv = [a for a in train_argv(channels, tmp_path / "out", "--epochs", "1") if a]
    at = argv.index("--checkpoint-dir")
    del argv[at : at + 2]
    before = {p for p in tmp_path.rglob("*")}
    assert train.main(argv) == 0
    assert "checkpoints: off (a plain command has no default folder" in capsys.readouterr().out
    written = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in written if p.suffix == ".pt" and p.name != contract.WEIGHTS_FILE]


@pytest.mark.slow
def test_the_toolkit_environment_gives_its_own_checkpoint_folder_which_a_later_run_resumes(
    channels, tmp_path, capsys, monkeypatch
) -> None:
    base = tmp_path / "opt_ml"  # SAGEMAKER_BASE_DIR of a toolkit environment on a developer's machine
    _toolkit_env(monkeypatch, base, tmp_path / "no-opt-ml")
    assert train.get_args_parser().parse_args([]).checkpoint_dir == str(base / "checkpoints")
    argv = [a for a in train_argv(channels, tmp_path / "out")]
    at = argv.index("--checkpoint-dir")
    del argv[at : at + 2]
    assert train.main([*argv, "--epochs", "1"]) == 0
    assert train.main([*argv, "--epochs", "1"]) == 0  # a later run of the same training in the same environment
    out = capsys.readouterr().out
    assert re.search(rf"resumed from {re.escape(str(base / 'checkpoints'))}/checkpoint-\w+-epoch-0001\.pt", out)

    # The job's CheckpointConfig (SageMaker writes checkpointconfig.json) names the folder when there is one.
    (base / "input" / "config").mkdir(parents=True)
    (base / "input" / "config" / "checkpointconfig.json").write_text(json.dumps({"LocalPath": str(tmp_path / "c")}))
    assert train.get_args_parser().parse_args([]).checkpoint_dir == str(tmp_path / "c")


def test_inside_a_real_container_the_default_is_the_containers_checkpoint_folder(tmp_path, monkeypatch) -> None:
    container = tmp_path / "opt_ml"
    (container / "input" / "config").mkdir(parents=True)
    _toolkit_env(monkeypatch, None, container)
    assert train.get_args_parser().parse_args([]).checkpoint_dir is None  # no resourceconfig.json: not a container
    (container / "input" / "config" / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1"}))
    assert train.get_args_parser().parse_args([]).checkpoint_dir == str(container / "checkpoints")


def test_pruning_keeps_the_newest_two_of_this_key_and_nothing_of_other_keys(tmp_path) -> None:
    state = {"format": checkpoints.FORMAT}
    for epoch in (1, 2, 3):
        checkpoints.save(tmp_path, "a" * 16, epoch, state)
    checkpoints.save(tmp_path, "b" * 16, 5, state)
    checkpoints.save(tmp_path, "a" * 16, 1, state)  # a fresh start under key a, with a longer run's files present
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [checkpoints.file_name("a" * 16, e) for e in (1, 2, 3)] + [checkpoints.file_name("b" * 16, 5)]
    checkpoints.save(tmp_path, "a" * 16, 2, state)
    checkpoints.save(tmp_path, "a" * 16, 3, state)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [checkpoints.file_name("a" * 16, e) for e in (2, 3)] + [checkpoints.file_name("b" * 16, 5)]


def test_the_first_failure_reason_wins_and_an_earlier_runs_is_replaced(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SM_OUTPUT_DIR", str(tmp_path))
    failure = tmp_path / train.FAILURE_FILE
    failure.write_text("an earlier run's reason")
    old = time.time() - 3600
    os.utime(failure, (old, old))
    train._write_failure_reason("rank 1 of 2: the root cause")
    train._write_failure_reason("rank 0 of 2: lost the other ranks")  # a consequence, written later
    assert failure.read_text() == "rank 1 of 2: the root cause"
