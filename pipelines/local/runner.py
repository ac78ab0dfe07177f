"""``python -m pipelines.run local``: build the pipeline's definition offline and execute it on this machine.

The definition is the one ``definition`` writes and ``upsert`` sends, built by the same ``get_pipeline`` with the
same options (a preset, ``--hp``, the Deploy step's switches), with local stand-ins for what names the account:
a placeholder role and account, and the bucket of the local object store. Then, as ``upsert`` uploads the code
objects the definition names (``code_artifacts``: S3 URI -> bytes, named by content hash) before a run, the
runner puts them in the local object store, and the input data under a run-specific prefix (``InputDataUri``).
The executor (:mod:`.executor`) does the rest, from the definition alone.

With ``--definition FILE`` the runner builds nothing: it runs that JSON as it is, after putting each ``--object``
file in the object store. This is the one module of the local side that knows the project: what this project's
jobs need beyond the container contract (train.py's flags, ``TORCH_HOME``, the epoch progress, the packages
standing in for the image in cache keys), the deploy function the Lambda step runs, the value checks of
:mod:`pipelines.validation` and the summary are handed over only when the definition runs this project's code
(:func:`runs_project_code`). Any other definition gets the container contract alone.

Each run gets ``<workdir>/run-NNNN/``: ``definition.json`` (exactly what ran), ``run.json`` (the run and its steps,
shaped like DescribePipelineExecution and ListPipelineExecutionSteps, with the process that runs it), and a folder
per step.

Before the run folder exists, the registry is read and checked, and every value of the run is checked against the
rules of :mod:`pipelines.validation`: a refused value leaves nothing behind. While it runs, SIGINT, SIGTERM and
SIGHUP stop every job within seconds (:data:`containers.JOBS`) and the run ends ``Stopped``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entrypoints import contract
from pipelines import config, validation
from pipelines.definition import names
from pipelines.local import containers
from pipelines.local import sagemaker as local_sagemaker
from pipelines.local.cache import CACHE_DIR, StepCache
from pipelines.local.console import Console
from pipelines.local.executor import DEFINITION_FILE, LocalExecution, RunStopped, StepExecutor
from pipelines.local.objectstore import ObjectStore, ObjectStoreError, s3_uris, split_uri
from pipelines.local.registry import RegistryError
from pipelines.local.runs import RUN_ID
from pipelines.local.tracking_store import TrackingStore
from pipelines.serving import endpoint
from pipelines.util import fsutil, processes


class InvalidOptions(Exception):
    """Options or values the pipeline refuses (``problems`` says which and why); nothing was started."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stopped_by_signals(grace_seconds: float = processes.STOP_GRACE_SECONDS) -> Iterator[None]:
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
PIPELINE_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,255}")  # CreatePipeline's PipelineName
ACCEPTED_ARGUMENTS_DIR = "accepted-arguments"  # marks of job arguments the scripts' parsers accepted (validation)
# What this project's jobs import, whose versions stand in for the container image in a step's cache key.
PROJECT_JOB_PACKAGES = ("torch", "torchvision", "pillow", "numpy")


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
    definition_file: Path | None = None  # run this definition JSON as it is, instead of building the template's
    objects: list[tuple[str, Path]] = field(default_factory=list)  # (s3 URI, local file or folder) put before the run
    pipeline_name: str | None = None  # with definition_file: the name its ARNs carry (default: the file's stem)
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
    from pipelines import sdk

    sdk.quiet()  # before the SDK is imported: its import warns otherwise
    import boto3
    from sagemaker.workflow.pipeline_context import PipelineSession

    from pipelines.pipeline import get_pipeline, pipeline_code, preset_options

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
        boto_session=boto3.Session(region_name=local_sagemaker.REGION), default_bucket=config.LOCAL_BUCKET
    )
    with sdk.telemetry_off():
        pipeline = get_pipeline(
            session,
            role=local_sagemaker.ROLE_ARN,
            bucket=config.LOCAL_BUCKET,
            options=pipeline_options,
            account_id=local_sagemaker.ACCOUNT_ID,
        )
        definition = json.loads(pipeline.definition())
    artifacts = pipeline_code(config.LOCAL_BUCKET, pipeline_options)  # exactly what the definition names
    return definition, artifacts, pipeline_options


@dataclass
class Prepared:
    """The definition a run executes, and what is put in the object store before it (S3 URI -> bytes or a local
    file or folder). ``project``: its jobs run this project's code, so the project's checks and extras apply."""

    definition: dict[str, Any]
    objects: dict[str, bytes | Path]
    pipeline_name: str
    project: bool


def read_definition_file(path: Path) -> dict[str, Any]:
    """A definition JSON (the one ``definition`` writes, or one written by hand); ValueError says what is wrong."""
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"--definition {path} cannot be read as JSON ({error}); pass a pipeline definition") from None
    if not isinstance(definition, dict) or not isinstance(definition.get("Steps"), list):
        raise ValueError(f"--definition {path} is not a pipeline definition: it needs a 'Steps' list")
    return definition


def runs_project_code(definition: dict[str, Any], objects: dict[str, bytes | Path], store: ObjectStore) -> bool:
    """Whether a job of ``definition`` runs this project's code: an object it names (given for this run, or in
    the store already) holds the same bytes as a code object the builder packs from this checkout."""
    from pipelines.packaging import code_artifacts

    ours = {hashlib.sha256(artifact.body).hexdigest() for artifact in code_artifacts(config.LOCAL_BUCKET, "any").all()}
    for uri in dict.fromkeys(s3_uris(definition)):
        given = objects.get(uri)
        if isinstance(given, bytes):
            if hashlib.sha256(given).hexdigest() in ours:
                return True
            continue
        try:
            path = given if given is not None else store.path(uri)
        except ObjectStoreError:
            continue
        if path.is_file() and fsutil.file_sha256(path) in ours:
            return True
    return False


def put_objects(store: ObjectStore, objects: dict[str, bytes | Path]) -> None:
    """What ``upsert`` uploads before a run (the code objects), and each ``--object``: copied, never linked, so a
    file edited later does not change an object the cache has keyed by its content."""
    for uri, body in objects.items():
        if isinstance(body, bytes):
            store.put_bytes(uri, body)
        elif body.is_dir():
            for path in fsutil.iter_files(body):
                store.put_bytes(f"{uri.rstrip('/')}/{path.relative_to(body).as_posix()}", path.read_bytes())
        else:
            store.put_bytes(uri, body.read_bytes())


def training_arguments(request: dict[str, Any]) -> list[str]:
    """entrypoints/train.py's flags that the local jobs add: its checkpoint and TensorBoard defaults are the
    container's absolute paths (here they lie under each job's root), and the jobs share this machine's cores."""
    checkpoint = (request.get("CheckpointConfig") or {}).get("LocalPath", config.CHECKPOINT_LOCAL_PATH)
    tensorboard = (request.get("TensorBoardOutputConfig") or {}).get("LocalPath", "none")
    return ["--checkpoint-dir", checkpoint, "--tensorboard-dir", tensorboard, *config.LOCAL_TRAINING_EXTRA_ARGUMENTS]


def project_training_extras(workdir: Path) -> Any:
    """What this project's training jobs need here beyond the container contract: train.py's local flags, a torch
    cache shared by the jobs, and how its log shows epochs (the ``epoch`` metric, the ``epochs`` hyperparameter)."""
    from pipelines.local.jobs import TrainingExtras

    return TrainingExtras(
        training_arguments,
        {"TORCH_HOME": str(workdir / "torch-cache")},
        epoch_metric="epoch",
        epochs_hyperparameter="epochs",
    )


def step_executors(options: LocalRunOptions, workdir: Path, api: Any, project: bool = True) -> dict[str, StepExecutor]:
    """One executor per step type; RegisterModel registers through ``api`` (the LocalSageMaker). For this project's
    definition the training jobs get the project's extras and the Lambda executor runs the deploy function against
    the local registry and endpoint; for any other, the engine runs the container contract alone and knows no
    function."""
    from pipelines.local.control import (
        ConditionExecutor,
        FailExecutor,
        LambdaExecutor,
        ModelExecutor,
        RegisterModelExecutor,
    )
    from pipelines.local.deploy_function import deploy_function
    from pipelines.local.jobs import ProcessingExecutor, TrainingExecutor, TrainingExtras, TuningExecutor

    functions = {}
    if project:
        functions[options.deploy_function_name] = deploy_function(
            workdir,
            model_package_group=options.model_package_group,
            endpoint_name=options.endpoint_name,
            port=options.port,
            ray=options.ray,
        )
    training_extras = project_training_extras(workdir) if project else TrainingExtras()
    executors: list[StepExecutor] = [
        ProcessingExecutor(),
        TuningExecutor(training_extras),
        TrainingExecutor(training_extras),
        ConditionExecutor(),
        FailExecutor(),
        RegisterModelExecutor(api),
        ModelExecutor(api),
        LambdaExecutor(functions),
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
        self.project = True  # the definition runs this project's code (known once it is prepared)
        self.tracking: TrackingStore | None = None  # MLflow's side of a tracked run (pipelines/local/tracking_store.py)

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

    def _prepared(self) -> Prepared:
        """The template's definition built with the run's options and its code objects, or the --definition file
        as it is with the --object files (InvalidOptions, before anything is written)."""
        if self.options.definition_file is None:
            try:
                definition, artifacts, pipeline_options = build_definition(self.options)
            except ValueError as error:  # before the run folder: a refused option leaves nothing behind
                raise InvalidOptions([str(error)]) from error
            objects: dict[str, bytes | Path] = {artifact.s3_uri: artifact.body for artifact in artifacts.all()}
            return Prepared(definition, objects, pipeline_options.pipeline_name, True)
        return self._definition_from_file(self.options.definition_file)

    def _definition_from_file(self, path: Path) -> Prepared:
        """--definition FILE as it is, with the --object files; whether it runs this project's code decides
        what the runner hands the engine."""
        name = self.options.pipeline_name or path.stem
        problems = []
        if not PIPELINE_NAME.fullmatch(name):
            problems.append(
                f"pipeline name {name!r} is not a SageMaker PipelineName (letters, digits and hyphens, starting and "
                "ending with a letter or digit): pass --pipeline-name NAME"
            )
        objects: dict[str, bytes | Path] = {}
        for uri, source in self.options.objects:
            try:
                split_uri(uri)
            except ObjectStoreError as error:
                problems.append(f"--object {uri}={source}: {error}")
            if not source.exists():
                problems.append(f"--object {uri}={source}: {source} does not exist; pass a file or a folder")
            objects[uri] = source.expanduser().resolve()
        try:
            definition = read_definition_file(path)
        except ValueError as error:
            problems.append(str(error))
        if problems:
            raise InvalidOptions(problems)
        project = runs_project_code(definition, objects, ObjectStore(self.workdir))
        return Prepared(definition, objects, name, project)

    def _checked_values(self, definition: dict[str, Any], overrides: list[dict[str, str]], project: bool) -> None:
        """Every value of the run against the rules the scripts, SageMaker and the config hold (InvalidOptions).
        A definition that runs none of this project's code is held to SageMaker's rules alone: this project's
        bounds and scripts' parsers say nothing about its values."""
        values = validation.parameter_values(definition, overrides)
        problems = []
        for kind, name in (
            ("endpoint", self.options.endpoint_name),
            ("model package group", self.options.model_package_group),
            ("model package group", values.get("ModelPackageGroupName", self.options.model_package_group)),
        ):
            try:
                names.check_name(kind, name)
            except ValueError as error:
                problems.append(str(error))
        accepted = self.workdir / CACHE_DIR / ACCEPTED_ARGUMENTS_DIR  # what an earlier run checked already
        if project:
            problems += validation.run_problems(
                definition, values, self.options.hyperparameters, local=True, accepted=accepted
            )
        else:
            problems += validation.shape_problems(definition, values)
        if problems:
            raise InvalidOptions(list(dict.fromkeys(problems)))  # a name given twice (flag, parameter) once

    def _parameters(
        self, store: ObjectStore, prepared: Prepared, overrides: list[dict[str, str]], seconds: float
    ) -> tuple[dict[str, Any], str]:
        """The run's parameter values and where its data comes from: a built definition gets its input data put
        in the store unless --param InputDataUri names it; a --definition file gets its defaults and --param."""
        given = {item["Name"] for item in overrides}
        parameters = validation.parameter_values(prepared.definition, overrides)
        changed = ", ".join(f"{o['Name']}={o['Value']}" for o in overrides if o["Name"] != "InputDataUri")
        if self.options.definition_file is None:
            source = "--param InputDataUri" if "InputDataUri" in given else str(self.options.data or DEMO_SOURCE)
            if "InputDataUri" not in given:
                image_size = int(parameters.get("ImageSize", 32))
                parameters["InputDataUri"] = self._data_input(store, prepared.pipeline_name, image_size)
            shown = f"preset {self.options.resolved_preset}, built in {seconds:.1f} s; data: {source}"
        else:
            source = f"--definition {self.options.definition_file}"
            whose = "this project's code" if prepared.project else "no code of this project"
            shown = f"{self.options.definition_file} (runs {whose})"
        self.console.write(
            f"  definition: {shown}; parameters: {changed or 'the defaults'}; "
            f"cache {'on' if self.options.cache else 'off'}"
        )
        return parameters, source

    def _run(self) -> dict[str, Any]:

        started = time.perf_counter()
        problems = path_problems(self.options.workdir, self.options.data)  # before anything is read or written
        if problems:
            raise InvalidOptions(problems)
        try:  # the registry first: a damaged one stops the run before any work
            local_sagemaker.LocalSageMaker(self.workdir).registry.check()
        except RegistryError as error:
            raise InvalidOptions([str(error)]) from error
        if self.options.tracking_uri and self.options.definition_file is None:  # MLflow imported, and a store
            self.tracking = TrackingStore(self.options.tracking_uri)  # migrated, while the definition is built
        try:
            return self._execute(started)
        finally:
            if self.tracking is not None:
                self.tracking.close()

    def _execute(self, started: float) -> dict[str, Any]:
        prepared = self._prepared()
        definition = prepared.definition
        uri = self.options.tracking_uri
        if self.tracking is None and uri and _contains_value(definition, uri):  # a file whose jobs track into the store
            self.tracking = TrackingStore(uri)
        overrides = validation.parameter_overrides(definition, self.options.parameters)
        self._checked_values(definition, overrides, prepared.project)
        self.run_id, self.run_dir = new_run_folder(self.workdir)
        self.console.write(f"Local pipeline {self.run_id} in {self.run_dir}")
        fsutil.write_json_atomic(self.run_dir / DEFINITION_FILE, definition)
        store = ObjectStore(self.workdir)
        put_objects(store, prepared.objects)
        parameters, source = self._parameters(store, prepared, overrides, time.perf_counter() - started)
        from pipelines.local.deploy_function import local_sagemaker as local_api

        api = local_api(self.workdir, self.options.port, self.options.ray)
        name = prepared.pipeline_name
        self.project = prepared.project
        job_environment = None
        if self.tracking is not None:  # the store's tables and the experiment, before parallel trials start
            self.tracking.prepare(name)
            job_environment = self.tracking.job_environment(self.tracking.serve())
        self.execution = LocalExecution(
            definition,
            executors=step_executors(self.options, self.workdir, api, prepared.project),
            parameters=parameters,
            run_dir=self.run_dir,
            store=store,
            cache=StepCache(
                self.workdir,
                enabled=self.options.cache,
                report=self.console.write,
                runtime_packages=PROJECT_JOB_PACKAGES if prepared.project else None,
            ),
            console=self.console,
            execution_variables=self._execution_variables(name),
            region=local_sagemaker.REGION,
            account_id=local_sagemaker.ACCOUNT_ID,
            sagemaker=api,
            job_environment=job_environment,
            cpus=self.options.cpus or contract.available_cpus(),
            record={
                "RunId": self.run_id,
                "PipelineArn": self._pipeline_arn(name),
                "PipelineExecutionArn": f"{self._pipeline_arn(name)}/execution/{self.run_id}",
                "PipelineExecutionDisplayName": self.run_id,
                "Workdir": str(self.workdir),
                "RunFolder": str(self.run_dir),
                "Preset": self.options.resolved_preset if self.options.definition_file is None else None,
                "Data": source,
                "PipelineParameters": [{"Name": k, "Value": str(v)} for k, v in parameters.items()],
                "Process": processes.identity(),  # status output tells a run whose process has gone
            },
        )
        try:
            self.execution.run()
        finally:
            if prepared.project:  # what this project's users look for; another definition's record is its own
                self._summarise()  # a failed run's record gets what it reached too
            self.execution.write_record(self.execution.record["PipelineExecutionStatus"])
        return self.execution.record

    def _pipeline_arn(self, name: str) -> str:
        return local_sagemaker.arn("pipeline", name)

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
        if self.tracking is not None:
            self._summarise_tracking(summary, self.tracking)

    def _summarise_tracking(self, summary: dict[str, Any], tracking: TrackingStore) -> None:
        """MLflow: the registered version's ARN, number and status as tags of its run (the package names the run
        in its CustomerMetadataProperties), and the command that opens the UI on this store."""
        uri = tracking.uri
        arn = summary.get("model_package", {}).get("ModelPackageArn")
        if arn:
            try:
                package = local_sagemaker.LocalSageMaker(self.workdir).registry.by_arn(arn)
            except RegistryError:
                package = None
            if package is not None:
                summary["tracking_run"] = tracking.tag_registered_version(package)
        ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"
        summary["tracking"] = {"uri": uri, "ui": ui}


# The longest workdir path (bytes) a run accepts: the run writes paths up to about 3 KB below it (job folders,
# object-store keys with the pipeline name, the data's class folders and file names, each up to 255 bytes), and
# Linux refuses a path of 4096 bytes or more (PATH_MAX), half way through a run.
WORKDIR_PATH_MAX = 1024


def path_problems(workdir: Path, data: Path | None) -> list[str]:
    """What keeps the run's folders from working, found before anything is written: a workdir path too long, or a
    workdir inside the ``--data`` folder (whose copy into the store would copy itself)."""
    problems = []
    absolute = Path(os.path.abspath(workdir.expanduser()))
    size = len(os.fsencode(str(absolute)))
    if size > WORKDIR_PATH_MAX:
        problems.append(
            f"--workdir is a path of {size} bytes; a run writes paths up to about 3 KB below it and Linux "
            f"refuses 4096: use a workdir path of at most {WORKDIR_PATH_MAX} bytes"
        )
    if data is not None and not problems:
        source = data.expanduser().resolve()
        if source.is_dir() and absolute.resolve().is_relative_to(source):
            problems.append(
                f"--workdir {workdir} lies inside --data {data}: the run copies the data folder into the workdir's "
                "store, which would copy itself; pass a --workdir outside the data folder"
            )
    return problems


def _contains_value(value: Any, text: str) -> bool:
    """Whether ``text`` is one of the values in ``value`` (a definition): a --definition file whose jobs do not
    track into the run's store gets no helper (MLflow's import and a store: seconds of a core for nothing)."""
    if isinstance(value, dict):
        return any(_contains_value(item, text) for item in value.values())
    if isinstance(value, list):
        return any(_contains_value(item, text) for item in value)
    return value == text
