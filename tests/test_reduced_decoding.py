"""Reduced-size JPEG decoding, judged by what users see: on photo-sized JPEGs of the demo's test split, the served
answers keep >= 99% top-1 agreement with full decoding, and the test accuracy moves by at most 0.5 points.

The model is the demo's network (resnet18 at 32 pixels, random backbone weights) with its head fitted to the demo's
train split in closed form (ridge regression on the backbone's features): a digits classifier of ~97% test accuracy
in seconds, where training it would take minutes on two cores. A network that was not trained end to end reacts
more to small pixel changes than a trained one, so this is the harder case for reduced-size decoding.
``bench/inference_bench.py`` measures the same on a model trained by ``entrypoints/train.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from entrypoints import contract, inference, modeling
from pipelines import config, demo_data

pytestmark = pytest.mark.slow
PHOTO_SIZE = (1024, 768)  # a photo's shape; large enough that the handler decodes it at 1/8 size
RIDGE = 10.0


def _split(folder: Path, class_names: list[str], preprocess: inference.Preprocessor) -> tuple[np.ndarray, np.ndarray]:
    samples = sorted((path, class_names.index(path.parent.name)) for path in folder.glob("*/*.jpg"))
    return np.stack([preprocess(path.read_bytes()) for path, _ in samples]), np.array([label for _, label in samples])


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the artifact, the demo's test split)."""
    root = tmp_path_factory.mktemp("demo")
    splits = demo_data.write_digit_splits(root / "digits")
    class_names = json.loads((splits["train"] / contract.LABELS_FILE).read_text())
    size = config.DEMO_IMAGE_SIZE
    model_config = modeling.ModelConfig("resnet18", len(class_names), class_names, input_size=size, resize_size=36)
    torch.manual_seed(0)
    model = modeling.build_model(model_config).eval()
    images, labels = _split(splits["train"], class_names, inference.Preprocessor(model_config, draft_factor=0))
    head = modeling.head_module(model, "resnet18")[-1]
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        features = model(torch.from_numpy(images)).double()
    mean, std = features.mean(0), features.std(0) + 1e-6
    standardised = (features - mean) / std
    targets = torch.nn.functional.one_hot(torch.from_numpy(labels), len(class_names)).double() * 10 - 5
    gram = standardised.T @ standardised + RIDGE * torch.eye(features.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(gram, standardised.T @ targets)  # (512, classes) on standardised features
    with torch.no_grad():
        head.weight.copy_((weights / std[:, None]).T.float())
        head.bias.copy_((-(mean / std) @ weights).float())
    model.fc = torch.nn.Sequential(head)
    return modeling.save_artifact(model, root / "model", model_config), splits["test"]


def test_reduced_size_decoding_keeps_the_demo_models_answers_on_photo_sized_test_images(
    demo_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact, test_dir = demo_model
    monkeypatch.setenv(contract.ENV_INFERENCE_RUNTIME, "eager")
    serving = inference.load_serving_model(artifact, precision="fp32")
    class_names = serving.class_names
    full = inference.Preprocessor(serving.config, draft_factor=0)
    reduced = inference.Preprocessor(serving.config, draft_factor=inference.DEFAULT_JPEG_DRAFT_FACTOR)
    samples = sorted((path, class_names.index(path.parent.name)) for path in test_dir.glob("*/*.jpg"))
    labels = np.array([label for _, label in samples])
    photos = [demo_data.photo_jpeg(path.read_bytes(), PHOTO_SIZE, seed) for seed, (path, _) in enumerate(samples)]
    assert reduced.open(photos[0]).size == (PHOTO_SIZE[0] // 8, PHOTO_SIZE[1] // 8)  # decoded at 1/8 size indeed
    assert full.open(photos[0]).size == PHOTO_SIZE
    top1 = {
        name: serving.logits(np.stack([preprocess(photo) for photo in photos])).argmax(axis=1)
        for name, preprocess in (("full", full), ("reduced", reduced))
    }
    agreement = float(np.mean(top1["full"] == top1["reduced"]))
    accuracy = {name: float(np.mean(answers == labels)) for name, answers in top1.items()}
    assert len(samples) > 150 and accuracy["full"] > 0.9  # the digits are learned: agreement means something
    assert agreement >= 0.99, (agreement, accuracy)
    assert abs(accuracy["reduced"] - accuracy["full"]) <= 0.005, accuracy
