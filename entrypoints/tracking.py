"""Experiment tracking with MLflow, for the jobs' scripts: on only when ``MLFLOW_TRACKING_URI`` is set.

Standard library only at import time; ``mlflow`` is imported when a job starts tracking. Shipped inside the
training ``source_dir`` (beside train.py) and, for the Evaluate step, as its ``tracking`` input beside the
script (``/opt/ml/processing/input/tracking``), like Preprocess's ``contract`` input.

**Never breaks a job.** MLflow missing, a server that cannot be reached or that refuses a request: the job prints
one line (``MLflow tracking: off ...``) and goes on untracked. After the first failure nothing more is sent. The
HTTP client's retries are bounded (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``; set
here only when the job's environment does not), so an unreachable server costs seconds, not minutes. The model
artifact, the metric lines the tuner reads, ``evaluation.json`` and the model registry stay the system of record.

**One parent run per pipeline execution.** Every job of an execution (the tuning trials, Train, Evaluate) gets
``PIPELINE_EXECUTION_ID`` in its environment (``ExecutionVariables.PIPELINE_EXECUTION_ID`` on SageMaker, the run
id locally) and joins the execution's parent run, found by the tag ``pipeline.execution_id`` in the experiment.
Parallel trials may both find none and each create one, so the parent is *elected*: among every run ever tagged
as that execution's parent (deleted ones included, so the order never changes) the one with the smallest run ID
wins. A job that created a candidate searches again at once and joins the winner; when it ends, a job re-elects,
moves the children of every losing candidate to the winner and deletes the losers. A candidate is only created
while none is visible, and every creator settles after creating, so once the last job of the window has ended
the execution has exactly one parent, holding every child.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"
ENV_EXECUTION_ID = "PIPELINE_EXECUTION_ID"  # ExecutionVariables.PIPELINE_EXECUTION_ID, or the local run id
ENV_STEP = "PIPELINE_STEP_NAME"  # Tune, Train or Evaluate: which child a job's run is
ENV_DEBUGGER_RULES = "DEBUGGER_RULES"  # the Debugger rules the job runs (the job itself cannot see them)
# MLflow's HTTP client retries 7 times with exponential backoff and waits 120 s per request by default: minutes
# of stall per call against a server that is down. A job tracks on a best-effort basis, so both are bounded.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
DEFAULT_EXPERIMENT = "ImageClassificationPipeline"
# What a tracked training job pip-installs (appended to the source directory's requirements.txt by the pipeline):
# MLflow's client without its server and UI, and SageMaker's plugin that signs requests to a tracking server ARN.
JOB_REQUIREMENTS = ("mlflow-skinny==3.18.0", "sagemaker-mlflow==0.5.0")

TAG_EXECUTION = "pipeline.execution_id"  # on the parent and on every child
TAG_ROLE = "pipeline.role"  # "execution" (the parent), "trial", "train" or "evaluate"
TAG_STEP = "pipeline.step"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under this parent
TAG_RUN_NAME = "mlflow.runName"
ROLE_PARENT = "execution"
ROLES_BY_STEP = {"Tune": "trial", "Train": "train", "Evaluate": "evaluate"}
# In evaluation.json when tracking is configured, so the Register step can copy the run ID into the model
# package's CustomerMetadataProperties (a JsonGet needs the path to exist even when tracking was off).
REPORT_SECTION = "tracking"
REPORT_RUN_ID = "mlflow_run_id"
NOT_TRACKED = "not-tracked"


def configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this job should track: a tracking URI is set."""
    return bool((environ if environ is not None else os.environ).get(ENV_TRACKING_URI, "").strip())


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file (``<folder>/mlartifacts``), so they
    do not land in each job's working folder; a server's own default otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    if not database.is_absolute():
        database = Path.cwd() / database
    return (database.parent / "mlartifacts").as_uri()


def _say(message: str) -> None:
    print(f"MLflow tracking: {message}", flush=True)


def _load_mlflow() -> tuple[Any, Any]:
    """(MlflowClient class, ViewType) with the HTTP retries bounded first; ImportError when MLflow is missing."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    return MlflowClient, ViewType


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


class ParentElection:
    """The execution's parent run: joined, or created and elected (see the module docstring)."""

    def __init__(self, client: Any, view_type: Any, experiment_id: str, execution_id: str, pipeline: str) -> None:
        self.client, self.view_type = client, view_type
        self.experiment_id, self.execution_id, self.pipeline = experiment_id, execution_id, pipeline
        self.created: str | None = None

    def candidates(self) -> list[Any]:
        return list(
            self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{TAG_EXECUTION}` = '{self.execution_id}' and tags.`{TAG_ROLE}` = '{ROLE_PARENT}'",
                run_view_type=self.view_type.ALL,
                max_results=1000,
            )
        )

    @staticmethod
    def winner(runs: Iterable[Any]) -> str:
        return min(run.info.run_id for run in runs)

    def join(self, before_create: Callable[[], None] | None = None) -> str:
        """The parent's run ID, creating a candidate only while none is visible."""
        runs = self.candidates()
        if not runs:
            if before_create is not None:  # tests widen the race window here
                before_create()
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{self.pipeline} {self.execution_id}",
                tags={TAG_EXECUTION: self.execution_id, TAG_ROLE: ROLE_PARENT, "pipeline.name": self.pipeline},
            )
            self.created = run.info.run_id
            runs = self.candidates()
        return self.winner(runs)

    def settle(self) -> str:
        """Re-elect; move every losing candidate's children to the winner and delete the losers."""
        runs = self.candidates()
        winner = self.winner(runs)
        for run in runs:
            loser = run.info.run_id
            if loser == winner:
                continue
            children = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{TAG_PARENT}` = '{loser}'",
                run_view_type=self.view_type.ALL,
                max_results=1000,
            )
            for child in children:
                self.client.set_tag(child.info.run_id, TAG_PARENT, winner)
            if run.info.lifecycle_stage != "deleted":
                self.client.delete_run(loser)
        return winner


class Tracker:
    """One job's MLflow run, a child of its execution's parent. Every method is a no-op once tracking is off."""

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.election: ParentElection | None = None
        self.experiment_id: str | None = None

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _off(self, error: BaseException) -> None:
        _say(f"off for the rest of this job ({_first_line(error)}); the job goes on untracked")
        self.client = self.run_id = self.election = None

    def _call(self, what: Callable[[], Any]) -> Any:
        if not self.active:
            return None
        try:
            return what()
        except Exception as error:  # tracking never breaks the job: one line, then off
            self._off(error)
            return None

    @classmethod
    def start(
        cls,
        run_name: str,
        tags: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        before_create: Callable[[], None] | None = None,
    ) -> Tracker:
        """Start this job's run under the execution's parent; an inactive tracker (and one line) on any failure."""
        tracker = cls()
        env = environ if environ is not None else os.environ
        if not configured(env):
            return tracker
        uri = env[ENV_TRACKING_URI].strip()
        try:
            client_class, view_type = _load_mlflow()
        except ImportError as error:
            _say(f"off: MLflow is not installed ({error}); {ENV_TRACKING_URI} is set but nothing is tracked")
            return tracker
        try:
            client = client_class(tracking_uri=uri)
            experiment_name = env.get(ENV_EXPERIMENT, "").strip() or DEFAULT_EXPERIMENT
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                try:
                    experiment_id = client.create_experiment(experiment_name, artifact_location=artifact_location(uri))
                except Exception:  # another job created it first
                    experiment = client.get_experiment_by_name(experiment_name)
                    if experiment is None:
                        raise
                    experiment_id = experiment.experiment_id
            else:
                experiment_id = experiment.experiment_id
            step = env.get(ENV_STEP, "").strip()
            execution_id = env.get(ENV_EXECUTION_ID, "").strip()
            run_tags = {key: str(value) for key, value in (tags or {}).items() if value is not None}
            if step:
                run_tags[TAG_STEP] = step
                run_tags[TAG_ROLE] = ROLES_BY_STEP.get(step, step.lower())
            election = None
            if execution_id:
                election = ParentElection(
                    client, view_type, experiment_id, execution_id, env.get(ENV_EXPERIMENT, "") or "pipeline"
                )
                run_tags[TAG_EXECUTION] = execution_id
                run_tags[TAG_PARENT] = election.join(before_create)
            run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        except Exception as error:
            _say(f"off: cannot reach or use the tracking server at {uri} ({_first_line(error)}); the job goes on")
            return tracker
        tracker.client, tracker.run_id, tracker.election = client, run.info.run_id, election
        tracker.experiment_id = experiment_id
        tracker.parent_id = run_tags.get(TAG_PARENT)
        where = f" under parent {tracker.parent_id}" if tracker.parent_id else ""
        _say(f"run {tracker.run_id} in experiment {experiment_name!r} at {uri}{where}")
        return tracker

    def _batches(self, run_id: str | None, kind: str, items: list[Any]) -> None:
        """``log_batch`` in MLflow's limits (100 params or tags, 1000 metrics a request): a 1000-class
        evaluation's per-class F1 scores are several requests, not a refused one."""
        size = 1000 if kind == "metrics" else 100
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            self._call(lambda chunk=chunk: self.client.log_batch(run_id or self.run_id, **{kind: chunk}))

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:  # MLflow may not even be importable
            return
        from mlflow.entities import Param

        self._batches(None, "params", [Param(str(k), str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None) -> None:
        if not self.active:  # MLflow may not even be importable
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, int(step or 0)) for k, v in metrics.items() if v is not None]
        self._batches(run_id, "metrics", items)

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        if not self.active:  # MLflow may not even be importable
            return
        from mlflow.entities import RunTag

        self._batches(run_id, "tags", [RunTag(str(k), str(v)) for k, v in tags.items() if v is not None])

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if Path(path).is_file():
            self._call(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_dict(self, document: Any, file_name: str) -> None:
        self._call(lambda: self.client.log_text(self.run_id, json.dumps(document, indent=2, default=str), file_name))

    def end(self, status: str = "FINISHED", end_parent: bool = False) -> None:
        """End this run and settle the parent (see ParentElection.settle); ``end_parent``: the execution's last
        tracked job ends the parent too, with the same status."""
        if not self.active:
            return
        run_id = self.run_id
        self._call(lambda: self.client.set_terminated(run_id, status))
        if self.election is not None:
            parent = self._call(self.election.settle)
            if end_parent and parent:
                self._call(lambda: self.client.set_terminated(parent, status))
        self.run_id = None


def prepare(uri: str, experiment_name: str | None) -> str | None:
    """Create the store's tables and the experiment before any job starts (parallel trials that each create a
    fresh SQLite store's tables collide); the experiment's ID, or None and one line when that fails. With no
    experiment name, the store alone: "" once its tables are there."""
    try:
        client_class, _ = _load_mlflow()
        client = client_class(tracking_uri=uri)
        if experiment_name is None:
            client.search_experiments(max_results=1)
            return ""
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            return str(experiment.experiment_id)
        return str(client.create_experiment(experiment_name, artifact_location=artifact_location(uri)))
    except Exception as error:
        _say(f"off: cannot use the tracking store at {uri} ({_first_line(error)}); the jobs will say so too")
        return None


# CustomerMetadataProperties keys of a model package registered with tracking (set by the Register step).
PACKAGE_RUN_ID = "mlflow-run-id"
PACKAGE_EXPERIMENT = "mlflow-experiment"
PACKAGE_TRACKING_URI = "mlflow-tracking-uri"


def tag_registered_version(package: Mapping[str, Any], tracking_uri: str | None = None) -> str | None:
    """Tag the run named in a model package's metadata, and its parent, with the package's ARN, version and
    approval status (the run -> version direction; the package names its run). Returns the run ID tagged, or
    None when the package names no run or tracking fails (one line, never an exception)."""
    metadata = package.get("CustomerMetadataProperties") or {}
    run_id = metadata.get(PACKAGE_RUN_ID)
    uri = tracking_uri or metadata.get(PACKAGE_TRACKING_URI)
    if not run_id or run_id == NOT_TRACKED or not uri:
        return None
    tags = {
        "model_package.arn": package.get("ModelPackageArn"),
        "model_package.version": package.get("ModelPackageVersion"),
        "model_package.status": package.get("ModelApprovalStatus"),
    }
    try:
        client_class, _ = _load_mlflow()
        client = client_class(tracking_uri=uri)
        parent = client.get_run(run_id).data.tags.get(TAG_PARENT)
        for target in (run_id, parent):
            if target:
                for key, value in tags.items():
                    if value is not None:
                        client.set_tag(target, key, str(value))
    except Exception as error:  # the registry stays the system of record
        _say(f"could not tag run {run_id} with its model package ({_first_line(error)})")
        return None
    return run_id


def disabled_line(environ: Mapping[str, str] | None = None) -> str | None:
    """The line a job prints when it does not track because no URI is set (None when one is)."""
    if configured(environ):
        return None
    return f"MLflow tracking: off (no {ENV_TRACKING_URI})"


if __name__ == "__main__":  # pragma: no cover - a quick check inside a container: python tracking.py
    tracker = Tracker.start("tracking-check")
    print("active" if tracker.active else "inactive", file=sys.stderr)
    tracker.end()
