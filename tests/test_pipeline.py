"""The SageMaker pipeline's definition, built offline under moto and checked against botocore's API shapes."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from entrypoints import contract
from pipelines import config

ROLE = "arn:aws:iam::123456789012:role/PipelineRole"
BUCKET = "pipeline-test-bucket"
REGION = "us-east-1"
REPO = Path(__file__).resolve().parent.parent
ALL_OPTIONS = {
    "debugger": False,
    "tuning_strategy": "Hyperband",
    "warm_start_parent": "imgclf-tune-parent",
    "use_spot_instances": True,
    "kms_key": "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    "subnets": ("subnet-0123456789abcdef0",),
    "security_group_ids": ("sg-0123456789abcdef0",),
    "network_isolation": True,
    "weights_uri": "s3://weights-bucket/resnet50.pth",
    "torch_distributed": True,
    "int8_serving": False,
    "serving_wheels_uri": "s3://wheels-bucket/wheelhouse/",
}


def _build(preset: str = "default", **options: Any) -> dict[str, Any]:
    import boto3
    from sagemaker.workflow.pipeline_context import PipelineSession

    from pipelines.pipeline import get_pipeline, preset_options

    session = PipelineSession(boto_session=boto3.Session(region_name=REGION), default_bucket=BUCKET)
    pipeline = get_pipeline(session, role=ROLE, bucket=BUCKET, options=preset_options(preset, **options))
    return json.loads(pipeline.definition())


@contextlib.contextmanager
def offline_aws() -> Iterator[Any]:
    """moto with the artifact bucket made and the SDK's telemetry off, for module-scoped builds (the autouse
    telemetry fixture is function-scoped). Yields the S3 client."""
    import sagemaker.telemetry.telemetry_logging as telemetry
    from moto import mock_aws

    original = telemetry._send_telemetry_request
    telemetry._send_telemetry_request = lambda *args, **kwargs: None
    try:
        with mock_aws():
            import boto3

            s3 = boto3.client("s3", region_name=REGION)
            s3.create_bucket(Bucket=BUCKET)
            yield s3
    finally:
        telemetry._send_telemetry_request = original


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    """Definitions built once per module under moto: default, twice (determinism), no Debugger, all options, no
    Deploy step, the demo preset, torchrun for the final training."""
    with offline_aws() as s3:
        return {
            "default": _build(),
            "again": _build(),
            "no_debugger": _build(debugger=False),
            "distributed": _build(torch_distributed=True),
            "all_options": _build(**ALL_OPTIONS),
            "no_deploy": _build(deploy_step=False),
            "demo": _build("demo"),
            "bucket_objects": s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0),
        }


def training_default(name: str) -> Any:
    from pipelines.pipeline import training_default as read_default

    return read_default(name)


def _steps(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from pipelines.definition.check import iter_steps

    return {step["Name"]: step for step in iter_steps(definition)}


def _register_name(definition: dict[str, Any]) -> str:
    (name,) = [name for name, step in _steps(definition).items() if step["Type"] == "RegisterModel"]
    return name


def _decode(value: str) -> Any:
    """Hyperparameters are JSON-encoded strings, as the SageMaker training toolkit decodes them."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


# --- graph -----------------------------------------------------------------------------------------------------


def test_step_graph_and_edges(built: dict[str, Any]) -> None:
    from pipelines import pipeline
    from pipelines.definition.check import step_dependencies

    definition = built["default"]
    assert [(s["Name"], s["Type"]) for s in definition["Steps"]] == [
        ("Preprocess", "Processing"),
        ("Tune", "Tuning"),
        ("Train", "Training"),
        ("Evaluate", "Processing"),
        ("CheckAccuracy", "Condition"),
    ]
    check = _steps(definition)["CheckAccuracy"]["Arguments"]
    register = _register_name(definition)
    assert [(s["Name"], s["Type"]) for s in check["IfSteps"]] == [(register, "RegisterModel"), ("Deploy", "Lambda")]
    assert register.startswith(pipeline.STEP_REGISTER)
    assert [(s["Name"], s["Type"]) for s in check["ElseSteps"]] == [(pipeline.STEP_FAIL, "Fail")]

    graph = step_dependencies(definition)
    assert graph["Preprocess"] == set()
    assert graph["Tune"] == {"Preprocess"}
    assert graph["Train"] == {"Preprocess", "Tune"}
    assert graph["Evaluate"] == {"Preprocess", "Train"}
    assert graph["CheckAccuracy"] == {"Evaluate"}
    assert graph[_register_name(definition)] == {"CheckAccuracy", "Evaluate"}  # it registers Evaluate's artifact
    assert graph[pipeline.STEP_FAIL] >= {"CheckAccuracy", "Evaluate"}
    assert graph["Deploy"] == {"CheckAccuracy", register}  # after Register, and only in the accuracy branch
    # Edges come from property references only (no explicit DependsOn).
    assert not any("DependsOn" in step for step in _steps(definition).values())


def _evaluate_arguments(definition: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Evaluate's flags (``--name value`` pairs) and its inputs by name."""
    arguments = _steps(definition)["Evaluate"]["Arguments"]
    entrypoint = arguments["AppSpecification"]["ContainerArguments"]
    flags = dict(zip(entrypoint[::2], entrypoint[1::2], strict=True))
    return flags, {item["InputName"]: item for item in arguments["ProcessingInputs"]}


@pytest.mark.slow
def test_evaluate_builds_int8_from_the_validation_split_unless_turned_off_or_serving_on_gpu(
    built: dict[str, Any],
) -> None:
    flags, inputs = _evaluate_arguments(built["default"])
    assert flags["--int8"] == "on" and flags["--serving-device"] == "cpu"
    assert flags["--valid-dir"] == inputs["valid"]["S3Input"]["LocalPath"] == config.EVALUATE_VALID_DIR
    assert inputs["valid"]["S3Input"]["S3Uri"] == {
        "Get": "Steps.Preprocess.ProcessingOutputConfig.Outputs['valid'].S3Output.S3Uri"
    }
    assert "--wheels" not in flags and "wheels" not in inputs
    flags, inputs = _evaluate_arguments(built["all_options"])  # int8_serving=False, a wheelhouse
    assert flags["--int8"] == "off"
    assert flags["--wheels"] == inputs["wheels"]["S3Input"]["LocalPath"] == config.EVALUATE_WHEELS_DIR
    assert inputs["wheels"]["S3Input"]["S3Uri"] == ALL_OPTIONS["serving_wheels_uri"]
    with offline_aws():
        gpu = _build(serving_instance_type="ml.g5.xlarge")
    assert _evaluate_arguments(gpu)[0]["--serving-device"] == "gpu"


def test_no_repack_step_and_registered_container(built: dict[str, Any]) -> None:
    definition = built["default"]
    steps = _steps(definition)
    assert not [name for name, step in steps.items() if "Repack" in name or step["Type"] not in _KNOWN_TYPES]
    register = steps[_register_name(definition)]["Arguments"]
    (container,) = register["InferenceSpecification"]["Containers"]
    evaluation_uri = {"Get": "Steps.Evaluate.ProcessingOutputConfig.Outputs['evaluation'].S3Output.S3Uri"}
    # the artifact Evaluate scored and wrote beside its report, with the serving precision it chose
    assert container["ModelDataUrl"] == {"Std:Join": {"On": "/", "Values": [evaluation_uri, "model.tar.gz"]}}
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert container["Environment"]["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"
    assert container["Image"].endswith(f"/ray:{config.RAY_SERVE_IMAGE_TAG.format(device='cpu')}")  # Ray Serve
    spec = register["InferenceSpecification"]
    assert spec["SupportedContentTypes"] == list(config.REQUEST_CONTENT_TYPES)
    assert spec["SupportedResponseMIMETypes"] == list(config.RESPONSE_CONTENT_TYPES)
    assert spec["SupportedRealtimeInferenceInstanceTypes"] == ["ml.m5.large", "ml.m5.xlarge"]  # the CPU image's
    assert spec["SupportedTransformInstanceTypes"] == list(config.TRANSFORM_INSTANCE_TYPES)
    assert register["ModelApprovalStatus"] == {"Get": "Parameters.ModelApprovalStatus"}
    assert register["ModelPackageGroupName"] == {"Get": "Parameters.ModelPackageGroupName"}
    statistics = register["ModelMetrics"]["ModelQuality"]["Statistics"]
    assert statistics["ContentType"] == "application/json"
    assert statistics["S3Uri"] == {
        "Std:Join": {
            "On": "/",
            "Values": [
                {"Get": "Steps.Evaluate.ProcessingOutputConfig.Outputs['evaluation'].S3Output.S3Uri"},
                config.EVALUATION_FILE,
            ],
        }
    }


_KNOWN_TYPES = {"Processing", "Tuning", "Training", "Condition", "RegisterModel", "Fail", "Lambda"}


def test_deploy_step_invokes_the_deploy_function_with_the_new_package(built: dict[str, Any]) -> None:
    deploy = _steps(built["default"])["Deploy"]
    assert deploy["Type"] == "Lambda"
    assert deploy["DisplayName"] and "awaiting-approval" in deploy["Description"]
    # the function upsert creates, in the pipeline's region and the role's account: no account ID in the code
    account = ROLE.split(":")[4]
    assert deploy["FunctionArn"] == f"arn:aws:lambda:{REGION}:{account}:function:{config.DEPLOY_FUNCTION_NAME}"
    assert deploy["Arguments"] == {
        "model_package_arn": {"Get": f"Steps.{_register_name(built['default'])}.ModelPackageArn"}
    }
    assert deploy["OutputParameters"] == [
        {"OutputName": name, "OutputType": "String"} for name in ("action", "endpoint_name", "model_package_arn")
    ]
    # the approval status the handler checks is the Register step's, set by the ModelApprovalStatus parameter
    register = _steps(built["default"])[_register_name(built["default"])]["Arguments"]
    assert register["ModelApprovalStatus"] == {"Get": "Parameters.ModelApprovalStatus"}
    assert "CacheConfig" not in deploy  # every run invokes it

    no_deploy = _steps(built["no_deploy"])
    assert "Deploy" not in no_deploy
    assert [s["Name"] for s in no_deploy["CheckAccuracy"]["Arguments"]["IfSteps"]] == [_register_name(built["default"])]


def test_deploy_function_name_and_account_come_from_the_builder_arguments() -> None:
    from pipelines.pipeline import account_of_role, deploy_function_arn, preset_options

    assert account_of_role("arn:aws:iam::210987654321:role/x") == "210987654321"
    assert (
        deploy_function_arn("cn-north-1", "210987654321", "f") == "arn:aws-cn:lambda:cn-north-1:210987654321:function:f"
    )
    with pytest.raises(ValueError, match="not an IAM role ARN"):
        account_of_role("arn:aws:iam::role/x")
    with pytest.raises(ValueError, match="not a Lambda function name"):
        preset_options(deploy_function_name="bad name").validate()


# --- parameters ------------------------------------------------------------------------------------------------


def test_every_parameter_declared_typed_and_referenced(built: dict[str, Any]) -> None:
    from pipelines.definition.check import iter_references
    from pipelines.pipeline import PARAMETER_NAMES

    definition = built["default"]
    declared = {p["Name"]: p for p in definition["Parameters"]}
    assert list(declared) == list(PARAMETER_NAMES)
    assert {"InputDataUri", "ProcessingInstanceType", "TrainingInstanceType", "MaxTuningJobs"} <= set(declared)
    assert {"MaxParallelTuningJobs", "TrainingEpochs", "AccuracyThreshold", "ModelApprovalStatus"} <= set(declared)
    assert "ModelPackageGroupName" in declared
    referenced = {ref.split(".", 1)[1] for ref in iter_references(definition["Steps"]) if ref.startswith("Parameters.")}
    assert referenced == set(declared)

    def default(name: str) -> Any:
        return declared[name]["DefaultValue"]

    assert declared["MaxTuningJobs"]["Type"] == "Integer" and default("MaxTuningJobs") == config.MAX_TUNING_JOBS
    assert default("MaxParallelTuningJobs") == config.MAX_PARALLEL_TUNING_JOBS
    assert declared["AccuracyThreshold"]["Type"] == "Float"
    assert default("AccuracyThreshold") == config.ACCURACY_THRESHOLD
    assert default("TrainingEpochs") == config.FINAL_TRAINING_EPOCHS
    assert default("TuningEpochs") == training_default("epochs")
    assert default("Architecture") == training_default("architecture")
    assert default("ModelApprovalStatus") == "PendingManualApproval"
    assert declared["ModelApprovalStatus"]["EnumValues"] == list(config.APPROVAL_STATUSES)
    assert default("ModelPackageGroupName") == config.MODEL_PACKAGE_GROUP
    assert default("TrainingInstanceType") == config.TRAINING_INSTANCE_TYPE
    assert default("ProcessingInstanceType") == config.PROCESSING_INSTANCE_TYPE
    assert default("InputDataUri") == f"s3://{BUCKET}/{config.PIPELINE_NAME}/input/"
    assert default("ImageSize") == config.IMAGE_SIZE


def test_demo_preset_is_builder_options_of_the_same_pipeline(built: dict[str, Any]) -> None:
    """--preset demo changes defaults, hyperparameters and ranges, never the DAG: the demo a user runs locally is
    the definition they would upsert as a cheap smoke test."""
    demo, default = built["demo"], built["default"]
    assert [(s["Name"], s["Type"]) for s in _steps(demo).values()] == [
        (s["Name"], s["Type"]) for s in _steps(default).values()
    ]
    defaults = {p["Name"]: p["DefaultValue"] for p in demo["Parameters"]}
    for name, value in config.DEMO_PARAMETER_DEFAULTS.items():
        assert defaults[name] == value, name
    assert defaults["Architecture"] == config.DEMO_HYPERPARAMETERS["architecture"]
    assert defaults["TuningEpochs"] == config.DEMO_HYPERPARAMETERS["epochs"]
    assert defaults["TrainingInstanceType"] == config.DEMO_TRAINING_INSTANCE_TYPE
    tune = _steps(demo)["Tune"]["Arguments"]
    ranges = tune["HyperParameterTuningJobConfig"]["ParameterRanges"]
    tuned = {item["Name"] for kind in ranges.values() for item in kind}
    assert tuned == set(config.DEMO_HYPERPARAMETER_RANGES)
    static = tune["TrainingJobDefinition"]["StaticHyperParameters"]
    assert _decode(static["weights"]) == "none" and _decode(static["horizontal-flip"]) is False
    assert _decode(static["trainable-blocks"]) == "all"  # not tuned in the demo: a fixed value
    # the demo trains at the size the images are preprocessed to: the ImageSize parameter reaches the trainer too
    image_size = {"Std:Join": {"On": "", "Values": [{"Get": "Parameters.ImageSize"}]}}
    assert static["input-size"] == image_size
    assert _steps(demo)["Train"]["Arguments"]["HyperParameters"]["input-size"] == image_size
    assert "input-size" not in _steps(default)["Train"]["Arguments"]["HyperParameters"]
    image = tune["TrainingJobDefinition"]["AlgorithmSpecification"]["TrainingImage"]
    assert f"pytorch-training:{config.TRAINING_FRAMEWORK_VERSION}-cpu-" in image  # CPU instance, CPU image


def test_training_defaults_are_written_only_in_train_py(built: dict[str, Any]) -> None:
    """Every hyperparameter a definition gives train.py is one of its flags, and is a pipeline parameter, tuned,
    or a value other than train.py's default: a default written a second time in the pipeline would show here."""
    from entrypoints import train_args

    parser = train_args.get_args_parser()
    defaults = vars(parser.parse_args([]))
    parameter_set = {"architecture", "epochs", "input-size"}  # Architecture, *Epochs, ImageSize (demo)
    checked = 0
    for name in ("default", "demo", "all_options", "distributed"):
        steps = _steps(built[name])
        tune = steps["Tune"]["Arguments"]
        ranges = tune["HyperParameterTuningJobConfig"]["ParameterRanges"]
        tuned = {item["Name"] for kind in ranges.values() for item in kind}
        for hyperparameters in (
            tune["TrainingJobDefinition"]["StaticHyperParameters"],
            steps["Train"]["Arguments"]["HyperParameters"],
        ):
            for key, value in hyperparameters.items():
                if key.startswith("sagemaker_"):
                    continue
                dest = key.replace("-", "_")
                assert dest in defaults, f"{name}: {key} is not a flag of entrypoints/train.py"
                if key in parameter_set or key in tuned or isinstance(value, dict):
                    continue
                checked += 1
                assert _decode(value) != defaults[dest], f"{name}: {key}={value} repeats train.py's default"
    assert checked >= 3  # the demo's overrides (weights, trainable-blocks, horizontal-flip) were looked at
    # the tuner's seed is train.py's --seed, read from the parser
    seed = _steps(built["default"])["Tune"]["Arguments"]["HyperParameterTuningJobConfig"]["RandomSeed"]
    assert seed == defaults["seed"]


def test_fixed_hyperparameters_leave_the_search() -> None:
    from pipelines.pipeline import preset_options

    options = preset_options("demo").with_hyperparameters({"lr": 0.01, "architecture": "resnet34"})
    assert "lr" not in options.hyperparameter_ranges and options.hyperparameters["lr"] == 0.01
    assert options.hyperparameters["architecture"] == "resnet34"  # the Architecture parameter's default
    with pytest.raises(ValueError, match="unknown preset"):
        preset_options("huge")
    with pytest.raises(ValueError, match="no pipeline parameter named Nope"):
        preset_options(parameter_defaults={"Nope": 1}).validate()


def test_preprocess_runs_the_script_with_its_flags(built: dict[str, Any]) -> None:
    preprocess = _steps(built["default"])["Preprocess"]["Arguments"]
    app = preprocess["AppSpecification"]
    assert app["ContainerEntrypoint"] == ["python3", "/opt/ml/processing/input/code/preprocess.py"]
    arguments = app["ContainerArguments"]
    flags = arguments[0::2]
    assert flags == ["--input", "--output-dir", "--image-size", "--valid-fraction", "--test-fraction", "--seed"]
    assert arguments[arguments.index("--image-size") + 1] == {
        "Std:Join": {"On": "", "Values": [{"Get": "Parameters.ImageSize"}]}
    }
    outputs = {o["OutputName"]: o["S3Output"]["LocalPath"] for o in preprocess["ProcessingOutputConfig"]["Outputs"]}
    assert outputs == {split: f"/opt/ml/processing/output/{split}" for split in config.SPLITS}
    (data_input,) = [i for i in preprocess["ProcessingInputs"] if i["InputName"] == "data"]
    assert data_input["S3Input"]["S3Uri"] == {"Get": "Parameters.InputDataUri"}
    assert f"pytorch-training:{config.TRAINING_FRAMEWORK_VERSION}-cpu-{config.PYTHON_VERSION}" in app["ImageUri"]


# --- tuning and training ---------------------------------------------------------------------------------------


def test_tuning_ranges_objective_and_limits_match_config(built: dict[str, Any]) -> None:
    tune = _steps(built["default"])["Tune"]["Arguments"]
    job_config = tune["HyperParameterTuningJobConfig"]
    assert job_config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": config.OBJECTIVE_METRIC}
    assert job_config["Strategy"] == config.TUNING_STRATEGY == "Bayesian"
    assert job_config["TrainingJobEarlyStoppingType"] == "Auto"
    assert job_config["ResourceLimits"] == {
        "MaxNumberOfTrainingJobs": {"Get": "Parameters.MaxTuningJobs"},
        "MaxParallelTrainingJobs": {"Get": "Parameters.MaxParallelTuningJobs"},
    }
    ranges = job_config["ParameterRanges"]
    found: dict[str, config.HyperparameterRange] = {}
    for item in ranges["ContinuousParameterRanges"]:
        found[item["Name"]] = config.HyperparameterRange(
            "continuous", float(item["MinValue"]), float(item["MaxValue"]), scaling=item["ScalingType"]
        )
    for item in ranges["IntegerParameterRanges"]:
        found[item["Name"]] = config.HyperparameterRange(
            "integer", float(item["MinValue"]), float(item["MaxValue"]), scaling=item["ScalingType"]
        )
    for item in ranges["CategoricalParameterRanges"]:
        found[item["Name"]] = config.HyperparameterRange(
            "categorical", values=tuple(str(_decode(v)) for v in item["Values"])
        )
    assert found == config.HYPERPARAMETER_RANGES
    definition = tune["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == config.METRIC_DEFINITIONS
    static = definition["StaticHyperParameters"]
    assert static["epochs"] == {"Std:Join": {"On": "", "Values": [{"Get": "Parameters.TuningEpochs"}]}}
    assert static["architecture"] == {"Get": "Parameters.Architecture"}
    # the default preset sets nothing but its parameters: train.py's own defaults do the rest
    assert {key for key in static if not key.startswith("sagemaker_")} == {"epochs", "architecture"}
    assert not set(config.HYPERPARAMETER_RANGES) & set(static)
    assert "sagemaker_job_name" not in static  # a timestamp there would break determinism
    assert _decode(static["sagemaker_program"]) == "train.py"
    channels = [c["ChannelName"] for c in definition["InputDataConfig"]]
    assert channels == ["train", "valid"]


def test_training_takes_the_best_trials_hyperparameters_and_more_epochs(built: dict[str, Any]) -> None:
    train = _steps(built["default"])["Train"]["Arguments"]
    hyperparameters = train["HyperParameters"]
    user_keys = {key for key in hyperparameters if not key.startswith("sagemaker_")}
    assert user_keys == {"architecture", "epochs", *config.HYPERPARAMETER_RANGES}
    for key in config.HYPERPARAMETER_RANGES:
        assert hyperparameters[key] == {
            "Std:Join": {"On": "", "Values": [{"Get": f"Steps.Tune.BestTrainingJob.TunedHyperParameters['{key}']"}]}
        }, key
    assert hyperparameters["epochs"] == {"Std:Join": {"On": "", "Values": [{"Get": "Parameters.TrainingEpochs"}]}}
    assert training_default("epochs") < config.FINAL_TRAINING_EPOCHS
    assert train["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    checkpoint_uri = train["CheckpointConfig"]["S3Uri"]["Std:Join"]["Values"]
    assert {"Get": "Steps.Tune.BestTrainingJob.TrainingJobName"} in checkpoint_uri
    assert train["TensorBoardOutputConfig"]["LocalPath"] == "/opt/ml/output/tensorboard"
    assert train["AlgorithmSpecification"]["MetricDefinitions"] == config.METRIC_DEFINITIONS
    assert "EnableManagedSpotTraining" not in train
    assert [c["ChannelName"] for c in train["InputDataConfig"]] == ["train", "valid"]


def test_debugger_rules_hook_and_profiler_behind_one_switch(built: dict[str, Any]) -> None:
    train = _steps(built["default"])["Train"]["Arguments"]
    rules = {rule["RuleConfigurationName"] for rule in train["DebugRuleConfigurations"]}
    assert rules == {"LossNotDecreasing", "Overfit", "VanishingGradient", "PoorWeightInitialization"}
    assert [rule["RuleConfigurationName"] for rule in train["ProfilerRuleConfigurations"]] == ["ProfilerReport"]
    hook = train["DebugHookConfig"]
    names = [collection["CollectionName"] for collection in hook["CollectionConfigurations"]]
    assert names == sorted(set(names))  # one per name, in a fixed order
    assert {"losses", "gradients", "weights"} <= set(names)
    assert train["ProfilerConfig"]["DisableProfiler"] is False

    off = _steps(built["no_debugger"])["Train"]["Arguments"]
    for key in ("DebugRuleConfigurations", "DebugHookConfig", "ProfilerRuleConfigurations"):
        assert key not in off
    assert off["ProfilerConfig"] == {"DisableProfiler": True}
    # Trials never carry Debugger (cost), with or without the switch.
    tune = _steps(built["default"])["Tune"]["Arguments"]["TrainingJobDefinition"]
    assert "DebugHookConfig" not in tune and "DebugRuleConfigurations" not in tune


def test_torch_distributed_launches_the_final_training_only_on_training_instance_count(
    built: dict[str, Any],
) -> None:
    default, distributed = _steps(built["default"]), _steps(built["distributed"])
    train = distributed["Train"]["Arguments"]
    assert _decode(train["HyperParameters"]["sagemaker_torch_distributed_enabled"]) is True
    assert train["ResourceConfig"]["InstanceCount"] == {"Get": "Parameters.TrainingInstanceCount"}
    (count,) = [p for p in built["distributed"]["Parameters"] if p["Name"] == "TrainingInstanceCount"]
    assert count == {"Name": "TrainingInstanceCount", "Type": "Integer", "DefaultValue": 1}
    # the trials stay single-instance, single-process: the Tune step is the default one, byte for byte
    trial = distributed["Tune"]["Arguments"]["TrainingJobDefinition"]
    assert trial["HyperParameterTuningResourceConfig"]["InstanceCount"] == 1
    assert not [key for key in trial["StaticHyperParameters"] if "distributed" in key]
    for name in set(distributed) - {"Train"}:
        assert json.dumps(distributed[name], sort_keys=True) == json.dumps(default[name], sort_keys=True), name

    # No Debugger hook (SageMaker has none for a distributed job with checkpoints), so none of the rules that
    # read its tensors; the profiler and its report need no hook and stay.
    assert "DebugHookConfig" not in train and "DebugRuleConfigurations" not in train
    assert [rule["RuleConfigurationName"] for rule in train["ProfilerRuleConfigurations"]] == ["ProfilerReport"]
    assert train["ProfilerConfig"]["DisableProfiler"] is False
    assert "torchrun" in distributed["Train"]["Description"]
    # ...and nothing else of the Train step differs from the single-instance one
    single = default["Train"]["Arguments"]
    debugger = ("DebugHookConfig", "DebugRuleConfigurations", "ProfilerRuleConfigurations")
    for key in set(single) | set(train):
        if key in ("HyperParameters", "ResourceConfig", *debugger):
            continue
        assert train.get(key) == single.get(key), key
    launcher = {"sagemaker_torch_distributed_enabled", "sagemaker_instance_type"}
    assert set(train["HyperParameters"]) - set(single["HyperParameters"]) == launcher
    assert {**train["ResourceConfig"], "InstanceCount": 1} == single["ResourceConfig"]

    # without the option: one instance, no such parameter, the Debugger hook kept next to the checkpoints
    assert single["ResourceConfig"]["InstanceCount"] == 1 and "DebugHookConfig" in single
    assert "TrainingInstanceCount" not in {p["Name"] for p in built["default"]["Parameters"]}


def test_training_instance_count_belongs_to_torch_distributed() -> None:
    from pipelines.pipeline import preset_options

    hint = r"TrainingInstanceCount is a parameter only of a pipeline built with torch_distributed \(--torch-distributed"
    with pytest.raises(ValueError, match=hint):
        preset_options(parameter_defaults={"TrainingInstanceCount": 2}).validate()
    preset_options(torch_distributed=True, parameter_defaults={"TrainingInstanceCount": 2}).validate()


# --- evaluation, condition, fail -------------------------------------------------------------------------------


def test_condition_reads_the_accuracy_path_evaluate_writes(built: dict[str, Any]) -> None:
    steps = _steps(built["default"])
    evaluate = steps["Evaluate"]
    (property_file,) = evaluate["PropertyFiles"]
    assert property_file == {
        "PropertyFileName": "EvaluationReport",
        "OutputName": "evaluation",
        "FilePath": contract.EVALUATION_FILE,
    }
    outputs = evaluate["Arguments"]["ProcessingOutputConfig"]["Outputs"]
    assert [(o["OutputName"], o["S3Output"]["LocalPath"]) for o in outputs] == [
        ("evaluation", "/opt/ml/processing/evaluation")
    ]
    inputs = {i["InputName"]: i["S3Input"] for i in evaluate["Arguments"]["ProcessingInputs"]}
    assert inputs["model"]["S3Uri"] == {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}
    assert inputs["model"]["LocalPath"] == "/opt/ml/processing/model"
    assert inputs["test"]["S3Uri"] == {"Get": "Steps.Preprocess.ProcessingOutputConfig.Outputs['test'].S3Output.S3Uri"}

    (condition,) = steps["CheckAccuracy"]["Arguments"]["Conditions"]
    assert condition["Type"] == "GreaterThanOrEqualTo"
    json_get = condition["LeftValue"]["Std:JsonGet"]
    assert json_get["Path"] == contract.ACCURACY_JSON_PATH == "multiclass_classification_metrics.accuracy.value"
    assert json_get["PropertyFile"] == {"Get": "Steps.Evaluate.PropertyFiles.EvaluationReport"}
    assert condition["RightValue"] == {"Get": "Parameters.AccuracyThreshold"}

    message = steps["AccuracyBelowThreshold"]["Arguments"]["ErrorMessage"]["Std:Join"]["Values"]
    assert condition["LeftValue"] in message
    assert {"Get": "Parameters.AccuracyThreshold"} in message


def test_steps_have_names_retries_and_cache(built: dict[str, Any]) -> None:
    steps = _steps(built["default"])
    for name, step in steps.items():
        assert step.get("DisplayName") and step.get("Description"), name
    for name in ("Preprocess", "Tune", "Train", "Evaluate"):
        assert steps[name]["CacheConfig"] == {"Enabled": True, "ExpireAfter": config.CACHE_EXPIRE_AFTER}
        retried = {kind for policy in steps[name]["RetryPolicies"] for kind in policy["ExceptionType"]}
        assert {"Step.THROTTLING", "SageMaker.CAPACITY_ERROR", "SageMaker.RESOURCE_LIMIT"} <= retried, name
    register = steps[_register_name(built["default"])]
    assert {"Step.THROTTLING"} <= {k for p in register["RetryPolicies"] for k in p["ExceptionType"]}
    assert steps["Preprocess"]["Arguments"]["ProcessingJobName"] == f"{config.BASE_JOB_PREFIX}-preprocess"
    assert steps["Tune"]["Arguments"]["HyperParameterTuningJobName"] == f"{config.BASE_JOB_PREFIX}-tune"


def test_job_options_reach_every_job(built: dict[str, Any]) -> None:
    steps = _steps(built["all_options"])
    key = ALL_OPTIONS["kms_key"]
    vpc = {"Subnets": list(ALL_OPTIONS["subnets"]), "SecurityGroupIds": list(ALL_OPTIONS["security_group_ids"])}
    for name in ("Preprocess", "Evaluate"):
        arguments = steps[name]["Arguments"]
        assert arguments["NetworkConfig"]["EnableNetworkIsolation"] is True, name
        assert arguments["NetworkConfig"]["VpcConfig"] == vpc, name
        assert arguments["ProcessingResources"]["ClusterConfig"]["VolumeKmsKeyId"] == key, name
        assert arguments["ProcessingOutputConfig"]["KmsKeyId"] == key, name
    tune = steps["Tune"]["Arguments"]
    trial = tune["TrainingJobDefinition"]
    train = steps["Train"]["Arguments"]
    for name, job, resources in (
        ("Tune", trial, trial["HyperParameterTuningResourceConfig"]),
        ("Train", train, train["ResourceConfig"]),
    ):
        assert job["EnableNetworkIsolation"] is True, name
        assert job["EnableManagedSpotTraining"] is True, name
        assert job["VpcConfig"] == vpc, name
        assert job["OutputDataConfig"]["KmsKeyId"] == key, name
        assert resources["VolumeKmsKeyId"] == key, name
        assert job["StoppingCondition"]["MaxWaitTimeInSeconds"] >= job["StoppingCondition"]["MaxRuntimeInSeconds"]
        channels = {c["ChannelName"]: c for c in job["InputDataConfig"]}
        assert channels["weights"]["DataSource"]["S3DataSource"]["S3Uri"] == ALL_OPTIONS["weights_uri"], name
    job_config = tune["HyperParameterTuningJobConfig"]
    assert job_config["Strategy"] == "Hyperband"
    assert job_config["TrainingJobEarlyStoppingType"] == "Off"  # SageMaker requires Off with Hyperband
    assert tune["WarmStartConfig"] == {
        "WarmStartType": "TransferLearning",
        "ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": ALL_OPTIONS["warm_start_parent"]}],
    }


def test_bad_options_are_refused_with_a_reason() -> None:
    from pipelines.pipeline import PipelineOptions

    cases = [
        (PipelineOptions(tuning_strategy="Grid"), "tuning strategy"),
        (PipelineOptions(subnets=("subnet-1",)), "both subnets and security groups"),
        (PipelineOptions(network_isolation=True), "weights URI"),
        (PipelineOptions(weights_uri="/local/resnet.pth"), "s3://"),
        (PipelineOptions(use_spot_instances=True, max_wait_seconds=10, max_runtime_seconds=20), "max wait"),
    ]
    for options, reason in cases:
        with pytest.raises(ValueError, match=reason):
            options.validate()


# --- determinism and code ----------------------------------------------------------------------------------------


def test_building_twice_gives_identical_definitions_and_uploads_nothing(built: dict[str, Any]) -> None:
    assert json.dumps(built["default"]) == json.dumps(built["again"])
    text = json.dumps(built["default"])
    assert "sagemaker_job_name" not in text
    assert built["bucket_objects"] == 0  # building is pure: `upsert` uploads the code


def test_code_objects_are_content_addressed(built: dict[str, Any], tmp_path: Path) -> None:
    from pipelines.packaging import code_artifacts

    artifacts = code_artifacts(BUCKET, config.PIPELINE_NAME)
    text = json.dumps(built["default"])
    for artifact in artifacts.all():
        assert artifact.s3_uri.startswith(f"s3://{BUCKET}/{config.PIPELINE_NAME}/code/")
        assert artifact.s3_uri in text
    assert artifacts.preprocess.body == (REPO / "steps" / "preprocess.py").read_bytes()
    assert artifacts.evaluate.body == (REPO / "steps" / "evaluate.py").read_bytes()

    # A copy elsewhere (another checkout folder) with caches and hidden files gives the same objects...
    copy_root = tmp_path / "checkout"
    for folder in ("entrypoints", "steps"):
        shutil.copytree(REPO / folder, copy_root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (copy_root / "entrypoints" / "__pycache__").mkdir()
    (copy_root / "entrypoints" / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\0stale")
    (copy_root / "entrypoints" / ".notes").write_text("editor scratch")
    copied = code_artifacts(BUCKET, config.PIPELINE_NAME, copy_root)
    assert copied == artifacts
    with tarfile.open(fileobj=io.BytesIO(copied.training.body), mode="r:gz") as archive:
        names = archive.getnames()
        assert all(member.mtime == 0 for member in archive.getmembers())
    assert "train.py" in names and contract.SERVING_CODE_FILES[0] in names
    assert not [name for name in names if "__pycache__" in name or name.startswith(".")]

    # ...and any change of content gives a new path, so a cached step never runs old code.
    (copy_root / "entrypoints" / "train.py").write_text("print('changed')\n")
    assert code_artifacts(BUCKET, config.PIPELINE_NAME, copy_root).training.s3_uri != artifacts.training.s3_uri


def test_code_object_addresses_and_bytes_are_pinned(tmp_path: Path) -> None:
    """The code objects' URIs and archive bytes of a fixed tree, as they were before packaging shared fsutil's
    file walk and tar entries: a change here moves every code URI (and so every cached step) of every pipeline."""
    import hashlib

    from pipelines.packaging import code_artifacts

    files = {
        "entrypoints/train.py": b"print('train')\n",
        "entrypoints/b.py": b"B = 1\n",
        "entrypoints/a/x.py": b"X = 2\n",
        "entrypoints/a.py": b"A = 3\n",
        "entrypoints/.hidden": b"not shipped",
        "entrypoints/a/__pycache__/x.cpython-311.pyc": b"\0",
        "steps/preprocess.py": b"P = 1\n",
        "steps/evaluate.py": b"E = 1\n",
        "entrypoints/contract.py": b"C = 1\n",
    }
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(body)
    artifacts = code_artifacts("bucket", "Pipe", tmp_path)
    pinned = {
        "s3://bucket/Pipe/code/f1b1ad5d8513afc4fc3cef10cdf69828e3505b92c9794fc7abace43f522e3141/preprocess.py": (
            "cbdc1da03a3dfe42fbad5ad88009bcbc2cd373ff54484639f89d6a2f0dc525f9"
        ),
        "s3://bucket/Pipe/code/93bdef4bef4f83c5517cc7b9c5afc0a62e9dea41c1d2f5c818a5f341bf3f5da6/evaluate.py": (
            "95ce140a8b4c00a3b70da06601bee66543642ad255213036fd45fb40536b10f9"
        ),
        "s3://bucket/Pipe/code/d8be40bd282a1e071d16a7fb63dbfbc5865fb0120b236027027e910183dc36b8/sourcedir.tar.gz": (
            "fdaab0471f02fa39acdc0725bedc5c1586d569bba33ac81a33d0c14cde4f10e7"
        ),
        "s3://bucket/Pipe/code/8f1c5eed234e4c8482f8321f1cf8bf4a7ecfe90ec3b8fa3e18a8468599b10868/contract.py": (
            "287d7f1b076931fae11e7436824947f423fd129786d40059206218a90333de32"
        ),
    }
    assert {item.s3_uri: hashlib.sha256(item.body).hexdigest() for item in artifacts.all()} == pinned
    with tarfile.open(fileobj=io.BytesIO(artifacts.training.body), mode="r:gz") as archive:
        assert archive.getnames() == ["a/x.py", "a.py", "b.py", "contract.py", "train.py"]


@pytest.mark.slow
def test_definition_command_is_offline_and_stable_across_processes(built: dict[str, Any], tmp_path: Path) -> None:
    """`definition` in a fresh process with no credentials and another hash seed gives the same JSON."""
    output = tmp_path / "definition.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        PYTHONHASHSEED="12345",
        SAGEMAKER_PIPELINE_ROLE_ARN=ROLE,
        ARTIFACT_BUCKET=BUCKET,
        AWS_REGION=REGION,
    )
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "definition", "--output", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(output.read_text()) == built["default"]


# --- validation against botocore's SageMaker API shapes ---------------------------------------------------------


def test_job_arguments_match_sagemaker_api_shapes(built: dict[str, Any]) -> None:
    from pipelines.definition.check import STEP_API_OPERATIONS, check_definition

    for variant in ("default", "no_debugger", "all_options", "no_deploy", "demo", "distributed"):
        assert check_definition(built[variant]) == [], variant
    checked_types = {step["Type"] for step in _steps(built["default"]).values()} & set(STEP_API_OPERATIONS)
    assert checked_types == {"Processing", "Training", "Tuning", "RegisterModel"}


def _mutations() -> list[tuple[str, Any, str]]:
    def args(definition: dict[str, Any], name: str) -> dict[str, Any]:
        return _steps(definition)[name]["Arguments"]

    return [
        (
            "unknown member",
            lambda d: args(d, "Train").update(InstanceCount=1),
            "unknown member 'InstanceCount' of CreateTrainingJobRequest",
        ),
        (
            "missing required",
            lambda d: args(d, "Evaluate").pop("RoleArn"),
            "missing required member 'RoleArn' of CreateProcessingJobRequest",
        ),
        (
            "wrong scalar type",
            lambda d: args(d, "Train")["ResourceConfig"].update(VolumeSizeInGB="30"),
            "expected an integer",
        ),
        (
            "bad enum",
            lambda d: args(d, "Tune")["HyperParameterTuningJobConfig"].update(Strategy="Bayes"),
            "is not one of HyperParameterTuningJobStrategyType's values",
        ),
        (
            "parameter of the wrong type",
            lambda d: args(d, "Train")["ResourceConfig"].update(InstanceCount={"Get": "Parameters.InputDataUri"}),
            "expression gives a string where TrainingInstanceCount needs an integer",
        ),
        (
            "undeclared parameter",
            lambda d: args(d, "Train")["ResourceConfig"].update(InstanceType={"Get": "Parameters.GpuType"}),
            "reference Parameters.GpuType names no declared parameter",
        ),
        (
            "bad member of a top training job",
            lambda d: args(d, "Train")["CheckpointConfig"].update(
                S3Uri={"Get": "Steps.Tune.TrainingJobSummaries[0].Nope"}
            ),
            "HyperParameterTrainingJobSummary has no member 'Nope'",
        ),
        (
            "bad step property",
            lambda d: args(d, "Evaluate")["ProcessingInputs"][0]["S3Input"].update(
                S3Uri={"Get": "Steps.Train.ModelArtifacts.S3Artifacts"}
            ),
            "ModelArtifacts has no member 'S3Artifacts'",
        ),
        (
            "unknown processing output",
            lambda d: args(d, "Evaluate")["ProcessingInputs"][1]["S3Input"].update(
                S3Uri={"Get": "Steps.Preprocess.ProcessingOutputConfig.Outputs['testing'].S3Output.S3Uri"}
            ),
            "Preprocess has no output 'testing'",
        ),
        (
            "unknown step",
            lambda d: args(d, "Train")["InputDataConfig"][0]["DataSource"]["S3DataSource"].update(
                S3Uri={"Get": "Steps.Prep.ProcessingOutputConfig.Outputs['train'].S3Output.S3Uri"}
            ),
            "names no step",
        ),
        (
            "unknown property file",
            lambda d: args(d, "CheckAccuracy")["Conditions"][0]["LeftValue"]["Std:JsonGet"].update(
                PropertyFile={"Get": "Steps.Evaluate.PropertyFiles.Report"}
            ),
            "names no property file of Evaluate",
        ),
        (
            "unused parameter",
            lambda d: d["Parameters"].append({"Name": "Unused", "Type": "String", "DefaultValue": "x"}),
            "parameter Unused is declared but never used",
        ),
        (
            "name too long",
            lambda d: args(d, "Tune").update(HyperParameterTuningJobName="image-classification-tuning-job-x"),
            "above the maximum 32",
        ),
        (
            "cycle",
            lambda d: _steps(d)["Preprocess"].update(DependsOn=["Evaluate"]),
            "steps form a cycle",
        ),
        (
            "unknown Lambda output",
            lambda d: args(d, "AccuracyBelowThreshold")["ErrorMessage"]["Std:Join"]["Values"].append(
                {"Get": "Steps.Deploy.OutputParameters['status']"}
            ),
            "names no output of Deploy",
        ),
        (
            "Lambda step input from a missing Register property",
            lambda d: args(d, "Deploy").update(model_package_arn={"Get": "Steps.Register-RegisterModel.PackageArn"}),
            "has no member 'PackageArn'",
        ),
        (
            "not a function ARN",
            lambda d: _steps(d)["Deploy"].update(FunctionArn="imgclf-deploy-on-approval"),
            "is not the ARN of a Lambda function",
        ),
    ]


def test_a_tuning_steps_top_training_jobs_are_properties_as_on_sagemaker(built: dict[str, Any]) -> None:
    """The SDK's TuningStep.get_top_model_s3_uri(top_k) reads TrainingJobSummaries[top_k] (a second API's shape)."""
    from pipelines.definition.check import check_definition

    text = json.dumps(built["default"])
    best = '"Steps.Tune.BestTrainingJob.TrainingJobName"'
    assert best in text
    assert check_definition(text.replace(best, '"Steps.Tune.TrainingJobSummaries[1].TrainingJobName"')) == []


@pytest.mark.parametrize(("case", "mutate", "expected"), _mutations(), ids=[m[0] for m in _mutations()])
def test_checker_reports_what_sagemaker_would_refuse(
    built: dict[str, Any], case: str, mutate: Any, expected: str
) -> None:
    from pipelines.definition.check import check_definition

    definition = copy.deepcopy(built["default"])
    mutate(definition)
    problems = check_definition(definition)
    assert any(expected in problem for problem in problems), (case, problems)
