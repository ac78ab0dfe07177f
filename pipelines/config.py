"""The one place for names, defaults, hyperparameter ranges, metric regexes and thresholds.

The SageMaker pipeline (``pipelines/pipeline.py``) and the local runner (``pipelines/local``) both read
from here; values the container scripts also need live in ``entrypoints/contract.py`` (shipped with them)
and are re-exported below, so every value is written down once.
"""

from __future__ import annotations

from entrypoints import contract
from pipelines.definition.hyperparameters import HyperparameterRange
from steps import deploy

# --- names (stable: no timestamps, so SageMaker step caching works) ------------------------------------------
PIPELINE_NAME = "ImageClassificationPipeline"
MODEL_PACKAGE_GROUP = "ImageClassificationModels"
BASE_JOB_PREFIX = "imgclf"
DEPLOY_FUNCTION_NAME = "imgclf-deploy-on-approval"
DEPLOY_RULE_NAME = "imgclf-model-approved"
# The deploy function's own default (its settings table in steps/deploy.py owns every endpoint setting).
ENDPOINT_NAME_PREFIX = deploy.SETTINGS_BY_NAME["resource_name_prefix"].default

# --- deployment on approval (steps/deploy.py, wired by pipelines/aws/deploy_infra.py) -------------------------------
# The endpoint's settings (instance type, autoscaling, ...) and their defaults are rows of steps/deploy.py's
# settings table; what is here is the function itself.
ENV_DEPLOY_ROLE_ARN = "DEPLOY_LAMBDA_ROLE_ARN"  # the deploy Lambda's own role (docs/iam.md: create it once)
DEPLOY_RULE_TARGET_ID = "deploy-lambda"
DEPLOY_LAMBDA_RUNTIME = "python3.12"
DEPLOY_LAMBDA_TIMEOUT_SECONDS = 900  # the most Lambda allows: the handler may wait for a busy endpoint
DEPLOY_LAMBDA_MEMORY_MB = 256

# --- step names and container paths (the SageMaker pipeline and the local runner both use them) ------------------
# Step names are stable: they key the definition, step caching and `status`.
STEP_PREPROCESS = "Preprocess"
STEP_TUNE = "Tune"
STEP_TRAIN = "Train"
STEP_EVALUATE = "Evaluate"
STEP_CHECK = "CheckAccuracy"
STEP_REGISTER = "Register"
STEP_FAIL = "AccuracyBelowThreshold"
STEP_DEPLOY = "Deploy"
# What the Deploy step (a LambdaStep running steps/deploy.py) returns: its LambdaOutputs, shown in Studio.
DEPLOY_STEP_OUTPUTS = ("action", "endpoint_name", "model_package_arn")
# Paths inside the containers (the defaults of steps/preprocess.py, steps/evaluate.py and entrypoints/train.py).
PROCESSING_ROOT = "/opt/ml/processing"
PREPROCESS_INPUT_DIR = f"{PROCESSING_ROOT}/input/data"
PREPROCESS_CONTRACT_DIR = f"{PROCESSING_ROOT}/input/contract"  # contract.py, beside input/code/preprocess.py
PREPROCESS_OUTPUT_DIR = f"{PROCESSING_ROOT}/output"
EVALUATE_MODEL_DIR = f"{PROCESSING_ROOT}/model"
EVALUATE_TEST_DIR = f"{PROCESSING_ROOT}/test"
EVALUATE_OUTPUT_DIR = f"{PROCESSING_ROOT}/evaluation"
EVALUATE_VALID_DIR = f"{PROCESSING_ROOT}/valid"  # calibrates the int8 network
EVALUATE_WHEELS_DIR = f"{PROCESSING_ROOT}/wheels"  # the serving wheelhouse, when the pipeline is given one
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
TENSORBOARD_LOCAL_PATH = "/opt/ml/output/tensorboard"
OUTPUT_EVALUATION = "evaluation"  # the evaluation step's output name (also its S3 folder name)

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
# Serving images (pipelines/images.py builds their URIs). The default is AWS's Ray Serve inference image; the
# SageMaker PyTorch inference image of INFERENCE_FRAMEWORK_VERSION (TorchServe) is past end of patches.
SERVING_IMAGE = "ray-serve"  # or "pytorch-2.6"
SERVING_INSTANCE_TYPE = INFERENCE_INSTANCE_TYPES[0]  # picks the CPU or GPU build of the serving image
RAY_SERVE_IMAGE_REPOSITORY = "ray"
RAY_SERVE_IMAGE_TAG = "serve-ml-sagemaker-{device}-v1.4"  # device: cpu or cuda (AWS's v1.4 release tags)
RAY_SERVE_VERSION = "2.57.0"  # the image's Ray; setup.py pins the same for local --ray endpoints
RAY_SERVE_TORCH_VERSION = "2.10"  # the image's torch (the model package's FrameworkVersion)
# The deploy function (which ships alone) owns these two: it sets the AMI and warns about the legacy image.
RAY_SERVE_GPU_AMI_VERSION = deploy.RAY_SERVE_GPU_AMI_VERSION  # the GPU image needs this host AMI's drivers
LEGACY_INFERENCE_END_OF_PATCHES = deploy.LEGACY_END_OF_PATCHES

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

# Training defaults (epochs, batch size, learning rate, seed, ...) are written once, in entrypoints/train_args.py (the
# parser of entrypoints/train.py); the pipeline passes only what it sets: the Architecture and TuningEpochs/
# TrainingEpochs parameters, the tuned values of HYPERPARAMETER_RANGES, and a preset's overrides.
FINAL_TRAINING_EPOCHS = 10  # the TrainingStep trains longer than each tuning trial


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
TRAINING_MAX_RUNTIME_SECONDS = 24 * 3600  # per training job (each trial and the final training)
TRAINING_MAX_WAIT_SECONDS = 36 * 3600  # with managed spot training: runtime plus time waiting for capacity
CACHE_EXPIRE_AFTER = "P30D"  # ISO 8601 duration a cached step result of the expensive steps stays reusable

# --- evaluation and registration ------------------------------------------------------------------------------------
EVALUATION_FILE = contract.EVALUATION_FILE
ACCURACY_JSON_PATH = contract.ACCURACY_JSON_PATH
ACCURACY_THRESHOLD = 0.7
APPROVAL_STATUS = "PendingManualApproval"
APPROVAL_STATUSES = ("PendingManualApproval", "Approved", "Rejected")
REQUEST_CONTENT_TYPES = contract.REQUEST_CONTENT_TYPES
RESPONSE_CONTENT_TYPES = contract.RESPONSE_CONTENT_TYPES

# --- presets: named sets of builder options (pipelines/pipeline.py: preset_options) ----------------------------------
PRESETS = ("default", "demo")

# --- the demo preset: seconds on a 2-core CPU, on scikit-learn's digits ------------------------------------------
# A preset is a set of builder options (pipelines/pipeline.py: preset_options): `definition`, `upsert` and `local`
# all take --preset demo, so the local demo runs the very definition a cheap cloud smoke test would upsert.
DEMO_HYPERPARAMETERS: dict[str, str | int | float] = {  # train.py's defaults otherwise
    "architecture": "resnet18",
    "weights": "none",
    "epochs": 4,  # each tuning trial (the TuningEpochs default)
    "trainable-blocks": "all",
    "horizontal-flip": False,  # a mirrored digit is another symbol (or none); flips cost the demo ~4 points
}
# The demo trains from random weights (no download), so it tunes the tuner's ranges minus trainable-blocks
# (freezing random layers teaches nothing; it stays "all") and with learning rates that converge in a few epochs.
DEMO_HYPERPARAMETER_RANGES: dict[str, HyperparameterRange] = {
    **{name: spec for name, spec in HYPERPARAMETER_RANGES.items() if name != "trainable-blocks"},
    "lr": HyperparameterRange("continuous", 1e-3, 1e-2, scaling="Logarithmic"),
}
DEMO_IMAGE_SIZE = 32  # the digits are 8x8; the demo archive upscales them, and the trainer sees them at this size
DEMO_PARAMETER_DEFAULTS: dict[str, str | int | float] = {
    "ImageSize": DEMO_IMAGE_SIZE,
    "TrainingEpochs": 8,  # the final training (the trials run DEMO_HYPERPARAMETERS' epochs)
    "MaxTuningJobs": 2,
    "MaxParallelTuningJobs": 2,
    "AccuracyThreshold": 0.9,
}
DEMO_TRAINING_INSTANCE_TYPE = "ml.m5.xlarge"  # a CPU instance (and the CPU image) is enough for the demo

# --- the local executor (python -m pipelines.run local) -----------------------------------------------------------
LOCAL_WORKDIR = "runs"  # python -m pipelines.run local --workdir: one run-NNNN folder per run, cache, registry
LOCAL_ENDPOINT_NAME = f"{ENDPOINT_NAME_PREFIX}-local"
LOCAL_ENDPOINT_PORT = 8080  # SageMaker's serving containers listen on 8080; a busy port gives way to a free one
# The bucket the local build of the definition names where `upsert` uses the account's: S3 URIs map to the local
# object store <workdir>/s3/<bucket>/<key>. The local region, account and role live with the engine's ARNs
# (pipelines/local/sagemaker.py: REGION, ACCOUNT_ID, ROLE_ARN), read from there by the runner.
LOCAL_BUCKET = "local-artifacts"
# Flags the local executor adds to each training job after the hyperparameters (the jobs share this machine's
# cores, where on SageMaker each has an instance of its own).
LOCAL_TRAINING_EXTRA_ARGUMENTS: tuple[str, ...] = ("--workers", "0")

# --- rules every value is checked against before anything runs (pipelines/validation.py applies them) -------------
# Bounds of pipeline parameters that no script's parser and no SageMaker API shape holds (those are checked with
# the script's own parser and botocore's shapes): name -> (lowest, highest, why), both ends allowed.
PARAMETER_BOUNDS: dict[str, tuple[float, float, str]] = {
    "AccuracyThreshold": (0.0, 1.0, "the test accuracy is a fraction: above 1 nothing registers, below 0 all do"),
    "ImageSize": (8, 2048, "8 px is the digits' own size, 2048 beyond any size torchvision's weights were trained at"),
}
LOCAL_PORT_RANGE = (0, 65535)  # --port of local endpoints; 0: any free port
# Flags of entrypoints/train.py that the container contract sets (channels and output folders from SM_*, the
# checkpoint and TensorBoard folders from the job's configs): never hyperparameters (--hp), since a value there
# would move the job's outputs away from where SageMaker collects them.
CONTAINER_MANAGED_TRAINING_FLAGS = (
    "train-dir",
    "valid-dir",
    "weights-dir",
    "model-dir",
    "output-data-dir",
    "checkpoint-dir",
    "tensorboard-dir",
)
