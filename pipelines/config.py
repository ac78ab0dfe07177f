"""The one place for names, defaults, hyperparameter ranges, metric regexes and thresholds.

The SageMaker pipeline (``pipelines/pipeline.py``) and the local runner (``pipelines/local``) both read
from here; values the container scripts also need live in ``entrypoints/contract.py`` (shipped with them)
and are re-exported below, so every value is written down once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from entrypoints import contract

# --- names (stable: no timestamps, so SageMaker step caching works) ------------------------------------------
PIPELINE_NAME = "ImageClassificationPipeline"
MODEL_PACKAGE_GROUP = "ImageClassificationModels"
BASE_JOB_PREFIX = "imgclf"
DEPLOY_FUNCTION_NAME = "imgclf-deploy-on-approval"
DEPLOY_RULE_NAME = "imgclf-model-approved"
ENDPOINT_NAME_PREFIX = "imgclf"

# Environment variables that carry account-specific settings (never written in code).
ENV_ROLE_ARN = "SAGEMAKER_PIPELINE_ROLE_ARN"
ENV_BUCKET = "ARTIFACT_BUCKET"
ENV_REGION = "AWS_REGION"

# --- containers ------------------------------------------------------------------------------------------------
PYTHON_VERSION = "py312"
TRAINING_FRAMEWORK_VERSION = "2.8"  # newest SageMaker PyTorch training image (py312)
INFERENCE_FRAMEWORK_VERSION = "2.6"  # newest SageMaker PyTorch inference image (py312)
PROCESSING_INSTANCE_TYPE = "ml.m5.xlarge"
TRAINING_INSTANCE_TYPE = "ml.g4dn.xlarge"
INFERENCE_INSTANCE_TYPES = ("ml.m5.large", "ml.m5.xlarge", "ml.g4dn.xlarge")
TRANSFORM_INSTANCE_TYPES = ("ml.m5.xlarge",)

# --- data -------------------------------------------------------------------------------------------------------
SPLITS = contract.SPLITS
LABELS_FILE = contract.LABELS_FILE
MANIFEST_FILE = contract.MANIFEST_FILE
IMAGE_SIZE = contract.DEFAULT_RESIZE_SIZE  # short side the processing step resizes to
VALID_FRACTION = 0.1
TEST_FRACTION = 0.1
SPLIT_SEED = 42

# --- training -----------------------------------------------------------------------------------------------------
OBJECTIVE_METRIC = contract.OBJECTIVE_METRIC
METRIC_DEFINITIONS = contract.METRIC_DEFINITIONS

# Hyperparameters of entrypoints/train.py, keyed by flag name without the leading "--". The tuning step
# overrides the tuned ones with values from HYPERPARAMETER_RANGES.
DEFAULT_HYPERPARAMETERS: dict[str, str | int | float] = {
    "architecture": "resnet50",
    "weights": "imagenet",
    "epochs": 5,
    "batch-size": 64,
    "lr": 1e-3,
    "optimizer": "adamw",
    "weight-decay": 1e-4,
    "eps": 1e-8,
    "label-smoothing": 0.1,
    "dropout": 0.2,
    "hidden-units": 256,
    "trainable-blocks": "1",
    "scheduler": "cosine",
    "seed": 42,
}
FINAL_TRAINING_EPOCHS = 10  # the TrainingStep trains longer than each tuning trial


@dataclass(frozen=True)
class HyperparameterRange:
    """A tuning range in plain data: the pipeline turns it into SDK parameter ranges, the local tuner samples it."""

    kind: Literal["continuous", "integer", "categorical"]
    min_value: float | None = None
    max_value: float | None = None
    values: tuple[str, ...] = field(default_factory=tuple)
    scaling: Literal["Auto", "Linear", "Logarithmic"] = "Auto"


HYPERPARAMETER_RANGES: dict[str, HyperparameterRange] = {
    "lr": HyperparameterRange("continuous", 1e-5, 1e-2, scaling="Logarithmic"),
    "batch-size": HyperparameterRange("categorical", values=("32", "64", "128")),
    "weight-decay": HyperparameterRange("continuous", 1e-6, 1e-2, scaling="Logarithmic"),
    "eps": HyperparameterRange("continuous", 1e-9, 1e-6, scaling="Logarithmic"),
    "dropout": HyperparameterRange("continuous", 0.0, 0.5, scaling="Linear"),
    "hidden-units": HyperparameterRange("categorical", values=("0", "128", "256", "512")),
    "trainable-blocks": HyperparameterRange("categorical", values=("0", "1", "2", "all")),
}
TUNING_STRATEGY = "Bayesian"  # or "Hyperband", "Random"
TUNING_STRATEGIES = ("Bayesian", "Hyperband", "Random")
MAX_TUNING_JOBS = 8
MAX_PARALLEL_TUNING_JOBS = 2

# --- evaluation and registration ------------------------------------------------------------------------------------
EVALUATION_FILE = contract.EVALUATION_FILE
ACCURACY_JSON_PATH = contract.ACCURACY_JSON_PATH
ACCURACY_THRESHOLD = 0.7
APPROVAL_STATUS = "PendingManualApproval"
REQUEST_CONTENT_TYPES = contract.REQUEST_CONTENT_TYPES
RESPONSE_CONTENT_TYPES = contract.RESPONSE_CONTENT_TYPES

# --- the local runner's demo: seconds on a 2-core CPU, on scikit-learn's digits -------------------------------
LOCAL_DEMO_HYPERPARAMETERS: dict[str, str | int | float] = {
    **DEFAULT_HYPERPARAMETERS,
    "architecture": "resnet18",
    "weights": "none",
    "epochs": 4,
    "trainable-blocks": "all",
}
LOCAL_DEMO_IMAGE_SIZE = 32  # the digits are 8x8; the demo archive upscales them
LOCAL_TUNING_TRIALS = 2
LOCAL_ACCURACY_THRESHOLD = 0.9
