"""Fine-tune a torchvision CNN on an ImageFolder channel: every tuning trial and the final training run this.

Runs under SageMaker's training contract (hyperparameters as ``--key value`` flags, channels and output folders
from ``SM_*`` environment variables, checkpoints in /opt/ml/checkpoints) and as a plain local command::

    python entrypoints/train.py --train-dir data/train --valid-dir data/valid --model-dir runs/model \\
        --architecture resnet18 --weights none --epochs 3 --input-size 64

Per epoch it prints one metrics line (``contract.format_metrics_line``: the tuner's regexes read it), writes
TensorBoard scalars when TensorBoard is importable and a folder is set, and saves a checkpoint it resumes from
when started again (managed spot training). At the end it writes the model artifact of the contract
(``modeling.save_artifact``: the last epoch's weights, model_config.json, hyperparameters.json, code/) and
``training_curves.png`` + ``training_history.json`` in the output-data folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:  # works both as ``entrypoints.train`` and as ``python train.py`` inside the training container
    from . import contract, data, modeling
except ImportError:  # pragma: no cover - exercised by the script-mode tests in a subprocess
    import contract  # type: ignore[no-redef]
    import data  # type: ignore[no-redef]
    import modeling  # type: ignore[no-redef]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "step", "none")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-epoch-(\d+)\.pt$")
CHECKPOINT_FORMAT = 1
CHECKPOINTS_KEPT = 2
SAGEMAKER_CHECKPOINT_DIR = "/opt/ml/checkpoints"
SAGEMAKER_TENSORBOARD_DIR = "/opt/ml/output/tensorboard"
SAGEMAKER_TENSORBOARD_CONFIG = "/opt/ml/input/config/tensorboardoutputconfig.json"
DEBUGGER_CONFIG_ENV = "SMDEBUG_CONFIG_FILE_PATH"  # smdebug's own override of the path below
DEBUGGER_CONFIG_FILE = "/opt/ml/input/config/debughookconfig.json"
CURVES_IMAGE = "training_curves.png"
HISTORY_FILE = "training_history.json"
SKIPPED_FILES_REPORT = "skipped_files.json"
DISABLED = ("", "none", "off", "false")


class TrainingError(Exception):
    """A failure the user can act on: printed as one line (and as SageMaker's failure reason), exit status 1."""


class NonFiniteLossError(TrainingError):
    pass


# --- flags -------------------------------------------------------------------------------------------------------


def _number(kind: type, value: str, minimum: float | None = None, maximum: float | None = None, strict=False):
    """Parse tuner strings such as "128", "128.0" or "0.0012"; refuse NaN, inf and out-of-range values."""
    try:
        number = float(str(value).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    if kind is int:
        if not number.is_integer():
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
        number = int(number)
    if minimum is not None and (number <= minimum if strict else number < minimum):
        raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    if maximum is not None and number > maximum:
        raise argparse.ArgumentTypeError(f"must be <= {maximum:g}, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    return _number(int, value, 0, strict=True)


def _non_negative_int(value: str) -> int:
    return _number(int, value, 0)


def _int(value: str) -> int:
    return _number(int, value)


def _positive_float(value: str) -> float:
    return _number(float, value, 0.0, strict=True)


def _non_negative_float(value: str) -> float:
    return _number(float, value, 0.0)


def _fraction(value: str) -> float:
    number = _number(float, value, 0.0, 1.0)
    if number >= 1.0:
        raise argparse.ArgumentTypeError(f"must be < 1, got {value!r}")
    return number


def _trainable_blocks(value: str) -> str:
    text = str(value).strip().lower()
    if text == modeling.TRAINABLE_ALL:
        return text
    return str(_non_negative_int(text))


def _workers(value: str) -> str:
    text = str(value).strip().lower()
    return text if text == "auto" else str(_non_negative_int(text))


def _choice(choices: Sequence[str]):
    def parse(value: str) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise argparse.ArgumentTypeError(f"choose one of {', '.join(choices)}; got {value!r}")
        return text

    return parse


def _bool(value: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _add_switch(group: argparse._ArgumentGroup, name: str, help_text: str) -> None:
    """``--name`` / ``--name VALUE`` / ``--no-name``: SageMaker passes every hyperparameter as ``--key value``."""
    dest = name.replace("-", "_")
    group.add_argument(
        f"--{name}", dest=dest, nargs="?", const=True, default=None, type=_bool, metavar="BOOL", help=help_text
    )
    group.add_argument(
        f"--no-{name}", dest=dest, action="store_false", default=argparse.SUPPRESS, help=f"turn --{name} off"
    )


def _env(name: str, fallback: str | None = None) -> str | None:
    return os.environ.get(name) or fallback


def _in_sagemaker_container() -> bool:
    """The training toolkit exports SM_TRAINING_ENV; SageMaker itself writes resourceconfig.json."""
    return "SM_TRAINING_ENV" in os.environ or Path("/opt/ml/input/config/resourceconfig.json").is_file()


def _default_tensorboard_dir() -> str | None:
    """SageMaker's TensorBoard output folder: from its config file, else /opt/ml/output/tensorboard if present."""
    config = Path(SAGEMAKER_TENSORBOARD_CONFIG)
    if config.is_file():
        try:
            local_path = json.loads(config.read_text()).get("LocalPath")
        except (json.JSONDecodeError, AttributeError):
            local_path = None
        if local_path:
            return str(local_path)
    return SAGEMAKER_TENSORBOARD_DIR if Path(SAGEMAKER_TENSORBOARD_DIR).is_dir() else None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (the help then says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a torchvision CNN for image classification (SageMaker training entry point).",
        formatter_class=_HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--architecture",
        type=_choice(tuple(modeling.ARCHITECTURES)),
        default="resnet50",
        help=f"torchvision network: {', '.join(modeling.ARCHITECTURES)}",
    )
    model.add_argument(
        "--weights",
        default="imagenet",
        help="backbone weights: 'imagenet' (torchvision's, downloaded; a 'weights' channel is used instead when "
        "the job has one), 'none' (random init), or the path of a torchvision state_dict .pth file",
    )
    model.add_argument(
        "--hidden-units", type=_non_negative_int, default=256, help="hidden layer of the new head; 0 = one linear layer"
    )
    model.add_argument("--dropout", type=_fraction, default=0.2, help="dropout in the new head, in [0, 1)")
    model.add_argument(
        "--trainable-blocks",
        type=_trainable_blocks,
        default="1",
        help="how many of the backbone's last blocks train: 0 = feature extractor (head only), 'all' = full fine-tune",
    )
    model.add_argument(
        "--input-size", type=_positive_int, default=contract.DEFAULT_INPUT_SIZE, help="square crop the network sees"
    )
    model.add_argument(
        "--resize-size",
        type=_positive_int,
        default=None,
        help="short side before the evaluation centre crop (default: input-size * 256/224)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--epochs", type=_positive_int, default=5, help="epochs in total (a resumed run counts its past)"
    )
    optim.add_argument("--batch-size", type=_positive_int, default=64, help="images per training step")
    optim.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate")
    optim.add_argument("--optimizer", type=_choice(OPTIMIZERS), default="adamw", help="adamw or sgd (momentum 0.9)")
    optim.add_argument(
        "--weight-decay", type=_non_negative_float, default=1e-4, help="decoupled weight decay (not on biases/norms)"
    )
    optim.add_argument("--eps", type=_positive_float, default=1e-8, help="AdamW epsilon (unused by sgd)")
    optim.add_argument("--label-smoothing", type=_fraction, default=0.1, help="cross-entropy label smoothing, [0, 1)")
    optim.add_argument(
        "--scheduler",
        type=_choice(SCHEDULERS),
        default="cosine",
        help="per-step learning rate: cosine to 0, step (x0.1 at 50%% and 75%% of the epochs), none",
    )
    optim.add_argument("--seed", type=_int, default=42, help="seed for initialisation, shuffling and augmentation")
    _add_switch(
        optim,
        "horizontal-flip",
        "random horizontal flips in training (default: on; turn off where a mirror image means something else: "
        "digits, text)",
    )

    speed = parser.add_argument_group("speed")
    speed.add_argument(
        "--workers", type=_workers, default="auto", help="data-loading processes; 'auto' = one per available CPU"
    )
    _add_switch(speed, "amp", "automatic mixed precision (default: on with a GPU; bfloat16 on CPU when asked)")
    _add_switch(speed, "channels-last", "NHWC memory layout (default: on with a GPU)")
    speed.add_argument(
        "--num-gpus",
        type=_non_negative_int,
        default=_env("SM_NUM_GPUS"),
        help="GPUs to use (SM_NUM_GPUS; default: all visible); 0 = CPU, >1 = DataParallel",
    )

    paths = parser.add_argument_group("data and outputs (SageMaker sets these through SM_* variables)")
    paths.add_argument("--train-dir", default=_env("SM_CHANNEL_TRAIN"), help="train channel (SM_CHANNEL_TRAIN)")
    paths.add_argument("--valid-dir", default=_env("SM_CHANNEL_VALID"), help="valid channel (SM_CHANNEL_VALID)")
    paths.add_argument(
        "--weights-dir",
        default=_env("SM_CHANNEL_WEIGHTS"),
        help="optional channel with one torchvision state_dict .pth, for jobs without internet (SM_CHANNEL_WEIGHTS)",
    )
    paths.add_argument("--model-dir", default=_env("SM_MODEL_DIR", "runs/model"), help="model artifact (SM_MODEL_DIR)")
    paths.add_argument(
        "--output-data-dir",
        default=_env("SM_OUTPUT_DATA_DIR", "runs/output"),
        help="curves and history (SM_OUTPUT_DATA_DIR)",
    )
    paths.add_argument(
        "--checkpoint-dir",
        default=SAGEMAKER_CHECKPOINT_DIR if _in_sagemaker_container() else "runs/checkpoints",
        help=f"per-epoch checkpoints, resumed from when present ({SAGEMAKER_CHECKPOINT_DIR} in a SageMaker "
        "training container, which syncs it with checkpoint_s3_uri); 'none' turns checkpointing off",
    )
    paths.add_argument(
        "--tensorboard-dir",
        default=_default_tensorboard_dir(),
        help="TensorBoard scalars (SageMaker's TensorBoard output folder when the job has one); 'none' = off",
    )
    return parser


@dataclass
class Settings:
    """Flags after cross-checks and 'auto' resolution."""

    args: argparse.Namespace
    trainable_blocks: int | None
    resize_size: int
    workers: int
    device: torch.device
    num_gpus: int
    amp: bool
    amp_dtype: torch.dtype
    channels_last: bool
    checkpoint_dir: Path | None
    tensorboard_dir: Path | None
    weights: str

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters this run used, keyed like ``pipelines.config.DEFAULT_HYPERPARAMETERS``."""
        a = self.args
        return {
            "architecture": a.architecture,
            "weights": a.weights,
            "epochs": a.epochs,
            "batch-size": a.batch_size,
            "lr": a.lr,
            "optimizer": a.optimizer,
            "weight-decay": a.weight_decay,
            "eps": a.eps,
            "label-smoothing": a.label_smoothing,
            "dropout": a.dropout,
            "hidden-units": a.hidden_units,
            "trainable-blocks": a.trainable_blocks,
            "scheduler": a.scheduler,
            "seed": a.seed,
            "input-size": a.input_size,
            "resize-size": self.resize_size,
            "horizontal-flip": a.horizontal_flip is not False,
        }

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed (everything but the epoch count and speed settings)."""
        values = self.hyperparameters()
        values.pop("epochs")
        values.pop("weights")  # a resumed run needs no pretrained weights: they are in the checkpoint
        return values


def resolve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """Cross-flag checks and 'auto' values; errors go through ``parser.error`` and name the flag."""
    blocks_available = len(modeling.ARCHITECTURES[args.architecture].blocks)
    trainable_blocks = modeling.parse_trainable_blocks(args.trainable_blocks)
    if trainable_blocks is not None and trainable_blocks > blocks_available:
        parser.error(
            f"argument --trainable-blocks: {args.architecture} has {blocks_available} backbone blocks, "
            f"got {trainable_blocks} (use 'all' for a full fine-tune)"
        )
    if not args.train_dir:
        parser.error("argument --train-dir: no train channel (pass --train-dir or set SM_CHANNEL_TRAIN)")
    if not args.valid_dir:
        parser.error("argument --valid-dir: no valid channel (pass --valid-dir or set SM_CHANNEL_VALID)")
    for flag, value in (("--train-dir", args.train_dir), ("--valid-dir", args.valid_dir)):
        if not Path(value).is_dir():
            parser.error(f"argument {flag}: {value} is not a folder")
    if args.weights_dir and not Path(args.weights_dir).is_dir():
        parser.error(f"argument --weights-dir: {args.weights_dir} is not a folder")

    weights = str(args.weights).strip()
    if weights.lower() in ("none", "imagenet"):
        weights = weights.lower()
    elif not Path(weights).exists():
        parser.error(f"argument --weights: expected 'none', 'imagenet' or an existing .pth file, got {weights!r}")
    if weights == "imagenet" and args.weights_dir:
        weights = str(args.weights_dir)  # the job has a weights channel: no download

    cuda_count = torch.cuda.device_count()
    num_gpus = cuda_count if args.num_gpus is None else args.num_gpus
    if num_gpus > cuda_count:
        parser.error(f"argument --num-gpus: {num_gpus} asked for but {cuda_count} CUDA device(s) are visible")
    device = torch.device("cuda" if num_gpus > 0 else "cpu")
    amp = device.type == "cuda" if args.amp is None else args.amp
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        amp_dtype = torch.bfloat16  # CPU autocast supports bfloat16 only
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    workers = data.auto_workers() if args.workers == "auto" else int(args.workers)
    resize_size = args.resize_size or round(
        args.input_size * contract.DEFAULT_RESIZE_SIZE / contract.DEFAULT_INPUT_SIZE
    )
    if resize_size < args.input_size:
        parser.error(f"argument --resize-size: {resize_size} is smaller than --input-size {args.input_size}")
    checkpoint_dir = None if str(args.checkpoint_dir).strip().lower() in DISABLED else Path(args.checkpoint_dir)
    tensorboard_dir = (
        None
        if args.tensorboard_dir is None or str(args.tensorboard_dir).strip().lower() in DISABLED
        else Path(args.tensorboard_dir)
    )
    return Settings(
        args=args,
        trainable_blocks=trainable_blocks,
        resize_size=resize_size,
        workers=workers,
        device=device,
        num_gpus=num_gpus,
        amp=amp,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        checkpoint_dir=checkpoint_dir,
        tensorboard_dir=tensorboard_dir,
        weights=weights,
    )


# --- optimiser and schedule ----------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Trainable parameters only; no weight decay on biases and normalisation weights (1-D tensors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=args.lr, eps=args.eps)


def lr_factor(step: int, steps_per_epoch: int, epochs: int, scheduler: str) -> float:
    """Learning-rate multiplier after ``step`` optimiser steps (a pure function: resumes exactly)."""
    total = max(1, steps_per_epoch * epochs)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if scheduler == "step":
        epoch = step // max(1, steps_per_epoch)
        return 0.1 ** sum(epoch >= milestone for milestone in (epochs * 0.5, epochs * 0.75))
    return 1.0


# --- checkpoints ---------------------------------------------------------------------------------------------------


def checkpoint_files(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every checkpoint in the folder, newest first; temporary and foreign files are ignored."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def save_checkpoint(checkpoint_dir: Path, epoch: int, state: dict[str, Any]) -> Path:
    """Write atomically (temporary file, fsync, rename) and keep the newest ``CHECKPOINTS_KEPT``."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / f"checkpoint-epoch-{epoch:04d}.pt"
    temporary = checkpoint_dir / f".{final.name}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    for _, old in checkpoint_files(checkpoint_dir)[CHECKPOINTS_KEPT:]:
        old.unlink(missing_ok=True)
    return final


def load_newest_checkpoint(checkpoint_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads (``weights_only=True``: plain tensors and numbers, no pickled code)."""
    for _, path in checkpoint_files(checkpoint_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, ValueError) as error:  # truncated upload, foreign file
            print(f"checkpoint {path} does not load ({error}); trying an older one", flush=True)
            continue
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
            return state, path
        print(f"checkpoint {path} is not in this script's format; trying an older one", flush=True)
    return None


# --- Debugger, TensorBoard, progress -------------------------------------------------------------------------------


class DebuggerHook:
    """SageMaker Debugger through smdebug when it is importable and the job carries a hook config.

    Registers the model (weights of frozen layers included, gradients of trainable ones) and the loss module,
    and switches TRAIN/EVAL modes, which is what the built-in rules (loss not decreasing, overfit, vanishing
    gradient, poor weight initialisation) read.
    """

    def __init__(self) -> None:
        self.hook = None
        self.modes = None
        config_path = os.environ.get(DEBUGGER_CONFIG_ENV, DEBUGGER_CONFIG_FILE)
        if not Path(config_path).is_file():
            print(f"Debugger: off (no hook config at {config_path})", flush=True)
            return
        try:
            import smdebug.pytorch as smd
        except ImportError:
            print(
                f"Debugger: the job has a hook config ({config_path}) but smdebug is not installed; "
                "training runs without the Debugger hook",
                flush=True,
            )
            return
        self.hook = smd.get_hook(create_if_not_exists=True)
        self.modes = smd.modes
        if self.hook is None:  # smdebug found no config after all
            print(f"Debugger: smdebug created no hook from {config_path}; off", flush=True)
        else:
            print(f"Debugger: hook created from {config_path}", flush=True)

    def register(self, model: nn.Module, loss: nn.Module) -> None:
        if self.hook is not None:
            self.hook.register_module(model)
            self.hook.register_loss(loss)

    def train(self) -> None:
        if self.hook is not None:
            self.hook.set_mode(self.modes.TRAIN)

    def eval(self) -> None:
        if self.hook is not None:
            self.hook.set_mode(self.modes.EVAL)

    def close(self) -> None:
        if self.hook is not None:
            self.hook.close()


def open_tensorboard(log_dir: Path | None, purge_step: int | None):
    if log_dir is None:
        print("TensorBoard: off (no --tensorboard-dir)", flush=True)
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        print(f"TensorBoard: off (cannot import it: {error})", flush=True)
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"TensorBoard: scalars in {log_dir}", flush=True)
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class Progress:
    """A tqdm bar on a terminal, otherwise about ten plain lines per epoch (CloudWatch-friendly).

    Never writes ``name=value`` pairs: the tuner's metric regexes must only match the per-epoch metrics line.
    """

    def __init__(self, epoch: int, epochs: int, steps: int) -> None:
        self.prefix = f"epoch {epoch}/{epochs}"
        self.steps = steps
        self.every = max(1, steps // 10)
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=steps, desc=self.prefix, unit="step", leave=False)

    def update(self, step: int, loss: float, images_per_second: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.4f} | {images_per_second:.0f} img/s")
        elif step % self.every == 0 or step == self.steps:
            print(f"{self.prefix} step {step}/{self.steps} loss {loss:.4f} {images_per_second:.0f} img/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_curves(history: dict[str, list[float]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("training curves: matplotlib is not installed; no picture", flush=True)
        return None
    epochs = history["epoch"]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, history["train_loss"], marker="o", label="train")
    loss_axis.plot(epochs, history["valid_loss"], marker="o", label="valid")
    loss_axis.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    loss_axis.legend()
    accuracy_axis.plot(epochs, history["valid_accuracy"], marker="o", color="tab:green")
    accuracy_axis.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# --- training ------------------------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    model: nn.Module  # the unwrapped network, as saved (on the training device, eval mode)
    config: modeling.ModelConfig
    history: dict[str, list[float]]
    model_dir: Path
    resumed_from: Path | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)


def _load_channels(settings: Settings) -> tuple[data.ChannelIndex, data.ChannelIndex]:
    args = settings.args
    try:
        class_names = data.read_class_names(args.train_dir)
        data.check_same_classes(class_names, data.read_class_names(args.valid_dir))
        train_index = data.scan_channel(args.train_dir, class_names)
        valid_index = data.scan_channel(args.valid_dir, class_names)
    except data.DataError as error:
        raise TrainingError(str(error)) from error
    for name, index in (("train", train_index), ("valid", valid_index)):
        counts = index.counts()
        empty = [c for c, n in counts.items() if n == 0]
        print(f"{name}: {len(index.samples)} images in {len(counts)} classes", flush=True)
        if empty:
            print(f"{name}: {len(empty)} classes have no images: {empty[:10]}", flush=True)
        for item in index.skipped:
            print(f"{name}: skipped {item['path']}: {item['reason']}", flush=True)
    if len(train_index.samples) < 2:
        raise TrainingError(f"the train channel {args.train_dir} has {len(train_index.samples)} images; need >= 2")
    if not valid_index.samples:
        raise TrainingError(f"the valid channel {args.valid_dir} has no images")
    return train_index, valid_index


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())  # state_dict mismatches list hundreds of keys over many lines
    return text if len(text) <= limit else text[:limit] + " ..."


def _build_network(config: modeling.ModelConfig, weights: str) -> nn.Module:
    try:
        return modeling.build_model(config, weights=weights)
    except OSError as error:
        if weights != "imagenet":
            raise TrainingError(f"argument --weights: cannot read {weights}: {error}") from error
        raise TrainingError(  # urllib's URLError is an OSError
            f"could not download the ImageNet weights of {config.architecture} ({error}); the job may have no "
            "internet: give it a 'weights' channel (SM_CHANNEL_WEIGHTS) holding torchvision's .pth file, "
            "or pass --weights none"
        ) from error
    except pickle.UnpicklingError as error:
        raise TrainingError(
            f"argument --weights: {weights} is not a plain state_dict (torch.save(model.state_dict()) of a "
            f"torchvision {config.architecture}); files that need unpickling code are refused"
        ) from error
    except (RuntimeError, ValueError) as error:  # another network's weights, a missing file
        raise TrainingError(
            f"argument --weights: cannot load {weights!r} into {config.architecture}: {_first_line(error)}"
        ) from error


def train_one_epoch(
    model: nn.Module,
    loader,
    normalize: data.BatchNormalizer,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    settings: Settings,
    epoch: int,
    epochs: int,
) -> tuple[float, float]:
    """One pass over the train loader; returns (mean loss per image, images per second)."""
    modeling.set_train_mode(model)
    device = settings.device
    autocast = torch.autocast(device.type, dtype=settings.amp_dtype) if settings.amp else nullcontext()
    progress = Progress(epoch, epochs, len(loader))
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    try:
        for step, (images, labels) in enumerate(loader, start=1):
            inputs = normalize(images)
            targets = labels.to(device, non_blocking=True)
            with autocast:
                loss = criterion(model(inputs), targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"the training loss is {loss_value} at epoch {epoch} step {step}: training diverged; "
                    f"lower --lr (now {settings.args.lr:g}) or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total_loss += loss_value * targets.shape[0]
            seen += targets.shape[0]
            progress.update(step, loss_value, seen / max(time.perf_counter() - start, 1e-9))
    finally:
        progress.close()
    return total_loss / max(seen, 1), seen / max(time.perf_counter() - start, 1e-9)


def evaluate(
    model: nn.Module, loader, normalize: data.BatchNormalizer, criterion: nn.Module, settings: Settings
) -> tuple[float, float]:
    """(mean loss per image, accuracy) on the valid loader."""
    model.eval()
    autocast = torch.autocast(settings.device.type, dtype=settings.amp_dtype) if settings.amp else nullcontext()
    total_loss = torch.zeros((), dtype=torch.float64, device=settings.device)
    correct = torch.zeros((), dtype=torch.int64, device=settings.device)
    seen = 0
    with torch.no_grad():
        for images, labels in loader:
            inputs = normalize(images)
            targets = labels.to(settings.device, non_blocking=True)
            with autocast:
                logits = model(inputs)
                loss = criterion(logits, targets)
            total_loss += loss.double() * targets.shape[0]
            correct += (logits.argmax(dim=1) == targets).sum()
            seen += targets.shape[0]
    return total_loss.item() / max(seen, 1), correct.item() / max(seen, 1)


def run_training(settings: Settings) -> TrainingResult:
    """Train as the flags say and write the artifact; returns the trained network and the history."""
    args = settings.args
    torch.manual_seed(args.seed)
    device = settings.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(
        f"device {device} (GPUs {settings.num_gpus}), amp {settings.amp}"
        f"{' ' + str(settings.amp_dtype).replace('torch.', '') if settings.amp else ''}, "
        f"channels_last {settings.channels_last}, loader workers {settings.workers}",
        flush=True,
    )

    for flag, folder in (
        ("--model-dir", Path(args.model_dir)),
        ("--output-data-dir", Path(args.output_data_dir)),
        ("--checkpoint-dir", settings.checkpoint_dir),
        ("--tensorboard-dir", settings.tensorboard_dir),
    ):
        if folder is not None:  # fail now, not after the first epoch
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise TrainingError(f"argument {flag}: cannot create {folder} ({error.strerror})") from error
    train_index, valid_index = _load_channels(settings)
    class_names = train_index.class_names
    config = modeling.ModelConfig(
        architecture=args.architecture,
        num_classes=len(class_names),
        class_names=class_names,
        hidden_units=args.hidden_units,
        dropout=args.dropout,
        input_size=args.input_size,
        resize_size=settings.resize_size,
    )

    pin = device.type == "cuda"
    batch_size = min(args.batch_size, len(train_index.samples))
    train_set = data.ImageDataset(
        train_index.samples,
        args.input_size,
        settings.resize_size,
        train=True,
        seed=args.seed,
        horizontal_flip=args.horizontal_flip is not False,
    )
    valid_set = data.ImageDataset(valid_index.samples, args.input_size, settings.resize_size, train=False)
    # drop_last: a final batch of one image would break batch norm in train mode.
    train_loader = data.make_loader(
        train_set, batch_size, shuffle=True, workers=settings.workers, pin_memory=pin, seed=args.seed, drop_last=True
    )
    valid_loader = data.make_loader(valid_set, batch_size, shuffle=False, workers=settings.workers, pin_memory=pin)
    normalize = data.BatchNormalizer(
        config.mean, config.std, device, settings.channels_last, reuse_output=device.type == "cpu"
    )

    checkpoint = None
    if settings.checkpoint_dir is not None:
        checkpoint = load_newest_checkpoint(settings.checkpoint_dir)
    if checkpoint is not None:
        state, checkpoint_path = checkpoint
        differences = {
            key: (state["fingerprint"].get(key), value)
            for key, value in settings.fingerprint().items()
            if state["fingerprint"].get(key) != value
        }
        if state.get("class_names") != class_names:
            differences["class names"] = ("checkpoint's", "this channel's")
        if differences:
            detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differences.items())
            raise TrainingError(
                f"checkpoint {checkpoint_path} was written by a run with other settings ({detail}); "
                "pass an empty --checkpoint-dir to start fresh, or --checkpoint-dir none"
            )
        weights = "none"  # the checkpoint holds the weights: no download needed
    else:
        weights = settings.weights
        print(f"weights: {weights}", flush=True)

    model = _build_network(config, weights)
    frozen = modeling.freeze_backbone(model, args.architecture, settings.trainable_blocks)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"model {args.architecture}: {trainable:,} of {total:,} parameters train, {len(frozen)} backbone blocks frozen",
        flush=True,
    )
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = make_optimizer(model, args)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, args.epochs, args.scheduler)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp and settings.amp_dtype == torch.float16)
    history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "valid_loss": [], "valid_accuracy": [], "lr": []}
    start_epoch = 0
    resumed_from = None
    if checkpoint is not None:
        state, resumed_from = checkpoint
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The schedule is a function of this run's --epochs, which may differ from the stopped run's.
        factor = lr_factor(scheduler.last_epoch, steps_per_epoch, args.epochs, args.scheduler)
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * factor
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and len(state["rng_cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        history = {key: list(values) for key, values in state["history"].items()}
        start_epoch = int(state["epoch"])
        print(f"resumed from {resumed_from}: {start_epoch} of {args.epochs} epochs done", flush=True)
        if start_epoch >= args.epochs:
            print("all epochs were already done; writing the artifact from the checkpoint", flush=True)

    training_model: nn.Module = model
    if settings.num_gpus > 1:
        training_model = nn.DataParallel(model, device_ids=list(range(settings.num_gpus)))

    debugger = DebuggerHook()
    debugger.register(model, criterion)
    writer = open_tensorboard(settings.tensorboard_dir, purge_step=start_epoch + 1 if start_epoch else None)
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            train_loader.sampler.set_epoch(epoch)
            debugger.train()
            epoch_start = time.perf_counter()
            train_loss, images_per_second = train_one_epoch(
                training_model,
                train_loader,
                normalize,
                criterion,
                optimizer,
                scheduler,
                scaler,
                settings,
                epoch,
                args.epochs,
            )
            debugger.eval()
            valid_loss, valid_accuracy = evaluate(training_model, valid_loader, normalize, criterion, settings)
            lr = optimizer.param_groups[0]["lr"]
            print(contract.format_metrics_line(epoch, train_loss, valid_loss, valid_accuracy), flush=True)
            print(
                f"epoch {epoch}/{args.epochs} took {time.perf_counter() - epoch_start:.1f}s, "
                f"{images_per_second:.0f} train img/s, lr now {lr:.3g}",
                flush=True,
            )
            for key, value in (
                ("epoch", epoch),
                ("train_loss", train_loss),
                ("valid_loss", valid_loss),
                ("valid_accuracy", valid_accuracy),
                ("lr", lr),
            ):
                history[key].append(value)
            if writer is not None:
                writer.add_scalar("loss/train", train_loss, epoch)
                writer.add_scalar("loss/valid", valid_loss, epoch)
                writer.add_scalar("accuracy/valid", valid_accuracy, epoch)
                writer.add_scalar("lr", lr, epoch)
                writer.add_scalar("throughput/train_images_per_second", images_per_second, epoch)
                writer.flush()
            if settings.checkpoint_dir is not None:
                save_checkpoint(
                    settings.checkpoint_dir,
                    epoch,
                    {
                        "format": CHECKPOINT_FORMAT,
                        "epoch": epoch,
                        "fingerprint": settings.fingerprint(),
                        "class_names": class_names,
                        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng_cpu": torch.get_rng_state(),
                        "rng_cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                        "history": history,
                    },
                )
    finally:
        if writer is not None:
            writer.close()
        debugger.close()

    model.eval()
    hyperparameters = settings.hyperparameters()
    hyperparameters["weights"] = settings.weights
    model_dir = modeling.save_artifact(model, args.model_dir, config, hyperparameters)
    print(f"model artifact (last epoch's weights) written to {model_dir}", flush=True)
    output_dir = Path(args.output_data_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    skipped = train_index.skipped + valid_index.skipped
    if skipped:
        (output_dir / SKIPPED_FILES_REPORT).write_text(json.dumps(skipped, indent=2))
    if history["epoch"]:
        best = max(range(len(history["epoch"])), key=lambda i: history["valid_accuracy"][i])
        print(
            f"best validation accuracy {history['valid_accuracy'][best]:.4f} at epoch {history['epoch'][best]}; "
            f"the artifact holds epoch {history['epoch'][-1]}",
            flush=True,
        )
        curves = write_curves(history, output_dir / CURVES_IMAGE)
        if curves is not None:
            print(f"training curves: {curves}", flush=True)
    return TrainingResult(model, config, history, model_dir, resumed_from, skipped)


def _write_failure_reason(message: str) -> None:
    """SageMaker shows /opt/ml/output/failure as the job's FailureReason."""
    output_dir = os.environ.get("SM_OUTPUT_DIR")
    if output_dir and Path(output_dir).is_dir():
        (Path(output_dir) / "failure").write_text(message[:1024])


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    try:
        args = parser.parse_args(argv)
        settings = resolve_settings(args, parser)
    except SystemExit as stop:  # argparse printed the usage and the flag's problem
        return int(stop.code or 0)
    try:
        run_training(settings)
    except (TrainingError, data.DataError) as error:  # DataError: an image that no longer decodes, mid-epoch
        print(f"error: {error}", file=sys.stderr, flush=True)
        _write_failure_reason(str(error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
