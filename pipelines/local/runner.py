"""``python -m pipelines.run local``: build the pipeline's definition offline and execute it on this machine.

The definition is the one ``definition`` writes and ``upsert`` sends, built by the same ``get_pipeline`` with the
same options (a preset, ``--hp``, the Deploy step's switches), with local stand-ins for what names the account:
a placeholder role and account, and the bucket of the local object store. Then, as ``upsert`` uploads the code
objects the definition names (``code_artifacts``: S3 URI -> bytes, named by content hash) before a run, the
runner puts them in the local object store, and the input data under a run-specific prefix (``InputDataUri``).
The executor (:mod:`.executor`) does the rest, from the definition alone.

Each run gets ``<workdir>/run-NNNN/``: ``definition.json`` (exactly what ran), ``run.json`` (the run and its steps,
shaped like DescribePipelineExecution and ListPipelineExecutionSteps, with the process that runs it), and a folder
per step.

Before the run folder exists, the registry is read and checked, and every value of the run is checked against the
rules of :mod:`pipelines.validation`: a refused value leaves nothing behind. While it runs, SIGINT, SIGTERM and
SIGHUP stop every job within seconds (:data:`containers.JOBS`) and the run ends ``Stopped``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entrypoints import contract
from pipelines import config, validation
from pipelines.local import containers, endpoint, fsutil, processes
from pipelines.local.cache import CACHE_DIR, StepCache
from pipelines.local.console import Console
from pipelines.local.executor import DEFINITION_FILE, LocalExecution, RunStopped, StepExecutor
from pipelines.local.objectstore import ObjectStore
from pipelines.local.registry import LocalModelRegistry, RegistryError
from pipelines.local.runs import RUN_ID


class InvalidOptions(Exception):
    """Options or values the pipeline refuses (``problems`` says which and why); nothing was started."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stopped_by_signals(grace_seconds: float = config.LOCAL_STOP_GRACE_SECONDS) -> Iterator[None]:
    """While inside, SIGINT, SIGTERM and SIGHUP stop every job (SIGTERM to each job's processes, SIGKILL after
    ``grace_seconds``; no new job starts) and raise :class:`RunStopped`, so the run unwinds and is recorded
    Stopped. A second signal kills what is left at once. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[str] = []

    def on_signal(number: int, _frame: Any) -> None:
        if received:  # impatient: no more grace
            containers.JOBS.stop_all(received[0], 0.0)
            return
        received.append(signal.Signals(number).name)
        containers.JOBS.stop_all(received[0], grace_seconds)
        raise RunStopped(received[0])

    containers.JOBS.allow()
    previous = {number: signal.signal(number, on_signal) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


DEMO_SOURCE = "built-in demo (scikit-learn digits)"
ACCEPTED_ARGUMENTS_DIR = "accepted-arguments"  # marks of job arguments the scripts' parsers accepted (validation)


@dataclass
class LocalRunOptions:
    """What a local run can change. Builder options shape the definition; ``parameters`` are its run's values."""

    workdir: Path = Path(config.LOCAL_WORKDIR)
    data: Path | None = None  # None: the built-in demo archive
    preset: str | None = None  # default: "demo" without data, "default" with it
    parameters: list[tuple[str, str]] = field(default_factory=list)  # Name=Value, checked as `start --param`
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # --hp: fixed for every job
    debugger: bool = True
    torch_distributed: bool = False  # the Train step under torchrun (--param TrainingInstanceCount=N processes)
    int8_serving: bool = True
    deploy_step: bool = True
    deploy_function_name: str = config.DEPLOY_FUNCTION_NAME
    model_package_group: str = config.MODEL_PACKAGE_GROUP
    cache: bool = True
    endpoint_name: str = config.LOCAL_ENDPOINT_NAME
    port: int = config.LOCAL_ENDPOINT_PORT
    ray: bool = False  # serve the approved model on a local Ray Serve cluster (the container's sequence)
    cpus: int | None = None
    demo_per_class_limit: int | None = None  # tests shrink the demo archive with this
    tracking_uri: str | None = None  # MLflow tracking of Tune, Train and Evaluate (the CLI: <workdir>/mlflow.db)

    @property
    def resolved_preset(self) -> str:
        return self.preset or ("demo" if self.data is None else "default")


def new_run_folder(workdir: Path) -> tuple[str, Path]:
    """``run-0001``, ``run-0002``, ...: the next free number (created here, so two runs never share one)."""
    workdir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in workdir.iterdir() if (m := RUN_ID.fullmatch(p.name))]
    number = max(numbers, default=0) + 1
    while True:
        run_id = f"run-{number:04d}"
        try:
            (workdir / run_id).mkdir()
        except FileExistsError:
            number += 1
            continue
        return run_id, workdir / run_id


def build_definition(options: LocalRunOptions) -> tuple[dict[str, Any], Any, Any]:
    """(definition, code artifacts, PipelineOptions): what ``definition --preset <preset>`` builds, with the local
    role, account and bucket. Raises ValueError for bad options."""
    from pipelines.aws_cli import _quiet_sdk, _sdk_telemetry_off

    _quiet_sdk()  # before the SDK is imported: its import warns otherwise
    import boto3
    from sagemaker.workflow.pipeline_context import PipelineSession

    from pipelines.packaging import code_artifacts
    from pipelines.pipeline import get_pipeline, preset_options

    pipeline_options = preset_options(
        options.resolved_preset,
        debugger=options.debugger,
        torch_distributed=options.torch_distributed,
        int8_serving=options.int8_serving,
        deploy_step=options.deploy_step,
        deploy_function_name=options.deploy_function_name,
        model_package_group=options.model_package_group,
        mlflow_tracking_uri=options.tracking_uri,
    ).with_hyperparameters(options.hyperparameters)
    session = PipelineSession(
        boto_session=boto3.Session(region_name=config.LOCAL_REGION), default_bucket=config.LOCAL_BUCKET
    )
    with _sdk_telemetry_off():
        pipeline = get_pipeline(
            session,
            role=config.LOCAL_ROLE_ARN,
            bucket=config.LOCAL_BUCKET,
            options=pipeline_options,
            account_id=config.LOCAL_ACCOUNT_ID,
        )
        definition = json.loads(pipeline.definition())
    artifacts = code_artifacts(config.LOCAL_BUCKET, pipeline_options.pipeline_name, tracking=bool(options.tracking_uri))
    return definition, artifacts, pipeline_options


def step_executors(options: LocalRunOptions, workdir: Path, registry: LocalModelRegistry) -> dict[str, StepExecutor]:
    """One executor per step type; the Lambda one runs the deploy function against the local registry/endpoint."""
    from pipelines.local.control import ConditionExecutor, FailExecutor, LambdaExecutor, RegisterModelExecutor
    from pipelines.local.deploy_function import deploy_function
    from pipelines.local.jobs import ProcessingExecutor, TrainingExecutor, TuningExecutor

    function = deploy_function(
        workdir,
        registry,
        model_package_group=options.model_package_group,
        endpoint_name=options.endpoint_name,
        port=options.port,
        ray=options.ray,
    )
    executors: list[StepExecutor] = [
        ProcessingExecutor(),
        TuningExecutor(),
        TrainingExecutor(),
        ConditionExecutor(),
        FailExecutor(),
        RegisterModelExecutor(registry),
        LambdaExecutor({options.deploy_function_name: function}),
    ]
    return {executor.step_type: executor for executor in executors}


class LocalPipeline:
    """One local run. ``run()`` returns the run record; raises DefinitionInvalid before the first step, or
    PipelineFailed at the step that failed (the run folder stays)."""

    def __init__(self, options: LocalRunOptions, console: Console | None = None) -> None:
        self.options = options
        self.console = console or Console()
        self.workdir = options.workdir.resolve()
        self.run_id = ""
        self.run_dir = Path()
        self.execution: LocalExecution | None = None

    def _data_input(self, store: ObjectStore, pipeline_name: str, image_size: int) -> str:
        """Put the input data in the object store; returns its prefix (the run's InputDataUri).

        ``--data`` goes under this run's prefix. The demo archive is the same bytes for the same generator code,
        image size and limit, so it is written once under a prefix named by those and reused by later runs.
        """
        if self.options.data is not None:
            prefix = f"s3://{config.LOCAL_BUCKET}/{pipeline_name}/{self.run_id}/input/"
            data = self.options.data.expanduser().resolve()
            if not data.exists():
                raise FileNotFoundError(f"--data {self.options.data} does not exist")
            store.put(prefix + data.name, data)
            return prefix
        generator = Path(str(importlib.util.find_spec("pipelines.demo_data").origin))  # not imported: no sklearn
        limit = self.options.demo_per_class_limit
        variant = f"{fsutil.file_sha256(generator)[:12]}-{image_size}px" + (f"-{limit}-per-class" if limit else "")
        prefix = f"s3://{config.LOCAL_BUCKET}/{pipeline_name}/demo-input/{variant}/"
        archive = store.path(prefix + "digits.zip")
        if archive.is_file():
            self.console.write(f"  demo archive {archive} (written by an earlier run)")
            return prefix
        from pipelines import demo_data

        started = time.perf_counter()
        demo_data.write_digits_archive(archive, image_size=image_size, per_class_limit=limit)
        self.console.write(f"  demo archive {archive} written in {time.perf_counter() - started:.1f} s")
        return prefix

    def run(self) -> dict[str, Any]:
        with stopped_by_signals():
            return self._run()

    def _checked_values(self, definition: dict[str, Any], overrides: list[dict[str, str]]) -> None:
        """Every value of the run against the rules the scripts, SageMaker and the config hold (InvalidOptions)."""
        values = validation.parameter_values(definition, overrides)
        problems = []
        for kind, name in (
            ("endpoint", self.options.endpoint_name),
            ("model package group", self.options.model_package_group),
            ("model package group", values.get("ModelPackageGroupName", self.options.model_package_group)),
        ):
            try:
                validation.check_name(kind, name)
            except ValueError as error:
                problems.append(str(error))
        accepted = self.workdir / CACHE_DIR / ACCEPTED_ARGUMENTS_DIR  # what an earlier run checked already
        problems += validation.run_problems(
            definition, values, self.options.hyperparameters, local=True, accepted=accepted
        )
        if problems:
            raise InvalidOptions(list(dict.fromkeys(problems)))  # a name given twice (flag, parameter) once

    def _run(self) -> dict[str, Any]:
        from pipelines.aws_cli import parameter_overrides

        started = time.perf_counter()
        try:  # the registry first: a damaged one stops the run before any work
            LocalModelRegistry(self.workdir).check()
        except RegistryError as error:
            raise InvalidOptions([str(error)]) from error
        try:
            definition, artifacts, pipeline_options = build_definition(self.options)
        except ValueError as error:  # before the run folder: a refused option leaves nothing behind
            raise InvalidOptions([str(error)]) from error
        overrides = parameter_overrides(definition, self.options.parameters)
        self._checked_values(definition, overrides)
        self.run_id, self.run_dir = new_run_folder(self.workdir)
        self.console.write(f"Local pipeline {self.run_id} in {self.run_dir}")
        fsutil.write_json_atomic(self.run_dir / DEFINITION_FILE, definition)
        store = ObjectStore(self.workdir)
        for artifact in artifacts.all():  # what upsert uploads before a run
            store.put_bytes(artifact.s3_uri, artifact.body)
        given = {item["Name"] for item in overrides}
        parameters = validation.parameter_values(definition, overrides)
        source = "--param InputDataUri" if "InputDataUri" in given else str(self.options.data or DEMO_SOURCE)
        if "InputDataUri" not in given:
            uri = self._data_input(store, pipeline_options.pipeline_name, int(parameters.get("ImageSize", 32)))
            parameters["InputDataUri"] = uri
            overrides.append({"Name": "InputDataUri", "Value": uri})
        changed = ", ".join(f"{o['Name']}={o['Value']}" for o in overrides if o["Name"] != "InputDataUri")
        self.console.write(
            f"  definition: preset {self.options.resolved_preset}, built in {time.perf_counter() - started:.1f} s; "
            f"data: {source}; parameters: {changed or 'the defaults'}; "
            f"cache {'on' if self.options.cache else 'off'}"
        )
        registry = LocalModelRegistry(self.workdir)
        name = pipeline_options.pipeline_name
        if self.options.tracking_uri:  # the store's tables and the experiment, before parallel trials start
            from entrypoints import tracking

            tracking.prepare(self.options.tracking_uri, name)
        self.execution = LocalExecution(
            definition,
            executors=step_executors(self.options, self.workdir, registry),
            parameters=parameters,
            run_dir=self.run_dir,
            store=store,
            cache=StepCache(self.workdir, enabled=self.options.cache, report=self.console.write),
            console=self.console,
            execution_variables=self._execution_variables(name),
            region=config.LOCAL_REGION,
            account_id=config.LOCAL_ACCOUNT_ID,
            cpus=self.options.cpus or contract.available_cpus(),
            record={
                "RunId": self.run_id,
                "PipelineArn": self._pipeline_arn(name),
                "PipelineExecutionArn": f"{self._pipeline_arn(name)}/execution/{self.run_id}",
                "PipelineExecutionDisplayName": self.run_id,
                "Workdir": str(self.workdir),
                "RunFolder": str(self.run_dir),
                "Preset": self.options.resolved_preset,
                "Data": source,
                "PipelineParameters": [{"Name": k, "Value": str(v)} for k, v in parameters.items()],
                "Process": processes.identity(),  # status output tells a run whose process has gone
            },
        )
        try:
            self.execution.run()
        finally:
            self._summarise()  # a failed run's record gets what it reached too
            self.execution.write_record(self.execution.record["PipelineExecutionStatus"])
        return self.execution.record

    def _pipeline_arn(self, name: str) -> str:
        return f"arn:aws:sagemaker:{config.LOCAL_REGION}:{config.LOCAL_ACCOUNT_ID}:pipeline/{name.lower()}"

    def _execution_variables(self, name: str) -> dict[str, str]:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {
            "PipelineExecutionId": self.run_id,
            "PipelineName": name,
            "PipelineArn": self._pipeline_arn(name),
            "PipelineExecutionArn": f"{self._pipeline_arn(name)}/execution/{self.run_id}",
            "StartDateTime": now,
            "CurrentDateTime": now,
        }

    def _summarise(self) -> None:
        """What this pipeline's users look for, read from the executed steps: test accuracy, the confusion
        matrix, the model package, the endpoint."""
        from entrypoints.contract import accuracy_from_report
        from pipelines.pipeline import PROPERTY_FILE_EVALUATION

        assert self.execution is not None
        summary = self.execution.record["Summary"]
        for key, path in summary.get("property_files", {}).items():
            if key.endswith(f".{PROPERTY_FILE_EVALUATION}"):
                report = fsutil.read_json(Path(path))
                summary["test_accuracy"] = accuracy_from_report(report) if isinstance(report, dict) else None
                summary["evaluation"] = path
                picture = Path(path).with_name(contract.CONFUSION_MATRIX_IMAGE)
                summary["confusion_matrix"] = str(picture) if picture.is_file() else None
        for answer in summary.get("lambda", {}).values():
            if answer.get("action") in ("created", "updated", "unchanged"):
                try:
                    state = endpoint.status(self.workdir, str(answer.get("endpoint_name")))
                except endpoint.EndpointError:  # reported by `endpoint status`; the summary goes on without it
                    state = None
                if state is not None and state["EndpointStatus"] == "InService":
                    summary["endpoint"] = {"name": answer["endpoint_name"], "url": state["url"]}
        if self.options.tracking_uri:
            self._summarise_tracking(summary)

    def _summarise_tracking(self, summary: dict[str, Any]) -> None:
        """MLflow: the registered version's ARN, number and status as tags of its run (the package names the run
        in its CustomerMetadataProperties), and the command that opens the UI on this store."""
        from entrypoints import tracking

        uri = str(self.options.tracking_uri)
        arn = summary.get("model_package", {}).get("ModelPackageArn")
        if arn:
            try:
                package = LocalModelRegistry(self.workdir).by_arn(arn)
            except RegistryError:
                package = None
            if package is not None:
                summary["tracking_run"] = tracking.tag_registered_version(package, uri)
        ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"
        summary["tracking"] = {"uri": uri, "ui": ui}
