"""Executors of the job steps: Processing, Training and Tuning, each reading only its step's ``Arguments``.

Each job runs under the SageMaker container contract of :mod:`.containers` in ``<run folder>/<step>/``; its S3
inputs come from the local object store and its outputs go back there, at the URIs the arguments name:

- **Processing** (CreateProcessingJob): ``ProcessingInputs`` (the code object is one of them) at their
  ``LocalPath``, ``AppSpecification.ContainerEntrypoint`` + ``ContainerArguments``, ``Environment``, and each
  of ``ProcessingOutputConfig.Outputs`` uploaded to its ``S3Uri``.
- **Training** (CreateTrainingJob): ``HyperParameters`` (``sagemaker_submit_directory`` names the code,
  ``sagemaker_program`` the script), the ``InputDataConfig`` channels, ``Environment``, checkpoints synced with
  ``CheckpointConfig``, TensorBoard output, and ``model.tar.gz`` at ``<S3OutputPath>/<job>/output/``. Debugger
  rules and the profiler are listed as not evaluated locally.
- **Tuning** (CreateHyperParameterTuningJob): ``MaxNumberOfTrainingJobs`` trials, ``MaxParallelTrainingJobs`` at
  a time (at most one per CPU), sampled from ``ParameterRanges`` with ``RandomSeed`` (:mod:`.tuning`; every
  strategy is sampled as a Latin hypercube here), each a training job of ``TrainingJobDefinition`` with its
  ``StaticHyperParameters``; the best by ``HyperParameterTuningJobObjective``, read with the definition's
  ``MetricDefinitions``, becomes ``BestTrainingJob``.

Every job (each tuning trial too) is recorded in the local SageMaker (:mod:`.sagemaker`) under its job name, so
``describe_training_job(TrainingJobName=...)`` answers for it as SageMaker's would.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from pipelines.definition.expressions import as_text, is_expression
from pipelines.definition.hyperparameters import TUNING_METRIC_PARAMETER, decode_hyperparameter
from pipelines.local import containers, tuning
from pipelines.local.console import Progress
from pipelines.local.executor import LocalExecution, StepContext, StepExecutor, StepFailure, StepResult
from pipelines.util import fsutil


@dataclasses.dataclass(frozen=True)
class TrainingExtras:
    """What a project's training script needs beyond the container contract, handed over by whoever builds the
    executors (the runner): flags after the hyperparameters, made from the CreateTrainingJob request (container
    paths in them are mapped under the job's root, as a script's defaults would be on SageMaker), and environment
    variables; and how its log shows progress: the metric (one of the definition's MetricDefinitions) whose lines
    end an epoch, and the hyperparameter that plans the epochs. The engine adds none of its own: without them a
    job's progress shows no epochs."""

    arguments: Callable[[dict[str, Any]], list[str]] = lambda request: []
    environment: dict[str, str] = dataclasses.field(default_factory=dict)
    epoch_metric: str = ""
    epochs_hyperparameter: str = ""


DEBUGGER_ARGUMENTS = ("DebugRuleConfigurations", "DebugHookConfig", "ProfilerRuleConfigurations", "ProfilerConfig")
DEBUGGER_RULES = ("DebugRuleConfigurations", "ProfilerRuleConfigurations")


def _arn(context: StepContext, kind: str, name: str) -> str:
    return context.execution.arn(f"{kind}/{name.lower()}")


@contextlib.contextmanager
def _recorded_job(context: StepContext, kind: str, request: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """The job in the local SageMaker (:mod:`.sagemaker`), as SageMaker keeps it: Create<kind> with the request
    before it runs, its status and Describe fields (what the caller puts in the yielded dict) when it ends."""
    api = context.execution.sagemaker
    described: dict[str, Any] = {}
    if api is None:  # an execution made without one keeps no job records
        yield described
        return
    create = getattr(api, "create_" + re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower())
    try:
        create(**{**request, f"{kind}Name": name})
    except ClientError as error:
        raise StepFailure(f"{kind} {name}: {error.response['Error']['Message']}") from error
    try:
        yield described
    except BaseException as error:
        stopped = isinstance(error, KeyboardInterrupt) or getattr(error, "signal_name", None)
        api.end_job(kind, name, "Stopped" if stopped else "Failed", FailureReason=str(error)[:1024])
        raise
    api.end_job(kind, name, "Completed", **described)


def _job_error(error: containers.JobError) -> StepFailure:
    return StepFailure(str(error), error.log_path, error.tail, signal_name=error.signal_name)


def _decoded(value: Any) -> Any:
    """A hyperparameter as the training toolkit reads it: JSON where it parses."""
    return decode_hyperparameter(as_text(value))


def _file_counts(folder: Path) -> int:
    return sum(1 for _ in fsutil.iter_files(folder)) if folder.is_dir() else int(folder.is_file())


# --- metrics ----------------------------------------------------------------------------------------------------


def metric_values(line: str, definitions: list[dict[str, str]]) -> dict[str, float]:
    """The metrics one log line carries, found with the definition's regexes (as SageMaker finds them)."""
    found = {}
    for definition in definitions:
        match = re.search(definition["Regex"], line)
        if match:
            try:
                found[definition["Name"]] = float(match.group(1))
            except (IndexError, ValueError):
                continue
    return found


def final_metrics(log_text: str, definitions: list[dict[str, str]]) -> dict[str, float]:
    """The last value of each metric in a log: SageMaker's FinalMetricDataList."""
    final: dict[str, float] = {}
    for line in log_text.splitlines():
        final.update(metric_values(line, definitions))
    return final


def _watch(
    progress: Progress, who: str, epochs: int, definitions: list[dict[str, str]], epoch_metric: str
) -> Callable[[str], None]:
    """Tick the progress on every log line with the ``epoch_metric`` (the definitions say which lines those are)."""

    def on_line(line: str) -> None:
        metrics = metric_values(line, definitions) if epoch_metric else {}
        if epoch_metric in metrics:
            progress.epoch(who, int(metrics.pop(epoch_metric)), epochs, metrics)

    return on_line


# --- processing ------------------------------------------------------------------------------------------------


class ProcessingExecutor(StepExecutor):
    step_type = "Processing"
    provides = frozenset(
        {
            "ProcessingJobName",
            "ProcessingJobArn",
            "ProcessingJobStatus",
            "ProcessingInputs",
            "ProcessingOutputConfig",
            "ProcessingResources",
            "AppSpecification",
            "Environment",
        }
    )

    def check(self, step: dict[str, Any], execution: LocalExecution) -> list[str]:
        name, arguments = step["Name"], step.get("Arguments", {})
        problems = []
        if not arguments.get("AppSpecification", {}).get("ContainerEntrypoint"):
            problems.append(f"{name}: no AppSpecification.ContainerEntrypoint (an image's own entrypoint runs only "
                            "on SageMaker)")  # fmt: skip
        for item in arguments.get("ProcessingInputs", []):
            if "S3Input" not in item:
                problems.append(f"{name}: input {item.get('InputName')!r} is not an S3Input (runs only on SageMaker)")
                continue
            missing = execution.missing_object(item["S3Input"].get("S3Uri"))
            if missing:
                problems.append(f"{name}: input {item.get('InputName')!r}: {missing}")
        for item in arguments.get("ProcessingOutputConfig", {}).get("Outputs", []):
            if "S3Output" not in item:
                problems.append(f"{name}: output {item.get('OutputName')!r} is not an S3Output")
        return problems

    def cache_key(self, context: StepContext) -> dict[str, Any]:
        arguments = copy.deepcopy(context.arguments)
        for item in arguments.get("ProcessingInputs", []):
            what = f"input {item['InputName']}"
            item["S3Input"]["S3Uri"] = context.content_hash(item["S3Input"]["S3Uri"], what)
        for item in arguments.get("ProcessingOutputConfig", {}).get("Outputs", []):
            item["S3Output"].pop("S3Uri", None)  # where this execution's outputs go: new each run, by design
        return {"arguments": arguments, "property_files": context.step.get("PropertyFiles", [])}

    def run(self, context: StepContext) -> StepResult:
        job_name = f"{context.arguments.get('ProcessingJobName') or context.name.lower()}-{context.execution.run_id}"
        with _recorded_job(context, "ProcessingJob", context.arguments, job_name) as described:
            result = self._run(context, job_name)
            described.update(result.properties)
        return result

    def _run(self, context: StepContext, job_name: str) -> StepResult:
        arguments = context.arguments
        run = context.execution
        inputs = [
            containers.ProcessingInput(
                context.local_path(item["S3Input"]["S3Uri"], f"input {item['InputName']}"),
                item["S3Input"]["LocalPath"],
                item["InputName"],
            )
            for item in arguments.get("ProcessingInputs", [])
        ]
        outputs = arguments.get("ProcessingOutputConfig", {}).get("Outputs", [])
        app = arguments["AppSpecification"]
        job = containers.ProcessingJob(
            job_name=job_name,
            root=context.folder,
            entrypoint=[as_text(item) for item in app["ContainerEntrypoint"]],
            inputs=inputs,
            outputs=[containers.ProcessingOutput(o["S3Output"]["LocalPath"], o["OutputName"]) for o in outputs],
            arguments=[as_text(item) for item in app.get("ContainerArguments", [])],
            cpus=run.cpus,
            env=context.execution.job_environment(
                {
                    **{key: as_text(value) for key, value in arguments.get("Environment", {}).items()},
                    "MPLCONFIGDIR": str(context.folder / "mplconfig"),
                }
            ),
        )
        try:
            result = job.run()
        except containers.JobError as error:
            raise _job_error(error) from error
        written: dict[str, Path] = {"log": result.log_path}
        for output in outputs:
            local = result.outputs[output["OutputName"]]
            written[output["OutputName"]] = local
            written[f"s3:{output['OutputName']}"] = context.store.put(output["S3Output"]["S3Uri"], local)
        for spec in context.step.get("PropertyFiles", []):
            if not (written[spec["OutputName"]] / spec["FilePath"]).is_file():
                raise StepFailure(
                    f"the job wrote no {spec['FilePath']} to its output {spec['OutputName']!r} "
                    f"(property file {spec['PropertyFileName']})",
                    result.log_path,
                )
        instances = arguments.get("ProcessingResources", {}).get("ClusterConfig", {}).get("InstanceCount", 1)
        notes = [f"InstanceCount {instances}: ran as one instance"] if instances != 1 else []
        counts = ", ".join(f"{o['OutputName']} {_file_counts(written[o['OutputName']])} files" for o in outputs)
        return StepResult(
            properties={
                "ProcessingJobName": job_name,
                "ProcessingJobArn": _arn(context, "processing-job", job_name),
                "ProcessingJobStatus": "Completed",
                **{key: arguments[key] for key in self.provides if key in arguments},
            },
            metadata={"ProcessingJob": {"Arn": _arn(context, "processing-job", job_name)}},
            detail=f"outputs {counts}" if counts else "done",
            outputs=written,
            summary={
                "property_files": {
                    f"{context.name}.{spec['PropertyFileName']}": str(written[spec["OutputName"]] / spec["FilePath"])
                    for spec in context.step.get("PropertyFiles", [])
                }
            },
            notes=notes,
        )


# --- training --------------------------------------------------------------------------------------------------


def _training_inputs_keyed(request: dict[str, Any], hyperparameters_key: str, context: StepContext) -> dict[str, Any]:
    """A CreateTrainingJob-shaped request for a cache key: input URIs and the code object by their content."""
    keyed = copy.deepcopy(request)
    for channel in keyed.get("InputDataConfig", []):
        source = channel["DataSource"]["S3DataSource"]
        source["S3Uri"] = context.content_hash(source["S3Uri"], f"channel {channel['ChannelName']}")
    hyperparameters = keyed.get(hyperparameters_key, {})
    submit = _decoded(hyperparameters.get("sagemaker_submit_directory", ""))
    if isinstance(submit, str) and submit.startswith("s3://"):
        hyperparameters["sagemaker_submit_directory"] = context.content_hash(submit, "the training code")
    return keyed


def _instance_count(request: dict[str, Any]) -> Any:
    """A training job's InstanceCount (a tuning trial's comes from the tuning job's resource config)."""
    resources = request.get("ResourceConfig") or request.get("HyperParameterTuningResourceConfig") or {}
    return resources.get("InstanceCount", 1)


def _check_training(
    name: str, request: dict[str, Any], hyperparameters_key: str, execution: LocalExecution
) -> list[str]:
    problems = []
    hyperparameters = request.get(hyperparameters_key, {})
    for key in ("sagemaker_program", "sagemaker_submit_directory"):
        if key not in hyperparameters:
            problems.append(f"{name}: no {key} hyperparameter (only script-mode framework training runs locally)")
    code = execution.known_before_the_run(hyperparameters.get("sagemaker_submit_directory"))
    missing = execution.missing_object(_decoded(code)) if code is not None else None
    if missing:
        problems.append(f"{name}: the training code (sagemaker_submit_directory): {missing}")
    for channel in request.get("InputDataConfig", []):
        source = channel.get("DataSource", {}).get("S3DataSource")
        if source is None:
            problems.append(f"{name}: channel {channel.get('ChannelName')!r} is not an S3 data source")
        elif missing := execution.missing_object(source.get("S3Uri")):
            problems.append(f"{name}: channel {channel.get('ChannelName')!r}: {missing}")
    count = execution.known_before_the_run(_instance_count(request))
    launch = {key: value for key, value in hyperparameters.items() if not is_expression(value)}
    problem = containers.launch_problem(launch, count) if count is not None else None
    if problem:
        problems.append(f"{name}: {problem}")
    return problems


def run_training_job(
    context: StepContext,
    request: dict[str, Any],
    job_name: str,
    root: Path,
    cpus: int,
    on_line: Callable[[str], None] | None = None,
    extras: TrainingExtras | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """One CreateTrainingJob request (the Train step's, or a tuning trial's): returns the DescribeTrainingJob-shaped
    properties and the files written. Raises StepFailure (with the log) if the script fails."""
    with _recorded_job(context, "TrainingJob", request, job_name) as described:
        properties, written = _run_training_job(context, request, job_name, root, cpus, on_line, extras)
        described.update(properties)
    return properties, written


def _run_training_job(
    context: StepContext,
    request: dict[str, Any],
    job_name: str,
    root: Path,
    cpus: int,
    on_line: Callable[[str], None] | None,
    extras: TrainingExtras | None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    hyperparameters = {key: as_text(value) for key, value in request.get("HyperParameters", {}).items()}
    submit = _decoded(hyperparameters["sagemaker_submit_directory"])
    checkpoint = request.get("CheckpointConfig") or {}
    checkpoint_path = checkpoint.get("LocalPath", containers.DEFAULT_CHECKPOINT_PATH)
    tensorboard = request.get("TensorBoardOutputConfig") or {}
    extras = extras or TrainingExtras()
    restore = {}
    if checkpoint.get("S3Uri") and context.store.exists(checkpoint["S3Uri"]):  # SageMaker resumes from them
        restore[checkpoint_path] = context.store.path(checkpoint["S3Uri"])
    job = containers.TrainingJob(
        job_name=job_name,
        root=root,
        source_tarball=context.local_path(submit, "the training code (sagemaker_submit_directory)"),
        entry_point=str(_decoded(hyperparameters["sagemaker_program"])),
        hyperparameters=hyperparameters,
        channels={
            channel["ChannelName"]: context.local_path(
                channel["DataSource"]["S3DataSource"]["S3Uri"], f"channel {channel['ChannelName']}"
            )
            for channel in request.get("InputDataConfig", [])
        },
        cpus=cpus,
        extra_arguments=extras.arguments(request),
        env=context.execution.job_environment(
            {
                **{key: as_text(value) for key, value in request.get("Environment", {}).items()},
                **extras.environment,
                "MPLCONFIGDIR": str(root / "mplconfig"),
            }
        ),
        restore=restore,
        instance_count=_instance_count(request),
    )
    try:
        result = job.run(on_line)
    except containers.JobError as error:
        raise _job_error(error) from error
    output_path = request["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    model_uri = f"{output_path}/{job_name}/output/model.tar.gz"
    written = {"log": result.log_path, "model": result.outputs["model"]}
    written["s3:model"] = context.store.put(model_uri, result.outputs["model"])
    if "output" in result.outputs:
        written["s3:output"] = context.store.put(
            f"{output_path}/{job_name}/output/output.tar.gz", result.outputs["output"]
        )
    local_checkpoints = containers.container_path(root, checkpoint_path)
    if checkpoint.get("S3Uri") and local_checkpoints.is_dir() and any(local_checkpoints.iterdir()):
        written["checkpoints"] = local_checkpoints
        written["s3:checkpoints"] = context.store.put(checkpoint["S3Uri"], local_checkpoints)
    local_tensorboard = containers.container_path(root, tensorboard["LocalPath"]) if tensorboard else None
    if local_tensorboard and local_tensorboard.is_dir() and any(local_tensorboard.iterdir()):
        written["tensorboard"] = local_tensorboard
        uri = f"{tensorboard['S3OutputPath'].rstrip('/')}/{job_name}/tensorboard-output"
        written["s3:tensorboard"] = context.store.put(uri, local_tensorboard)
    definitions = request.get("AlgorithmSpecification", {}).get("MetricDefinitions", [])
    final = final_metrics(result.log_path.read_text(errors="replace"), definitions)
    properties = {
        "TrainingJobName": job_name,
        "TrainingJobArn": _arn(context, "training-job", job_name),
        "TrainingJobStatus": "Completed",
        "ModelArtifacts": {"S3ModelArtifacts": model_uri},
        "HyperParameters": hyperparameters,
        "FinalMetricDataList": [{"MetricName": name, "Value": value} for name, value in final.items()],
        **{key: request[key] for key in TrainingExecutor.provides if key in request and key != "HyperParameters"},
    }
    return properties, written


def _epochs(hyperparameters: dict[str, Any], key: str) -> int:
    """The epochs a job plans (for its progress bar): its hyperparameter ``key``, 0 when it does not say."""
    try:
        return int(_decoded(hyperparameters.get(key, 0))) if key else 0
    except (TypeError, ValueError):
        return 0


class TrainingExecutor(StepExecutor):
    step_type = "Training"
    provides = frozenset(
        {
            "TrainingJobName",
            "TrainingJobArn",
            "TrainingJobStatus",
            "ModelArtifacts",
            "HyperParameters",
            "FinalMetricDataList",
            "OutputDataConfig",
            "InputDataConfig",
            "AlgorithmSpecification",
            "CheckpointConfig",
            "ResourceConfig",
            "StoppingCondition",
        }
    )

    def __init__(self, extras: TrainingExtras | None = None) -> None:
        self.extras = extras or TrainingExtras()

    def check(self, step: dict[str, Any], execution: LocalExecution) -> list[str]:
        return _check_training(step["Name"], step.get("Arguments", {}), "HyperParameters", execution)

    def cache_key(self, context: StepContext) -> dict[str, Any]:
        keyed = _training_inputs_keyed(context.arguments, "HyperParameters", context)
        return {"arguments": {k: v for k, v in keyed.items() if k != "TrainingJobName"}}

    def run(self, context: StepContext) -> StepResult:
        arguments = context.arguments
        run = context.execution
        job_name = f"{arguments.get('TrainingJobName') or context.name.lower()}-{run.run_id}"
        epochs = _epochs(arguments.get("HyperParameters", {}), self.extras.epochs_hyperparameter)
        definitions = arguments.get("AlgorithmSpecification", {}).get("MetricDefinitions", [])
        progress = run.console.progress(context.name, epochs)
        try:
            properties, written = run_training_job(
                context,
                arguments,
                job_name,
                context.folder,
                run.cpus,
                _watch(progress, "final", epochs, definitions, self.extras.epoch_metric),
                self.extras,
            )
        finally:
            progress.close()
        skipped = [key for key in DEBUGGER_ARGUMENTS if key in arguments]
        if arguments.get("ProfilerConfig", {}).get("DisableProfiler") is True:
            skipped.remove("ProfilerConfig")
        rules = [rule["RuleConfigurationName"] for key in DEBUGGER_RULES for rule in arguments.get(key, [])]
        notes = [f"not evaluated locally: {', '.join(skipped)} ({', '.join(rules) or 'no rules'})"] if skipped else []
        final = ", ".join(f"{m['MetricName']}={m['Value']:.4f}" for m in properties["FinalMetricDataList"])
        launcher = ""
        if containers.torch_distributed(properties["HyperParameters"]):
            count = _instance_count(arguments)
            processes = containers.ranks(properties["HyperParameters"], count)
            launcher = f"; torchrun, {processes} processes"
            notes.append(
                f"torch_distributed: InstanceCount {count} ran as one torchrun of {processes} processes on this "
                "machine (one host, gloo on CPUs)"
            )
        return StepResult(
            properties=properties,
            metadata={"TrainingJob": {"Arn": properties["TrainingJobArn"]}},
            detail=f"{job_name}; {final}{launcher}" + ("; Debugger rules not evaluated locally" if skipped else ""),
            outputs=written,
            notes=notes,
        )


# --- tuning ------------------------------------------------------------------------------------------------------


TOP_TRAINING_JOBS = 50  # how many of the best training jobs a SageMaker tuning step lists in TrainingJobSummaries


def _trial_summary(context: StepContext, trial: tuning.TrialOutcome, objective: dict[str, Any]) -> dict[str, Any]:
    """A completed trial as a HyperParameterTrainingJobSummary (DescribeHyperParameterTuningJob's shape)."""
    return {
        "TrainingJobName": trial.name,
        "TrainingJobArn": _arn(context, "training-job", trial.name),
        "TrainingJobStatus": "Completed",
        "TunedHyperParameters": trial.tuned,
        "FinalHyperParameterTuningJobObjectiveMetric": {
            "Type": objective["Type"],
            "MetricName": objective["MetricName"],
            "Value": trial.objective,
        },
    }


class TuningExecutor(StepExecutor):
    step_type = "Tuning"
    provides = frozenset(
        {
            "HyperParameterTuningJobName",
            "HyperParameterTuningJobArn",
            "HyperParameterTuningJobStatus",
            "HyperParameterTuningJobConfig",
            "BestTrainingJob",
            "TrainingJobSummaries",
            "TrainingJobStatusCounters",
        }
    )

    def __init__(self, extras: TrainingExtras | None = None) -> None:
        self.extras = extras or TrainingExtras()

    def check(self, step: dict[str, Any], execution: LocalExecution) -> list[str]:
        arguments = step.get("Arguments", {})
        if "TrainingJobDefinition" not in arguments:
            return [
                f"{step['Name']}: one TrainingJobDefinition is needed (TrainingJobDefinitions run only on SageMaker)"
            ]
        return _check_training(step["Name"], arguments["TrainingJobDefinition"], "StaticHyperParameters", execution)

    def cache_key(self, context: StepContext) -> dict[str, Any]:
        arguments = dict(context.arguments)
        keyed = _training_inputs_keyed(arguments["TrainingJobDefinition"], "StaticHyperParameters", context)
        return {"arguments": {**arguments, "TrainingJobDefinition": keyed}}

    def run(self, context: StepContext) -> StepResult:
        arguments = context.arguments
        run = context.execution
        limits = arguments["HyperParameterTuningJobConfig"]["ResourceLimits"]
        trials, parallel = int(limits["MaxNumberOfTrainingJobs"]), int(limits["MaxParallelTrainingJobs"])
        if trials < 1 or parallel < 1:
            raise StepFailure(f"MaxNumberOfTrainingJobs {trials} and MaxParallelTrainingJobs {parallel} must be >= 1")
        tuning_job = arguments.get("HyperParameterTuningJobName") or context.name.lower()
        with _recorded_job(context, "HyperParameterTuningJob", arguments, f"{tuning_job}-{run.run_id}") as described:
            result = self._tune(context, tuning_job, trials, parallel)
            described.update(result.properties)
        return result

    def _tune(self, context: StepContext, tuning_job: str, trials: int, parallel: int) -> StepResult:
        arguments, run = context.arguments, context.execution
        job_config = arguments["HyperParameterTuningJobConfig"]
        definition = arguments["TrainingJobDefinition"]
        objective = job_config["HyperParameterTuningJobObjective"]
        definitions = definition.get("AlgorithmSpecification", {}).get("MetricDefinitions", [])
        ranges = tuning.ranges_from_definition(job_config.get("ParameterRanges", {}))
        samples = tuning.sample_trials(ranges, trials, int(job_config.get("RandomSeed", 0)))
        at_once = max(1, min(parallel, trials, run.cpus))
        static = definition.get("StaticHyperParameters", {})
        epochs = _epochs(static, self.extras.epochs_hyperparameter)
        progress = run.console.progress(context.name, trials * epochs)

        def run_trial(index: int, tuned: dict[str, str]) -> tuning.TrialOutcome:
            trial = f"trial-{index:02d}"
            request = {
                **{key: value for key, value in definition.items() if key != "StaticHyperParameters"},
                "HyperParameters": {
                    **static,
                    **tuned,
                    TUNING_METRIC_PARAMETER: json.dumps(objective["MetricName"]),
                },
            }
            job_name = f"{tuning_job}-{run.run_id}-{index:03d}"
            started = time.perf_counter()
            on_line = _watch(progress, trial, epochs, definitions, self.extras.epoch_metric)
            try:
                properties, _ = run_training_job(
                    context,
                    request,
                    job_name,
                    context.folder / trial,
                    max(1, run.cpus // at_once),
                    on_line,
                    self.extras,
                )
            except StepFailure as failure:
                last = next((line for line in reversed(failure.tail) if line.strip()), "")
                reason = f"{failure}: {last.strip()}" if last else str(failure)
                return tuning.TrialOutcome(
                    job_name, tuned, None, "Failed", reason, time.perf_counter() - started, failure.signal_name
                )
            final = {m["MetricName"]: m["Value"] for m in properties["FinalMetricDataList"]}
            if objective["MetricName"] not in final:
                reason = f"no {objective['MetricName']} in the log (the metric regex found nothing)"
                return tuning.TrialOutcome(job_name, tuned, None, "Failed", reason, time.perf_counter() - started)
            value = final[objective["MetricName"]]
            return tuning.TrialOutcome(job_name, tuned, value, "Completed", None, time.perf_counter() - started)

        try:
            with ThreadPoolExecutor(max_workers=at_once) as pool:
                outcomes = list(pool.map(run_trial, range(1, trials + 1), samples))
        finally:
            progress.close()
        return self._result(context, tuning_job, outcomes, objective, at_once)

    @staticmethod
    def _result(
        context: StepContext,
        tuning_job: str,
        outcomes: list[tuning.TrialOutcome],
        objective: dict[str, str],
        at_once: int,
    ) -> StepResult:
        run = context.execution
        trials_file = context.folder / "trials.json"
        fsutil.write_json_atomic(trials_file, [dataclasses.asdict(outcome) for outcome in outcomes])
        written: dict[str, Path] = {"trials": trials_file}
        for index in range(1, len(outcomes) + 1):
            log = context.folder / f"trial-{index:02d}" / "log.txt"
            if log.is_file():
                written[f"trial-{index:02d}-log"] = log
        best = tuning.best_trial(outcomes, objective["Type"])
        failed = [outcome for outcome in outcomes if outcome.status != "Completed"]
        if best is None:
            first = outcomes[0]
            raise StepFailure(
                f"every trial failed; {first.name}: {first.failure_reason}", context.folder / "trial-01" / "log.txt"
            )
        best_file = context.folder / "best_hyperparameters.json"
        fsutil.write_json_atomic(best_file, best.tuned)
        written["best"] = best_file
        tuning_name = f"{tuning_job}-{run.run_id}"
        arn = _arn(context, "hyper-parameter-tuning-job", tuning_name)
        metric = objective["MetricName"]
        detail = f"{len(outcomes)} trials, {at_once} at a time; best {best.name} {metric}={best.objective:.4f}"
        if failed:
            detail += f"; {len(failed)} failed ({failed[0].name}: {failed[0].failure_reason})"
        stopped = [outcome for outcome in failed if outcome.signal]
        if stopped:  # its result would have been different: never reused by a later run
            detail += f"; not cached: {', '.join(f'{o.name} ended by {o.signal}' for o in stopped)}"
        job_config = context.arguments["HyperParameterTuningJobConfig"]
        strategy, stopping = job_config.get("Strategy", "Bayesian"), job_config.get("TrainingJobEarlyStoppingType")
        notes = [
            f"Strategy {strategy} sampled locally as a seeded Latin hypercube; early stopping {stopping} not applied"
        ]
        return StepResult(
            notes=notes,
            properties={
                "HyperParameterTuningJobName": tuning_name,
                "HyperParameterTuningJobArn": arn,
                "HyperParameterTuningJobStatus": "Completed",
                "HyperParameterTuningJobConfig": job_config,
                "TrainingJobStatusCounters": {"Completed": len(outcomes) - len(failed), "Failed": len(failed)},
                "BestTrainingJob": _trial_summary(context, best, objective),
                # SageMaker's top jobs, best first (the SDK's get_top_model_s3_uri(top_k) reads [top_k])
                "TrainingJobSummaries": [
                    _trial_summary(context, trial, objective)
                    for trial in tuning.ranked_trials(outcomes, objective["Type"])[:TOP_TRAINING_JOBS]
                ],
            },
            metadata={"TuningJob": {"Arn": arn}},
            detail=detail,
            outputs=written,
            summary={"best_trial": best.name, "tuned_hyperparameters": best.tuned},
            cacheable=not stopped,
        )
