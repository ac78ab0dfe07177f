"""Experiment tracking with MLflow, for the jobs' scripts: on only when ``MLFLOW_TRACKING_URI`` is set.

Standard library only. A job that tracks into a server (``http(s)://``: the local runner serves its SQLite store,
or ``--tracking-uri``) speaks MLflow's REST API itself (:class:`RestClient`) and never imports ``mlflow``, which
with its store would cost seconds of a core per job; a SQLite store, a SageMaker MLflow ARN (signed by the
sagemaker-mlflow plugin) or TLS client options go through MLflow's own client, imported when the job starts
tracking. Shipped inside the training ``source_dir`` (beside train.py) and, for the Evaluate step, as its
``tracking`` input beside the script (``/opt/ml/processing/input/tracking``), like Preprocess's ``contract`` input.

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

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
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
# MLflow's client options that RestClient does not speak: with one of them set, a job uses MLflow's own client.
MLFLOW_CLIENT_OPTIONS = (
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_AUTH",
)
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


def _mlflow_client(uri: str) -> Any:
    """MLflow's own client (with the HTTP retries bounded first), taking :class:`RestClient`'s plain batch items;
    ImportError when MLflow is missing."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.entities import Metric, Param, RunTag, ViewType
    from mlflow.tracking import MlflowClient

    class Client(MlflowClient):
        VIEW_ALL = ViewType.ALL

        def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = ()) -> None:
            super().log_batch(
                run_id,
                metrics=[Metric(**item) for item in metrics],
                params=[Param(**item) for item in params],
                tags=[RunTag(**item) for item in tags],
            )

    return Client(tracking_uri=uri)


def speaks_rest(uri: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether a job reaches this URI with :class:`RestClient` (an http(s) server, no client option it lacks)."""
    env = environ if environ is not None else os.environ
    return uri.startswith(("http://", "https://")) and not any(env.get(key) for key in MLFLOW_CLIENT_OPTIONS)


def client_for(uri: str, environ: Mapping[str, str] | None = None) -> Any:
    """The client a job uses: :class:`RestClient` for an http(s) server, MLflow's own otherwise (a SQLite store, a
    SageMaker MLflow ARN through the sagemaker-mlflow plugin); ImportError when that one is missing."""
    env = environ if environ is not None else os.environ
    return RestClient(uri, env) if speaks_rest(uri, env) else _mlflow_client(uri)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


class RestError(Exception):
    """A refused REST call: MLflow's error code (``RESOURCE_DOES_NOT_EXIST``...) and message, or the HTTP status."""

    def __init__(self, message: str, error_code: str = "") -> None:
        super().__init__(message)
        self.error_code = error_code


def _as_run(document: Mapping[str, Any]) -> SimpleNamespace:
    """A run of the REST API shaped as MLflow's ``Run`` where the tracker reads it (info, tags)."""
    tags = {tag["key"]: tag.get("value") for tag in document.get("data", {}).get("tags", [])}
    return SimpleNamespace(info=SimpleNamespace(**document["info"]), data=SimpleNamespace(tags=tags))


def _artifact_name(name: str) -> str:
    if ".." in name.split("/"):
        raise ValueError(f"artifact path {name!r} leaves the run's artifact folder")
    return name


class RestClient:
    """The part of MLflow's client that a job uses, over MLflow's REST API with the standard library only.

    Importing MLflow and its store costs seconds of a core per job, which on a small machine is the whole cost of
    tracking; a job that talks to a server (the local runner serves its SQLite store, or ``--tracking-uri``)
    needs none of it. Same method names and shapes as ``MlflowClient`` where the tracker calls them; batch items
    are plain ``{"key", "value", ...}`` dicts. Basic and bearer auth as MLflow reads them from the environment.
    Artifacts go where the run's artifact URI says: ``mlflow-artifacts:`` (a server that proxies them) by HTTP
    PUT, ``file:`` (a store on this machine) by a copy, anything else (s3: ...) through MLflow's own client.
    """

    VIEW_ALL = "ALL"

    def __init__(self, uri: str, environ: Mapping[str, str]) -> None:
        self.url = uri.rstrip("/")
        self.timeout = float(environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"])
        self.headers: dict[str, str] = {}
        user, password = environ.get("MLFLOW_TRACKING_USERNAME"), environ.get("MLFLOW_TRACKING_PASSWORD")
        if user and password:  # MLflow's order: basic auth first, then a token
            self.headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        elif environ.get("MLFLOW_TRACKING_TOKEN"):
            self.headers["Authorization"] = f"Bearer {environ['MLFLOW_TRACKING_TOKEN']}"
        self.artifact_uris: dict[str, str] = {}

    def _send(self, method: str, url: str, data: bytes | None, content_type: str) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - http(s) only (speaks_rest)
            url, data=data, headers={**self.headers, "Content-Type": content_type}, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            try:
                answer = json.loads(error.read() or b"{}")
            except ValueError:
                answer = {}
            code = str(answer.get("error_code", ""))
            raise RestError(f"HTTP {error.code} {code}: {answer.get('message', error.reason)}", code) from None

    def _call(self, endpoint: str, body: Mapping[str, Any] | None = None, **query: str) -> dict[str, Any]:
        url = f"{self.url}/api/2.0/mlflow/{endpoint}"
        if body is None:
            return self._send("GET", f"{url}?{urllib.parse.urlencode(query)}", None, "application/json")
        return self._send("POST", url, json.dumps(body).encode(), "application/json")

    def get_experiment_by_name(self, name: str) -> SimpleNamespace | None:
        try:
            answer = self._call("experiments/get-by-name", experiment_name=name)
        except RestError as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return SimpleNamespace(**answer["experiment"])

    def create_experiment(self, name: str, artifact_location: str | None = None) -> str:
        body = {"name": name, **({"artifact_location": artifact_location} if artifact_location else {})}
        return str(self._call("experiments/create", body)["experiment_id"])

    def search_runs(
        self, experiment_ids: list[str], filter_string: str = "", run_view_type: str = "", max_results: int = 1000
    ) -> list[SimpleNamespace]:
        body = {"experiment_ids": experiment_ids, "filter": filter_string, "max_results": max_results}
        answer = self._call("runs/search", {**body, "run_view_type": run_view_type or "ACTIVE_ONLY"})
        return [_as_run(run) for run in answer.get("runs", [])]

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> SimpleNamespace:
        tag_list = [{"key": key, "value": value} for key, value in tags.items()]
        body = {"experiment_id": experiment_id, "run_name": run_name, "tags": tag_list}
        run = _as_run(self._call("runs/create", {**body, "start_time": int(time.time() * 1000)})["run"])
        self.artifact_uris[run.info.run_id] = run.info.artifact_uri
        return run

    def get_run(self, run_id: str) -> SimpleNamespace:
        return _as_run(self._call("runs/get", run_id=run_id)["run"])

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = ()) -> None:
        self._call("runs/log-batch", {"run_id": run_id, "metrics": metrics, "params": params, "tags": tags})

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._call("runs/set-tag", {"run_id": run_id, "key": key, "value": value})

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        self._call("runs/update", {"run_id": run_id, "status": status, "end_time": int(time.time() * 1000)})

    def delete_run(self, run_id: str) -> None:
        self._call("runs/delete", {"run_id": run_id})

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        name = _artifact_name("/".join(filter(None, [(artifact_path or "").strip("/"), Path(local_path).name])))
        if not self._put(run_id, name, Path(local_path).read_bytes()):
            _mlflow_client(self.url).log_artifact(run_id, local_path, artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        if not self._put(run_id, _artifact_name(artifact_file.strip("/")), text.encode("utf-8")):
            _mlflow_client(self.url).log_text(run_id, text, artifact_file)

    def _put(self, run_id: str, name: str, data: bytes) -> bool:
        """``data`` as the run's artifact ``name`` where its artifact URI says; False for a store that only MLflow's
        client reaches (s3: ...)."""
        root = self.artifact_uris.get(run_id) or self.get_run(run_id).info.artifact_uri
        where = urllib.parse.urlparse(root)
        if where.scheme == "mlflow-artifacts":
            base = f"{urllib.parse.urlparse(self.url).scheme}://{where.netloc}" if where.netloc else self.url
            path = urllib.parse.quote(f"{where.path.strip('/')}/{name}")
            self._send("PUT", f"{base}/api/2.0/mlflow-artifacts/artifacts/{path}", data, "application/octet-stream")
        elif where.scheme == "file":
            target = Path(urllib.request.url2pathname(where.path)) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        else:
            return False
        return True


class ParentElection:
    """The execution's parent run: joined, or created and elected (see the module docstring)."""

    def __init__(self, client: Any, experiment_id: str, execution_id: str, pipeline: str) -> None:
        self.client = client
        self.experiment_id, self.execution_id, self.pipeline = experiment_id, execution_id, pipeline
        self.created: str | None = None

    def candidates(self) -> list[Any]:
        return list(
            self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{TAG_EXECUTION}` = '{self.execution_id}' and tags.`{TAG_ROLE}` = '{ROLE_PARENT}'",
                run_view_type=self.client.VIEW_ALL,
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
                run_view_type=self.client.VIEW_ALL,
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
            client = client_for(uri, env)
        except ImportError as error:
            _say(f"off: MLflow is not installed ({error}); {ENV_TRACKING_URI} is set but nothing is tracked")
            return tracker
        try:
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
                pipeline = env.get(ENV_EXPERIMENT, "") or "pipeline"
                election = ParentElection(client, experiment_id, execution_id, pipeline)
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
        self._batches(None, "params", [{"key": str(k), "value": str(v)[:6000]} for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None) -> None:
        now = int(time.time() * 1000)
        items = [
            {"key": str(k), "value": float(v), "timestamp": now, "step": int(step or 0)}
            for k, v in metrics.items()
            if v is not None
        ]
        self._batches(run_id, "metrics", items)

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        self._batches(run_id, "tags", [{"key": str(k), "value": str(v)} for k, v in tags.items() if v is not None])

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
        client = client_for(uri)
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
        client = client_for(uri)
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
