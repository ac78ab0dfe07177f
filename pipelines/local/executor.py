"""The local executor: runs a pipeline definition (the JSON that ``upsert`` sends to SageMaker) on this machine.

It knows nothing of this project's DAG. It reads the definition:

- **parameters**: the declared defaults, overridden by the run's values;
- **order**: the step graph of the ``Get`` references and ``DependsOn`` lists (``definition.check.step_dependencies``);
  a ConditionStep's outcome picks the branch that runs;
- **steps**: one executor per step type (:mod:`.jobs` for Processing, Training and Tuning, :mod:`.control` for
  Condition, Fail, RegisterModel and Lambda), each reading only the step's ``Arguments``, resolved by
  :mod:`pipelines.definition.expressions`; S3 URIs live in the local object store (:mod:`.objectstore`);
- **caching**: steps whose ``CacheConfig`` is enabled are keyed by their resolved arguments and the content of
  their inputs (:mod:`.cache`); a hit reuses the earlier run's properties, as SageMaker does.

A definition it cannot run fails before the first step (:class:`DefinitionInvalid`): the SageMaker API checks
of ``definition.check.check_definition`` (unknown steps, parameters, property files and outputs, property paths the
producing step's Describe response lacks), a step type with no local executor, a property the local executor of
the producing step does not fill, and what each executor checks. Every message names the step and the reference.

``run.json`` in the run folder records the run and its steps in the shape of ``DescribePipelineExecution`` and
``ListPipelineExecutionSteps`` (``StepName``, ``StepStatus``, ``StartTime``, ``CacheHitResult``, ``Metadata``...),
with what only a local run has under each step's ``Local``.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.definition.check import (
    check_definition,
    iter_references,
    iter_steps,
    own_arguments,
    step_dependencies,
)
from pipelines.definition.expressions import ExpressionError, Scope, split_property_path
from pipelines.local import sagemaker as sagemaker_api
from pipelines.local.cache import RESULT_KEYS, StepCache
from pipelines.local.console import Console
from pipelines.local.objectstore import ObjectStore, ObjectStoreError
from pipelines.local.runs import RUN_RECORD
from pipelines.util import fsutil

DEFINITION_FILE = "definition.json"


class DefinitionInvalid(Exception):
    """The definition cannot run here; nothing ran. ``problems`` names each step and reference."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"the definition cannot run: {len(problems)} problem(s): " + "; ".join(problems))
        self.problems = problems


class StepFailure(Exception):
    """Raised by a step executor: the step failed for the reason given (with its log, if it has one)."""

    def __init__(
        self, reason: str, log_path: Path | None = None, tail: list[str] | None = None, signal_name: str | None = None
    ) -> None:
        super().__init__(reason)
        self.log_path = log_path
        self.tail = tail or []
        self.signal_name = signal_name  # the signal that ended the step's job, if one did


class RunStopped(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT, SIGTERM, SIGHUP): every job was stopped, the run marked Stopped."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class PipelineFailed(Exception):
    """The run stopped at a step: the message names the step and why."""

    def __init__(self, step: str, message: str, log_path: Path | None = None, tail: list[str] | None = None) -> None:
        super().__init__(f"step {step} failed: {message}")
        self.step = step
        self.reason = message
        self.log_path = log_path
        self.tail = tail or []


@dataclass
class StepResult:
    """What a step executor returns."""

    properties: dict[str, Any] = field(default_factory=dict)  # what Steps.<name>.<path> reads
    metadata: dict[str, Any] = field(default_factory=dict)  # ListPipelineExecutionSteps' Metadata
    detail: str = ""  # the progress line
    outputs: dict[str, Path] = field(default_factory=dict)  # run-folder and object-store paths it wrote
    summary: dict[str, Any] = field(default_factory=dict)  # merged into the run record's Summary
    notes: list[str] = field(default_factory=list)  # what the local run leaves out (Debugger rules, ...)
    outcome: bool | None = None  # a condition's
    cacheable: bool = True  # False: a result a later run must not reuse (a trial was ended by a signal)

    def cached_form(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in RESULT_KEYS}


class StepExecutor:
    """Runs the steps of one type. Subclasses set ``step_type`` and ``provides`` (the top-level properties
    they fill) and implement :meth:`run`; cacheable ones implement :meth:`cache_key`."""

    step_type = ""
    provides: frozenset[str] = frozenset()

    def check(self, step: dict[str, Any], execution: LocalExecution) -> list[str]:
        """Problems that keep the step from running here (found before the first step runs)."""
        return []

    def cache_key(self, context: StepContext) -> dict[str, Any] | None:
        """What keys the step's cache entry; None: the step is never cached."""
        return None

    def run(self, context: StepContext) -> StepResult:
        raise NotImplementedError


@dataclass
class StepContext:
    """One step being run: its definition, its folder in the run folder, and the execution around it."""

    name: str
    step: dict[str, Any]
    execution: LocalExecution
    folder: Path
    _arguments: Any = None

    def resolve(self, value: Any) -> Any:
        """``value`` evaluated (an ExpressionError fails the step: :meth:`LocalExecution._run_step`)."""
        return self.execution.scope.resolve(value)

    @property
    def arguments(self) -> Any:
        """The step's Arguments with every expression evaluated (computed once)."""
        if self._arguments is None:
            self._arguments = self.resolve(self.step.get("Arguments", {}))
        return self._arguments

    @property
    def store(self) -> ObjectStore:
        return self.execution.store

    def local_path(self, uri: str, what: str) -> Path:
        """The object-store path of an input URI; a StepFailure naming ``what`` if nothing is there."""
        try:
            path = self.store.path(uri)
        except ObjectStoreError as error:
            raise StepFailure(f"{what}: {error}") from error
        if not path.exists():
            raise StepFailure(f"{what}: {uri} holds no object in the local object store ({path})")
        return path

    def content_hash(self, uri: str, what: str) -> str:
        self.local_path(uri, what)
        return self.store.content_hash(uri)


def _without_execution_variables(arguments: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any]:
    """The cache key's parts without the environment variables that the definition sets to an execution variable
    (``{"Get": "Execution.PipelineExecutionId"}``, e.g. for experiment tracking): they differ in every execution by
    design, like the output locations, so a step that differs in nothing else is still reused. (SageMaker keys a
    Training or Processing step by its whole Environment, so there such a step runs in every execution.)"""
    parts = copy.deepcopy(parts)  # never the step's own arguments
    keyed = parts.get("arguments")
    if not isinstance(keyed, dict):
        return parts
    definition = "TrainingJobDefinition"  # a tuning step's jobs
    for holder, raw in ((keyed, arguments), (keyed.get(definition), arguments.get(definition))):
        if not isinstance(holder, dict) or not isinstance(raw, dict) or not isinstance(raw.get("Environment"), dict):
            continue
        varying = [
            name
            for name, value in raw["Environment"].items()
            if isinstance(value, dict) and str(value.get("Get", "")).startswith("Execution.")
        ]
        if varying and isinstance(holder.get("Environment"), dict):
            holder["Environment"] = {k: v for k, v in holder["Environment"].items() if k not in varying}
    return parts


class LocalExecution:
    """One execution of a definition in ``run_dir``. ``run()`` returns the run record or raises
    :class:`DefinitionInvalid` (before any step) or :class:`PipelineFailed` (at the failing step)."""

    def __init__(
        self,
        definition: dict[str, Any],
        *,
        executors: Mapping[str, StepExecutor],
        parameters: Mapping[str, Any],
        run_dir: Path,
        store: ObjectStore,
        cache: StepCache,
        console: Console,
        execution_variables: Mapping[str, str],
        region: str,
        account_id: str,
        cpus: int,
        record: dict[str, Any] | None = None,
        sagemaker: Any = None,
        job_environment: Callable[[dict[str, str]], dict[str, str]] | None = None,
    ) -> None:
        self.definition = definition
        # whoever builds the execution (the runner) has the last word on each job's environment variables
        self.job_environment = job_environment or (lambda environment: environment)
        self.executors = dict(executors)
        self.run_dir = run_dir
        self.run_id = run_dir.name
        self.workdir = run_dir.parent
        self.store = store
        self.cache = cache
        self.console = console
        self.cpus = cpus
        self.region, self.account_id = region, account_id
        self.sagemaker = sagemaker  # a LocalSageMaker: the job executors record their jobs there (None: no records)
        self.steps = {step["Name"]: step for step in iter_steps(definition)}
        self.graph = step_dependencies(definition)
        self.scope = Scope(dict(parameters), dict(execution_variables), read_property_file=self.read_property_file)
        self.record: dict[str, Any] = {**(record or {}), "PipelineExecutionSteps": [], "Summary": {}}
        self.outcomes: dict[str, bool] = {}
        self.succeeded: set[str] = set()
        self._started = time.perf_counter()
        self._lock = threading.Lock()

    # --- checks before the first step ---------------------------------------------------------------------------
    def problems(self) -> list[str]:
        problems = list(check_definition(self.definition, unused_parameters=False))  # as SageMaker runs it
        for name, step in self.steps.items():
            if not fsutil.is_safe_name(name):
                problems.append(f"step name {name!r} may hold only letters, digits, hyphens and underscores")
            executor = self.executors.get(step.get("Type", ""))
            if executor is None:
                known = ", ".join(sorted(self.executors))
                problems.append(f"{name}: step type {step.get('Type')!r} has no local executor (these have: {known})")
                continue
            problems.extend(executor.check(step, self))
            for reference in iter_references(own_arguments(step)):
                problem = self._reference_problem(name, reference)
                if problem:
                    problems.append(problem)
        return problems

    def _reference_problem(self, name: str, reference: str) -> str | None:
        """A property the local executor of the producing step does not fill (the API checks come first)."""
        root, _, rest = reference.partition(".")
        if root != "Steps":
            return None
        producer, _, path = rest.partition(".")
        step = self.steps.get(producer)
        executor = self.executors.get(step.get("Type", "")) if step else None
        if executor is None or not path:
            return None  # reported already (unknown step, or a step type with no executor)
        first = split_property_path(path)[0]
        if first == "PropertyFiles" or first in executor.provides:
            return None
        return f"{name}: reference {reference}: the local {executor.step_type} executor does not fill {first}"

    # --- the run ------------------------------------------------------------------------------------------------
    def order(self) -> list[str]:
        """The steps in an order that respects every dependency (the definition's order among equals)."""
        ordered: list[str] = []
        placed: set[str] = set()
        pending = list(self.steps)
        while pending:
            ready = next((n for n in pending if self.graph.get(n, set()) <= placed), None)
            if ready is None:  # a cycle: check_definition reports it before this runs
                raise DefinitionInvalid([f"steps form a cycle among {', '.join(pending)}"])
            ordered.append(ready)
            placed.add(ready)
            pending.remove(ready)
        return ordered

    def _branch_taken(self, name: str) -> bool:
        """False for a step in a condition branch that was not chosen (SageMaker lists no such step)."""
        for condition, step in self.steps.items():
            if step.get("Type") != "Condition":
                continue
            for branch, wanted in (("IfSteps", True), ("ElseSteps", False)):
                if name in {nested["Name"] for nested in step["Arguments"].get(branch, [])}:
                    return self.outcomes.get(condition) is wanted
        return True

    def run(self) -> dict[str, Any]:
        self.record.update({"PipelineExecutionStatus": "Executing", "StartTime": fsutil.utc_now()})
        problems = self.problems()
        if problems:
            self.record["FailureReason"] = DefinitionInvalid(problems).args[0]
            self.write_record("Failed")
            raise DefinitionInvalid(problems)
        try:
            for name in self.order():
                if self._branch_taken(name) and self.graph.get(name, set()) <= self.succeeded:
                    self._run_step(name)
        except PipelineFailed as failure:
            self.record["FailureReason"] = str(failure)
            self.write_record("Failed")
            raise
        except KeyboardInterrupt as stop:
            self._mark_executing("Stopped")
            self.record["StoppedBy"] = getattr(stop, "signal_name", "SIGINT")
            self.write_record("Stopped")
            raise
        except Exception as error:  # recorded, then raised as it is: run.json never says Executing after exit
            self._mark_executing("Failed")
            self.record["FailureReason"] = f"{type(error).__name__}: {error}"
            self.write_record("Failed")
            raise
        return self.write_record("Succeeded")

    def _run_step(self, name: str) -> None:
        step = self.steps[name]
        executor = self.executors[step["Type"]]
        record = self._begin(step)
        context = StepContext(name, step, self, self.run_dir / name.lower())
        started = time.perf_counter()
        try:
            try:
                result = self._cached_or_run(executor, context, record)
            except (ExpressionError, ObjectStoreError) as error:
                raise StepFailure(str(error)) from error
        except StepFailure as failure:
            self._finish(record, "Failed", time.perf_counter() - started, str(failure), failure=str(failure))
            if failure.tail:
                self.console.details(failure.tail)
            if failure.log_path:
                self.console.details([f"log: {failure.log_path}"])
                record["Local"]["Log"] = self._relative(failure.log_path)
            raise PipelineFailed(name, str(failure), failure.log_path, failure.tail) from failure
        self.scope.properties[name] = result.properties
        if result.outcome is not None:
            self.outcomes[name] = result.outcome
        record["Metadata"] = result.metadata
        record["Local"].update(
            Outputs={key: self._relative(path) for key, path in result.outputs.items()},
            Log=self._relative(result.outputs["log"]) if "log" in result.outputs else None,
            Notes=result.notes,
            Properties=result.properties,
        )
        summary = self.record["Summary"]
        for key, value in result.summary.items():
            both_maps = isinstance(value, dict) and isinstance(summary.get(key), dict)
            summary[key] = {**summary[key], **value} if both_maps else value
        self.succeeded.add(name)
        self._finish(record, "Succeeded", time.perf_counter() - started, result.detail)

    def _cached_or_run(self, executor: StepExecutor, context: StepContext, record: dict[str, Any]) -> StepResult:
        cache_config = context.step.get("CacheConfig") or {}
        parts = executor.cache_key(context) if cache_config.get("Enabled") else None
        if parts is None:
            return executor.run(context)
        parts = _without_execution_variables(context.step.get("Arguments", {}), parts)
        key = self.cache.key(context.name, parts)
        entry = self.cache.lookup(key, cache_config.get("ExpireAfter"))
        if entry is None:
            result = executor.run(context)
            if result.cacheable:
                self.cache.store(key, context.name, self.run_id, result.outputs, result.cached_form())
            return result
        old_run = self.workdir / entry.run_id
        outputs = {}
        for output, path in entry.output_paths(self.workdir).items():
            if path.is_relative_to(old_run):  # the run folder's files: linked in, so this run folder is complete
                outputs[output] = fsutil.link_tree(path, self.run_dir / path.relative_to(old_run))
            else:  # the object store's: the properties point at them, as SageMaker's point at the old S3 objects
                outputs[output] = path
        record["CacheHitResult"] = {"SourcePipelineExecutionArn": self.execution_arn(entry.run_id)}
        record["Local"]["CachedFromRun"] = entry.run_id
        return StepResult(**entry.result, outputs=outputs)

    # --- what executors read -------------------------------------------------------------------------------------
    def known_before_the_run(self, value: Any) -> Any:
        """``value`` resolved if it reads no step property (literals, parameters, execution variables), else None."""
        resolved = self.scope.resolve_known(value)  # what only the run can tell is left an expression
        return None if iter_references(resolved) else resolved

    def missing_object(self, uri: Any) -> str | None:
        """Why ``uri`` (known before the run) names nothing in the object store, or None if it does."""
        resolved = self.known_before_the_run(uri)
        if resolved is None:
            return None
        try:
            return None if self.store.exists(resolved) else f"{resolved} holds no object in the local object store"
        except ObjectStoreError as error:
            return str(error)

    def read_property_file(self, step_name: str, file_name: str) -> Any:
        """A property file of a step that ran: the JSON file its declared output holds."""
        step = self.steps.get(step_name)
        declared = {p["PropertyFileName"]: p for p in (step or {}).get("PropertyFiles", [])}
        if file_name not in declared:
            raise ExpressionError(f"Steps.{step_name}.PropertyFiles.{file_name}: no such property file")
        if step_name not in self.scope.properties:
            raise ExpressionError(f"Steps.{step_name}.PropertyFiles.{file_name}: step {step_name} has not run")
        spec = declared[file_name]
        reference = f"Steps.{step_name}.ProcessingOutputConfig.Outputs['{spec['OutputName']}'].S3Output.S3Uri"
        uri = self.scope.get(reference)
        path = self.store.path(uri.rstrip("/") + "/" + spec["FilePath"])
        document = fsutil.read_json(path)
        if document is None:
            raise ExpressionError(f"property file {file_name} of {step_name}: {path} does not exist")
        return document

    def arn(self, resource: str) -> str:
        """A SageMaker ARN (``<type>/<name>``) in the execution's region and account, made where every local one is."""
        resource_type, _, name = resource.partition("/")
        return sagemaker_api.arn(resource_type, name, region=self.region, account=self.account_id)

    def execution_arn(self, run_id: str) -> str:
        return str(self.scope.execution.get("PipelineArn", "")) + f"/execution/{run_id}"

    # --- bookkeeping --------------------------------------------------------------------------------------------
    def _relative(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.workdir.resolve()).as_posix()
        except ValueError:
            return str(path)

    def _begin(self, step: dict[str, Any]) -> dict[str, Any]:
        record = {
            "StepName": step["Name"],
            "StepDisplayName": step.get("DisplayName", step["Name"]),
            "StepDescription": step.get("Description", ""),
            "StartTime": fsutil.utc_now(),
            "StepStatus": "Executing",
            "AttemptCount": 1,
            "Metadata": {},
            "Local": {"StepType": step["Type"], "CachedFromRun": None},
        }
        self.record["PipelineExecutionSteps"].append(record)
        self.write_record("Executing")
        return record

    def _finish(self, record: dict[str, Any], status: str, seconds: float, detail: str, failure: str = "") -> None:
        record.update(StepStatus=status, EndTime=fsutil.utc_now())
        record["Local"].update(DurationSeconds=round(seconds, 2), Detail=detail)
        if failure:
            record["FailureReason"] = failure
        cached = record["Local"].get("CachedFromRun")
        label = "cached" if cached else status
        self.console.step(record["StepName"], label, seconds, detail + (f" (cached from {cached})" if cached else ""))
        self.write_record("Executing")

    def _mark_executing(self, status: str) -> None:
        for record in self.record["PipelineExecutionSteps"]:
            if record["StepStatus"] == "Executing":
                record.update(StepStatus=status, EndTime=fsutil.utc_now())

    def write_record(self, status: str) -> dict[str, Any]:
        with self._lock:
            self.record["PipelineExecutionStatus"] = status
            self.record["LastModifiedTime"] = fsutil.utc_now()
            self.record["ElapsedSeconds"] = round(time.perf_counter() - self._started, 2)
            fsutil.write_json_atomic(self.run_dir / RUN_RECORD, self.record)
        return self.record
