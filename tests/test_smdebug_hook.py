"""SageMaker Debugger: the training script's hook, exercised with the real smdebug package.

smdebug 1.0.34 (its last release) pins protobuf<=3.20.3 and calls ``ndarray.tostring()``, which numpy 2
removed, so it cannot share the project's environment. ``.ci/run`` makes ``.venv-smdebug`` (system site
packages, so the same torch, plus numpy<2, protobuf 3.20.3, smdebug) and runs this file there::

    SMDEBUG_REQUIRED=1 .venv-smdebug/bin/python -m pytest -m smdebug tests/test_smdebug_hook.py

In the main environment smdebug is not importable and the module is reported as skipped with that reason;
with ``SMDEBUG_REQUIRED=1`` a missing smdebug is an error instead, so CI cannot pass without running it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.smdebug

if os.environ.get("SMDEBUG_REQUIRED") == "1":
    import smdebug  # noqa: F401 - fail loudly: this environment exists to run these tests
else:
    pytest.importorskip("smdebug", reason="smdebug lives in .venv-smdebug; .ci/run runs this file there")

from smdebug import modes  # noqa: E402
from smdebug.trials import create_trial  # noqa: E402

from entrypoints import contract  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _write_split(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    colours = {"red": (200, 40, 40), "blue": (40, 40, 200)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (32, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    (root / "labels.json").write_text(json.dumps(list(colours)))
    return root


def _hook_config(local_path: Path) -> dict:
    """The DebugHookConfig the SageMaker SDK sends with the training job (SageMaker writes it into the container)."""
    from sagemaker.debugger import CollectionConfig, DebuggerHookConfig

    config = DebuggerHookConfig(
        s3_output_path="s3://example-bucket/debug-output",
        container_local_output_path=str(local_path),
        hook_parameters={"save_interval": "1"},
        # What the built-in rules read: losses (LossNotDecreasing, Overfit), gradients (VanishingGradient),
        # weights and biases (PoorWeightInitialization).
        collection_configs=[CollectionConfig(name) for name in ("losses", "weights", "biases", "gradients")],
    )
    return config._to_request_dict()


def test_hook_records_losses_by_mode_weights_of_frozen_layers_and_gradients_of_trainable_ones(tmp_path) -> None:
    train_dir = _write_split(tmp_path / "train", 4, seed=1)
    valid_dir = _write_split(tmp_path / "valid", 2, seed=2)
    tensors = tmp_path / "tensors"
    config_file = tmp_path / "debughookconfig.json"
    config_file.write_text(json.dumps(_hook_config(tensors)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "SMDEBUG_"))}
    env.update(SMDEBUG_CONFIG_FILE_PATH=str(config_file), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argv = [
        sys.executable,
        str(REPO / "entrypoints" / "train.py"),
        *("--train-dir", str(train_dir), "--valid-dir", str(valid_dir)),
        *("--model-dir", str(tmp_path / "model"), "--output-data-dir", str(tmp_path / "output")),
        *("--checkpoint-dir", str(tmp_path / "checkpoints"), "--tensorboard-dir", "none"),
        *("--architecture", "resnet18", "--weights", "none", "--input-size", "32", "--batch-size", "4"),
        *("--epochs", "2", "--trainable-blocks", "1", "--hidden-units", "8", "--workers", "0"),
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert f"Debugger: hook created from {config_file}" in done.stdout

    trial = create_trial(str(tensors))
    # 8 training images / batch 4 = 2 steps per epoch; 4 valid images / batch 4 = 1 step per epoch.
    assert trial.steps(mode=modes.TRAIN) == [0, 1, 2, 3]
    assert trial.steps(mode=modes.EVAL) == [0, 1]

    (loss_name,) = trial.tensor_names(collection="losses")
    loss = trial.tensor(loss_name)
    train_losses = [float(loss.value(step, mode=modes.TRAIN)) for step in range(4)]
    valid_losses = [float(loss.value(step, mode=modes.EVAL)) for step in range(2)]
    logged = contract.parse_metrics(done.stdout)  # the epoch means the script printed
    assert [row["train_loss"] for row in logged] == pytest.approx(
        [np.mean(train_losses[:2]), np.mean(train_losses[2:])], abs=1e-5
    )
    assert [row["valid_loss"] for row in logged] == pytest.approx(valid_losses, abs=1e-5)

    weights = set(trial.tensor_names(collection="weights"))
    frozen, trainable = "ResNet_layer1.0.conv1.weight", "ResNet_layer4.1.conv2.weight"
    assert {frozen, trainable} <= weights
    first, last = (trial.tensor(frozen).value(s, mode=modes.TRAIN) for s in (0, 3))
    assert np.array_equal(first, last)  # frozen, and recorded all the same
    first, last = (trial.tensor(trainable).value(s, mode=modes.TRAIN) for s in (0, 3))
    assert not np.array_equal(first, last)

    gradients = trial.tensor_names(collection="gradients")
    assert "gradient/ResNet_layer4.1.conv2.weight" in gradients
    assert all(name.startswith(("gradient/ResNet_layer4.", "gradient/ResNet_fc.")) for name in gradients), gradients
    assert np.abs(trial.tensor("gradient/ResNet_fc.3.weight").value(0, mode=modes.TRAIN)).sum() > 0
