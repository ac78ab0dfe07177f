"""Image transforms shared by training, evaluation and serving: sizes and normalisation come from the
model's ``ModelConfig`` only, so nothing about them is written twice.

Shipped in the training ``source_dir`` and in ``<model>/code/``: imports only torch, torchvision, PIL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
