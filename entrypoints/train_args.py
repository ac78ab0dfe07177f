"""The flags of entrypoints/train.py and their defaults: the one place a training default is written.

Shipped beside train.py in the training ``sourcedir`` and importable without torch, so the pipeline builder reads
a default here (``get_args_parser().get_default("seed")``) instead of keeping a copy. The pipeline passes only the
hyperparameters it sets: the pipeline parameters (architecture, epochs), the tuned ones, and a preset's overrides.
The flags fall into groups, one helper each: model, optimisation, speed, several processes, data and outputs.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

try:  # works both as ``entrypoints.train_args`` and beside ``python train.py`` inside the training container
    from . import contract
except ImportError:  # pragma: no cover - exercised by the script-mode tests in a subprocess
    import contract  # type: ignore[no-redef]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "step", "none")
LR_SCALING = ("none", "linear")
SAGEMAKER_BASE_DIR = "/opt/ml"  # the training toolkit's base folder inside a SageMaker container
CHECKPOINT_CONFIG_FILE = "checkpointconfig.json"  # SageMaker writes it when the job has a CheckpointConfig
TENSORBOARD_CONFIG_FILE = "tensorboardoutputconfig.json"  # ... and this one with a TensorBoardOutputConfig


# --- flag types -------------------------------------------------------------------------------------------------------


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


_positive_int = functools.partial(_number, int, minimum=0, strict=True)
_non_negative_int = functools.partial(_number, int, minimum=0)
_int = functools.partial(_number, int)
_positive_float = functools.partial(_number, float, minimum=0.0, strict=True)
_non_negative_float = functools.partial(_number, float, minimum=0.0)


def _fraction(value: str) -> float:
    number = _number(float, value, 0.0, 1.0)
    if number >= 1.0:
        raise argparse.ArgumentTypeError(f"must be < 1, got {value!r}")
    return number


def _trainable_blocks(value: str) -> str:
    text = str(value).strip().lower()
    if text == contract.TRAINABLE_ALL:
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


def _toolkit_folder(variable: str, below_base: str) -> Path | None:
    """A folder of the training toolkit's environment: from its ``SM_*`` variable, else inside a real SageMaker
    container (``/opt/ml/input/config/resourceconfig.json`` exists) the container's own; None elsewhere."""
    if os.environ.get(variable):
        return Path(os.environ[variable])
    if Path(SAGEMAKER_BASE_DIR, "input", "config", "resourceconfig.json").is_file():
        return Path(SAGEMAKER_BASE_DIR, below_base)
    return None


def _config_local_path(name: str) -> str | None:
    """``LocalPath`` of one of SageMaker's output configs (checkpoints, TensorBoard) in the input config folder."""
    config_dir = _toolkit_folder("SM_INPUT_CONFIG_DIR", "input/config")
    path = config_dir / name if config_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        local_path = json.loads(path.read_text()).get("LocalPath")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return str(local_path) if local_path else None


def _default_checkpoint_dir() -> str | None:
    """The job's CheckpointConfig folder, else ``<toolkit base>/checkpoints``; no default for a plain command.

    The base is the training toolkit's (``SM_INPUT_DIR`` = ``<base>/input``): ``/opt/ml`` in a container, the
    ``SAGEMAKER_BASE_DIR`` of a toolkit environment on a developer's machine, so a later run in that same
    environment resumes there. A plain command has none: a folder shared by unrelated runs is how one run's
    checkpoint used to become another's model.
    """
    configured = _config_local_path(CHECKPOINT_CONFIG_FILE)
    if configured:
        return configured
    input_dir = _toolkit_folder("SM_INPUT_DIR", "input")
    return str(input_dir.parent / "checkpoints") if input_dir is not None else None


def _default_tensorboard_dir() -> str | None:
    """The job's TensorBoardOutputConfig folder, else ``<toolkit output>/tensorboard`` when that exists."""
    configured = _config_local_path(TENSORBOARD_CONFIG_FILE)
    if configured:
        return configured
    output_dir = _toolkit_folder("SM_OUTPUT_DIR", "output")
    folder = output_dir / "tensorboard" if output_dir is not None else None
    return str(folder) if folder is not None and folder.is_dir() else None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (the help then says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def get_args_parser(architectures: Sequence[str] = (), backends: Sequence[str] = ()) -> argparse.ArgumentParser:
    """train.py's parser. ``architectures`` and ``backends`` are the accepted values of --architecture and
    --dist-backend (train.py passes modeling's and distributed's, which need torch); left empty, any value
    passes, which is enough for reading the defaults."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a torchvision CNN for image classification (SageMaker training entry point).",
        formatter_class=_HelpFormatter,
    )
    _add_model_flags(parser, architectures)
    _add_optimisation_flags(parser)
    _add_speed_flags(parser)
    _add_distributed_flags(parser, backends)
    _add_path_flags(parser)
    return parser


def _add_model_flags(parser: argparse.ArgumentParser, architectures: Sequence[str]) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--architecture",
        type=_choice(architectures) if architectures else str,
        default="resnet50",
        help=f"torchvision network: {', '.join(architectures) or 'a torchvision classification model'}",
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


def _add_optimisation_flags(parser: argparse.ArgumentParser) -> None:
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
    optim.add_argument(
        "--lr-scaling",
        type=_choice(LR_SCALING),
        default="none",
        help="learning rate for several processes: 'none' uses --lr as given, 'linear' multiplies it by the number "
        "of processes (the global batch grows with them; --batch-size is per process)",
    )
    optim.add_argument(
        "--seed", type=_int, default=42, help="seed for initialisation, shuffling and augmentation (+ rank for dropout)"
    )
    _add_switch(
        optim,
        "horizontal-flip",
        "random horizontal flips in training (default: on; turn off where a mirror image means something else: "
        "digits, text)",
    )


def _add_speed_flags(parser: argparse.ArgumentParser) -> None:
    speed = parser.add_argument_group("speed")
    speed.add_argument(
        "--workers",
        type=_workers,
        default="auto",
        help="data-loading processes; 'auto' = one per available CPU, shared by the processes of this host",
    )
    _add_switch(speed, "amp", "automatic mixed precision (default: on with a GPU; bfloat16 on CPU when asked)")
    _add_switch(speed, "channels-last", "NHWC memory layout (default: on)")
    speed.add_argument(
        "--num-gpus",
        type=_non_negative_int,
        default=_env("SM_NUM_GPUS"),
        help="GPUs to use (SM_NUM_GPUS; default: all visible); 0 = CPU, >1 = DataParallel in one process; "
        "under torchrun each process uses one GPU (LOCAL_RANK)",
    )


def _add_distributed_flags(parser: argparse.ArgumentParser, backends: Sequence[str]) -> None:
    ranks = parser.add_argument_group("several processes (under torchrun, as SageMaker's torch_distributed runs it)")
    ranks.add_argument(
        "--dist-backend",
        type=_choice(backends) if backends else str,
        default="auto",
        help="collective backend: auto = nccl on GPUs, gloo on CPUs",
    )
    ranks.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=600,
        help="seconds a rank waits for the others in a collective before the run fails (a stuck or lost rank)",
    )
    _add_switch(
        ranks,
        "sync-batchnorm",
        "batch-norm statistics over the global batch instead of each process's (GPUs only; default: off)",
    )


def _add_path_flags(parser: argparse.ArgumentParser) -> None:
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
        default=_default_checkpoint_dir(),
        help="per-epoch checkpoints, resumed by a later run with the same settings and data (default: the "
        "job's CheckpointConfig folder, which SageMaker syncs with checkpoint_s3_uri, or <toolkit base>/checkpoints "
        "in a training-toolkit environment; none for a plain command); 'none' turns checkpointing off",
    )
    paths.add_argument(
        "--tensorboard-dir",
        default=_default_tensorboard_dir(),
        help="TensorBoard scalars (SageMaker's TensorBoard output folder when the job has one); 'none' = off",
    )
