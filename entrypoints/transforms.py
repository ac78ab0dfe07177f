"""Evaluation-time preprocessing, the one implementation: training's validation (``data.load_eval_crop``),
serving (``inference.Preprocessor``) and the Evaluate step (which runs the artifact's own ``Preprocessor``) all
call :func:`resize_crop` on a decoded image and normalise with the constants of :func:`normalization`, so for the
same decoded image they give the same tensor, bit for bit. How each path decodes stays its own (serving's and the
validation loader's reduced-size JPEG decoding differ on purpose).

Sizes and normalisation come from the model's ``ModelConfig`` only, so nothing about them is written twice.

Shipped in the training ``source_dir`` and in ``<model>/code/``: imports only PIL and numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def resized_size(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to ``resize_size``: torchvision ``Resize(int)``'s rounding
    (the long side truncated), so crops match the notebooks' ``Resize`` + ``CenterCrop`` exactly."""
    if width <= height:
        return resize_size, int(resize_size * height / width)
    return int(resize_size * width / height), resize_size


def resize_crop(image: Image.Image, input_size: int, resize_size: int) -> np.ndarray:
    """Decoded image (any PIL mode) -> ``(input_size, input_size, 3)`` uint8 RGB array.

    Converted to RGB first (alpha dropped, CMYK and palettes converted, as training's data was), the short side
    resized to ``resize_size`` with PIL's antialiased bilinear filter, then the centre ``input_size`` square cut:
    what torchvision's ``Resize(resize_size)`` + ``CenterCrop(input_size)`` give on a PIL image, pixel for pixel.
    (``train.py`` refuses ``resize_size < input_size``; such a config would get a zero-padded crop here too.)
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = resized_size(image.width, image.height, resize_size)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    left = round((width - input_size) / 2.0)
    top = round((height - input_size) / 2.0)
    return np.asarray(image.crop((left, top, left + input_size, top + input_size)))


def normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 ``(scale, offset)`` such that ``x * scale - offset`` (``x`` the uint8 pixel as float32,
    multiplied, rounded, then subtracted) is ``ToTensor`` + ``Normalize(mean, std)``: ``x / 255`` then
    ``(x - mean) / std`` is ``x * (1 / (255 * std)) - mean / std``.

    The single source of these constants: numpy (:func:`normalized_array`, serving) and torch
    (``data.BatchNormalizer``, training's validation) apply the same two float32 operations to them, so their
    results are bitwise equal.
    """
    std32 = np.asarray(std, dtype=np.float32)
    scale = np.float32(1.0) / (np.float32(255.0) * std32)
    offset = np.asarray(mean, dtype=np.float32) / std32
    return scale, offset


def normalized_array(pixels: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB array -> ``(3, H, W)`` float32 array ``x * scale - offset`` (:func:`normalization`)."""
    channels_first = np.ascontiguousarray(pixels.transpose(2, 0, 1))  # uint8: the cheap copy, not the float one
    out = channels_first * scale[:, None, None]
    out -= offset[:, None, None]
    return out
