"""Names and formats that training, evaluation, serving and the pipeline must agree on.

This module is shipped inside the training ``source_dir`` and inside every model artifact's ``code/``
folder, so it may import nothing but the standard library. ``pipelines/config.py`` re-exports what the
pipeline needs from here, so each value is written down once.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

# --- files of the data contract (the processing step writes them, training reads them) -------------------
LABELS_FILE = "labels.json"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "valid", "test")

# --- the model artifact (SM_MODEL_DIR -> model.tar.gz) ----------------------------------------------------
WEIGHTS_FILE = "model.pt"  # a plain state_dict: loads with torch.load(weights_only=True)
MODEL_CONFIG_FILE = "model_config.json"
HYPERPARAMETERS_FILE = "hyperparameters.json"
CODE_DIR = "code"
# Files copied from entrypoints/ into <model>/code/ so the serving container needs no repack step.
SERVING_CODE_FILES = ("inference.py", "modeling.py", "transforms.py", "contract.py")
SERVING_REQUIREMENTS_FILE = "requirements-serving.txt"  # copied as code/requirements.txt
# The Ray Serve app at the artifact's root (AWS's Ray Serve inference container runs `serve run config.yaml`
# with <model> and <model>/code on PYTHONPATH): the config (one application, route prefix /) and the module it
# names, a thin wrapper over code/inference.py. Both are copied from entrypoints/ under these names.
RAY_SERVE_CONFIG_FILE = "config.yaml"
RAY_SERVE_CONFIG_TEMPLATE = "ray_serve_config.yaml"  # entrypoints/ name of config.yaml
RAY_SERVE_MODULE_FILE = "deployment.py"
# What the evaluation step adds to the artifact it registers (the served artifact): the precision it chose after
# scoring fp32 and int8 on the test split (and why), the statically quantised network when int8 was built, and,
# when it ships ONNX Runtime for an image that lacks it, the wheels under code/ that code/requirements.txt names.
SERVING_DECISION_FILE = "serving.json"
INT8_MODEL_FILE = "model.int8.onnx"
WHEELS_DIR = "wheels"  # <model>/code/wheels: installed by code/requirements.txt with no package index
PRECISIONS = ("fp32", "int8")

# --- image preprocessing shared by training, evaluation and serving ----------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 224  # the crop the network sees
DEFAULT_RESIZE_SIZE = 256  # short side before the centre crop (and the processing step's default)
TRAINABLE_ALL = "all"  # --trainable-blocks value that fine-tunes the whole backbone

# --- metrics the training script logs, once per epoch -------------------------------------------------------
OBJECTIVE_METRIC = "valid_accuracy"
_FLOAT = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
METRIC_NAMES = ("train_loss", "valid_loss", "valid_accuracy")
# Metric definitions in the shape SageMaker's estimator and tuner take (Name/Regex).
METRIC_DEFINITIONS = [{"Name": name, "Regex": rf"\b{name}={_FLOAT}"} for name in METRIC_NAMES]
METRIC_DEFINITIONS.append({"Name": "epoch", "Regex": rf"\bepoch={_FLOAT}"})


def format_metrics_line(epoch: int, train_loss: float, valid_loss: float, valid_accuracy: float) -> str:
    """The one line per epoch that the tuner's and Studio's metric regexes read."""
    return f"epoch={epoch} train_loss={train_loss:.6f} valid_loss={valid_loss:.6f} valid_accuracy={valid_accuracy:.6f}"


def parse_metrics(log_text: str) -> list[dict[str, float]]:
    """Read every metrics line of a training log with the same regexes the tuner uses.

    Returns one dict per epoch line, in order. A line counts only when all metrics are on it.
    """
    patterns = {d["Name"]: re.compile(d["Regex"]) for d in METRIC_DEFINITIONS}
    rows = []
    for line in log_text.splitlines():
        row = {}
        for name, pattern in patterns.items():
            match = pattern.search(line)
            if match:
                row[name] = float(match.group(1))
        if len(row) == len(patterns):
            rows.append(row)
    return rows


# --- evaluation report (SageMaker model-quality format, doubles as the registry's ModelMetrics) --------------
EVALUATION_FILE = "evaluation.json"
CONFUSION_MATRIX_IMAGE = "confusion_matrix.png"
ACCURACY_JSON_PATH = "multiclass_classification_metrics.accuracy.value"


def value_at(document: Any, dotted_path: str) -> Any:
    """The value at ``"a.b.c"`` in nested objects (a JsonGet path without list indices, such as
    ACCURACY_JSON_PATH), or None where the path is absent."""
    value = document
    for key in dotted_path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def accuracy_from_report(report: Any) -> float | None:
    """The accuracy of an evaluation report, at the path the ConditionStep reads; None if it has none."""
    value = value_at(report, ACCURACY_JSON_PATH)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# --- the endpoint contract ------------------------------------------------------------------------------------
IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image")
JSON_CONTENT_TYPE = "application/json"
REQUEST_CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, JSON_CONTENT_TYPE)
RESPONSE_CONTENT_TYPES = (JSON_CONTENT_TYPE,)
DEFAULT_TOP_K = 5
MAX_BATCH_IMAGES = 32
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused as possible decompression bombs
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # SageMaker real-time endpoints refuse larger request bodies
# Environment variables the serving handlers read (set them on the SageMaker Model / endpoint config).
ENV_INFERENCE_RUNTIME = "INFERENCE_RUNTIME"  # auto (default) | onnxruntime | torchscript | eager
ENV_INFERENCE_THREADS = "INFERENCE_NUM_THREADS"  # intra-op threads per model-server worker
ENV_JPEG_DRAFT_FACTOR = "INFERENCE_JPEG_DRAFT_FACTOR"  # 0 = decode JPEGs at full size (see inference.py)
ENV_MODEL_SERVER_WORKERS = "SAGEMAKER_MODEL_SERVER_WORKERS"  # the toolkit's own: worker processes per model
# ... and the Ray Serve deployment (deployment.py): replicas per instance and requests each replica takes at once.
ENV_SERVE_REPLICAS = "INFERENCE_REPLICAS"  # default: one per GPU, else one per 4 vCPUs
ENV_SERVE_MAX_ONGOING_REQUESTS = "INFERENCE_MAX_ONGOING_REQUESTS"  # default: 2 x threads per replica, at least 4
ENV_SERVE_MODEL_DIR = "SM_MODEL_DIR"  # where deployment.py finds the model; default: the folder it lies in
ENV_INFERENCE_PRECISION = "INFERENCE_PRECISION"  # auto (default: the artifact's serving.json) | fp32 | int8
# Dynamic batching of single-image requests in a replica: up to this many images per forward (1 turns it off),
# a request waiting at most this long for others to join it.
ENV_SERVE_MAX_BATCH_SIZE = "INFERENCE_MAX_BATCH_SIZE"
ENV_SERVE_BATCH_WAIT_MS = "INFERENCE_BATCH_WAIT_MS"
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_MS = 5.0


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks (input archives, pretrained weights of hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- the machine ---------------------------------------------------------------------------------------------------


def available_cpus() -> int:
    """CPUs this process may use (the container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1
