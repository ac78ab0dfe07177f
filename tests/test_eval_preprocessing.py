"""Evaluation-time preprocessing is one implementation: for the same decoded image, training's validation
(``ImageDataset(train=False)`` + ``BatchNormalizer``), the Evaluate step (``TestImages`` over the artifact's own
``code/inference.py``) and serving (``model_fn`` + ``input_fn``) give the same uint8 crop and the same float32
tensor, bit for bit.

The images are small enough that no path decodes them at reduced size (the validation loader reduces a JPEG with
twice ``resize_size`` on its short side, serving one with twice that again), so every path decodes the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _notebook import eval_transform
from PIL import Image

from entrypoints import contract, data, inference, modeling
from steps import evaluate

CLASSES = ["cat", "dog"]
CONFIG = modeling.ModelConfig("resnet18", len(CLASSES), CLASSES, input_size=32, resize_size=36)
# name -> (file name, mode the file decodes to, PIL format, size): short sides under 2 x 36, long sides not square.
IMAGES = {
    "jpeg": ("photo.jpg", "RGB", "JPEG", (70, 53)),
    "png with alpha": ("sticker.png", "RGBA", "PNG", (45, 66)),
    "cmyk jpeg": ("print.jpg", "CMYK", "JPEG", (61, 49)),
}


def _write(folder: Path, name: str) -> Path:
    file_name, mode, fmt, (width, height) = IMAGES[name]
    rng = np.random.default_rng(len(file_name))
    smooth = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    pixels = np.clip(smooth + rng.normal(0, 40, smooth.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    if mode == "RGBA":  # an alpha channel that varies, so dropping it (not compositing) is what is checked
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
    path = folder / file_name
    image.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    with Image.open(path) as decoded:
        assert (decoded.mode, decoded.size) == (mode, (width, height))
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return modeling.save_artifact(modeling.build_model(CONFIG), tmp_path_factory.mktemp("artifact") / "model", CONFIG)


def _validation(path: Path, channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Training's validation: the loader's dataset, then the batch normaliser train.py applies on the device."""
    crop, label = data.ImageDataset([(str(path), 1)], CONFIG.input_size, CONFIG.resize_size, train=False)[(0, 0)]
    assert label == 1 and crop.dtype == torch.uint8
    normalize = data.BatchNormalizer(CONFIG.mean, CONFIG.std, channels_last=channels_last)
    return crop.permute(1, 2, 0).numpy(), normalize(crop.unsqueeze(0))[0].numpy()


def _evaluation(path: Path, artifact: Path) -> tuple[np.ndarray, np.ndarray]:
    """The Evaluate step: the artifact's own serving code, loaded as evaluate.py loads it, read by TestImages."""
    with evaluate.serving_code(artifact) as served:
        preprocess = served.load_serving_model(artifact, precision="fp32").preprocess
        tensor, label, position, reason = evaluate.TestImages([(str(path), 1)], preprocess, served.InferenceError)[0]
        assert (label, position, reason) == (1, 0, "")
        return preprocess.crop(path.read_bytes()), tensor


def _serving(path: Path, artifact: Path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The endpoint: the handlers as the serving toolkit calls them."""
    model = inference.model_fn(str(artifact))
    body = path.read_bytes()
    assert model.preprocess.open(body).size == size  # decoded at full size, as the other paths decode it
    batch = inference.input_fn(body, "image/jpeg" if path.suffix == ".jpg" else "image/png")
    return model.preprocess.crop(body), batch.images[0]


@pytest.mark.parametrize("name", list(IMAGES))
def test_validation_evaluation_and_serving_give_the_same_tensor_bit_for_bit(
    name: str, artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(contract.ENV_INFERENCE_RUNTIME, "eager")  # the runtime does not touch preprocessing
    path = _write(tmp_path, name)
    crops, tensors = {}, {}
    crops["validation"], tensors["validation"] = _validation(path, channels_last=False)
    _, tensors["validation, channels_last"] = _validation(path, channels_last=True)
    crops["evaluation"], tensors["evaluation"] = _evaluation(path, artifact)
    crops["serving"], tensors["serving"] = _serving(path, artifact, IMAGES[name][3])

    for crop in crops.values():
        assert crop.dtype == np.uint8 and crop.shape == (32, 32, 3)
        assert np.array_equal(crop, crops["validation"])
    for tensor in tensors.values():
        assert tensor.dtype == np.float32 and tensor.shape == (3, 32, 32)
        assert np.array_equal(tensor, tensors["validation"])
    # And that one tensor is the notebooks' Resize + CenterCrop + ToTensor + Normalize, to float rounding.
    with Image.open(path) as image:
        expected = eval_transform(CONFIG)(image.convert("RGB")).numpy()
    np.testing.assert_allclose(tensors["serving"], expected, atol=1e-5)


def test_the_crop_is_torchvisions_resize_and_centre_crop_on_either_orientation() -> None:
    from torchvision import transforms as T

    from entrypoints import transforms

    rng = np.random.default_rng(3)
    for width, height in ((341, 256), (256, 341), (257, 256), (37, 36), (36, 36), (1000, 37)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = T.Compose([T.Resize(36), T.CenterCrop(32)])(image)
        assert np.array_equal(transforms.resize_crop(image, 32, 36), np.asarray(expected)), (width, height)
