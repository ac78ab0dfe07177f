"""What the evaluation tests share: a model whose head is solved so that red, green and blue images get known
logits, and a test split of such images with known answers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from entrypoints import contract, inference, modeling

CLASSES = ["cat", "dog", "fox", "owl", "elk", "yak", "emu"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
# The logits the hand-set head gives for an image of each colour (one entry per class in CLASSES).
LOGITS = {
    "red": [10, 5, 4, 3, 2, 1, 0],  # cat
    "green": [0, 10, 5, 4, 3, 2, 1],  # dog, with cat last: a cat in green is outside the top 5
    "blue": [1, 5, 10, 4, 3, 2, 0],  # fox, dog second
}
# The test split: folder -> colours of its images. Expected: 5 of 7 right, 6 of 7 in the top 5.
SPLIT = {"cat": ["red", "red", "green"], "dog": ["green", "blue"], "fox": ["blue", "blue"]}
# Greys for the int8 tests: light and white lie on the same side of the normalisation mean in every channel, so
# only the size of the input tells them apart (a calibration that leaves the input no range makes them one).
GREYS = {"light": (170, 170, 170), "white": (250, 250, 250), "dark": (40, 40, 40)}
LOGITS.update({"light": LOGITS["red"], "white": LOGITS["green"], "dark": LOGITS["blue"]})


def model_config() -> modeling.ModelConfig:
    return modeling.ModelConfig("resnet18", len(CLASSES), CLASSES, input_size=32, resize_size=36)


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 36), {**COLOURS, **GREYS}[colour]).save(buffer, "PNG")
    return buffer.getvalue()


def known_model(palette: tuple[str, ...] = tuple(COLOURS)) -> torch.nn.Module:
    """A random backbone whose head is solved so the image of each colour of ``palette`` gets LOGITS[colour]."""
    torch.manual_seed(0)
    model = modeling.build_model(model_config()).eval()
    head = modeling.head_module(model, "resnet18")[-1]
    preprocess = inference.Preprocessor(model_config(), draft_factor=0)
    images = torch.from_numpy(np.stack([preprocess(png(c)) for c in palette]))
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        features = model(images).double()  # (3, 512)
    model.fc = torch.nn.Sequential(head)
    targets = torch.tensor([LOGITS[c] for c in palette], dtype=torch.float64)  # (3, 7)
    with torch.no_grad():
        head.weight.copy_((torch.linalg.pinv(features) @ targets).T.float())
        head.bias.zero_()
        achieved = model(images)
    np.testing.assert_allclose(achieved.numpy(), targets.numpy(), atol=0.05)  # the head reproduces LOGITS
    return model


def write_split(folder: Path, split: dict[str, list[str]] = SPLIT) -> Path:
    """``folder/<class>/<colour>_<i>.png`` for each colour listed under a class, and labels.json."""
    for name, colours in split.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, colour in enumerate(colours):
            (folder / name / f"{colour}_{i}.png").write_bytes(png(colour))
    (folder / contract.LABELS_FILE).write_text(json.dumps(CLASSES))
    return folder
