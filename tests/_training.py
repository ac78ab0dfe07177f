"""Tiny channels and flags for training-script tests: noisy solid red vs blue images a resnet18 learns in seconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from entrypoints import contract

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "entrypoints" / "train.py"
CLASSES = ("red", "blue")
COLOURS = {"red": (200, 40, 40), "blue": (40, 40, 200)}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Two cores shared by several jobs: one intra-op thread keeps tiny runs fast and repeatable (import it into
    a test module to apply it there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_split(root: Path, per_class: int, seed: int, size: tuple[int, int] = (40, 32), blend: float = 0.0) -> Path:
    """``per_class`` JPEGs per class plus labels.json and manifest.json, as the processing step lays them out.

    ``blend`` > 0 moves each image's colour a random part of the way (up to ``blend``) to the other class's, so
    some images look like the other class: a validation set whose accuracy is neither 0 nor 1.
    """
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        other = COLOURS[CLASSES[1 - CLASSES.index(name)]]
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            share = rng.uniform(0, blend)
            colour = (1 - share) * np.array(COLOURS[name]) + share * np.array(other)
            pixels = colour + rng.normal(0, 30, (size[1], size[0], 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.jpg", quality=90)
    (root / contract.LABELS_FILE).write_text(json.dumps(list(CLASSES)))
    (root / contract.MANIFEST_FILE).write_text(json.dumps({"counts": {n: per_class for n in CLASSES}}))
    return root


def train_argv(channels: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    """Flags for a seconds-long CPU run writing under ``out``; ``extra`` flags replace the defaults they name."""
    defaults = {
        "--train-dir": str(channels[0]),
        "--valid-dir": str(channels[1]),
        "--model-dir": str(out / "model"),
        "--output-data-dir": str(out / "output"),
        "--checkpoint-dir": str(out / "checkpoints"),
        "--tensorboard-dir": "none",
        "--architecture": "resnet18",
        "--weights": "none",
        "--input-size": "32",
        "--batch-size": "4",
        "--workers": "0",
        "--epochs": "2",
        "--trainable-blocks": "all",
        "--hidden-units": "0",
        "--dropout": "0",
    }
    given = set(extra[::2])
    argv = [item for flag, value in defaults.items() if flag not in given for item in (flag, value)]
    return argv + list(extra)


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without SageMaker's or torchrun's variables; one thread; unbuffered output."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SM_", "SAGEMAKER_", "SMDEBUG_", "TORCHELASTIC_")) and k not in launcher
    }
    env.pop("PYTHONPATH", None)  # the script must find its siblings by itself
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def toolkit_layout(base: Path, channels: tuple[Path, Path], hyperparameters: dict[str, Any]) -> Path:
    """A SageMaker training container's ``/opt/ml`` under ``base``, as the ``sagemaker-training`` toolkit reads it.

    The channels are copied to ``input/data/{train,valid}``; hyperparameters are JSON-encoded as the SDK writes
    them, with the toolkit's own (program, submit directory, job name) added.
    """
    config = base / "input" / "config"
    config.mkdir(parents=True)
    for name, source in zip(("train", "valid"), channels, strict=True):
        shutil.copytree(source, base / "input" / "data" / name)
    hyperparameters = {
        **hyperparameters,
        "sagemaker_program": "train.py",
        "sagemaker_submit_directory": str(REPO / "entrypoints"),
        "sagemaker_container_log_level": 20,
        "sagemaker_job_name": "imgclf-train-test",
        "sagemaker_region": "us-east-1",
    }
    (config / "hyperparameters.json").write_text(json.dumps({k: json.dumps(v) for k, v in hyperparameters.items()}))
    (config / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-1", "hosts": ["algo-1"], "current_instance_type": "ml.m5.large"})
    )
    channel_config = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
    (config / "inputdataconfig.json").write_text(json.dumps({"train": channel_config, "valid": channel_config}))
    return base


def run_toolkit(base: Path, cwd: Path, **env: str) -> tuple[int, str]:
    """The training toolkit's own ``train`` command (the container's entry point) on the layout at ``base``;
    returns its exit status and its whole log."""
    done = subprocess.run(
        [sys.executable, "-c", "from sagemaker_training.cli.train import main; main()"],
        cwd=cwd,
        # SM_STUDIO_LOCAL_MODE skips the wait for the cluster's DNS names (algo-1 does not resolve here).
        env=subprocess_env(SAGEMAKER_BASE_DIR=str(base), SM_STUDIO_LOCAL_MODE="true", **env),
        capture_output=True,
        text=True,
        timeout=400,
    )
    return done.returncode, done.stdout + done.stderr
