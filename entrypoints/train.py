"""Fine-tune a torchvision CNN on an ImageFolder channel: every tuning trial and the final training run this.

Runs under SageMaker's training contract (hyperparameters as ``--key value`` flags, channels and output folders
from ``SM_*`` environment variables, checkpoints where the job's CheckpointConfig says) and as a plain local
command::

    python entrypoints/train.py --train-dir data/train --valid-dir data/valid --model-dir runs/model \\
        --architecture resnet18 --weights none --epochs 3 --input-size 64

It runs unchanged under ``torchrun`` (SageMaker's ``torch_distributed`` launcher), one process per GPU on any
number of instances: DistributedDataParallel, a sharded sampler, metrics summed over the ranks, and rank 0
alone printing, writing TensorBoard, checkpoints and the artifact (``distributed.py``)::

    python -m torch.distributed.run --nproc-per-node 2 entrypoints/train.py ... --lr-scaling linear

Per epoch it prints one metrics line (``contract.format_metrics_line``: the tuner's regexes read it), writes
TensorBoard scalars when TensorBoard is importable and a folder is set, and saves a checkpoint it resumes from
when started again with the same settings and data (``checkpoints.py``; managed spot training). At the end it
writes the model artifact of the contract (``modeling.save_artifact``: the last epoch's weights,
model_config.json, hyperparameters.json, code/) and ``training_curves.png`` + ``training_history.json`` in the
output-data folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:  # works both as ``entrypoints.train`` and as ``python train.py`` inside the training container
    from . import checkpoints, contract, data, distributed, modeling, tracking, train_args
except ImportError:  # pragma: no cover - exercised by the script-mode tests in a subprocess
    import checkpoints  # type: ignore[no-redef]
    import contract  # type: ignore[no-redef]
    import data  # type: ignore[no-redef]
    import distributed  # type: ignore[no-redef]
    import modeling  # type: ignore[no-redef]
    import tracking  # type: ignore[no-redef]
    import train_args  # type: ignore[no-redef]

DEBUGGER_CONFIG_ENV = "SMDEBUG_CONFIG_FILE_PATH"  # smdebug's own override of the path below
DEBUGGER_CONFIG_FILE = "/opt/ml/input/config/debughookconfig.json"
CURVES_IMAGE = "training_curves.png"
HISTORY_FILE = "training_history.json"
SKIPPED_FILES_REPORT = "skipped_files.json"
FAILURE_FILE = "failure"  # in SM_OUTPUT_DIR: SageMaker shows its first 1024 characters as the FailureReason
DISABLED = ("", "none", "off", "false")
# The flags that are hyperparameters as given (Settings.hyperparameters adds those it resolves), in their order.
HYPERPARAMETER_FLAGS = (
    "architecture", "weights", "epochs", "batch-size", "lr", "lr-scaling", "optimizer", "weight-decay", "eps",
    "label-smoothing", "dropout", "hidden-units", "trainable-blocks", "scheduler", "seed", "input-size",
)  # fmt: skip
_PROCESS_STARTED = time.time()  # a failure file older than this is an earlier run's


class TrainingError(Exception):
    """A failure the user can act on: printed as one line (and as SageMaker's failure reason), exit status 1."""


class NonFiniteLossError(TrainingError):
    pass


def get_args_parser() -> argparse.ArgumentParser:
    """The flags (entrypoints/train_args.py, where every default is written) with the architectures and
    collective backends this code can build."""
    return train_args.get_args_parser(tuple(modeling.ARCHITECTURES), distributed.BACKENDS)


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
    world: distributed.World = field(default_factory=distributed.World)
    backend: str = "gloo"

    @property
    def lr(self) -> float:
        """The learning rate the optimiser gets: ``--lr``, times the number of processes with linear scaling."""
        return self.args.lr * (self.world.world_size if self.args.lr_scaling == "linear" else 1)

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters this run used, keyed like the flags (without "--"), as the pipeline passes them."""
        values = {flag: getattr(self.args, flag.replace("-", "_")) for flag in HYPERPARAMETER_FLAGS}
        return {
            **values,
            "resize-size": self.resize_size,
            "horizontal-flip": self.args.horizontal_flip is not False,
            "sync-batchnorm": bool(self.args.sync_batchnorm) and self.world.world_size > 1,
        }

    def run_arguments(self, global_batch: int) -> dict[str, Any]:
        """The hyperparameters as this run resolved them: the artifact's hyperparameters.json and MLflow's params."""
        return {
            **self.hyperparameters(),
            "weights": self.weights,
            "processes": self.world.world_size,
            "global-batch-size": global_batch,
            "effective-lr": self.lr,
        }


def _resolve_device(args: argparse.Namespace, world: distributed.World, parser: argparse.ArgumentParser):
    """(device, GPUs this process uses, collective backend); one GPU per process under torchrun."""
    cuda_count = torch.cuda.device_count()
    num_gpus = cuda_count if args.num_gpus is None else args.num_gpus
    if num_gpus > cuda_count:
        parser.error(f"argument --num-gpus: {num_gpus} asked for but {cuda_count} CUDA device(s) are visible")
    if num_gpus > 0 and world.launched:
        if world.local_world_size > cuda_count and args.dist_backend != "gloo":
            parser.error(
                f"argument --num-gpus: torchrun started {world.local_world_size} processes on this host but "
                f"{cuda_count} GPU(s) are visible: start one process per GPU (--nproc-per-node {cuda_count}), "
                "or pass --dist-backend gloo to share GPUs"
            )
        device, num_gpus = torch.device("cuda", world.local_rank % cuda_count), 1
    else:
        device = torch.device("cuda" if num_gpus > 0 else "cpu")
    backend = distributed.backend_for(args.dist_backend, device)
    if backend == "nccl" and device.type != "cuda":
        parser.error("argument --dist-backend: nccl needs GPUs and this run uses the CPU; use gloo (or auto)")
    if args.sync_batchnorm and world.world_size > 1 and device.type != "cuda":
        parser.error("argument --sync-batchnorm: PyTorch's SyncBatchNorm runs on GPUs only, and this run uses the CPU")
    return device, num_gpus, backend


def _disabled(value: str | None) -> bool:
    return value is None or str(value).strip().lower() in DISABLED


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

    try:
        world = distributed.from_environment()
    except distributed.LaunchError as error:
        parser.error(f"torchrun's environment: {error}")
    device, num_gpus, backend = _resolve_device(args, world, parser)
    amp = device.type == "cuda" if args.amp is None else args.amp
    # float16 only on a GPU without bfloat16 (CPU autocast supports bfloat16 only)
    amp_dtype = torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
    channels_last = True if args.channels_last is None else args.channels_last  # NHWC: faster on CPUs as on GPUs
    workers = data.auto_workers(world.local_world_size) if args.workers == "auto" else int(args.workers)
    resize_size = args.resize_size or round(
        args.input_size * contract.DEFAULT_RESIZE_SIZE / contract.DEFAULT_INPUT_SIZE
    )
    if resize_size < args.input_size:
        parser.error(f"argument --resize-size: {resize_size} is smaller than --input-size {args.input_size}")
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
        checkpoint_dir=None if _disabled(args.checkpoint_dir) else Path(args.checkpoint_dir),
        tensorboard_dir=None if _disabled(args.tensorboard_dir) else Path(args.tensorboard_dir),
        weights=weights,
        world=world,
        backend=backend,
    )


# --- optimiser and schedule ----------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
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
        make, options = torch.optim.SGD, {"momentum": 0.9, "nesterov": True}
    else:
        make, options = torch.optim.AdamW, {"eps": args.eps}
    try:  # one kernel per step instead of one per parameter: about 15 % of a small CPU model's step (torch >= 2.4)
        return make(groups, lr=lr, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the fused kernel
        return make(groups, lr=lr, **options)


def lr_factor(step: int, steps_per_epoch: int, epochs: int, scheduler: str) -> float:
    """Learning-rate multiplier after ``step`` optimiser steps (a pure function: resumes exactly)."""
    total = max(1, steps_per_epoch * epochs)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if scheduler == "step":
        epoch = step // max(1, steps_per_epoch)
        return 0.1 ** sum(epoch >= milestone for milestone in (epochs * 0.5, epochs * 0.75))
    return 1.0


# --- what the log shows --------------------------------------------------------------------------------------------

_LOGGING = {"main": True}  # rank 0 (or a plain command) prints the log; other ranks print only their own errors


def log(message: str) -> None:
    if _LOGGING["main"]:
        print(message, flush=True)


# --- Debugger, TensorBoard, progress -------------------------------------------------------------------------------


class DebuggerHook:
    """SageMaker Debugger through smdebug when it is importable and the job carries a hook config.

    Registers the model (weights of frozen layers included, gradients of trainable ones) and the loss module,
    and switches TRAIN/EVAL modes, which is what the built-in rules (loss not decreasing, overfit, vanishing
    gradient, poor weight initialisation) read.

    With several processes the hook stays off. SageMaker documents Debugger as unavailable for jobs that
    combine a distributed option with checkpoints ("Considerations for Amazon SageMaker Debugger",
    docs.aws.amazon.com/sagemaker/latest/dg/debugger-considerations.html), and the SDK then sends no hook
    config (``Framework._validate_and_set_debugger_configs``); torchrun is not among the launchers whose
    tensors it supports. The job's rules are configured by the pipeline, not here.
    """

    def __init__(self, processes: int = 1) -> None:
        self.hook = None
        self.modes = None
        config_path = os.environ.get(DEBUGGER_CONFIG_ENV, DEBUGGER_CONFIG_FILE)
        if processes > 1:
            log(
                f"Debugger: hook off with {processes} processes (SageMaker supports no Debugger hook in distributed "
                "jobs with checkpoints)"
            )
            return
        if not Path(config_path).is_file():
            log(f"Debugger: off (no hook config at {config_path})")
            return
        try:
            import smdebug.pytorch as smd
        except ImportError:
            log(
                f"Debugger: the job has a hook config ({config_path}) but smdebug is not installed; "
                "training runs without the Debugger hook"
            )
            return
        self.hook = smd.get_hook(create_if_not_exists=True)
        self.modes = smd.modes
        if self.hook is None:  # smdebug found no config after all
            log(f"Debugger: smdebug created no hook from {config_path}; off")
        else:
            log(f"Debugger: hook created from {config_path}")

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
        log("TensorBoard: off (no --tensorboard-dir)")
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        log(f"TensorBoard: off (cannot import it: {error})")
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    log(f"TensorBoard: scalars in {log_dir}")
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class Progress:
    """A tqdm bar on a terminal, otherwise about ten plain lines per epoch (CloudWatch-friendly); rank 0's only.

    Never writes ``name=value`` pairs: the tuner's metric regexes must only match the per-epoch metrics line.
    With several processes the figures are rank 0's (its loss, its images/s times the number of processes).
    """

    def __init__(self, epoch: int, epochs: int, steps: int) -> None:
        self.prefix = f"epoch {epoch}/{epochs}"
        self.steps = steps
        self.every = max(1, steps // 10)
        self.bar = None
        if sys.stderr.isatty() and _LOGGING["main"]:
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
            log(f"{self.prefix} step {step}/{self.steps} loss {loss:.4f} {images_per_second:.0f} img/s")

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
        log("training curves: matplotlib is not installed; no picture")
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
        log(f"{name}: {len(index.samples)} images in {len(counts)} classes")
        if empty:
            log(f"{name}: {len(empty)} classes have no images: {empty[:10]}")
        for item in index.skipped:
            log(f"{name}: skipped {item['path']}: {item['reason']}")
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


@dataclass
class Batches:
    """This rank's loaders: an equal share of the shuffled train set, a disjoint share of the valid set."""

    train: Any
    valid: Any
    normalize: data.BatchNormalizer
    per_process: int

    def global_batch(self, settings: Settings) -> int:
        return self.per_process * settings.world.world_size


def make_batches(
    settings: Settings, train_index: data.ChannelIndex, valid_index: data.ChannelIndex, config: modeling.ModelConfig
) -> Batches:
    args, world, device = settings.args, settings.world, settings.device
    shard = math.ceil(len(train_index.samples) / world.world_size)
    if shard < 2:
        raise TrainingError(
            f"the train channel {args.train_dir} has {len(train_index.samples)} images: fewer than 2 for each of "
            f"{world.world_size} processes"
        )
    batch_size = min(args.batch_size, shard)
    pin = device.type == "cuda"
    train_set = data.ImageDataset(
        train_index.samples,
        args.input_size,
        settings.resize_size,
        train=True,
        seed=args.seed,
        horizontal_flip=args.horizontal_flip is not False,
    )
    valid_set = data.ImageDataset(valid_index.samples, args.input_size, settings.resize_size, train=False)
    shards = {"num_replicas": world.world_size, "rank": world.rank}
    # drop_last: a final batch of one image would break batch norm in train mode.
    train_loader = data.make_loader(
        train_set, batch_size, True, settings.workers, pin, args.seed, drop_last=True, pad_shards=True, **shards
    )
    valid_loader = data.make_loader(valid_set, batch_size, False, settings.workers, pin, **shards)
    normalize = data.BatchNormalizer(
        config.mean, config.std, device, settings.channels_last, reuse_output=device.type == "cpu"
    )
    return Batches(train_loader, valid_loader, normalize, batch_size)


@dataclass
class Trainee:
    """The network and what trains it; ``training_model`` wraps ``model`` (DDP, DataParallel) or is it."""

    model: nn.Module
    training_model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


def build_trainee(settings: Settings, config: modeling.ModelConfig, weights: str, steps_per_epoch: int) -> Trainee:
    args, device, world = settings.args, settings.device, settings.world
    model = _build_network(config, weights)
    frozen = modeling.freeze_backbone(model, args.architecture, settings.trainable_blocks)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"model {args.architecture}: {trainable:,} of {total:,} parameters train, {len(frozen)} backbone blocks frozen")
    if settings.hyperparameters()["sync-batchnorm"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters and state_dict keys
    elif args.sync_batchnorm:
        log("--sync-batchnorm: one process, nothing to synchronise")
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = make_optimizer(model, args, settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, args.epochs, args.scheduler)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp and settings.amp_dtype == torch.float16)
    training_model: nn.Module = model
    if world.launched:  # DDP sends rank 0's parameters and buffers to every rank here
        device_ids = [device.index] if device.type == "cuda" else None
        training_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    elif settings.num_gpus > 1:
        training_model = nn.DataParallel(model, device_ids=list(range(settings.num_gpus)))
    return Trainee(model, training_model, criterion, optimizer, scheduler, scaler)


def train_one_epoch(trainee: Trainee, batches: Batches, settings: Settings, epoch: int) -> tuple[float, int, float]:
    """One pass over this rank's train shard; returns (summed loss, images, seconds)."""
    model, optimizer, scheduler, scaler = trainee.training_model, trainee.optimizer, trainee.scheduler, trainee.scaler
    modeling.set_train_mode(model)
    device = settings.device
    autocast = torch.autocast(device.type, dtype=settings.amp_dtype) if settings.amp else nullcontext()
    progress = Progress(epoch, settings.args.epochs, len(batches.train))
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    try:
        for step, (images, labels) in enumerate(batches.train, start=1):
            inputs = batches.normalize(images)
            targets = labels.to(device, non_blocking=True)
            with autocast:
                loss = trainee.criterion(model(inputs), targets)
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
            rate = seen * settings.world.world_size / max(time.perf_counter() - start, 1e-9)
            progress.update(step, loss_value, rate)
    finally:
        progress.close()
    return total_loss, seen, time.perf_counter() - start


def evaluate(
    model: nn.Module, loader, normalize: data.BatchNormalizer, criterion: nn.Module, settings: Settings
) -> tuple[float, int, int]:
    """(summed loss, correct predictions, images) over this rank's valid shard."""
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
    return total_loss.item(), int(correct.item()), seen


# --- resuming --------------------------------------------------------------------------------------------------


def resume_fingerprint(settings: Settings, global_batch: int, data_digests: dict[str, str]) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: every input that changes the result. Every hyperparameter
    (--epochs too: the schedule decays over them), the starting weights (a file by its bytes: its path differs
    from job to job), the global batch, the data of both channels, and the code."""
    values = settings.hyperparameters()
    if values["weights"] not in ("none", "imagenet"):
        values["weights"] = checkpoints.file_digest(Path(values["weights"]))
    values["global-batch-size"] = global_batch
    values.update({f"{name}-data": digest for name, digest in data_digests.items()})
    values["code"] = checkpoints.code_digest()
    return values


def agree_on_data(settings: Settings, train_index: data.ChannelIndex, valid_index: data.ChannelIndex):
    """Both channels' fingerprints, the same on every rank (each instance downloads its own copy)."""
    digests = {
        "train": data.channel_fingerprint(settings.args.train_dir, train_index),
        "valid": data.channel_fingerprint(settings.args.valid_dir, valid_index),
    }
    seen = distributed.gather(digests)
    differing = [rank for rank, other in enumerate(seen) if other != seen[0]]
    if differing:
        raise TrainingError(
            f"the channels differ between ranks (rank {differing[0]} sees other data than rank 0): every instance "
            "needs the whole train and valid channels (S3DistributionType FullyReplicated)"
        )
    return digests


def choose_checkpoint(settings: Settings, fingerprint: dict[str, Any]) -> tuple[dict[str, Any], Path] | None:
    """Rank 0 picks the checkpoint (or a fresh start, saying why); every rank then loads that same file."""
    if settings.checkpoint_dir is None:
        why = "--checkpoint-dir none" if settings.args.checkpoint_dir else "a plain command has no default folder"
        log(f"checkpoints: off ({why}; pass --checkpoint-dir DIR to resume later runs from it)")
        return None
    choice = None
    if settings.world.is_main:
        choice = checkpoints.choose(settings.checkpoint_dir, fingerprint)
        for line in (*choice.notes, choice.reason):
            if line:
                log(line)
    name = distributed.from_main(choice.path.name if choice and choice.path else None)
    if name is None:
        return None
    path = settings.checkpoint_dir / name
    state, problem = (choice.state, None) if choice is not None else (None, None)
    if state is None:
        try:
            state = checkpoints.load(path)
        except ValueError as error:
            problem = f"{error}: every instance needs the checkpoint folder's files (checkpoint_s3_uri does that)"
    problem = distributed.first_problem(problem)
    if problem:
        raise TrainingError(problem)
    return state, path


def restore(trainee: Trainee, state: dict[str, Any], settings: Settings) -> int:
    """Load a checkpoint into the trainee and this rank's RNG; returns the epochs it had done."""
    args, world = settings.args, settings.world
    trainee.model.load_state_dict(state["model"])
    trainee.optimizer.load_state_dict(state["optimizer"])
    trainee.scheduler.load_state_dict(state["scheduler"])  # the same --epochs: the same schedule, carried on
    trainee.scaler.load_state_dict(state["scaler"])
    epoch = int(state["epoch"])
    rng = state["rng"]
    if len(rng) == world.world_size:
        torch.set_rng_state(rng[world.rank]["cpu"])
        if settings.device.type == "cuda" and rng[world.rank]["cuda"].numel():
            torch.cuda.set_rng_state(rng[world.rank]["cuda"], settings.device)
    else:
        torch.manual_seed(args.seed + world.rank + 7919 * epoch)
        log(f"the checkpoint holds the random state of {len(rng)} processes, this run has {world.world_size}: reseeded")
    return epoch


def rng_states(settings: Settings) -> list[dict[str, torch.Tensor]]:
    """Every rank's CPU and CUDA random state, by rank (a collective: call it on every rank)."""
    device = settings.device
    own = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
    }
    return distributed.gather(own)


def checkpoint_state(
    trainee: Trainee, epoch: int, fingerprint: dict[str, Any], history: dict[str, list[float]], rng: list[Any]
) -> dict[str, Any]:
    """Everything a resumed run needs: rank 0's network, optimiser and schedule, and every rank's RNG."""
    return {
        "format": checkpoints.FORMAT,
        "epoch": epoch,
        "fingerprint": fingerprint,
        "model": {k: v.detach().cpu() for k, v in trainee.model.state_dict().items()},
        "optimizer": trainee.optimizer.state_dict(),
        "scheduler": trainee.scheduler.state_dict(),
        "scaler": trainee.scaler.state_dict(),
        "rng": rng,
        "history": history,
    }


# --- the run ---------------------------------------------------------------------------------------------------


def _make_output_folders(settings: Settings) -> None:
    """Rank 0 creates every output folder at start, so a bad path fails now, not after the first epoch."""
    args = settings.args
    if not settings.world.is_main:
        return
    for flag, folder in (
        ("--model-dir", Path(args.model_dir)),
        ("--output-data-dir", Path(args.output_data_dir)),
        ("--checkpoint-dir", settings.checkpoint_dir),
        ("--tensorboard-dir", settings.tensorboard_dir),
    ):
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise TrainingError(f"argument {flag}: cannot create {folder} ({error.strerror})") from error


def _announce(settings: Settings, session: distributed.Session, batches: Batches) -> None:
    """Device, processes, global batch and learning rate: what this run is, before it starts."""
    args = settings.args
    log(
        f"device {settings.device} (GPUs {settings.num_gpus}), amp {settings.amp}"
        f"{' ' + str(settings.amp_dtype).replace('torch.', '') if settings.amp else ''}, "
        f"channels_last {settings.channels_last}, loader workers {settings.workers}"
    )
    if session.active:
        ranks = "; ".join(f"rank {rank} pid {pid} on {host}" for rank, (host, pid) in enumerate(session.peers))
        log(f"processes {settings.world.world_size} ({settings.backend}, timeout {session.timeout_s:g} s): {ranks}")
    log(
        f"global batch {batches.global_batch(settings)} ({batches.per_process} per process x "
        f"{settings.world.world_size}); learning rate {settings.lr:g} (--lr {args.lr:g}, "
        f"--lr-scaling {args.lr_scaling})"
    )


def _epoch_metrics(sums: list[float]) -> dict[str, float]:
    train_loss, train_seen, valid_loss, correct, valid_seen = sums
    return {
        "train_loss": train_loss / max(train_seen, 1),
        "valid_loss": valid_loss / max(valid_seen, 1),
        "valid_accuracy": correct / max(valid_seen, 1),
    }


def _metrics_line(epoch: int, metrics: dict[str, float]) -> str:
    return contract.format_metrics_line(epoch, metrics["train_loss"], metrics["valid_loss"], metrics["valid_accuracy"])


TRACKED_METRICS = ("train_loss", "valid_loss", "valid_accuracy", "lr", "images_per_second")
# TensorBoard's tag of each tracked metric, in that order.
TENSORBOARD_TAGS = ("loss/train", "loss/valid", "accuracy/valid", "lr", "throughput/train_images_per_second")


def _record(writer, history: dict[str, list[float]], epoch: int, metrics: dict[str, float], tracker=None) -> None:
    for key in ("epoch", *TRACKED_METRICS):
        history.setdefault(key, []).append(epoch if key == "epoch" else metrics[key])
    if tracker is not None:
        tracker.log_metrics({key: metrics[key] for key in TRACKED_METRICS if key in metrics}, step=epoch)
    if writer is not None:
        for tag, key in zip(TENSORBOARD_TAGS, TRACKED_METRICS, strict=True):
            writer.add_scalar(tag, metrics[key], epoch)
        writer.flush()


def run_epochs(
    settings: Settings,
    session: distributed.Session,
    trainee: Trainee,
    batches: Batches,
    history: dict[str, list[float]],
    start_epoch: int,
    fingerprint: dict[str, Any],
    tracker: tracking.Tracker | None = None,
) -> None:
    """Train from ``start_epoch + 1`` to ``--epochs``: metrics summed over the ranks, rank 0 logs and saves."""
    args, world = settings.args, settings.world
    debugger = DebuggerHook(world.world_size)
    debugger.register(trainee.model, trainee.criterion)
    writer = None
    if world.is_main:
        writer = open_tensorboard(settings.tensorboard_dir, purge_step=start_epoch + 1 if start_epoch else None)
    # DataParallel spreads evaluation over the GPUs; under DDP each rank evaluates its shard with rank 0's buffers.
    evaluated = trainee.model if session.active else trainee.training_model
    key = checkpoints.key_of(fingerprint)
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            session.phase = f"epoch {epoch} training"
            batches.train.sampler.set_epoch(epoch)
            debugger.train()
            train_sum, train_seen, seconds = train_one_epoch(trainee, batches, settings, epoch)
            session.phase = f"epoch {epoch} evaluation"
            debugger.eval()
            distributed.broadcast_buffers(trainee.model)
            valid_sum, correct, valid_seen = evaluate(
                evaluated, batches.valid, batches.normalize, trainee.criterion, settings
            )
            sums = distributed.sum_across([train_sum, train_seen, valid_sum, correct, valid_seen], settings.device)
            metrics = _epoch_metrics(sums)
            metrics["lr"] = trainee.optimizer.param_groups[0]["lr"]
            metrics["images_per_second"] = sums[1] / max(seconds, 1e-9)
            log(_metrics_line(epoch, metrics))
            log(
                f"epoch {epoch}/{args.epochs} took {seconds:.1f}s, {metrics['images_per_second']:.0f} train img/s, "
                f"lr now {metrics['lr']:.3g}"
            )
            _record(writer, history, epoch, metrics, tracker if world.is_main else None)
            if settings.checkpoint_dir is not None:
                session.phase = f"epoch {epoch} checkpoint"
                rng = rng_states(settings)
                if world.is_main:
                    state = checkpoint_state(trainee, epoch, fingerprint, history, rng)
                    checkpoints.save(settings.checkpoint_dir, key, epoch, state)
    finally:
        if writer is not None:
            writer.close()
        debugger.close()


def write_outputs(
    settings: Settings,
    model: nn.Module,
    config: modeling.ModelConfig,
    history: dict[str, list[float]],
    skipped: list[dict[str, str]],
    global_batch: int,
) -> Path:
    """Rank 0: the artifact (with the arguments the run used), the history, the curves, the skipped files."""
    args = settings.args
    model.eval()
    model_dir = modeling.save_artifact(model, args.model_dir, config, settings.run_arguments(global_batch))
    log(f"model artifact (last epoch's weights) written to {model_dir}")
    output_dir = Path(args.output_data_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    if skipped:
        (output_dir / SKIPPED_FILES_REPORT).write_text(json.dumps(skipped, indent=2))
    if history.get("epoch"):
        best = max(range(len(history["epoch"])), key=lambda i: history["valid_accuracy"][i])
        log(
            f"best validation accuracy {history['valid_accuracy'][best]:.4f} at epoch {history['epoch'][best]}; "
            f"the artifact holds epoch {history['epoch'][-1]}"
        )
        curves = write_curves(history, output_dir / CURVES_IMAGE)
        if curves is not None:
            log(f"training curves: {curves}")
    return model_dir


def run_training(settings: Settings, session: distributed.Session | None = None) -> TrainingResult:
    """Train as the flags say and write the artifact (rank 0); returns the trained network and the history."""
    args, world = settings.args, settings.world
    session = session or distributed.Session(world, settings.backend, args.dist_timeout)
    _LOGGING["main"] = world.is_main
    torch.manual_seed(args.seed + world.rank)  # per-rank dropout; DDP gives every rank rank 0's initial weights
    if settings.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    _make_output_folders(settings)
    session.phase = "start-up"
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
    batches = make_batches(settings, train_index, valid_index, config)
    _announce(settings, session, batches)
    global_batch = batches.global_batch(settings)
    fingerprint = resume_fingerprint(settings, global_batch, agree_on_data(settings, train_index, valid_index))
    session.phase = "resuming"
    resumed = choose_checkpoint(settings, fingerprint)
    if resumed is None:
        log(f"weights: {settings.weights}")
    steps_per_epoch = len(batches.train)
    trainee = build_trainee(settings, config, "none" if resumed else settings.weights, steps_per_epoch)
    history: dict[str, list[float]] = {}
    start_epoch = 0
    if resumed is not None:
        state, path = resumed
        start_epoch = restore(trainee, state, settings)
        history = {key: list(values) for key, values in state["history"].items()}
        log(
            f"resumed from {path}: {start_epoch} of {args.epochs} epochs done; {checkpoints.same_training(fingerprint)}"
        )
        if start_epoch >= args.epochs:
            # A retried job must still give the tuner its objective: the last epoch's line, from the checkpoint.
            log("all epochs were already done; the last epoch's metrics, from the checkpoint:")
            log(_metrics_line(start_epoch, {key: values[-1] for key, values in history.items()}))
    tracker = start_tracking(settings, global_batch) if world.is_main else None
    try:
        if tracker is not None and start_epoch:  # a resumed job's run holds the earlier epochs too
            for index, epoch in enumerate(history.get("epoch", [])):
                done = {key: history[key][index] for key in TRACKED_METRICS if key in history}
                tracker.log_metrics(done, step=int(epoch))
        run_epochs(settings, session, trainee, batches, history, start_epoch, fingerprint, tracker)
        session.phase = "writing the artifact"
        model_dir, skipped = Path(args.model_dir), train_index.skipped + valid_index.skipped
        if world.is_main:
            model_dir = write_outputs(settings, trainee.model, config, history, skipped, global_batch)
            if tracker is not None:
                finish_tracking(tracker, settings, model_dir)
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    return TrainingResult(trainee.model, config, history, model_dir, resumed[1] if resumed else None, skipped)


# --- experiment tracking (MLflow, when MLFLOW_TRACKING_URI is set: entrypoints/tracking.py) --------------------------


def _job_name() -> str | None:
    if os.environ.get("TRAINING_JOB_NAME"):
        return os.environ["TRAINING_JOB_NAME"]
    try:
        return json.loads(os.environ.get("SM_TRAINING_ENV", "{}")).get("job_name")
    except (ValueError, AttributeError):
        return None


def start_tracking(settings: Settings, global_batch: int) -> tracking.Tracker | None:
    """Rank 0's MLflow run (None when no tracking URI is set): the hyperparameters as params, the job as tags."""
    if not tracking.configured():
        return None
    job_name = _job_name()
    tracker = tracking.Tracker.start(
        job_name or "train",
        tags={
            "job_name": job_name,
            "instance_type": os.environ.get("SM_CURRENT_INSTANCE_TYPE"),
            "processes": settings.world.world_size,
            "debugger_rules": os.environ.get(tracking.ENV_DEBUGGER_RULES, "none"),
            "device": settings.device.type,
        },
    )
    if not tracker.active:
        return None
    tracker.log_params(settings.run_arguments(global_batch))
    return tracker


def finish_tracking(tracker: tracking.Tracker, settings: Settings, model_dir: Path) -> None:
    """The curves, the history and the final arguments as artifacts; then the run ends."""
    output_dir = Path(settings.args.output_data_dir)
    tracker.log_artifact(output_dir / CURVES_IMAGE)
    tracker.log_artifact(output_dir / HISTORY_FILE)
    hyperparameters = Path(model_dir) / contract.HYPERPARAMETERS_FILE
    if hyperparameters.is_file():
        tracker.log_artifact(hyperparameters)
    else:
        tracker.log_dict(settings.hyperparameters(), "hyperparameters.json")
    tracker.end("FINISHED")


# --- failures ----------------------------------------------------------------------------------------------------


def _write_failure_reason(message: str) -> None:
    """SageMaker shows /opt/ml/output/failure as the job's FailureReason.

    The first rank to fail writes it; a later rank (which failed because of the first) leaves it alone. A file
    older than this process is an earlier run's and is replaced.
    """
    output_dir = os.environ.get("SM_OUTPUT_DIR")
    if not output_dir or not Path(output_dir).is_dir():
        return
    path = Path(output_dir) / FAILURE_FILE
    try:
        if path.stat().st_mtime < _PROCESS_STARTED:
            path.unlink()
    except FileNotFoundError:
        pass
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(message[:1024])


def _failure_message(settings: Settings, session: distributed.Session | None, error: BaseException) -> str | None:
    """This rank's account of ``error``, or None when it knows nothing beyond "stopped"."""
    if isinstance(error, (TrainingError, data.DataError, distributed.LaunchError)):
        return str(error)
    stopped = isinstance(error, distributed.Stopped)
    if session is not None and session.active and (stopped or distributed.is_collective_failure(error)):
        return distributed.explain_collective_failure(session, None if stopped else error)
    if stopped:
        return None
    traceback.print_exception(error)
    return f"{type(error).__name__} during {session.phase if session else 'start-up'}: {_first_line(error)}"


def report_failure(settings: Settings, session: distributed.Session | None, error: BaseException) -> int:
    """Print the error, write it as the job's failure reason (first rank wins), and return the exit status."""
    try:
        return _report(settings, session, error)
    finally:
        if session is not None and session.previous_sigterm is not None:  # ignored while the report was written
            signal.signal(signal.SIGTERM, session.previous_sigterm)


def _report(settings: Settings, session: distributed.Session | None, error: BaseException) -> int:
    message = _failure_message(settings, session, error)
    stopped = isinstance(error, distributed.Stopped)
    if message is not None:
        if settings.world.launched:
            message = f"{settings.world.label}: {message}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        _write_failure_reason(message)
    elif stopped:
        print(f"{settings.world.label}: {error}", file=sys.stderr, flush=True)
    return 128 + signal.SIGTERM if stopped else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    try:
        args = parser.parse_args(argv)
        settings = resolve_settings(args, parser)
    except SystemExit as stop:  # argparse printed the usage and the flag's problem
        return int(stop.code or 0)
    session = None
    try:
        session = distributed.Session(settings.world, settings.backend, args.dist_timeout)
        with distributed.joined(session, settings.device):
            run_training(settings, session)
    except (Exception, distributed.Stopped) as error:  # every failure is reported, then the exit status
        return report_failure(settings, session, error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
