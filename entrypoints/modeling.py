"""Networks by name, their classifier heads, partial freezing, and the model artifact on disk.

Shared by training (``train.py``), evaluation (``steps/evaluate.py`` through the artifact's ``code/``) and
serving (``inference.py``), so the network that is evaluated is the network that is deployed. Shipped in
the training ``source_dir`` and in ``<model>/code/``: imports only torch, torchvision and the standard library.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:  # works both as ``entrypoints.modeling`` and as a top-level module inside a container
    from . import contract
except ImportError:  # pragma: no cover - exercised inside containers
    import contract  # type: ignore[no-redef]


@dataclass(frozen=True)
class _Family:
    """Where a torchvision family keeps its classifier and its ordered backbone blocks."""

    head_path: str  # dotted attribute path of the final nn.Linear that the new head replaces
    blocks: tuple[str, ...]  # attribute paths of the backbone stages, input side first


_RESNET = _Family("fc", ("conv1", "layer1", "layer2", "layer3", "layer4"))
_DENSENET = _Family("classifier", ("features.conv0", *(f"features.denseblock{i}" for i in range(1, 5))))
_EFFICIENTNET = _Family("classifier.1", tuple(f"features.{i}" for i in range(9)))
_MOBILENET_V3_LARGE = _Family("classifier.3", tuple(f"features.{i}" for i in range(17)))
_MOBILENET_V3_SMALL = _Family("classifier.3", tuple(f"features.{i}" for i in range(13)))
_CONVNEXT = _Family("classifier.2", tuple(f"features.{i}" for i in range(8)))

ARCHITECTURES: dict[str, _Family] = {
    "resnet18": _RESNET,
    "resnet34": _RESNET,
    "resnet50": _RESNET,
    "resnet101": _RESNET,
    "resnet152": _RESNET,
    "wide_resnet50_2": _RESNET,
    "resnext50_32x4d": _RESNET,
    "densenet121": _DENSENET,
    "efficientnet_b0": _EFFICIENTNET,
    "efficientnet_b3": _EFFICIENTNET,
    "mobilenet_v3_large": _MOBILENET_V3_LARGE,
    "mobilenet_v3_small": _MOBILENET_V3_SMALL,
    "convnext_tiny": _CONVNEXT,
}


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network and feed it: saved as ``model_config.json``."""

    architecture: str
    num_classes: int
    class_names: list[str]
    hidden_units: int = 0
    dropout: float = 0.0
    input_size: int = contract.DEFAULT_INPUT_SIZE
    resize_size: int = contract.DEFAULT_RESIZE_SIZE
    mean: list[float] = field(default_factory=lambda: list(contract.IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(contract.IMAGENET_STD))

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.num_classes != len(self.class_names):
            raise ValueError(f"num_classes={self.num_classes} but {len(self.class_names)} class names were given")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


def _get_attr(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part) if not part.isdigit() else module[int(part)]  # type: ignore[index]
    return module


def _set_attr(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _get_attr(root, parent_path) if parent_path else root
    if name.isdigit():
        parent[int(name)] = value  # type: ignore[index]
    else:
        setattr(parent, name, value)


def make_head(in_features: int, num_classes: int, hidden_units: int = 0, dropout: float = 0.0) -> nn.Module:
    """The new classifier: one linear layer, or linear-ReLU-dropout-linear when ``hidden_units`` > 0."""
    if hidden_units <= 0:
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        layers.append(nn.Linear(in_features, num_classes))
        return nn.Sequential(*layers)
    return nn.Sequential(
        nn.Linear(in_features, hidden_units),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden_units, num_classes),
    )


def load_backbone_weights(arch: str, weights: str) -> nn.Module:
    """A torchvision network with ImageNet weights, from torchvision, a local file, or none.

    ``weights`` is ``none`` (random init, for tests), ``imagenet`` (torchvision's default weights, downloaded:
    needs internet) or the path of a state_dict file such as ``resnet50-11ad3fa6.pth`` (the ``weights``
    channel for jobs without internet). Files load with ``weights_only=True``: no pickled code runs.
    """
    import torchvision

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if weights in ("none", "", None):
        return torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        return torchvision.models.get_model(arch, weights="DEFAULT")
    path = Path(weights)
    if path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt", ".bin"))
        if len(candidates) != 1:
            raise ValueError(f"weights folder {path} must hold exactly one .pth/.pt file, found {len(candidates)}")
        path = candidates[0]
    if not path.is_file():
        raise ValueError(f"weights must be 'none', 'imagenet' or a state_dict file; {weights!r} is none of these")
    model = torchvision.models.get_model(arch, weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


def build_model(config: ModelConfig, weights: str = "none") -> nn.Module:
    """The backbone named in ``config`` with its classifier replaced by :func:`make_head`."""
    model = load_backbone_weights(config.architecture, weights)
    family = ARCHITECTURES[config.architecture]
    old_head = _get_attr(model, family.head_path)
    if not isinstance(old_head, nn.Linear):  # pragma: no cover - guards the family table
        raise TypeError(f"{config.architecture}.{family.head_path} is {type(old_head).__name__}, not Linear")
    head = make_head(old_head.in_features, config.num_classes, config.hidden_units, config.dropout)
    _set_attr(model, family.head_path, head)
    return model


def backbone_blocks(model: nn.Module, arch: str) -> list[nn.Module]:
    """The backbone's stages, input side first (the unit that ``trainable_blocks`` counts)."""
    return [_get_attr(model, path) for path in ARCHITECTURES[arch].blocks]


def head_module(model: nn.Module, arch: str) -> nn.Module:
    return _get_attr(model, ARCHITECTURES[arch].head_path)


def parse_trainable_blocks(value: str | int) -> int | None:
    """``all`` -> None (everything trains); otherwise a non-negative count of last blocks that train."""
    if isinstance(value, str) and value.strip().lower() == contract.TRAINABLE_ALL:
        return None
    count = int(value)
    if count < 0:
        raise ValueError(f"trainable blocks must be 'all' or >= 0, got {value!r}")
    return count


def freeze_backbone(model: nn.Module, arch: str, trainable_blocks: int | None) -> list[nn.Module]:
    """Freeze all but the last ``trainable_blocks`` backbone stages; the head always trains.

    Returns the frozen stages. ``None`` trains everything. Parameters outside the listed stages (stems,
    final norms) follow the stage before them: they train only in a full fine-tune.
    """
    if trainable_blocks is None:
        for param in model.parameters():
            param.requires_grad_(True)
        return []
    blocks = backbone_blocks(model, arch)
    for param in model.parameters():
        param.requires_grad_(False)
    trainable = blocks[len(blocks) - trainable_blocks :] if trainable_blocks else []
    for block in trainable:
        for param in block.parameters():
            param.requires_grad_(True)
    for param in head_module(model, arch).parameters():
        param.requires_grad_(True)
    return [block for block in blocks if all(block is not t for t in trainable)]


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, except batch-norm layers whose parameters are frozen stay in eval mode.

    Without this a "frozen" block would still drift: batch norm updates its running statistics in train mode.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def save_artifact(
    model: nn.Module,
    model_dir: str | Path,
    config: ModelConfig,
    hyperparameters: dict[str, Any] | None = None,
) -> Path:
    """Write the model artifact of the contract into ``model_dir`` (SageMaker tars it as model.tar.gz).

    ``model.pt`` (a state_dict of CPU tensors), ``model_config.json``, ``hyperparameters.json``, ``code/`` with
    the serving handlers and their requirements (what the legacy PyTorch serving container loads), and at the
    root the Ray Serve app (``config.yaml`` and ``deployment.py``, what the Ray Serve container runs): one
    artifact serves on both images with no repack step.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    torch.save(state, model_dir / contract.WEIGHTS_FILE)
    (model_dir / contract.MODEL_CONFIG_FILE).write_text(config.to_json())
    if hyperparameters is not None:
        (model_dir / contract.HYPERPARAMETERS_FILE).write_text(
            json.dumps(hyperparameters, indent=2, sort_keys=True, default=str)
        )
    copy_serving_code(model_dir / contract.CODE_DIR)
    copy_serving_app(model_dir)
    return model_dir


def copy_serving_code(code_dir: str | Path) -> Path:
    """Copy the serving handlers and their requirements from this folder into ``code_dir``."""
    source = Path(__file__).resolve().parent
    code_dir = Path(code_dir)
    code_dir.mkdir(parents=True, exist_ok=True)
    for name in contract.SERVING_CODE_FILES:
        shutil.copy2(source / name, code_dir / name)
    shutil.copy2(source / contract.SERVING_REQUIREMENTS_FILE, code_dir / "requirements.txt")
    return code_dir


def copy_serving_app(model_dir: str | Path) -> Path:
    """Copy the Ray Serve app (``config.yaml`` and the deployment module it names) to the artifact's root."""
    source = Path(__file__).resolve().parent
    model_dir = Path(model_dir)
    shutil.copy2(source / contract.RAY_SERVE_CONFIG_TEMPLATE, model_dir / contract.RAY_SERVE_CONFIG_FILE)
    shutil.copy2(source / contract.RAY_SERVE_MODULE_FILE, model_dir / contract.RAY_SERVE_MODULE_FILE)
    return model_dir


def read_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / contract.MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {model_dir} is not a model artifact of this project")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """Rebuild the network from ``model_config.json`` and load ``model.pt`` without unpickling code."""
    config = read_model_config(model_dir)
    model = build_model(config, weights="none")
    state = torch.load(Path(model_dir) / contract.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return model, config
