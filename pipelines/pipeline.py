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

from entrypoints import tracking, train_args
from pipelines import config, images
from pipelines.config import (  # step names and container paths
    CHECKPOINT_LOCAL_PATH,
    EVALUATE_MODEL_DIR,
    EVALUATE_OUTPUT_DIR,
    EVALUATE_TEST_DIR,
    EVALUATE_VALID_DIR,
    EVALUATE_WHEELS_DIR,
    OUTPUT_EVALUATION,
    PREPROCESS_CONTRACT_DIR,
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
from pipelines.definition.names import LAMBDA_FUNCTION_NAME, parse_number, partition_for_region
from pipelines.packaging import (
    TRACKING_CHANNEL,
    TRACKING_WHEELS_FOLDER,
    CodeArtifacts,
    code_artifacts,
    s3_uri,
)
from steps import evaluate as evaluate_step_script

# tracking.py beside the Evaluate script (/opt/ml/processing/input/{code,tracking}), as Preprocess has contract.py
EVALUATE_TRACKING_DIR = f"{config.PROCESSING_ROOT}/input/tracking"

# The evaluation report's PropertyFile (read by the CheckAccuracy condition).
PROPERTY_FILE_EVALUATION = "EvaluationReport"

WEIGHTS_CHANNEL = "weights"
TRAINING_CHANNELS_DIR = "/opt/ml/input/data"  # where a training job finds each channel, by its name

# Hyperparameters that pipeline parameters fill (so they are neither static values nor tuned).
PARAMETER_HYPERPARAMETERS = ("architecture", "epochs")


def training_default(name: str) -> Any:
    """train.py's default of a flag, keyed without "--" like the hyperparameters (read from its parser)."""
    defaults = vars(train_args.get_args_parser().parse_args([]))
    dest = name.replace("-", "_")
    if dest not in defaults:
        raise KeyError(f"entrypoints/train.py has no flag --{name}; see `python entrypoints/train.py --help`")
    return defaults[dest]


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
            Runtime for the evaluation container, and for the served artifact on an image that lacks it; with
            tracking, the MLflow client too: its ``tracking/`` folder is the Tune and Train jobs' ``tracking``
            channel, and their requirements install the client from it with no package index.
        hyperparameters: flags of entrypoints/train.py set for every job, keyed without "--"; a flag left out
            keeps train.py's default (entrypoints/train_args.py, the one place those are written). Those in
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
        mlflow_tracking_uri: MLflow tracking for the Tune, Train and Evaluate jobs (entrypoints/tracking.py): a
            SageMaker MLflow tracking server's or app's ARN (``--mlflow-tracking-arn``), or locally any MLflow URI.
            Sets the URI, the experiment (the pipeline's name) and the execution's ID in exactly those jobs'
            environments, ships tracking.py to Evaluate, adds the MLflow client to the training requirements (from
            the wheelhouse, given one) and the run ID to the model package's metadata. None (the default) leaves
            the definition as it was.
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
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    hyperparameter_ranges: Mapping[str, HyperparameterRange] = field(
        default_factory=lambda: dict(config.HYPERPARAMETER_RANGES)
    )
    parameter_defaults: Mapping[str, Any] = field(default_factory=dict)
    train_at_image_size: bool = False
    deploy_step: bool = True
    deploy_function_name: str = config.DEPLOY_FUNCTION_NAME
    torch_distributed: bool = False
    mlflow_tracking_uri: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad option and what to do instead."""
        unknown = sorted(set(self.parameter_defaults) - set(PARAMETER_NAMES) - set(OPTIONAL_PARAMETERS))
        if unknown:
            raise ValueError(f"no pipeline parameter named {', '.join(unknown)}; the parameters are {PARAMETER_NAMES}")
        for name in self.parameter_defaults:
            if name in OPTIONAL_PARAMETERS and not getattr(self, OPTIONAL_PARAMETERS[name]):
                raise ValueError(missing_parameter_hint(name))
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
            and str(self.hyperparameter("weights")).lower() not in ("none", "")
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
        if self.mlflow_tracking_uri is not None and (
            not self.mlflow_tracking_uri.strip() or any(c.isspace() for c in self.mlflow_tracking_uri)
        ):
            raise ValueError(f"MLflow tracking URI {self.mlflow_tracking_uri!r} is empty or holds spaces")
        if self.mlflow_tracking_uri is not None and self.network_isolation:
            raise ValueError(
                "MLflow tracking needs the jobs to reach the tracking server, and network isolation cuts them off "
                "from every network: drop one of the two; to track with no internet access, run the jobs in "
                "subnets with no internet route and an interface VPC endpoint for SageMaker MLflow (and the "
                "SageMaker API), and pass a wheelhouse (--serving-wheels-uri) that carries the MLflow client"
            )
        if not LAMBDA_FUNCTION_NAME.fullmatch(self.deploy_function_name):
            raise ValueError(
                f"deploy function name {self.deploy_function_name!r} is not a Lambda function name "
                "(1-64 letters, digits, hyphens or underscores)"
            )

    def hyperparameter(self, name: str) -> Any:
        """The value every job gets for a flag of train.py: the one set here, else train.py's default."""
        return self.hyperparameters[name] if name in self.hyperparameters else training_default(name)

    def with_hyperparameters(self, overrides: Mapping[str, Any]) -> PipelineOptions:
        """These options with some hyperparameters fixed: a fixed one leaves the tuner's ranges."""
        return dataclasses.replace(
            self,
            hyperparameters={**self.hyperparameters, **overrides},
            hyperparameter_ranges={k: v for k, v in self.hyperparameter_ranges.items() if k not in overrides},
        )


def preset_options(preset: str = "default", **changes: Any) -> PipelineOptions:
    """The options of a named preset, with ``changes`` on top.

    ``default`` is the production pipeline (train.py's defaults, config.HYPERPARAMETER_RANGES and the
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
        "Architecture": str(options.hyperparameter("architecture")),
        "MaxTuningJobs": config.MAX_TUNING_JOBS,
        "MaxParallelTuningJobs": config.MAX_PARALLEL_TUNING_JOBS,
        "TuningEpochs": options.hyperparameter("epochs"),
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
            return parse_number(kind, default[name])  # the forms SageMaker reads: "1_0" is not 10
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
    debug_uri = s3_uri(bucket, options.pipeline_name, "debugger")
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


@dataclass(frozen=True)
class _Build:
    """What every step's builder reads: the builder's arguments, the parameters and the job settings derived once."""

    session: PipelineSession
    role: str
    bucket: str
    region: str
    account_id: str
    options: PipelineOptions
    params: PipelineParameters
    code: CodeArtifacts
    cache: CacheConfig | None
    vpc: dict[str, list[str]]
    kms: dict[str, str]
    network_config: NetworkConfig | None
    processing_image: str

    @property
    def name(self) -> str:
        return self.options.pipeline_name

    @property
    def prefix(self) -> str:
        return self.options.base_job_prefix


def tracking_wheels_uri(options: PipelineOptions) -> str | None:
    """The wheelhouse's tracking/ folder when the jobs track and a wheelhouse is given (None otherwise): the Tune
    and Train jobs' tracking channel, so they install the MLflow client with no package index."""
    if not (options.mlflow_tracking_uri and options.serving_wheels_uri):
        return None
    return f"{options.serving_wheels_uri.rstrip('/')}/{TRACKING_WHEELS_FOLDER}/"


def pipeline_code(bucket: str, options: PipelineOptions, project_root: Path | None = None) -> CodeArtifacts:
    """The code objects a definition built with ``options`` names (``upsert`` uploads exactly these)."""
    wheels_dir = f"{TRAINING_CHANNELS_DIR}/{TRACKING_CHANNEL}" if tracking_wheels_uri(options) else None
    return code_artifacts(
        bucket,
        options.pipeline_name,
        project_root,
        tracking=bool(options.mlflow_tracking_uri),
        tracking_wheels_dir=wheels_dir,
    )


def _build_settings(
    session: PipelineSession,
    role: str,
    bucket: str,
    options: PipelineOptions,
    project_root: Path | None,
    account_id: str | None,
) -> _Build:
    vpc = (
        {"subnets": list(options.subnets), "security_group_ids": list(options.security_group_ids)}
        if options.subnets
        else {}
    )
    return _Build(
        session=session,
        role=role,
        bucket=bucket,
        region=session.boto_region_name,
        account_id=account_id or account_of_role(role),
        options=options,
        params=make_parameters(options, bucket),
        code=pipeline_code(bucket, options, project_root),
        cache=(
            CacheConfig(enable_caching=True, expire_after=options.cache_expire_after)
            if options.cache_expire_after
            else None
        ),
        vpc=vpc,
        kms={"volume_kms_key": options.kms_key, "output_kms_key": options.kms_key} if options.kms_key else {},
        network_config=(
            NetworkConfig(
                enable_network_isolation=options.network_isolation,
                security_group_ids=vpc.get("security_group_ids"),
                subnets=vpc.get("subnets"),
            )
            if vpc or options.network_isolation
            else None
        ),
        processing_image=framework_image_uri(session.boto_region_name, "training", options.processing_instance_type),
    )


def _script_processor(build: _Build, job: str, instance_count: Any) -> ScriptProcessor:
    return ScriptProcessor(
        image_uri=build.processing_image,
        command=["python3"],
        role=build.role,
        instance_type=build.params.processing_instance_type,
        instance_count=instance_count,
        base_job_name=f"{build.prefix}-{job}",
        sagemaker_session=build.session,
        network_config=build.network_config,
        **build.kms,
    )


def _preprocess_step(build: _Build) -> ProcessingStep:
    params = build.params
    preprocess_args = _script_processor(build, "preprocess", params.processing_instance_count).run(
        code=build.code.preprocess.s3_uri,
        inputs=[
            ProcessingInput(source=params.input_data_uri, destination=PREPROCESS_INPUT_DIR, input_name="data"),
            # contract.py beside the code input, where the script looks for it: one data contract, no copy
            ProcessingInput(
                source=build.code.contract.s3_uri, destination=PREPROCESS_CONTRACT_DIR, input_name="contract"
            ),
        ],
        outputs=[
            ProcessingOutput(
                output_name=split,
                source=f"{PREPROCESS_OUTPUT_DIR}/{split}",
                destination=_execution_s3(build.bucket, build.name, STEP_PREPROCESS, split),
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
        kms_key=build.options.kms_key,
    )
    return ProcessingStep(
        name=STEP_PREPROCESS,
        display_name="Preprocess images",
        description="Validate, deduplicate, resize and split the input images into train/valid/test ImageFolders.",
        step_args=preprocess_args,
        cache_config=build.cache,
        retry_policies=_retry_policies(job=True),
    )


def _split_uri(step_preprocess: ProcessingStep, split: str) -> Any:
    """The S3 URI of one split Preprocess wrote (a property of the step, so the edge is inferred)."""
    return step_preprocess.properties.ProcessingOutputConfig.Outputs[split].S3Output.S3Uri


@dataclass(frozen=True)
class _TrainingJobs:
    """What the tuning trials and the final training share: channels, estimator settings, static hyperparameters."""

    channels: dict[str, TrainingInput]
    estimator: dict[str, Any]
    static_hyperparameters: dict[str, Any]
    tuned_names: tuple[str, ...]


def _training_jobs(build: _Build, step_preprocess: ProcessingStep) -> _TrainingJobs:
    options, params = build.options, build.params
    channels: dict[str, TrainingInput] = {
        split: TrainingInput(s3_data=_split_uri(step_preprocess, split)) for split in ("train", "valid")
    }
    if options.weights_uri:
        channels[WEIGHTS_CHANNEL] = TrainingInput(s3_data=options.weights_uri)
    wheels = tracking_wheels_uri(options)
    if wheels:  # the MLflow client's wheels, which the training requirements install with no index
        channels[TRACKING_CHANNEL] = TrainingInput(s3_data=wheels)
    estimator: dict[str, Any] = {
        "entry_point": "train.py",
        "source_dir": build.code.training.s3_uri,
        "framework_version": config.TRAINING_FRAMEWORK_VERSION,
        "py_version": config.PYTHON_VERSION,
        "role": build.role,
        "instance_type": params.training_instance_type,
        # One instance for the trials; the Train step's count is TrainingInstanceCount with torch_distributed
        # only: a parameterised count makes the SDK drop the Debugger hook, which a single-node Train keeps.
        "instance_count": 1,
        "image_uri": framework_image_uri(build.region, "training", options.training_instance_type),
        "metric_definitions": config.METRIC_DEFINITIONS,
        "sagemaker_session": build.session,
        "enable_network_isolation": options.network_isolation,
        "use_spot_instances": options.use_spot_instances,
        "max_run": options.max_runtime_seconds,
        "max_wait": options.max_wait_seconds if options.use_spot_instances else None,
        "subnets": build.vpc.get("subnets"),
        "security_group_ids": build.vpc.get("security_group_ids"),
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
    return _TrainingJobs(channels, estimator, static_hyperparameters, tuned_names)


def _tracking_environment(build: _Build, step: str) -> dict[str, Any]:
    """The MLflow variables of one tracked job (entrypoints/tracking.py); empty without tracking, so a definition
    built without it is unchanged. The execution's ID makes one parent run per execution, and, being part of the
    job's environment, of Train's and Evaluate's cache keys: with tracking they run in every execution."""
    options = build.options
    if not options.mlflow_tracking_uri:
        return {}
    environment: dict[str, Any] = {
        tracking.ENV_TRACKING_URI: options.mlflow_tracking_uri,
        tracking.ENV_EXPERIMENT: options.pipeline_name,
        tracking.ENV_EXECUTION_ID: ExecutionVariables.PIPELINE_EXECUTION_ID,
        tracking.ENV_STEP: step,
    }
    if step == STEP_TRAIN:
        rules = _debugger_settings(options, build.bucket).get("rules", [])
        environment[tracking.ENV_DEBUGGER_RULES] = ",".join(rule.name for rule in rules) or "none"
    return environment


def _tune_step(build: _Build, training: _TrainingJobs) -> TuningStep:
    options, params = build.options, build.params
    tracked = {"environment": {**training.estimator["environment"], **_tracking_environment(build, STEP_TUNE)}}
    tuning_estimator = PyTorch(
        **{**training.estimator, **tracked},
        output_path=s3_uri(build.bucket, build.name, "tuning"),
        checkpoint_s3_uri=None,
        hyperparameters={**training.static_hyperparameters, "epochs": params.tuning_epochs},
        base_job_name=f"{build.prefix}-trial",
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
        base_tuning_job_name=f"{build.prefix}-tune",
        warm_start_config=warm_start,
        random_seed=int(options.hyperparameter("seed")),
    )
    return _StableTuningStep(
        name=STEP_TUNE,
        display_name="Tune hyperparameters",
        description=f"{strategy} search over {', '.join(training.tuned_names)}; objective {config.OBJECTIVE_METRIC}.",
        step_args=tuner.fit(inputs=training.channels),
        cache_config=build.cache,
        retry_policies=_retry_policies(job=True),
    )


def _train_step(build: _Build, training: _TrainingJobs, step_tune: TuningStep) -> TrainingStep:
    options, params = build.options, build.params
    best_job = step_tune.properties.BestTrainingJob
    tuned = {key: best_job.TunedHyperParameters[key] for key in training.tuned_names}
    distributed: dict[str, Any] = {}
    if options.torch_distributed:
        # torchrun on every instance, one process per GPU (one per CPU instance); the trials stay single-node.
        distributed = {
            "instance_count": params.training_instance_count,
            "distribution": {"torch_distributed": {"enabled": True}},
        }
    tracked = {"environment": {**training.estimator["environment"], **_tracking_environment(build, STEP_TRAIN)}}
    training_estimator = _TrainStepPyTorch(
        **{**training.estimator, **distributed, **tracked},
        output_path=s3_uri(build.bucket, build.name, "training"),
        # Keyed by the best trial: a cached Tune gives the same path (same cache key), a new Tune a new one. A
        # cached Tune with other TrainingEpochs shares the path: train.py keys each checkpoint file by its whole
        # training (every hyperparameter, the data, the code), so a job resumes only its own training's.
        checkpoint_s3_uri=Join(
            on="/", values=["s3:/", build.bucket, build.name, "checkpoints", best_job.TrainingJobName]
        ),
        checkpoint_local_path=CHECKPOINT_LOCAL_PATH,
        hyperparameters={**training.static_hyperparameters, **tuned, "epochs": params.training_epochs},
        base_job_name=f"{build.prefix}-train",
        tensorboard_output_config=TensorBoardOutputConfig(
            s3_output_path=s3_uri(build.bucket, build.name, "tensorboard"),
            container_local_output_path=TENSORBOARD_LOCAL_PATH,
        ),
        **_debugger_settings(options, build.bucket),
    )
    return TrainingStep(
        name=STEP_TRAIN,
        display_name="Train final model",
        description="Train with the best trial's hyperparameters for TrainingEpochs epochs"
        + (" under torchrun on TrainingInstanceCount instances." if options.torch_distributed else "."),
        step_args=training_estimator.fit(inputs=training.channels),
        cache_config=build.cache,
        retry_policies=_retry_policies(job=True),
    )


def _evaluate_step(build: _Build, step_train: TrainingStep, step_preprocess: ProcessingStep) -> ProcessingStep:
    """Evaluate also builds the int8 network (calibrated on the validation split), scores it beside fp32, and
    writes the artifact Register registers: the trained one plus the precision it chose (and the int8 network)."""
    options = build.options
    evaluate_inputs = [
        ProcessingInput(
            source=step_train.properties.ModelArtifacts.S3ModelArtifacts,
            destination=EVALUATE_MODEL_DIR,
            input_name="model",
        ),
        ProcessingInput(source=_split_uri(step_preprocess, "test"), destination=EVALUATE_TEST_DIR, input_name="test"),
        ProcessingInput(
            source=_split_uri(step_preprocess, "valid"), destination=EVALUATE_VALID_DIR, input_name="valid"
        ),
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
    processor = _script_processor(build, "evaluate", 1)
    if options.mlflow_tracking_uri and build.code.tracking is not None:  # tracking.py beside the script
        evaluate_inputs.append(
            ProcessingInput(source=build.code.tracking.s3_uri, destination=EVALUATE_TRACKING_DIR, input_name="tracking")
        )
        processor.env = _tracking_environment(build, STEP_EVALUATE)
    evaluate_args = processor.run(
        code=build.code.evaluate.s3_uri,
        inputs=evaluate_inputs,
        outputs=[
            ProcessingOutput(
                output_name=OUTPUT_EVALUATION,
                source=EVALUATE_OUTPUT_DIR,
                destination=_execution_s3(build.bucket, build.name, STEP_EVALUATE, OUTPUT_EVALUATION),
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
    return ProcessingStep(
        name=STEP_EVALUATE,
        display_name="Evaluate on the test split",
        description="Accuracy, top-5, per-class metrics and the confusion matrix on the held-out test split; int8 "
        "scored beside fp32 and served if within a point; writes the artifact to register.",
        step_args=evaluate_args,
        property_files=[
            PropertyFile(name=PROPERTY_FILE_EVALUATION, output_name=OUTPUT_EVALUATION, path=config.EVALUATION_FILE)
        ],
        cache_config=build.cache,
        retry_policies=_retry_policies(job=True),
    )


def _evaluation_dir_uri(step_evaluate: ProcessingStep) -> Any:
    return step_evaluate.properties.ProcessingOutputConfig.Outputs[OUTPUT_EVALUATION].S3Output.S3Uri


def _accuracy(step_evaluate: ProcessingStep) -> JsonGet:
    """The test accuracy in Evaluate's report (its PropertyFile)."""
    return JsonGet(
        step_name=step_evaluate.name,
        property_file=step_evaluate.property_files[0],
        json_path=config.ACCURACY_JSON_PATH,
    )


def _tracking_metadata(options: PipelineOptions, step_evaluate: ProcessingStep) -> dict[str, Any]:
    """With tracking, the model package's CustomerMetadataProperties name the MLflow run that evaluated it (read
    from evaluation.json's tracking section), the experiment and the tracking URI; nothing without."""
    if not options.mlflow_tracking_uri:
        return {}
    run_id = JsonGet(
        step_name=step_evaluate.name,
        property_file=step_evaluate.property_files[0],
        json_path=f"{evaluate_step_script.TRACKING_SECTION}.{evaluate_step_script.TRACKING_RUN_ID}",
    )
    return {
        "customer_metadata_properties": {
            "mlflow-run-id": run_id,
            "mlflow-experiment": options.pipeline_name,
            "mlflow-tracking-uri": options.mlflow_tracking_uri,
        }
    }


def _register_step(build: _Build, step_evaluate: ProcessingStep) -> ModelStep:
    """The artifact registered is the one Evaluate scored and wrote beside its report: train.py's, plus the serving
    precision Evaluate chose (serving.json) and, for int8, the quantised network and its runtime's wheels, so the
    decision travels with the bytes (an offline check of the artifact answers as the endpoint does). It serves on
    both images with no repack step: the Ray Serve image runs its config.yaml and deployment.py, the legacy
    PyTorch image its code/inference.py, found through SAGEMAKER_PROGRAM. No entry_point is given, so the SDK
    adds no _RepackModel step."""
    options, params = build.options, build.params
    evaluation_dir_uri = _evaluation_dir_uri(step_evaluate)
    serving_device = images.device_for(options.serving_instance_type)
    serving_instances = [options.serving_instance_type] + [
        instance_type
        for instance_type in config.INFERENCE_INSTANCE_TYPES
        if instance_type != options.serving_instance_type and images.device_for(instance_type) == serving_device
    ]
    model = Model(
        image_uri=images.serving_image_uri(
            build.region, options.serving_instance_type, options.serving_image, options.serving_image_uri
        ),
        model_data=Join(on="/", values=[evaluation_dir_uri, evaluate_step_script.SERVED_MODEL_ARCHIVE]),
        role=build.role,
        env={
            "SAGEMAKER_PROGRAM": "inference.py",
            "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
            "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
            "SAGEMAKER_REGION": build.region,
        },
        sagemaker_session=build.session,
        enable_network_isolation=options.network_isolation,
        vpc_config=(
            {"Subnets": list(options.subnets), "SecurityGroupIds": list(options.security_group_ids)}
            if options.subnets
            else None
        ),
        model_kms_key=options.kms_key,
    )
    register_args = model.register(
        content_types=list(config.REQUEST_CONTENT_TYPES),
        response_types=list(config.RESPONSE_CONTENT_TYPES),
        inference_instances=serving_instances,
        transform_instances=list(config.TRANSFORM_INSTANCE_TYPES),
        model_package_group_name=params.model_package_group_name,
        approval_status=params.model_approval_status,
        model_metrics=ModelMetrics(
            model_statistics=MetricsSource(
                s3_uri=Join(on="/", values=[evaluation_dir_uri, config.EVALUATION_FILE]),
                content_type="application/json",
            )
        ),
        description="Fine-tuned torchvision image classifier registered by the pipeline.",
        domain="COMPUTER_VISION",
        task="IMAGE_CLASSIFICATION",
        framework="PYTORCH",
        framework_version=images.framework_version(options.serving_image),
        **_tracking_metadata(options, step_evaluate),
    )
    return ModelStep(
        name=STEP_REGISTER,
        display_name="Register model",
        description="Register the model package with its evaluation report as model metrics.",
        step_args=register_args,
        retry_policies=_retry_policies(job=False),
    )


def _deploy_steps(build: _Build, step_register: ModelStep) -> list[LambdaStep]:
    """The deploy function `upsert` creates (steps/deploy.py) gets the new package's ARN. It starts the endpoint's
    create or blue/green update if the package is Approved (the ModelApprovalStatus parameter: auto-deploy for a
    dev or staging account) and returns at once; otherwise it returns awaiting-approval and EventBridge brings the
    approval to the same function later. None when the option is off."""
    options = build.options
    if not options.deploy_step:
        return []
    step_deploy = _InvokeOnlyLambdaStep(
        name=STEP_DEPLOY,
        display_name="Deploy if approved",
        description="Start the endpoint's create or blue/green update if the new model package is Approved; "
        "otherwise return awaiting-approval (approving it later deploys it through EventBridge).",
        lambda_func=Lambda(
            function_arn=deploy_function_arn(build.region, build.account_id, options.deploy_function_name),
            session=build.session,
        ),
        inputs={"model_package_arn": step_register.properties.ModelPackageArn},
        outputs=[
            LambdaOutput(output_name=name, output_type=LambdaOutputTypeEnum.String)
            for name in config.DEPLOY_STEP_OUTPUTS
        ],
    )
    return [step_deploy]


def _check_step(build: _Build, step_evaluate: ProcessingStep, if_steps: list[Any]) -> ConditionStep:
    """CheckAccuracy: the accuracy branch if Evaluate's accuracy reaches the threshold, else the FailStep."""
    accuracy = _accuracy(step_evaluate)
    threshold = build.params.accuracy_threshold
    step_fail = FailStep(
        name=STEP_FAIL,
        display_name="Accuracy below threshold",
        description="Stop without registering: the model is not accurate enough.",
        error_message=Join(on=" ", values=["Test accuracy", accuracy, "is below the AccuracyThreshold", threshold]),
    )
    return ConditionStep(
        name=STEP_CHECK,
        display_name="Check accuracy",
        description=f"Register only if {config.ACCURACY_JSON_PATH} >= AccuracyThreshold.",
        conditions=[ConditionGreaterThanOrEqualTo(left=accuracy, right=threshold)],
        if_steps=if_steps,
        else_steps=[step_fail],
    )


def get_pipeline(
    sagemaker_session: PipelineSession,
    role: str,
    bucket: str | None = None,
    options: PipelineOptions | None = None,
    project_root: Path | None = None,
    account_id: str | None = None,
) -> Pipeline:
    """Build the pipeline drawn in the module docstring. Pure: with ``bucket`` given it makes no AWS call and
    uploads nothing.

    The code objects the definition names are put in S3 by ``upload_code_artifacts(code_artifacts(...))``
    (the CLI's ``upsert`` does that before creating or updating the pipeline). One builder per step; each reads
    its upstream steps' properties only, so SageMaker infers every edge.

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
    build = _build_settings(
        sagemaker_session, role, bucket or sagemaker_session.default_bucket(), options, project_root, account_id
    )
    step_preprocess = _preprocess_step(build)
    training = _training_jobs(build, step_preprocess)
    step_tune = _tune_step(build, training)
    step_train = _train_step(build, training, step_tune)
    step_evaluate = _evaluate_step(build, step_train, step_preprocess)
    step_register = _register_step(build, step_evaluate)
    step_check = _check_step(build, step_evaluate, [step_register, *_deploy_steps(build, step_register)])
    return Pipeline(
        name=options.pipeline_name,
        parameters=build.params.as_list(),
        steps=[step_preprocess, step_tune, step_train, step_evaluate, step_check],
        sagemaker_session=sagemaker_session,
        pipeline_definition_config=PipelineDefinitionConfig(use_custom_job_prefix=True),
    )
