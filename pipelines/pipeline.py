"""The SageMaker pipeline: a pure builder, ``get_pipeline(...) -> Pipeline``.

The DAG (steps joined through step properties only, so SageMaker infers every edge)::

    InputDataUri
      -> Preprocess     ProcessingStep   steps/preprocess.py          outputs train/ valid/ test/
      -> Tune           TuningStep       entrypoints/train.py         objective valid_accuracy (Maximize)
      -> Train          TrainingStep     entrypoints/train.py         best TunedHyperParameters, TrainingEpochs,
                                                                      checkpoints, TensorBoard, Debugger rules;
                                                                      with torch_distributed: torchrun on
                                                                      TrainingInstanceCount instances
      -> Evaluate       ProcessingStep   steps/evaluate.py            evaluation.json (PropertyFile), and the
                                                                      artifact to register: fp32, or int8 when
                                                                      within a point of fp32 on the test split
      -> CheckAccuracy  ConditionStep    accuracy >= AccuracyThreshold
            if true  -> Register       ModelStep (RegisterModel)  Evaluate's artifact, the evaluation as ModelMetrics
                     -> Deploy         LambdaStep                 the deploy function (steps/deploy.py): starts
                                                                  the endpoint's create/update if the package is
                                                                  Approved, else returns awaiting-approval
            if false -> AccuracyBelowThreshold   FailStep          message names the accuracy and the threshold

Everything a run may change is a pipeline parameter (see ``PARAMETER_NAMES``); everything that changes the
shape of the definition (Debugger on/off, tuning strategy, spot, KMS, VPC, network isolation, warm start, the
Deploy step, torchrun for the final training, the hyperparameters and ranges of a preset) is a field of
``PipelineOptions``; ``preset_options`` gives the named presets ("default", "demo"). Building twice gives
byte-identical definitions: job names are stable prefixes (``PipelineDefinitionConfig(use_custom_job_prefix=True)``),
code goes to content-hashed S3 paths and no timestamp is written anywhere, so step caching works.

The same definition runs on SageMaker (``upsert``) and on one machine (``pipelines/local/executor.py``).

**Several processes and instances** (``torch_distributed``): the final Train step gets SageMaker's
``torch_distributed`` launcher and the ``TrainingInstanceCount`` parameter; the training toolkit then starts
``torchrun`` on every instance with one process per GPU (one per instance on CPU instances). Tuning trials stay
single-instance, single-process. SageMaker Debugger is not available to a job that combines a distributed
launcher with checkpoints ("Considerations for Amazon SageMaker Debugger"), so such a Train step has no Debugger
hook and none of the rules that read the hook's tensors; the profiler and its ProfilerReport rule, which need no
hook, stay on. Without the option the Train step runs on one instance, hook included.

The SageMaker SDK is imported here at module level: import this module lazily from the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagemaker import image_uris
from sagemaker.debugger import (
    CollectionConfig,
    DebuggerHookConfig,
    ProfilerConfig,
    ProfilerRule,
    Rule,
    TensorBoardOutputConfig,
    rule_configs,
)
from sagemaker.inputs import TrainingInput
from sagemaker.lambda_helper import Lambda
from sagemaker.model import Model
from sagemaker.model_metrics import MetricsSource, ModelMetrics
from sagemaker.network import NetworkConfig
from sagemaker.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter, ParameterRange
from sagemaker.processing import ProcessingInput, ProcessingOutput, ScriptProcessor
from sagemaker.pytorch import PyTorch
from sagemaker.tuner import HyperparameterTuner, WarmStartConfig, WarmStartTypes
from sagemaker.workflow.condition_step import ConditionStep
from sagemaker.workflow.conditions import ConditionGreaterThanOrEqualTo
from sagemaker.workflow.execution_variables import ExecutionVariables
from sagemaker.workflow.fail_step import FailStep
from sagemaker.workflow.functions import Join, JsonGet
from sagemaker.workflow.lambda_step import LambdaOutput, LambdaOutputTypeEnum, LambdaStep
from sagemaker.workflow.model_step import ModelStep
from sagemaker.workflow.parameters import ParameterFloat, ParameterInteger, ParameterString
from sagemaker.workflow.pipeline import Pipeline
from sagemaker.workflow.pipeline_context import PipelineSession
from sagemaker.workflow.pipeline_definition_config import PipelineDefinitionConfig
from sagemaker.workflow.properties import PropertyFile
from sagemaker.workflow.retry import (
    SageMakerJobExceptionTypeEnum,
    SageMakerJobStepRetryPolicy,
    StepExceptionTypeEnum,
    StepRetryPolicy,
)
from sagemaker.workflow.steps import CacheConfig, ProcessingStep, TrainingStep, TuningStep

from pipelines import config, images
from pipelines.config import (  # step names and container paths
    CHECKPOINT_LOCAL_PATH,
    EVALUATE_MODEL_DIR,
    EVALUATE_OUTPUT_DIR,
    EVALUATE_TEST_DIR,
    EVALUATE_VALID_DIR,
    EVALUATE_WHEELS_DIR,
    OUTPUT_EVALUATION,
    PREPROCESS_INPUT_DIR,
    PREPROCESS_OUTPUT_DIR,
    STEP_CHECK,
    STEP_DEPLOY,
    STEP_EVALUATE,
    STEP_FAIL,
    STEP_PREPROCESS,
    STEP_REGISTER,
    STEP_TRAIN,
    STEP_TUNE,
    TENSORBOARD_LOCAL_PATH,
    HyperparameterRange,
)
from pipelines.iam import LAMBDA_FUNCTION_NAME, partition_for_region
from steps import evaluate as evaluate_step_script

PROJECT_ROOT = Path(__file__).resolve().parent.parent


# The evaluation report's PropertyFile (read by the CheckAccuracy condition).
PROPERTY_FILE_EVALUATION = "EvaluationReport"

WEIGHTS_CHANNEL = "weights"

# Hyperparameters that pipeline parameters fill (so they are neither static values nor tuned).
PARAMETER_HYPERPARAMETERS = ("architecture", "epochs")


def framework_image_uri(region: str, scope: str, instance_type: str) -> str:
    """The SageMaker PyTorch image of ``scope`` ("training" or "inference") for an instance type: the framework
    and Python versions come from the config (the CPU or GPU build follows the instance type)."""
    version = config.TRAINING_FRAMEWORK_VERSION if scope == "training" else config.INFERENCE_FRAMEWORK_VERSION
    return image_uris.retrieve(
        framework="pytorch",
        region=region,
        version=version,
        py_version=config.PYTHON_VERSION,
        instance_type=instance_type,
        image_scope=scope,
    )


@dataclass(frozen=True)
class PipelineOptions:
    """What changes the shape of the definition; chosen at ``upsert`` time, not per run.

    Attributes:
        pipeline_name: the pipeline's name (also the S3 prefix of its artifacts).
        model_package_group: default of the ``ModelPackageGroupName`` parameter.
        base_job_prefix: prefix of every job name (stable, no timestamps).
        debugger: SageMaker Debugger rules, hook and profiler on the final training (off for accounts or
            regions that cannot run Debugger).
        tuning_strategy: "Bayesian", "Hyperband" or "Random".
        warm_start_parent: name of a finished tuning job to warm-start from (TransferLearning).
        use_spot_instances: managed spot training for the tuning trials and the final training.
        kms_key: KMS key id/ARN for job volumes, outputs and the registered model's artifacts.
        subnets / security_group_ids: VPC settings for every job (both or neither).
        network_isolation: no network access inside training and processing containers; then pretrained
            weights must come from ``weights_uri``.
        weights_uri: S3 URI of a torchvision ``state_dict`` (.pth) fed to training as the ``weights`` channel.
        input_data_uri: default of ``InputDataUri`` (default ``s3://<bucket>/<pipeline_name>/input/``).
        training_instance_type / processing_instance_type: defaults of the instance parameters; the container
            image (CPU or GPU build) is chosen from these.
        cache_expire_after: ISO 8601 duration for step caching of the expensive steps; None turns caching off.
        max_runtime_seconds / max_wait_seconds: time limits of each training job (max_wait only with spot).
        serving_image / serving_image_uri / serving_instance_type: the registered model's container (see
            pipelines/images.py): Ray Serve (default) or the legacy PyTorch image, a URI that overrides it, and
            the instance type whose device (CPU or GPU) picks the image's build.
        int8_serving: Evaluate builds an int8 network (calibrated on the validation split) and registers it for
            serving when its test accuracy is within a point of fp32's (off: fp32 only; always off for GPU
            serving instance types).
        serving_wheels_uri: s3:// prefix of a serving wheelhouse (``python -m pipelines.run wheelhouse``): ONNX
            Runtime for the evaluation container, and for the served artifact on an image that lacks it.
        hyperparameters: every flag of entrypoints/train.py the jobs get, keyed without "--". Those in
            ``hyperparameter_ranges`` are tuned (the final training takes the best trial's values); "architecture"
            and "epochs" give the defaults of the Architecture and TuningEpochs parameters; the rest are static.
        hyperparameter_ranges: what the tuner searches.
        parameter_defaults: defaults of pipeline parameters by name, over the config's (see PARAMETER_NAMES).
        train_at_image_size: the trainer's input-size is the ImageSize parameter (for images that are already
            at training size, as in the demo), instead of train.py's crop of the preprocessed images.
        deploy_step: end the accuracy branch with the Deploy LambdaStep (off: the DAG ends at Register).
        deploy_function_name: the deploy Lambda the Deploy step invokes (``upsert`` creates it under this name).
        torch_distributed: the final Train step runs under SageMaker's ``torch_distributed`` launcher (torchrun,
            one process per GPU) on ``TrainingInstanceCount`` instances, a parameter declared only with this
            option; its Debugger hook and tensor rules are off (see the module docstring).
    """

    pipeline_name: str = config.PIPELINE_NAME
    model_package_group: str = config.MODEL_PACKAGE_GROUP
    base_job_prefix: str = config.BASE_JOB_PREFIX
    debugger: bool = True
    tuning_strategy: str = config.TUNING_STRATEGY
    warm_start_parent: str | None = None
    use_spot_instances: bool = False
    kms_key: str | None = None
    subnets: tuple[str, ...] = field(default_factory=tuple)
    security_group_ids: tuple[str, ...] = field(default_factory=tuple)
    network_isolation: bool = False
    weights_uri: str | None = None
    input_data_uri: str | None = None
    training_instance_type: str = config.TRAINING_INSTANCE_TYPE
    processing_instance_type: str = config.PROCESSING_INSTANCE_TYPE
    cache_expire_after: str | None = config.CACHE_EXPIRE_AFTER
    max_runtime_seconds: int = config.TRAINING_MAX_RUNTIME_SECONDS
    max_wait_seconds: int = config.TRAINING_MAX_WAIT_SECONDS
    serving_image: str = config.SERVING_IMAGE
    serving_image_uri: str | None = None
    serving_instance_type: str = config.SERVING_INSTANCE_TYPE
    int8_serving: bool = True
    serving_wheels_uri: str | None = None
    hyperparameters: Mapping[str, Any] = field(default_factory=lambda: dict(config.DEFAULT_HYPERPARAMETERS))
    hyperparameter_ranges: Mapping[str, HyperparameterRange] = field(
        default_factory=lambda: dict(config.HYPERPARAMETER_RANGES)
    )
    parameter_defaults: Mapping[str, Any] = field(default_factory=dict)
    train_at_image_size: bool = False
    deploy_step: bool = True
    deploy_function_name: str = config.DEPLOY_FUNCTION_NAME
    torch_distributed: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the bad option and what to do instead."""
        unknown = sorted(set(self.parameter_defaults) - set(PARAMETER_NAMES) - set(OPTIONAL_PARAMETERS))
        if unknown:
            raise ValueError(f"no pipeline parameter named {', '.join(unknown)}; the parameters are {PARAMETER_NAMES}")
        for name in self.parameter_defaults:
            if name in OPTIONAL_PARAMETERS and not getattr(self, OPTIONAL_PARAMETERS[name]):
                raise ValueError(missing_parameter_hint(name))
        for name in PARAMETER_HYPERPARAMETERS:
            if name not in self.hyperparameters:
                raise ValueError(f"the hyperparameters need {name!r} (the default of its pipeline parameter)")
        fixed_and_tuned = sorted(set(PARAMETER_HYPERPARAMETERS) & set(self.hyperparameter_ranges))
        if fixed_and_tuned:
            raise ValueError(f"{', '.join(fixed_and_tuned)} is set by a pipeline parameter and cannot be tuned")
        if self.tuning_strategy not in config.TUNING_STRATEGIES:
            raise ValueError(
                f"tuning strategy {self.tuning_strategy!r} is not one of {', '.join(config.TUNING_STRATEGIES)}"
            )
        if bool(self.subnets) != bool(self.security_group_ids):
            raise ValueError("VPC settings need both subnets and security groups (or neither)")
        if self.use_spot_instances and self.max_wait_seconds < self.max_runtime_seconds:
            raise ValueError("with spot instances the max wait must be at least the max runtime")
        if (
            self.network_isolation
            and not self.weights_uri
            and str(self.hyperparameters.get("weights", "")).lower() not in ("none", "")
        ):
            raise ValueError(
                "with network isolation the training job cannot download pretrained weights: "
                "give a weights URI (an S3 .pth state_dict) for the 'weights' channel"
            )
        if self.weights_uri is not None and not self.weights_uri.startswith("s3://"):
            raise ValueError(f"weights URI must be an s3:// URI, got {self.weights_uri!r}")
        if self.input_data_uri is not None and not self.input_data_uri.startswith("s3://"):
            raise ValueError(f"input data URI must be an s3:// URI, got {self.input_data_uri!r}")
        if self.serving_wheels_uri is not None and not self.serving_wheels_uri.startswith("s3://"):
            raise ValueError(f"serving wheels URI must be an s3:// prefix, got {self.serving_wheels_uri!r}")
        if not LAMBDA_FUNCTION_NAME.fullmatch(self.deploy_function_name):
            raise ValueError(
                f"deploy function name {self.deploy_function_name!r} is not a Lambda function name "
                "(1-64 letters, digits, hyphens or underscores)"
            )

    def with_hyperparameters(self, overrides: Mapping[str, Any]) -> PipelineOptions:
        """These options with some hyperparameters fixed: a fixed one leaves the tuner's ranges."""
        return dataclasses.replace(
            self,
            hyperparameters={**self.hyperparameters, **overrides},
            hyperparameter_ranges={k: v for k, v in self.hyperparameter_ranges.items() if k not in overrides},
        )


def preset_options(preset: str = "default", **changes: Any) -> PipelineOptions:
    """The options of a named preset, with ``changes`` on top.

    ``default`` is the production pipeline (config.DEFAULT_HYPERPARAMETERS, HYPERPARAMETER_RANGES and the
    parameters' config defaults). ``demo`` trains a small CNN from random weights on small images in seconds
    per epoch on a CPU (config.DEMO_*): the local demo, or a cheap smoke test of the cloud setup.
    """
    if preset == "default":
        return PipelineOptions(**changes)
    if preset == "demo":
        demo: dict[str, Any] = {
            "hyperparameters": dict(config.DEMO_HYPERPARAMETERS),
            "hyperparameter_ranges": dict(config.DEMO_HYPERPARAMETER_RANGES),
            "parameter_defaults": dict(config.DEMO_PARAMETER_DEFAULTS),
            "train_at_image_size": True,
            "training_instance_type": config.DEMO_TRAINING_INSTANCE_TYPE,
        }
        return PipelineOptions(**{**demo, **changes})
    raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(config.PRESETS)}")


@dataclass(frozen=True)
class PipelineParameters:
    """The pipeline's run-time parameters (only these go into ``Pipeline(parameters=...)``)."""

    input_data_uri: ParameterString
    processing_instance_type: ParameterString
    processing_instance_count: ParameterInteger
    training_instance_type: ParameterString
    training_instance_count: ParameterInteger | None  # declared with torch_distributed only
    image_size: ParameterInteger
    valid_fraction: ParameterFloat
    test_fraction: ParameterFloat
    architecture: ParameterString
    max_tuning_jobs: ParameterInteger
    max_parallel_tuning_jobs: ParameterInteger
    tuning_epochs: ParameterInteger
    training_epochs: ParameterInteger
    accuracy_threshold: ParameterFloat
    model_approval_status: ParameterString
    model_package_group_name: ParameterString

    def as_list(self) -> list[ParameterString | ParameterInteger | ParameterFloat]:
        return [getattr(self, name) for name in self.__dataclass_fields__ if getattr(self, name) is not None]


def parameter_defaults(options: PipelineOptions, bucket: str) -> dict[str, Any]:
    """Every parameter's default: the config's, the hyperparameters' (Architecture, TuningEpochs), the options'."""
    return {
        "InputDataUri": options.input_data_uri or f"s3://{bucket}/{options.pipeline_name}/input/",
        "ProcessingInstanceType": options.processing_instance_type,
        "ProcessingInstanceCount": 1,
        "TrainingInstanceType": options.training_instance_type,
        "TrainingInstanceCount": 1,
        "ImageSize": config.IMAGE_SIZE,
        "ValidFraction": config.VALID_FRACTION,
        "TestFraction": config.TEST_FRACTION,
        "Architecture": str(options.hyperparameters["architecture"]),
        "MaxTuningJobs": config.MAX_TUNING_JOBS,
        "MaxParallelTuningJobs": config.MAX_PARALLEL_TUNING_JOBS,
        "TuningEpochs": options.hyperparameters["epochs"],
        "TrainingEpochs": config.FINAL_TRAINING_EPOCHS,
        "AccuracyThreshold": config.ACCURACY_THRESHOLD,
        "ModelApprovalStatus": config.APPROVAL_STATUS,
        "ModelPackageGroupName": options.model_package_group,
        **options.parameter_defaults,
    }


def make_parameters(options: PipelineOptions, bucket: str) -> PipelineParameters:
    """The parameters with their defaults (see :func:`parameter_defaults`)."""
    default = parameter_defaults(options, bucket)

    def typed(name: str, kind: type) -> Any:
        try:
            return kind(default[name])
        except (TypeError, ValueError) as error:
            wanted = {int: "an integer", float: "a number"}[kind]
            raise ValueError(
                f"the default of pipeline parameter {name} must be {wanted}, got {default[name]!r}"
            ) from error

    def string(name: str, **kwargs: Any) -> ParameterString:
        return ParameterString(name, default_value=str(default[name]), **kwargs)

    def integer(name: str) -> ParameterInteger:
        return ParameterInteger(name, default_value=typed(name, int))

    def number(name: str) -> ParameterFloat:
        return ParameterFloat(name, default_value=typed(name, float))

    return PipelineParameters(
        input_data_uri=string("InputDataUri"),
        processing_instance_type=string("ProcessingInstanceType"),
        processing_instance_count=integer("ProcessingInstanceCount"),
        training_instance_type=string("TrainingInstanceType"),
        training_instance_count=integer("TrainingInstanceCount") if options.torch_distributed else None,
        image_size=integer("ImageSize"),
        valid_fraction=number("ValidFraction"),
        test_fraction=number("TestFraction"),
        architecture=string("Architecture"),
        max_tuning_jobs=integer("MaxTuningJobs"),
        max_parallel_tuning_jobs=integer("MaxParallelTuningJobs"),
        tuning_epochs=integer("TuningEpochs"),
        training_epochs=integer("TrainingEpochs"),
        accuracy_threshold=number("AccuracyThreshold"),
        model_approval_status=string("ModelApprovalStatus", enum_values=list(config.APPROVAL_STATUSES)),
        model_package_group_name=string("ModelPackageGroupName"),
    )


PARAMETER_NAMES = (
    "InputDataUri",
    "ProcessingInstanceType",
    "ProcessingInstanceCount",
    "TrainingInstanceType",
    "ImageSize",
    "ValidFraction",
    "TestFraction",
    "Architecture",
    "MaxTuningJobs",
    "MaxParallelTuningJobs",
    "TuningEpochs",
    "TrainingEpochs",
    "AccuracyThreshold",
    "ModelApprovalStatus",
    "ModelPackageGroupName",
)
# Parameters declared only when the option named is on (a parameter that no step reads is refused).
OPTIONAL_PARAMETERS = {"TrainingInstanceCount": "torch_distributed"}


def missing_parameter_hint(name: str) -> str:
    """Why a definition has no parameter ``name`` that some other build of the pipeline has, and how to get it."""
    option = OPTIONAL_PARAMETERS[name]
    return (
        f"{name} is a parameter only of a pipeline built with {option} "
        f"(--{option.replace('_', '-')} for definition, upsert and local)"
    )


def sdk_parameter_ranges(
    specs: Mapping[str, HyperparameterRange] = config.HYPERPARAMETER_RANGES,
) -> dict[str, ParameterRange]:
    """Tuning ranges as the SDK's Continuous/Integer/CategoricalParameter objects."""
    ranges: dict[str, ParameterRange] = {}
    for name, spec in specs.items():
        if spec.kind == "continuous":
            ranges[name] = ContinuousParameter(spec.min_value, spec.max_value, scaling_type=spec.scaling)
        elif spec.kind == "integer":
            ranges[name] = IntegerParameter(int(spec.min_value), int(spec.max_value), scaling_type=spec.scaling)
        elif spec.kind == "categorical":
            ranges[name] = CategoricalParameter(list(spec.values))
        else:  # pragma: no cover - the Literal type rules this out
            raise ValueError(f"unknown range kind {spec.kind!r} for {name}")
    return ranges


# Files never shipped to a container (and never part of a code hash): caches and hidden files.
_EXCLUDED_DIRS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints"}
_EXCLUDED_SUFFIXES = (".pyc", ".pyo")


@dataclass(frozen=True)
class CodeArtifact:
    """One code object the pipeline's jobs read from S3, addressed by the hash of its content."""

    s3_uri: str
    body: bytes


@dataclass(frozen=True)
class CodeArtifacts:
    """The code of the three jobs: the two processing scripts and the training ``sourcedir.tar.gz``."""

    preprocess: CodeArtifact
    evaluate: CodeArtifact
    training: CodeArtifact

    def all(self) -> list[CodeArtifact]:
        return [self.preprocess, self.evaluate, self.training]


def _source_files(directory: Path) -> list[tuple[str, bytes]]:
    """(relative POSIX path, content) of every shipped file under directory, sorted."""
    files = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part in _EXCLUDED_DIRS or part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and not path.name.endswith(_EXCLUDED_SUFFIXES):
            files.append((relative.as_posix(), path.read_bytes()))
    return files


def _content_hash(files: list[tuple[str, bytes]]) -> str:
    """SHA-256 over relative names and contents: the same on every machine and checkout folder.

    (The SDK's own code hash includes the absolute path of the checkout, which changes with every CodeBuild
    run, and the bytes of __pycache__, which change whenever tests run; either would defeat step caching.)
    """
    digest = hashlib.sha256()
    for name, body in files:
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(hashlib.sha256(body).digest())
    return digest.hexdigest()


def _deterministic_tar_gz(files: list[tuple[str, bytes]]) -> bytes:
    """A .tar.gz with fixed times, owners and modes, so the same files give the same bytes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, body in files:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.mode = 0o644
            info.mtime = 0
            archive.addfile(info, io.BytesIO(body))
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def code_artifacts(bucket: str, pipeline_name: str, project_root: Path | None = None) -> CodeArtifacts:
    """The code objects, at ``s3://<bucket>/<pipeline_name>/code/<content hash>/<file>``.

    Pure: reads local files only. ``upload_code_artifacts`` puts them in S3 (``upsert`` does that).
    """
    root = Path(project_root) if project_root else PROJECT_ROOT

    def artifact(files: list[tuple[str, bytes]], file_name: str, body: bytes) -> CodeArtifact:
        return CodeArtifact(_s3(bucket, pipeline_name, "code", _content_hash(files), file_name), body)

    scripts = {}
    for script in ("preprocess.py", "evaluate.py"):
        path = root / "steps" / script
        if not path.is_file():
            raise FileNotFoundError(f"pipeline step script {path} is missing")
        files = [(script, path.read_bytes())]
        scripts[script] = artifact(files, script, files[0][1])
    training_dir = root / "entrypoints"
    training_files = _source_files(training_dir)
    if "train.py" not in dict(training_files):
        raise FileNotFoundError(f"training entry point {training_dir / 'train.py'} is missing")
    return CodeArtifacts(
        preprocess=scripts["preprocess.py"],
        evaluate=scripts["evaluate.py"],
        training=artifact(training_files, "sourcedir.tar.gz", _deterministic_tar_gz(training_files)),
    )


def upload_code_artifacts(boto_session: Any, artifacts: CodeArtifacts, kms_key: str | None = None) -> list[str]:
    """Put the code objects in S3 (idempotent: same content, same key). Returns their URIs."""
    s3 = boto_session.client("s3")
    extra: dict[str, str] = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key} if kms_key else {}
    uris = []
    for item in artifacts.all():
        bucket, _, key = item.s3_uri.removeprefix("s3://").partition("/")
        s3.put_object(Bucket=bucket, Key=key, Body=item.body, **extra)
        uris.append(item.s3_uri)
    return uris


class _TrainStepPyTorch(PyTorch):
    """The PyTorch estimator of the Train step, keeping the Debugger hook next to checkpointing on one instance.

    The SDK drops the hook whenever checkpointing is on and ``distribution`` is set, and it always sets
    ``distribution`` to ``{}``; SMDebug's limitation is about distributed jobs only, so a single-node Train keeps
    its hook. A ``torch_distributed`` Train is given no hook in the first place (``_debugger_settings``).
    It also writes the hook's collections in a fixed order, one per name (the SDK keeps them in a set, whose
    order changes from one Python process to the next, and may list a name twice with different settings).
    """

    def _prepare_collection_configs(self) -> None:
        by_name = {}
        for rule in self.debugger_rules or []:
            for collection in rule.collection_configs:
                by_name.setdefault(collection.name, collection)
        if self.debugger_hook_config:
            # the hook's own settings win over the rules' defaults
            by_name.update({c.name: c for c in self.debugger_hook_config.collection_configs or []})
        self.collection_configs = [by_name[name] for name in sorted(by_name)]

    def _validate_and_set_debugger_configs(self) -> None:
        hook = self.debugger_hook_config
        super()._validate_and_set_debugger_configs()
        single_node = self.instance_count == 1 and not getattr(self, "distribution", None)
        if hook and self.debugger_hook_config is False and single_node:
            self.debugger_hook_config = hook


class _StableTuningStep(TuningStep):
    """A TuningStep whose arguments carry no timestamped job name.

    The SDK writes the trial estimator's timestamped ``sagemaker_job_name`` into the static hyperparameters of
    a tuning step (it drops it for a TrainingStep), which would make every build differ and defeat caching.
    The training toolkit reads the job name from the environment, so dropping it changes nothing at run time.
    """

    @property
    def arguments(self) -> dict[str, Any]:
        request = super().arguments
        definition = request.get("TrainingJobDefinition", {})
        definition.get("StaticHyperParameters", {}).pop("sagemaker_job_name", None)
        return request


class _InvokeOnlyLambdaStep(LambdaStep):
    """A LambdaStep that only invokes its function: ``upsert``'s deploy wiring creates and updates the function
    (with its own role, environment and reproducible zip), so the SDK must never try to (and never warns that it
    will not)."""

    def _get_function_arn(self) -> str:
        return self.lambda_func.function_arn


def deploy_function_arn(region: str, account_id: str, function_name: str) -> str:
    """The deploy Lambda's ARN in the pipeline's own region and account."""
    return f"arn:{partition_for_region(region)}:lambda:{region}:{account_id}:function:{function_name}"


def account_of_role(role: str) -> str:
    """The account of an IAM role ARN (the pipeline's account: SageMaker passes only roles of its own account)."""
    parts = role.split(":")
    if len(parts) < 6 or parts[2] != "iam" or not (parts[4].isdigit() and len(parts[4]) == 12):
        raise ValueError(f"role {role!r} is not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)")
    return parts[4]


def _retry_policies(job: bool) -> list:
    """Retries for throttling/service faults, and for jobs also capacity and quota errors."""
    policies: list = [
        StepRetryPolicy(
            exception_types=[StepExceptionTypeEnum.SERVICE_FAULT, StepExceptionTypeEnum.THROTTLING],
            interval_seconds=10,
            backoff_rate=2.0,
            max_attempts=5,
        )
    ]
    if job:
        policies.append(
            SageMakerJobStepRetryPolicy(
                exception_types=[
                    SageMakerJobExceptionTypeEnum.CAPACITY_ERROR,
                    SageMakerJobExceptionTypeEnum.RESOURCE_LIMIT,
                    SageMakerJobExceptionTypeEnum.INTERNAL_ERROR,
                ],
                interval_seconds=60,
                backoff_rate=2.0,
                max_attempts=3,
            )
        )
    return policies


def _s3(bucket: str, *parts: str) -> str:
    return "s3://" + "/".join([bucket, *(part.strip("/") for part in parts)])


def _execution_s3(bucket: str, pipeline_name: str, *parts: str) -> Join:
    """An S3 URI unique to each execution (outputs are not part of the cache key, so caching still works)."""
    return Join(on="/", values=["s3:/", bucket, pipeline_name, ExecutionVariables.PIPELINE_EXECUTION_ID, *parts])


def _debugger_settings(options: PipelineOptions, bucket: str) -> dict[str, Any]:
    """Estimator keyword arguments for Debugger: rules + hook + profiler, or all off.

    A ``torch_distributed`` Train keeps only what works without the hook: SageMaker offers no Debugger hook to a
    job with a distributed launcher and checkpoints, and the tensor rules read nothing but the hook's tensors.
    """
    if not options.debugger:
        return {"debugger_hook_config": False, "disable_profiler": True}
    debug_uri = _s3(bucket, options.pipeline_name, "debugger")
    profiler = ProfilerConfig(s3_output_path=debug_uri, system_monitor_interval_millis=500)
    profiler_rules = [ProfilerRule.sagemaker(rule_configs.ProfilerReport())]
    if options.torch_distributed:
        return {"rules": profiler_rules, "debugger_hook_config": False, "profiler_config": profiler}
    rules = [
        Rule.sagemaker(rule_configs.loss_not_decreasing()),
        Rule.sagemaker(rule_configs.overfit()),
        Rule.sagemaker(rule_configs.vanishing_gradient()),
        Rule.sagemaker(rule_configs.poor_weight_initialization()),
        *profiler_rules,
    ]
    hook = DebuggerHookConfig(
        s3_output_path=debug_uri,
        collection_configs=[
            CollectionConfig(name="losses", parameters={"save_interval": "10"}),
            CollectionConfig(name="gradients", parameters={"save_interval": "50"}),
            CollectionConfig(name="weights", parameters={"save_interval": "50"}),
        ],
    )
    return {"rules": rules, "debugger_hook_config": hook, "profiler_config": profiler}


def get_pipeline(
    sagemaker_session: PipelineSession,
    role: str,
    bucket: str | None = None,
    options: PipelineOptions | None = None,
    project_root: Path | None = None,
    account_id: str | None = None,
) -> Pipeline:
    """Build the pipeline. Pure: with ``bucket`` given it makes no AWS call and uploads nothing.

    The code objects the definition names are put in S3 by ``upload_code_artifacts(code_artifacts(...))``
    (the CLI's ``upsert`` does that before creating or updating the pipeline).

    Args:
        sagemaker_session: a PipelineSession (its region picks the container images).
        role: the execution role ARN every job runs as.
        bucket: the artifact bucket (default: the session's default bucket).
        options: the switches that shape the definition (see PipelineOptions).
        project_root: the folder holding entrypoints/ and steps/ (default: this project).
        account_id: the account of the deploy Lambda the Deploy step invokes (default: the role's account).

    Returns:
        The Pipeline; ``pipeline.definition()`` is its JSON.
    """
    options = options or PipelineOptions()
    options.validate()
    bucket = bucket or sagemaker_session.default_bucket()
    code = code_artifacts(bucket, options.pipeline_name, project_root)
    region = sagemaker_session.boto_region_name
    account_id = account_id or account_of_role(role)
    params = make_parameters(options, bucket)
    name = options.pipeline_name
    prefix = options.base_job_prefix
    cache = (
        CacheConfig(enable_caching=True, expire_after=options.cache_expire_after)
        if options.cache_expire_after
        else None
    )
    vpc = (
        {"subnets": list(options.subnets), "security_group_ids": list(options.security_group_ids)}
        if options.subnets
        else {}
    )
    kms = {"volume_kms_key": options.kms_key, "output_kms_key": options.kms_key} if options.kms_key else {}

    # --- Preprocess -------------------------------------------------------------------------------------------
    processing_image = framework_image_uri(region, "training", options.processing_instance_type)
    network_config = (
        NetworkConfig(
            enable_network_isolation=options.network_isolation,
            security_group_ids=vpc.get("security_group_ids"),
            subnets=vpc.get("subnets"),
        )
        if vpc or options.network_isolation
        else None
    )
    preprocessor = ScriptProcessor(
        image_uri=processing_image,
        command=["python3"],
        role=role,
        instance_type=params.processing_instance_type,
        instance_count=params.processing_instance_count,
        base_job_name=f"{prefix}-preprocess",
        sagemaker_session=sagemaker_session,
        network_config=network_config,
        **kms,
    )
    preprocess_args = preprocessor.run(
        code=code.preprocess.s3_uri,
        inputs=[ProcessingInput(source=params.input_data_uri, destination=PREPROCESS_INPUT_DIR, input_name="data")],
        outputs=[
            ProcessingOutput(
                output_name=split,
                source=f"{PREPROCESS_OUTPUT_DIR}/{split}",
                destination=_execution_s3(bucket, name, STEP_PREPROCESS, split),
            )
            for split in config.SPLITS
        ],
        arguments=[
            "--input",
            PREPROCESS_INPUT_DIR,
            "--output-dir",
            PREPROCESS_OUTPUT_DIR,
            "--image-size",
            params.image_size.to_string(),
            "--valid-fraction",
            params.valid_fraction.to_string(),
            "--test-fraction",
            params.test_fraction.to_string(),
            "--seed",
            str(config.SPLIT_SEED),
        ],
        kms_key=options.kms_key,
    )
    step_preprocess = ProcessingStep(
        name=STEP_PREPROCESS,
        display_name="Preprocess images",
        description="Validate, deduplicate, resize and split the input images into train/valid/test ImageFolders.",
        step_args=preprocess_args,
        cache_config=cache,
        retry_policies=_retry_policies(job=True),
    )
    split_uri = {
        split: step_preprocess.properties.ProcessingOutputConfig.Outputs[split].S3Output.S3Uri
        for split in config.SPLITS
    }

    # --- shared training settings ----------------------------------------------------------------------------
    channels: dict[str, TrainingInput] = {
        "train": TrainingInput(s3_data=split_uri["train"]),
        "valid": TrainingInput(s3_data=split_uri["valid"]),
    }
    if options.weights_uri:
        channels[WEIGHTS_CHANNEL] = TrainingInput(s3_data=options.weights_uri)
    estimator_common: dict[str, Any] = {
        "entry_point": "train.py",
        "source_dir": code.training.s3_uri,
        "framework_version": config.TRAINING_FRAMEWORK_VERSION,
        "py_version": config.PYTHON_VERSION,
        "role": role,
        "instance_type": params.training_instance_type,
        # One instance for the trials; the Train step's count is TrainingInstanceCount with torch_distributed
        # only: a parameterised count makes the SDK drop the Debugger hook, which a single-node Train keeps.
        "instance_count": 1,
        "image_uri": framework_image_uri(region, "training", options.training_instance_type),
        "metric_definitions": config.METRIC_DEFINITIONS,
        "sagemaker_session": sagemaker_session,
        "enable_network_isolation": options.network_isolation,
        "use_spot_instances": options.use_spot_instances,
        "max_run": options.max_runtime_seconds,
        "max_wait": options.max_wait_seconds if options.use_spot_instances else None,
        "subnets": vpc.get("subnets"),
        "security_group_ids": vpc.get("security_group_ids"),
        "volume_kms_key": options.kms_key,
        "output_kms_key": options.kms_key,
        "environment": {"PYTHONUNBUFFERED": "1"},
    }
    tuned_names = tuple(options.hyperparameter_ranges)
    static_hyperparameters: dict[str, Any] = {
        key: value
        for key, value in options.hyperparameters.items()
        if key not in tuned_names and key not in PARAMETER_HYPERPARAMETERS
    }
    static_hyperparameters["architecture"] = params.architecture
    if options.train_at_image_size:
        static_hyperparameters["input-size"] = params.image_size

    # --- Tune --------------------------------------------------------------------------------------------------
    tuning_estimator = PyTorch(
        **estimator_common,
        output_path=_s3(bucket, name, "tuning"),
        checkpoint_s3_uri=None,
        hyperparameters={**static_hyperparameters, "epochs": params.tuning_epochs},
        base_job_name=f"{prefix}-trial",
        debugger_hook_config=False,
        disable_profiler=True,
    )
    strategy = options.tuning_strategy
    warm_start = (
        WarmStartConfig(WarmStartTypes.TRANSFER_LEARNING, parents={options.warm_start_parent})
        if options.warm_start_parent
        else None
    )
    tuner = HyperparameterTuner(
        estimator=tuning_estimator,
        objective_metric_name=config.OBJECTIVE_METRIC,
        objective_type="Maximize",
        hyperparameter_ranges=sdk_parameter_ranges(options.hyperparameter_ranges),
        metric_definitions=config.METRIC_DEFINITIONS,
        strategy=strategy,
        max_jobs=params.max_tuning_jobs,
        max_parallel_jobs=params.max_parallel_tuning_jobs,
        # Hyperband stops poor trials itself; SageMaker requires early stopping Off with it.
        early_stopping_type="Off" if strategy == "Hyperband" else "Auto",
        base_tuning_job_name=f"{prefix}-tune",
        warm_start_config=warm_start,
        random_seed=int(options.hyperparameters.get("seed", config.DEFAULT_HYPERPARAMETERS["seed"])),
    )
    step_tune = _StableTuningStep(
        name=STEP_TUNE,
        display_name="Tune hyperparameters",
        description=f"{strategy} search over {', '.join(tuned_names)}; objective {config.OBJECTIVE_METRIC}.",
        step_args=tuner.fit(inputs=channels),
        cache_config=cache,
        retry_policies=_retry_policies(job=True),
    )

    # --- Train -------------------------------------------------------------------------------------------------
    best_job = step_tune.properties.BestTrainingJob
    tuned = {key: best_job.TunedHyperParameters[key] for key in tuned_names}
    distributed: dict[str, Any] = {}
    if options.torch_distributed:
        # torchrun on every instance, one process per GPU (one per CPU instance); the trials stay single-node.
        distributed = {
            "instance_count": params.training_instance_count,
            "distribution": {"torch_distributed": {"enabled": True}},
        }
    training_estimator = _TrainStepPyTorch(
        **{**estimator_common, **distributed},
        output_path=_s3(bucket, name, "training"),
        # Keyed by the best trial: a cached Tune gives the same path (same cache key), a new Tune a new one,
        # so a job never resumes from another configuration's checkpoints.
        checkpoint_s3_uri=Join(on="/", values=["s3:/", bucket, name, "checkpoints", best_job.TrainingJobName]),
        checkpoint_local_path=CHECKPOINT_LOCAL_PATH,
        hyperparameters={**static_hyperparameters, **tuned, "epochs": params.training_epochs},
        base_job_name=f"{prefix}-train",
        tensorboard_output_config=TensorBoardOutputConfig(
            s3_output_path=_s3(bucket, name, "tensorboard"),
            container_local_output_path=TENSORBOARD_LOCAL_PATH,
        ),
        **_debugger_settings(options, bucket),
    )
    step_train = TrainingStep(
        name=STEP_TRAIN,
        display_name="Train final model",
        description="Train with the best trial's hyperparameters for TrainingEpochs epochs"
        + (" under torchrun on TrainingInstanceCount instances." if options.torch_distributed else "."),
        step_args=training_estimator.fit(inputs=channels),
        cache_config=cache,
        retry_policies=_retry_policies(job=True),
    )
    model_data = step_train.properties.ModelArtifacts.S3ModelArtifacts

    # --- Evaluate ----------------------------------------------------------------------------------------------
    evaluator = ScriptProcessor(
        image_uri=processing_image,
        command=["python3"],
        role=role,
        instance_type=params.processing_instance_type,
        instance_count=1,
        base_job_name=f"{prefix}-evaluate",
        sagemaker_session=sagemaker_session,
        network_config=network_config,
        **kms,
    )
    evaluation_report = PropertyFile(
        name=PROPERTY_FILE_EVALUATION, output_name=OUTPUT_EVALUATION, path=config.EVALUATION_FILE
    )
    # Evaluate also builds the int8 network (calibrated on the validation split), scores it beside fp32, and writes
    # the artifact Register registers: the trained one plus the precision it chose (and the int8 network if so).
    evaluate_inputs = [
        ProcessingInput(source=model_data, destination=EVALUATE_MODEL_DIR, input_name="model"),
        ProcessingInput(source=split_uri["test"], destination=EVALUATE_TEST_DIR, input_name="test"),
        ProcessingInput(source=split_uri["valid"], destination=EVALUATE_VALID_DIR, input_name="valid"),
    ]
    int8_arguments = [
        "--valid-dir",
        EVALUATE_VALID_DIR,
        "--int8",
        "on" if options.int8_serving else "off",
        "--serving-device",
        images.device_for(options.serving_instance_type),
    ]
    if options.serving_wheels_uri:
        evaluate_inputs.append(
            ProcessingInput(source=options.serving_wheels_uri, destination=EVALUATE_WHEELS_DIR, input_name="wheels")
        )
        int8_arguments += ["--wheels", EVALUATE_WHEELS_DIR]
    evaluate_args = evaluator.run(
        code=code.evaluate.s3_uri,
        inputs=evaluate_inputs,
        outputs=[
            ProcessingOutput(
                output_name=OUTPUT_EVALUATION,
                source=EVALUATE_OUTPUT_DIR,
                destination=_execution_s3(bucket, name, STEP_EVALUATE, OUTPUT_EVALUATION),
            )
        ],
        arguments=[
            "--model",
            EVALUATE_MODEL_DIR,
            "--test-dir",
            EVALUATE_TEST_DIR,
            "--output-dir",
            EVALUATE_OUTPUT_DIR,
            *int8_arguments,
        ],
        kms_key=options.kms_key,
    )
    step_evaluate = ProcessingStep(
        name=STEP_EVALUATE,
        display_name="Evaluate on the test split",
        description="Accuracy, top-5, per-class metrics and the confusion matrix on the held-out test split; int8 "
        "scored beside fp32 and served if within a point; writes the artifact to register.",
        step_args=evaluate_args,
        property_files=[evaluation_report],
        cache_config=cache,
        retry_policies=_retry_policies(job=True),
    )
    evaluation_dir_uri = step_evaluate.properties.ProcessingOutputConfig.Outputs[OUTPUT_EVALUATION].S3Output.S3Uri
    accuracy = JsonGet(
        step_name=step_evaluate.name, property_file=evaluation_report, json_path=config.ACCURACY_JSON_PATH
    )

    # --- Register ----------------------------------------------------------------------------------------------
    # The artifact registered is the one Evaluate scored and wrote beside its report: train.py's, plus the serving
    # precision Evaluate chose (serving.json) and, for int8, the quantised network and its runtime's wheels, so the
    # decision travels with the bytes (an offline check of the artifact answers as the endpoint does). It serves on
    # both images with no repack step: the Ray Serve image runs its config.yaml and deployment.py, the legacy
    # PyTorch image its code/inference.py, found through SAGEMAKER_PROGRAM. No entry_point is given, so the SDK
    # adds no _RepackModel step.
    served_model_data = Join(on="/", values=[evaluation_dir_uri, evaluate_step_script.SERVED_MODEL_ARCHIVE])
    serving_image = images.serving_image_uri(
        region, options.serving_instance_type, options.serving_image, options.serving_image_uri
    )
    serving_device = images.device_for(options.serving_instance_type)
    serving_instances = [options.serving_instance_type] + [
        instance_type
        for instance_type in config.INFERENCE_INSTANCE_TYPES
        if instance_type != options.serving_instance_type and images.device_for(instance_type) == serving_device
    ]
    model = Model(
        image_uri=serving_image,
        model_data=served_model_data,
        role=role,
        env={
            "SAGEMAKER_PROGRAM": "inference.py",
            "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
            "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
            "SAGEMAKER_REGION": region,
        },
        sagemaker_session=sagemaker_session,
        enable_network_isolation=options.network_isolation,
        vpc_config=(
            {"Subnets": list(options.subnets), "SecurityGroupIds": list(options.security_group_ids)}
            if options.subnets
            else None
        ),
        model_kms_key=options.kms_key,
    )
    model_metrics = ModelMetrics(
        model_statistics=MetricsSource(
            s3_uri=Join(on="/", values=[evaluation_dir_uri, config.EVALUATION_FILE]),
            content_type="application/json",
        )
    )
    register_args = model.register(
        content_types=list(config.REQUEST_CONTENT_TYPES),
        response_types=list(config.RESPONSE_CONTENT_TYPES),
        inference_instances=serving_instances,
        transform_instances=list(config.TRANSFORM_INSTANCE_TYPES),
        model_package_group_name=params.model_package_group_name,
        approval_status=params.model_approval_status,
        model_metrics=model_metrics,
        description="Fine-tuned torchvision image classifier registered by the pipeline.",
        domain="COMPUTER_VISION",
        task="IMAGE_CLASSIFICATION",
        framework="PYTORCH",
        framework_version=images.framework_version(options.serving_image),
    )
    step_register = ModelStep(
        name=STEP_REGISTER,
        display_name="Register model",
        description="Register the model package with its evaluation report as model metrics.",
        step_args=register_args,
        retry_policies=_retry_policies(job=False),
    )

    # --- Deploy -------------------------------------------------------------------------------------------------
    # The deploy function `upsert` creates (steps/deploy.py) gets the new package's ARN. It starts the endpoint's
    # create or blue/green update if the package is Approved (the ModelApprovalStatus parameter: auto-deploy for
    # a dev or staging account) and returns at once; otherwise it returns awaiting-approval and EventBridge
    # brings the approval to the same function later.
    deploy_steps: list[LambdaStep] = []
    if options.deploy_step:
        deploy_steps.append(
            _InvokeOnlyLambdaStep(
                name=STEP_DEPLOY,
                display_name="Deploy if approved",
                description="Start the endpoint's create or blue/green update if the new model package is Approved; "
                "otherwise return awaiting-approval (approving it later deploys it through EventBridge).",
                lambda_func=Lambda(
                    function_arn=deploy_function_arn(region, account_id, options.deploy_function_name),
                    session=sagemaker_session,
                ),
                inputs={"model_package_arn": step_register.properties.ModelPackageArn},
                outputs=[
                    LambdaOutput(output_name=name, output_type=LambdaOutputTypeEnum.String)
                    for name in config.DEPLOY_STEP_OUTPUTS
                ],
            )
        )

    # --- CheckAccuracy / Fail ----------------------------------------------------------------------------------
    step_fail = FailStep(
        name=STEP_FAIL,
        display_name="Accuracy below threshold",
        description="Stop without registering: the model is not accurate enough.",
        error_message=Join(
            on=" ",
            values=["Test accuracy", accuracy, "is below the AccuracyThreshold", params.accuracy_threshold],
        ),
    )
    step_check = ConditionStep(
        name=STEP_CHECK,
        display_name="Check accuracy",
        description=f"Register only if {config.ACCURACY_JSON_PATH} >= AccuracyThreshold.",
        conditions=[ConditionGreaterThanOrEqualTo(left=accuracy, right=params.accuracy_threshold)],
        if_steps=[step_register, *deploy_steps],
        else_steps=[step_fail],
    )

    return Pipeline(
        name=name,
        parameters=params.as_list(),
        steps=[step_preprocess, step_tune, step_train, step_evaluate, step_check],
        sagemaker_session=sagemaker_session,
        pipeline_definition_config=PipelineDefinitionConfig(use_custom_job_prefix=True),
    )


# --- checking a definition against SageMaker's own API shapes (offline) ----------------------------------------
#
# SageMaker validates a pipeline's job arguments only when a step runs, hours into an execution. These checks
# read botocore's SageMaker service model instead, so a wrong member name, a missing required member, a bad
# enum value or a reference to something that does not exist fails `definition`/`upsert` and the tests.

# Step type -> (the API call its Arguments are the request of, the Describe call its properties come from).
STEP_API_OPERATIONS = {
    "Processing": ("CreateProcessingJob", "DescribeProcessingJob"),
    "Training": ("CreateTrainingJob", "DescribeTrainingJob"),
    "Tuning": ("CreateHyperParameterTuningJob", "DescribeHyperParameterTuningJob"),
    "RegisterModel": ("CreateModelPackage", "DescribeModelPackage"),
}
# Job names the pipeline service fills in (the SDK leaves them out unless custom prefixes are on).
SERVICE_FILLED_MEMBERS = {"ProcessingJobName", "TrainingJobName", "HyperParameterTuningJobName"}
EXECUTION_VARIABLE_NAMES = {
    "CurrentDateTime",
    "StartDateTime",
    "PipelineArn",
    "PipelineName",
    "PipelineExecutionArn",
    "PipelineExecutionId",
    "ProcessingJobName",
    "TrainingJobName",
}
_PARAMETER_VALUE_TYPES = {"String": "string", "Integer": "integer", "Float": "float", "Boolean": "boolean"}
_LAMBDA_OUTPUT_TYPES = _PARAMETER_VALUE_TYPES  # a LambdaOutput's OutputType takes the same four names
# Which expression value types each botocore scalar type accepts ("any" = unknown until run time).
_ACCEPTED_TYPES = {
    "string": {"string", "any"},
    "integer": {"integer", "any"},
    "long": {"integer", "any"},
    "float": {"float", "integer", "any"},
    "double": {"float", "integer", "any"},
    "boolean": {"boolean", "any"},
}


@functools.lru_cache(maxsize=1)
def _sagemaker_service_model() -> Any:
    """botocore's SageMaker API model (loading it takes a second: once per process)."""
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker")


def iter_steps(definition: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step of a definition, the ones nested in condition branches included."""
    found = []
    pending = list(definition.get("Steps", []))
    while pending:
        step = pending.pop(0)
        found.append(step)
        if step.get("Type") == "Condition":
            pending.extend(step["Arguments"].get("IfSteps", []))
            pending.extend(step["Arguments"].get("ElseSteps", []))
    return found


def _is_expression(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("Get", "Std:Join", "Std:JsonGet")


def iter_references(value: Any) -> list[str]:
    """All ``{"Get": ...}`` reference strings anywhere inside value."""
    found = []
    if isinstance(value, dict):
        if set(value) == {"Get"} and isinstance(value["Get"], str):
            return [value["Get"]]
        for item in value.values():
            found.extend(iter_references(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(iter_references(item))
    return found


def split_property_path(path: str) -> list[str | int]:
    """Split a property path: ``A.B['x'].C[0]`` gives ``["A", "B", "x", "C", 0]``."""
    tokens: list[str | int] = []
    for match in re.finditer(r"([^.\[\]]+)|\[(\d+)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]", path):
        name, index, quoted, double = match.groups()
        if index is not None:
            tokens.append(int(index))
        else:
            tokens.append(next(text for text in (name, quoted, double) if text is not None))
    return tokens


class DefinitionChecker:
    """Checks a pipeline definition (as a dict) and collects problems as readable lines."""

    def __init__(self, definition: dict[str, Any]) -> None:
        self.definition = definition
        self.model = _sagemaker_service_model()
        self.steps = {step["Name"]: step for step in iter_steps(definition)}
        self.parameters = {p["Name"]: p for p in definition.get("Parameters", [])}
        self.problems: list[str] = []

    # -- entry point --------------------------------------------------------------------------------------------
    def check(self) -> list[str]:
        names = [step["Name"] for step in iter_steps(self.definition)]
        for name in {n for n in names if names.count(n) > 1}:
            self.problems.append(f"step name {name!r} is used more than once")
        for step in self.steps.values():
            operations = STEP_API_OPERATIONS.get(step.get("Type"))
            if operations:  # the shape walk checks every expression it meets, references included
                shape = self.model.operation_model(operations[0]).input_shape
                self._check_value(step.get("Arguments", {}), shape, f"{step['Name']}.Arguments", top_level=True)
            else:
                for reference in iter_references(own_arguments(step)):
                    self._expression_type({"Get": reference}, f"{step['Name']}.Arguments")
            for dependency in step.get("DependsOn", []):
                if dependency not in self.steps:
                    self.problems.append(f"{step['Name']} depends on unknown step {dependency!r}")
            if step.get("Type") == "Lambda":
                self._check_lambda_step(step)
        used = {ref.split(".", 1)[1] for ref in iter_references(self.definition) if ref.startswith("Parameters.")}
        for name in self.parameters:
            if name not in used:
                self.problems.append(f"parameter {name} is declared but never used")
        self._check_acyclic()
        return self.problems

    def _check_lambda_step(self, step: dict[str, Any]) -> None:
        arn = step.get("FunctionArn")
        if not (isinstance(arn, str) and re.fullmatch(r"arn:aws[a-z-]*:lambda:[a-z0-9-]+:\d{12}:function:[\w-]+", arn)):
            self.problems.append(f"{step['Name']}: FunctionArn {arn!r} is not the ARN of a Lambda function")
        names = [output.get("OutputName") for output in step.get("OutputParameters", [])]
        for name in {n for n in names if names.count(n) > 1}:
            self.problems.append(f"{step['Name']}: output {name!r} is declared more than once")
        for output in step.get("OutputParameters", []):
            if output.get("OutputType") not in _LAMBDA_OUTPUT_TYPES:
                self.problems.append(f"{step['Name']}: output {output.get('OutputName')!r} has an unknown type")

    # -- shapes -------------------------------------------------------------------------------------------------
    def _check_value(self, value: Any, shape: Any, where: str, top_level: bool = False) -> None:
        kind = shape.type_name
        if _is_expression(value):
            value_type = self._expression_type(value, where)
            if kind not in _ACCEPTED_TYPES:
                self.problems.append(f"{where}: an expression cannot stand for a {kind} ({shape.name})")
            elif value_type not in _ACCEPTED_TYPES[kind]:
                wanted = {"integer": "an integer", "long": "an integer", "boolean": "true/false"}.get(kind, f"a {kind}")
                self.problems.append(f"{where}: expression gives a {value_type} where {shape.name} needs {wanted}")
            return
        if kind == "structure":
            if not isinstance(value, dict):
                self.problems.append(f"{where}: expected an object ({shape.name}), got {type(value).__name__}")
                return
            for member in value:
                if member not in shape.members:
                    self.problems.append(f"{where}: unknown member {member!r} of {shape.name}")
            for member in shape.required_members:
                if member not in value and not (top_level and member in SERVICE_FILLED_MEMBERS):
                    self.problems.append(f"{where}: missing required member {member!r} of {shape.name}")
            for member, item in value.items():
                if member in shape.members:
                    self._check_value(item, shape.members[member], f"{where}.{member}")
        elif kind == "list":
            if not isinstance(value, list):
                self.problems.append(f"{where}: expected a list ({shape.name}), got {type(value).__name__}")
                return
            self._check_size(len(value), shape, where)
            for index, item in enumerate(value):
                self._check_value(item, shape.member, f"{where}[{index}]")
        elif kind == "map":
            if not isinstance(value, dict):
                self.problems.append(f"{where}: expected a map ({shape.name}), got {type(value).__name__}")
                return
            self._check_size(len(value), shape, where)
            for key, item in value.items():
                self._check_value(key, shape.key, f"{where}[key {key!r}]")
                self._check_value(item, shape.value, f"{where}[{key!r}]")
        elif kind == "string":
            if not isinstance(value, str):
                self.problems.append(f"{where}: expected a string ({shape.name}), got {value!r}")
                return
            if shape.enum and value not in shape.enum:
                self.problems.append(f"{where}: {value!r} is not one of {shape.name}'s values {shape.enum}")
            self._check_size(len(value), shape, where)
            self._check_pattern(value, shape, where)
        elif kind in ("integer", "long"):
            if isinstance(value, bool) or not isinstance(value, int):
                self.problems.append(f"{where}: expected an integer ({shape.name}), got {value!r}")
                return
            self._check_size(value, shape, where)
        elif kind in ("float", "double"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.problems.append(f"{where}: expected a number ({shape.name}), got {value!r}")
        elif kind == "boolean" and not isinstance(value, bool):
            self.problems.append(f"{where}: expected true/false ({shape.name}), got {value!r}")
        # timestamps and blobs do not occur in pipeline job arguments

    def _check_size(self, size: int, shape: Any, where: str) -> None:
        low, high = shape.metadata.get("min"), shape.metadata.get("max")
        if low is not None and size < low:
            self.problems.append(f"{where}: {size} is below the minimum {low} of {shape.name}")
        if high is not None and size > high:
            self.problems.append(f"{where}: {size} is above the maximum {high} of {shape.name}")

    def _check_pattern(self, value: str, shape: Any, where: str) -> None:
        pattern = shape.metadata.get("pattern")
        if not pattern:
            return
        try:
            compiled = re.compile(pattern)
        except re.error:  # Java-only syntax (\p{L}, \uD800 ranges): checked by the service alone
            return
        if not compiled.fullmatch(value):
            self.problems.append(f"{where}: {value!r} does not match {shape.name}'s pattern {pattern}")

    # -- expressions and references -----------------------------------------------------------------------------
    def _expression_type(self, expression: dict[str, Any], where: str) -> str:
        ((function, body),) = expression.items()
        if function == "Std:Join":
            for item in body.get("Values", []):
                if _is_expression(item):
                    self._expression_type(item, where)
            return "string"
        if function == "Std:JsonGet":
            self._expression_type(body.get("PropertyFile", {}), where)
            return "any"
        return self._reference_type(body, where)

    def _reference_type(self, reference: str, where: str) -> str:
        root, _, rest = reference.partition(".")
        if root == "Parameters":
            parameter = self.parameters.get(rest)
            if parameter is None:
                self.problems.append(f"{where}: reference {reference} names no declared parameter")
                return "any"
            return _PARAMETER_VALUE_TYPES.get(parameter["Type"], "any")
        if root == "Execution":
            if rest not in EXECUTION_VARIABLE_NAMES:
                self.problems.append(f"{where}: reference {reference} names no execution variable")
            return "string"
        if root == "Steps":
            step_name, _, path = rest.partition(".")
            step = self.steps.get(step_name)
            if step is None:
                self.problems.append(f"{where}: reference {reference} names no step")
                return "any"
            return self._step_property_type(step, path, reference, where)
        self.problems.append(f"{where}: reference {reference} is neither a parameter, a step nor an execution variable")
        return "any"

    def _step_property_type(self, step: dict[str, Any], path: str, reference: str, where: str) -> str:
        tokens = split_property_path(path)
        if tokens[:1] == ["PropertyFiles"]:
            declared = {p["PropertyFileName"] for p in step.get("PropertyFiles", [])}
            if len(tokens) != 2 or tokens[1] not in declared:
                self.problems.append(f"{where}: reference {reference} names no property file of {step['Name']}")
            return "any"
        if step.get("Type") == "Lambda":
            outputs = {o.get("OutputName"): o.get("OutputType") for o in step.get("OutputParameters", [])}
            if len(tokens) != 2 or tokens[0] != "OutputParameters" or tokens[1] not in outputs:
                self.problems.append(f"{where}: reference {reference} names no output of {step['Name']}")
                return "any"
            return _LAMBDA_OUTPUT_TYPES.get(outputs[tokens[1]], "any")
        operations = STEP_API_OPERATIONS.get(step.get("Type"))
        if operations is None:
            self.problems.append(f"{where}: reference {reference}: a {step.get('Type')} step has no properties")
            return "any"
        shape = self.model.operation_model(operations[1]).output_shape
        for position, token in enumerate(tokens):
            if isinstance(token, int):
                if shape.type_name != "list":
                    self.problems.append(f"{where}: reference {reference}: {shape.name} is not a list")
                    return "any"
                shape = shape.member
            elif shape.type_name == "structure":
                if token not in shape.members:
                    self.problems.append(f"{where}: reference {reference}: {shape.name} has no member {token!r}")
                    return "any"
                shape = shape.members[token]
            elif shape.type_name == "map":
                shape = shape.value
            elif shape.type_name == "list":  # a list indexed by name: processing outputs by OutputName
                if tokens[position - 1] == "Outputs" and step.get("Type") == "Processing":
                    outputs = step["Arguments"].get("ProcessingOutputConfig", {}).get("Outputs", [])
                    if token not in {output.get("OutputName") for output in outputs}:
                        self.problems.append(f"{where}: reference {reference}: {step['Name']} has no output {token!r}")
                shape = shape.member
            else:
                self.problems.append(f"{where}: reference {reference}: cannot index a {shape.type_name}")
                return "any"
        return {"integer": "integer", "long": "integer", "float": "float", "double": "float"}.get(
            shape.type_name, "string" if shape.type_name in ("string", "timestamp") else "any"
        )

    def _check_acyclic(self) -> None:
        graph = step_dependencies(self.definition)
        state: dict[str, int] = {}

        def visit(name: str, trail: list[str]) -> None:
            if state.get(name) == 1:
                self.problems.append(f"steps form a cycle: {' -> '.join([*trail, name])}")
                return
            if state.get(name) == 2:
                return
            state[name] = 1
            for upstream in sorted(graph.get(name, ())):
                visit(upstream, [*trail, name])
            state[name] = 2

        for name in sorted(graph):
            visit(name, [])


def own_arguments(step: dict[str, Any]) -> Any:
    """A step's arguments without the steps nested in it (a condition's branches are steps of their own)."""
    arguments = step.get("Arguments", {})
    if step.get("Type") == "Condition":
        return {key: value for key, value in arguments.items() if key not in ("IfSteps", "ElseSteps")}
    return arguments


def step_dependencies(definition: dict[str, Any]) -> dict[str, set[str]]:
    """Step name -> the steps it waits for (property references, DependsOn, and the enclosing condition)."""
    graph: dict[str, set[str]] = {}
    for step in iter_steps(definition):
        upstream = set(step.get("DependsOn", []))
        for reference in iter_references(own_arguments(step)):
            if reference.startswith("Steps."):
                upstream.add(reference.split(".")[1])
        upstream.discard(step["Name"])
        graph.setdefault(step["Name"], set()).update(upstream)
        if step.get("Type") == "Condition":
            for branch in ("IfSteps", "ElseSteps"):
                for nested in step["Arguments"].get(branch, []):
                    graph.setdefault(nested["Name"], set()).add(step["Name"])
    return graph


def check_definition(definition: dict[str, Any] | str) -> list[str]:
    """Problems found in a pipeline definition (dict or JSON text); an empty list means it passed."""

    parsed = json.loads(definition) if isinstance(definition, str) else definition
    return DefinitionChecker(parsed).check()
