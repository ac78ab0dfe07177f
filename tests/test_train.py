"""The training entry point and its input pipeline: tiny CPU runs, seconds each.

Every run uses resnet18 with random weights on 32-pixel crops of a two-class set of noisy solid colours
(red vs blue), which a network learns in a couple of epochs.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from _notebook import eval_transform
from _training import (  # noqa: F401 - one_torch_thread applies to every test here
    CLASSES,
    TRAIN_SCRIPT,
    one_torch_thread,
    run_toolkit,
    subprocess_env,
    toolkit_layout,
    train_argv,
    write_split,
)
from PIL import Image

from entrypoints import checkpoints, contract, data, modeling, train


@pytest.fixture(scope="module")
def channels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("channels")
    return write_split(root / "train", 8, seed=1), write_split(root / "valid", 4, seed=2)


def _metric_rows(text: str) -> list[dict[str, float]]:
    return contract.parse_metrics(text)


# --- training runs ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_falls_and_only_the_epoch_lines_match_the_tuner_regexes(channels, tmp_path, capsys) -> None:
    tensorboard = ("--tensorboard-dir", str(tmp_path / "tb"))
    code = train.main(train_argv(channels, tmp_path, "--epochs", "4", "--scheduler", "none", *tensorboard))
    out = capsys.readouterr().out
    assert code == 0, out
    rows = _metric_rows(out)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] * 0.8
    assert rows[-1]["valid_accuracy"] >= 0.875

    # Each regex of the tuner matches on the epoch lines only: progress and summary lines must not feed it.
    lines = out.splitlines()
    for definition in contract.METRIC_DEFINITIONS:
        pattern = re.compile(definition["Regex"])
        matching = [line for line in lines if pattern.search(line)]
        assert len(matching) == 4, (definition["Name"], matching)
        assert all(line == line.strip() and line.startswith("epoch=") for line in matching)
    for line in (line for line in lines if line.startswith("epoch=")):
        row = _metric_rows(line)[0]
        expected = contract.format_metrics_line(
            int(row["epoch"]), row["train_loss"], row["valid_loss"], row["valid_accuracy"]
        )
        assert line == expected

    history = json.loads((tmp_path / "output" / train.HISTORY_FILE).read_text())
    assert history["epoch"] == [1, 2, 3, 4]
    assert history["train_loss"] == pytest.approx([row["train_loss"] for row in rows], abs=1e-6)
    with Image.open(tmp_path / "output" / train.CURVES_IMAGE) as picture:
        assert picture.size[0] > 300 and picture.size[1] > 200

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    accuracy = events.Scalars("accuracy/valid")
    assert [e.step for e in accuracy] == [1, 2, 3, 4]
    assert [e.value for e in accuracy] == pytest.approx([row["valid_accuracy"] for row in rows])
    assert {"loss/train", "loss/valid", "lr"} <= set(events.Tags()["scalars"])


def _settings(argv: list[str]) -> train.Settings:
    parser = train.get_args_parser()
    return train.resolve_settings(parser.parse_args(argv), parser)


@pytest.mark.slow
def test_artifact_loads_back_and_predicts_what_the_trained_model_predicted(channels, tmp_path) -> None:
    result = train.run_training(
        _settings(train_argv(channels, tmp_path, "--hidden-units", "16", "--dropout", "0.3", "--trainable-blocks", "2"))
    )
    loaded, config = modeling.load_model(tmp_path / "model")
    assert config.class_names == list(CLASSES) == json.loads((channels[0] / contract.LABELS_FILE).read_text())
    assert (config.architecture, config.hidden_units, config.input_size) == ("resnet18", 16, 32)

    preprocess = eval_transform(config)
    images = sorted((channels[1]).rglob("*.jpg"))
    batch = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in images])
    with torch.no_grad():
        before = result.model.eval()(batch)
        after = loaded(batch)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)

    model_dir = tmp_path / "model"
    for name in contract.SERVING_CODE_FILES:
        assert (model_dir / contract.CODE_DIR / name).is_file(), name
    assert (model_dir / contract.CODE_DIR / "requirements.txt").is_file()
    saved = json.loads((model_dir / contract.HYPERPARAMETERS_FILE).read_text())
    from pipelines import config

    # what the tuner searches, the pipeline parameters and the demo's overrides are all recorded, as flags
    needed = {"architecture", "epochs", *config.HYPERPARAMETER_RANGES, *config.DEMO_HYPERPARAMETER_RANGES}
    assert needed | set(config.DEMO_HYPERPARAMETERS) <= set(saved)
    flags = vars(train.get_args_parser().parse_args([]))
    worked_out = {"processes", "global-batch-size", "effective-lr"}  # what the run derived, beside its flags
    assert all(key.replace("-", "_") in flags for key in set(saved) - worked_out), sorted(saved)
    assert (saved["hidden-units"], saved["trainable-blocks"], saved["epochs"]) == (16, "2", 2)
    torch.load(model_dir / contract.WEIGHTS_FILE, weights_only=True)  # no pickled code needed


@pytest.mark.slow
def test_restarted_run_resumes_from_the_newest_checkpoint_and_matches_an_uninterrupted_run(
    channels, tmp_path, capsys, monkeypatch
) -> None:
    flags = ("--scheduler", "none", "--dropout", "0.3", "--hidden-units", "8")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train.main(train_argv(channels, straight, "--epochs", "3", "--workers", "2", *flags)) == 0
    straight_out = capsys.readouterr().out

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "KEPT", 3)  # so that epoch 1's checkpoint is there to resume from
        assert train.main(train_argv(channels, stopped, "--epochs", "3", *flags)) == 0
    for later in (stopped / "checkpoints").glob("checkpoint-*-epoch-000[23].pt"):
        later.unlink()  # the job was stopped during epoch 2: only epoch 1's checkpoint reached the folder
    capsys.readouterr()
    assert train.main(train_argv(channels, stopped, "--epochs", "3", *flags)) == 0  # restarted, the same settings
    resumed_out = capsys.readouterr().out

    assert re.search(r"resumed from \S+/checkpoint-[0-9a-f]{16}-epoch-0001\.pt: 1 of 3 epochs done", resumed_out)
    assert [row["epoch"] for row in _metric_rows(resumed_out)] == [2, 3]  # epoch 1 is not trained again
    assert _metric_rows(resumed_out) == _metric_rows(straight_out)[1:]
    history = json.loads((stopped / "output" / train.HISTORY_FILE).read_text())
    assert history["epoch"] == [1, 2, 3]
    a = torch.load(straight / "model" / contract.WEIGHTS_FILE, weights_only=True)
    b = torch.load(stopped / "model" / contract.WEIGHTS_FILE, weights_only=True)
    for key in a:  # same crops, order, dropout masks and optimiser state: the same network (workers 2 vs 0)
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)

    names = sorted(p.name for p in (stopped / "checkpoints").iterdir())
    assert [re.sub("-[0-9a-f]{16}-", "-KEY-", name) for name in names] == [
        "checkpoint-KEY-epoch-0002.pt",
        "checkpoint-KEY-epoch-0003.pt",
    ]  # newest two, no temporary files
    state = torch.load(stopped / "checkpoints" / names[-1], weights_only=True)
    assert state["epoch"] == 3 and state["history"]["epoch"] == [1, 2, 3]


@pytest.mark.slow
def test_spot_restart_mid_cosine_schedule_ends_where_the_uninterrupted_run_ends(channels, tmp_path, capsys) -> None:
    argv = train_argv(channels, tmp_path, "--epochs", "3", "--scheduler", "cosine")
    assert train.main(argv) == 0
    first = _metric_rows(capsys.readouterr().out)
    final = torch.load(tmp_path / "model" / contract.WEIGHTS_FILE, weights_only=True)
    # The instance was reclaimed while epoch 3 ran: its checkpoint never reached the folder.
    (newest,) = (tmp_path / "checkpoints").glob("checkpoint-*-epoch-0003.pt")
    newest.unlink()
    assert train.main(argv) == 0
    again = _metric_rows(capsys.readouterr().out)
    assert again == first[2:]
    restarted = torch.load(tmp_path / "model" / contract.WEIGHTS_FILE, weights_only=True)
    for key in final:
        torch.testing.assert_close(restarted[key], final[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_frozen_blocks_stay_frozen_parameters_and_batch_norm_buffers(channels, tmp_path) -> None:
    torch.manual_seed(3)
    initial = torchvision.models.resnet18(weights=None)
    # Non-trivial running statistics, so that a batch-norm update in train mode would show.
    for module in initial.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    weights_channel = tmp_path / "weights"  # the 'weights' channel of a job without internet
    weights_channel.mkdir()
    torch.save(initial.state_dict(), weights_channel / "resnet18-test.pth")
    before = initial.state_dict()

    argv = ["--weights", "imagenet", "--weights-dir", str(weights_channel), "--trainable-blocks", "1", "--lr", "0.01"]
    code = train.main(train_argv(channels, tmp_path, *argv))
    assert code == 0
    after = torch.load(tmp_path / "model" / contract.WEIGHTS_FILE, weights_only=True)
    trainable_prefixes = ("layer4.", "fc.")
    frozen_keys = [k for k in before if not k.startswith(trainable_prefixes)]
    assert any("running_mean" in k for k in frozen_keys) and any("num_batches_tracked" in k for k in frozen_keys)
    for key in frozen_keys:
        assert torch.equal(after[key], before[key]), f"{key} changed although its block is frozen"
    changed = [k for k in before if k.startswith("layer4.") and not torch.equal(after[k], before[k])]
    assert "layer4.1.conv2.weight" in changed and "layer4.1.bn2.running_mean" in changed


@pytest.mark.slow
def test_weights_of_another_network_are_refused_naming_the_flag(channels, tmp_path, capsys) -> None:
    other = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), other)
    assert train.main(train_argv(channels, tmp_path, "--weights", str(other))) == 1
    err = capsys.readouterr().err
    assert "argument --weights: cannot load" in err and "resnet18" in err and len(err) < 600


def test_non_finite_loss_fails_fast_naming_epoch_and_step_and_writes_no_artifact(channels, tmp_path, capsys) -> None:
    code = train.main(train_argv(channels, tmp_path, "--lr", "1e30", "--epochs", "3"))
    captured = capsys.readouterr()
    assert code == 1
    assert re.search(r"loss is (nan|inf|-inf) at epoch 1 step \d+", captured.err), captured.err
    assert "--lr" in captured.err
    assert not (tmp_path / "model" / contract.WEIGHTS_FILE).exists()
    assert not _metric_rows(captured.out)


# --- flags --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--lr", "fast", "expected a number"),
        ("--lr", "-0.1", "must be >"),
        ("--lr", "nan", "finite"),
        ("--batch-size", "0", "must be >"),
        ("--batch-size", "12.5", "whole number"),
        ("--epochs", "", "expected a number"),
        ("--optimizer", "adam", "adamw, sgd"),
        ("--scheduler", "linear", "cosine, step, none"),
        ("--architecture", "vgg99", "resnet50"),
        ("--trainable-blocks", "some", "expected a number"),
        ("--trainable-blocks", "9", "5 backbone blocks"),
        ("--dropout", "1", "must be < 1"),
        ("--label-smoothing", "-0.1", "must be >="),
        ("--hidden-units", "-5", "must be >="),
        ("--workers", "many", "expected a number"),
        ("--amp", "maybe", "true or false"),
        ("--weights", "/nowhere/resnet18.pth", "'none', 'imagenet'"),
        ("--resize-size", "16", "smaller than --input-size"),
        ("--num-gpus", "4", "CUDA device"),
    ],
)
def test_bad_flag_fails_at_start_naming_the_flag(channels, tmp_path, capsys, flag, value, says) -> None:
    code = train.main(train_argv(channels, tmp_path, flag, value))
    err = capsys.readouterr().err
    assert code == 2
    assert f"argument {flag}" in err and says in err, err
    assert not (tmp_path / "model").exists()


def test_missing_channel_names_the_flag_and_the_environment_variable(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("SM_CHANNEL_TRAIN", raising=False)
    assert train.main(["--valid-dir", str(tmp_path), "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert "--train-dir" in err and "SM_CHANNEL_TRAIN" in err


def test_tuner_strings_for_every_range_parse_to_typed_values() -> None:
    from pipelines.config import HYPERPARAMETER_RANGES

    parser = train.get_args_parser()
    for name, spec in HYPERPARAMETER_RANGES.items():
        values = list(spec.values) if spec.kind == "categorical" else [str(spec.min_value), str(spec.max_value)]
        for value in values:
            args = parser.parse_args([f"--{name}", value])
            parsed = getattr(args, name.replace("-", "_"))
            assert str(parsed) == value or float(parsed) == float(value), (name, value, parsed)
    defaults = parser.parse_args([])
    assert defaults.batch_size == 64 and isinstance(defaults.batch_size, int)
    assert defaults.trainable_blocks == "1" and defaults.lr == pytest.approx(1e-3)
    switches = parser.parse_args(["--amp", "False", "--channels-last", "--batch-size", "128.0"])
    assert switches.amp is False and switches.channels_last is True and switches.batch_size == 128
    assert parser.parse_args(["--no-amp"]).amp is False


def test_other_classes_in_the_valid_channel_are_refused(channels, tmp_path, capsys) -> None:
    valid = write_split(tmp_path / "valid", 2, seed=5)
    (valid / contract.LABELS_FILE).write_text(json.dumps(["blue", "red"]))
    code = train.main(train_argv(channels, tmp_path, "--valid-dir", str(valid)))
    err = capsys.readouterr().err
    assert code == 1 and "different labels.json" in err and "same names in another order" in err


@pytest.mark.slow
def test_debugger_config_without_smdebug_trains_and_says_so_once(channels, tmp_path, capsys, monkeypatch) -> None:
    config = tmp_path / "debughookconfig.json"
    config.write_text(json.dumps({"LocalPath": str(tmp_path / "tensors")}))
    monkeypatch.setenv(train.DEBUGGER_CONFIG_ENV, str(config))
    monkeypatch.setitem(sys.modules, "smdebug", None)  # importing it now raises ImportError
    monkeypatch.setitem(sys.modules, "smdebug.pytorch", None)
    assert train.main(train_argv(channels, tmp_path, "--epochs", "1")) == 0
    out = capsys.readouterr().out
    assert out.count("smdebug is not installed") == 1
    assert (tmp_path / "model" / contract.WEIGHTS_FILE).is_file()


# --- launched the way SageMaker launches it --------------------------------------------------------------------


@pytest.mark.slow
def test_runs_as_a_script_from_any_folder_with_sagemaker_environment(channels, tmp_path) -> None:
    env = subprocess_env(
        SM_CHANNEL_TRAIN=str(channels[0]),
        SM_CHANNEL_VALID=str(channels[1]),
        SM_MODEL_DIR=str(tmp_path / "model"),
        SM_OUTPUT_DATA_DIR=str(tmp_path / "output"),
        SM_NUM_GPUS="0",
    )
    hyperparameters = ["--architecture", "resnet18", "--weights", "none", "--epochs", "1", "--batch-size", "4"]
    hyperparameters += ["--input-size", "32", "--trainable-blocks", "all", "--lr", "0.0012", "--workers", "0"]
    hyperparameters += ["--checkpoint-dir", str(tmp_path / "ckpt"), "--tensorboard-dir", "none"]
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *hyperparameters],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["epoch"] for row in _metric_rows(done.stdout)] == [1]
    assert (tmp_path / "model" / contract.MODEL_CONFIG_FILE).is_file()
    assert (tmp_path / "output" / train.CURVES_IMAGE).is_file()


@pytest.mark.slow
def test_sagemaker_training_toolkit_runs_the_entry_point_unchanged(channels, tmp_path) -> None:
    """The toolkit's own ``train`` command (the container's entry point) on an /opt/ml layout in tmp.

    It reads hyperparameters.json (values JSON-encoded, as the SDK writes them), inputdataconfig.json and
    resourceconfig.json, copies the source dir to code/, installs its requirements.txt, exports SM_* variables
    (SM_HPS, SM_CHANNELS, SM_CHANNEL_TRAIN, ...) and runs ``python train.py --key value ...``.
    """
    pytest.importorskip("sagemaker_training", reason="sagemaker-training is a dev requirement (setup.py)")
    hyperparameters = {
        "architecture": "resnet18",
        "weights": "none",
        "epochs": 2,
        "batch-size": "4",  # the tuner's categorical values arrive as strings
        "lr": 0.002,
        "trainable-blocks": "all",
        "hidden-units": "0",
        "input-size": 32,
        "workers": 0,
        "checkpoint-dir": str(tmp_path / "opt_ml" / "checkpoints"),
        "tensorboard-dir": "none",
        "_tuning_objective_metric": "valid_accuracy",
    }
    base = toolkit_layout(tmp_path / "opt_ml", channels, hyperparameters)
    code, log = run_toolkit(base, tmp_path)
    assert code == 0, log[-4000:]
    assert "train.py --architecture resnet18" in log  # the toolkit's own command line
    assert "SM_CHANNEL_TRAIN=" in log and "SM_HPS=" in log
    assert [row["epoch"] for row in _metric_rows(log)] == [1, 2]
    assert (base / "output" / "success").is_file()
    assert modeling.read_model_config(base / "model").class_names == list(CLASSES)
    assert (base / "output" / "data" / train.HISTORY_FILE).is_file()  # SM_OUTPUT_DATA_DIR was honoured


# --- the input pipeline -----------------------------------------------------------------------------------------


def test_jpeg_size_reads_baseline_and_progressive_headers(tmp_path) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    for progressive in (False, True):
        path = tmp_path / f"p{progressive}.jpg"
        image.save(path, quality=85, progressive=progressive)
        assert data.jpeg_size(path.read_bytes()) == (53, 37)
    image.save(tmp_path / "x.png")
    assert data.jpeg_size((tmp_path / "x.png").read_bytes()) is None


def test_crops_follow_random_resized_crop_rules_and_are_reproducible() -> None:
    for seed in range(200):
        rng = random.Random(seed)
        left, top, w, h = data.random_resized_crop_box(341, 256, rng)
        assert left >= 0 and top >= 0 and left + w <= 341 and top + h <= 256
        assert w * h >= 0.08 * 341 * 256 * 0.9 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
        assert data.random_resized_crop_box(341, 256, random.Random(seed)) == (left, top, w, h)


def test_pipeline_matches_the_eval_transform_and_decodes_large_jpegs_reduced(tmp_path) -> None:
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    path = tmp_path / "big.jpg"
    coarse.resize((1600, 1200), Image.BICUBIC).save(path, quality=92)
    config = modeling.ModelConfig("resnet18", 1, ["x"], input_size=64, resize_size=73)
    reference = eval_transform(config)(Image.open(path).convert("RGB"))
    crop = data.load_eval_crop(str(path), 64, 73)  # short side 1200 -> 73: decoded at 1/8 in the DCT domain
    assert crop.dtype == torch.uint8 and crop.shape == (3, 64, 64)
    normalize = data.BatchNormalizer(config.mean, config.std)
    difference = (normalize(crop.unsqueeze(0))[0] - reference).abs().mean().item()
    assert difference < 0.05, difference  # a few grey levels out of 255, after normalisation

    dataset = data.ImageDataset([(str(path), 0)], 64, 73, train=True, seed=7)
    first, label = dataset[(0, 1)]
    assert label == 0 and torch.equal(first, dataset[(0, 1)][0])  # same (seed, epoch, index): same crop
    assert not torch.equal(first, dataset[(0, 2)][0])  # next epoch: another crop


def test_batch_normalizer_equals_to_tensor_plus_normalize_and_can_lay_out_nhwc() -> None:
    images = torch.randint(0, 256, (3, 3, 9, 7), dtype=torch.uint8)
    from torchvision import transforms as T

    expected = torch.stack(
        [T.Normalize(contract.IMAGENET_MEAN, contract.IMAGENET_STD)(image.float() / 255) for image in images]
    )
    for channels_last in (False, True):
        out = data.BatchNormalizer(contract.IMAGENET_MEAN, contract.IMAGENET_STD, channels_last=channels_last)(images)
        torch.testing.assert_close(out, expected)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_channel_scan_reports_every_skipped_file_and_refuses_unknown_class_folders(channels, tmp_path) -> None:
    root = write_split(tmp_path / "train", 2, seed=3)
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "red" / ".DS_Store").write_bytes(b"\0")
    (root / "stray.jpg").write_bytes((root / "red" / "000.jpg").read_bytes())
    index = data.scan_channel(root, list(CLASSES))
    assert len(index.samples) == 4 and index.counts() == {"red": 2, "blue": 2}
    reasons = {Path(item["path"]).name: item["reason"] for item in index.skipped}
    assert reasons == {
        "notes.txt": "not an image extension (.txt)",
        ".DS_Store": "hidden file",
        "stray.jpg": "file outside a class folder",
    }
    (root / "green").mkdir()
    with pytest.raises(data.DataError, match="green"):
        data.scan_channel(root, list(CLASSES))
    (root / contract.LABELS_FILE).unlink()
    with pytest.raises(data.DataError, match=r"labels\.json is missing"):
        data.read_class_names(root)


def test_sampler_order_depends_on_seed_and_epoch_only() -> None:
    sampler = data.EpochSampler(20, shuffle=True, seed=1)
    sampler.set_epoch(3)
    order = list(sampler)
    assert sorted(i for i, _ in order) == list(range(20)) and {e for _, e in order} == {3}
    again = data.EpochSampler(20, shuffle=True, seed=1)
    again.set_epoch(3)
    assert list(again) == order
    again.set_epoch(4)
    assert list(again) != order
