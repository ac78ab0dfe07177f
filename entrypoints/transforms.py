"""Image transforms shared by training, evaluation and serving: sizes and normalisation come from the
model's ``ModelConfig`` only, so nothing about them is written twice.

Shipped in the training ``source_dir`` and in ``<model>/code/``: imports only torch, torchvision, PIL, numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from torchvision import transforms as T

if TYPE_CHECKING:  # pragma: no cover
    try:
        from .modeling import ModelConfig
    except ImportError:
        from modeling import ModelConfig  # type: ignore[no-redef]


def eval_transform(config: ModelConfig) -> T.Compose:
    """PIL image -> normalised float tensor: resize short side, centre crop (evaluation and serving)."""
    return T.Compose(
        [
            T.Resize(config.resize_size),
            T.CenterCrop(config.input_size),
            T.ToTensor(),
            T.Normalize(config.mean, config.std),
        ]
    )


def eval_resize_crop(config: ModelConfig) -> T.Compose:
    """PIL image -> PIL image: the resize and centre crop of :func:`eval_transform`, nothing else.

    Serving and evaluation finish with :func:`normalized_array` instead of ``ToTensor`` + ``Normalize``;
    together they give what ``eval_transform`` gives, to float rounding.
    """
    return T.Compose([T.Resize(config.resize_size), T.CenterCrop(config.input_size)])


def normalized_array(image: Image.Image, config: ModelConfig) -> np.ndarray:
    """RGB PIL image -> ``(3, H, W)`` float32 array normalised with the model's mean and std.

    ``ToTensor`` followed by ``Normalize`` fused into one multiply-add per pixel: ``x / 255`` then
    ``(x - mean) / std`` is ``x * (1 / (255 * std)) - mean / std``.
    """
    pixels = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    scale = 1.0 / (255.0 * std)
    offset = np.asarray(config.mean, dtype=np.float32) / std
    return np.ascontiguousarray((pixels * scale - offset).transpose(2, 0, 1))


def train_transform(config: ModelConfig) -> T.Compose:
    """PIL image -> augmented normalised float tensor (random resized crop and horizontal flip)."""
    return T.Compose(
        [
            T.RandomResizedCrop(config.input_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(config.mean, config.std),
        ]
    )
