"""The notebooks' evaluation transform: the named baseline that the product's preprocessing is compared with.

The product computes it once, in ``entrypoints/transforms.py``; this is torchvision's own composition, kept here
as the reference it must equal.
"""

from __future__ import annotations

from torchvision import transforms as T

from entrypoints import modeling


def eval_transform(config: modeling.ModelConfig) -> T.Compose:
    """PIL image -> normalised float tensor: ``Resize`` short side, ``CenterCrop``, ``ToTensor``, ``Normalize``."""
    return T.Compose(
        [
            T.Resize(config.resize_size),
            T.CenterCrop(config.input_size),
            T.ToTensor(),
            T.Normalize(config.mean, config.std),
        ]
    )
