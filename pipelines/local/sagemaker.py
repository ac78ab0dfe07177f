"""``LocalSageMaker``: the local side of SageMaker's API, shaped like boto3's SageMaker client.

Everything local that SageMaker would do goes through one object with boto3's method names, arguments and
answers: the step executors record their jobs here, the RegisterModel step calls ``create_model_package``, the
deploy function (``steps/deploy.py``, run in-process) calls the model, endpoint config and endpoint methods, and
the CLI's ``status``, ``models``, ``approve``, ``reject`` and ``deploy`` take either this or boto3's client and run
the same code. What it keeps lives in the workdir:

- model packages: ``model-registry.json`` and ``registry/`` (:mod:`.registry`);
- jobs: ``sagemaker/<kind>/<job name>.json``, one Describe-shaped record per job;
- models, endpoint configs and endpoints: ``local-sagemaker.json``;
- pipeline executions: the runs' ``run.json`` (:mod:`.runs`).

It behaves as SageMaker does where users rely on it: every ``CreateModelPackage`` adds a version; only
``UpdateModelPackage`` changes an approval status; a missing resource is a botocore ``ClientError``
(``ValidationException`` "Could not find ...", or ``ResourceNotFound``), so callers' own error handling runs. Every
ARN is made by :func:`arn`, in one stand-in region and account. Serving is not the engine's: ``CreateEndpoint``
hands the package to an :class:`EndpointHost` the caller gives (the runner's, which starts the local server), after
checking that the version's registered files still hold the bytes they held at registration.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import ClientError

from pipelines.definition import names
from pipelines.local import runs
from pipelines.local.objectstore import ObjectStore, ObjectStoreError, s3_uris
from pipelines.local.registry import APPROVAL_STATUSES, LocalModelRegistry, RegistryError, changed_files
from pipelines.util import fsutil

# The stand-ins for what names an account: every local ARN is in this region and account.
REGION = "us-east-1"
ACCOUNT_ID = "000000000000"  # not an account: local ARNs only need the shape
STATE_FILE = "local-sagemaker.json"
JOBS_DIR = "sagemaker"
JOB_KINDS = {  # API noun -> (record folder, ARN resource type, name field, status field)
    "ProcessingJob": ("processing-jobs", "processing-job", "ProcessingJobName", "ProcessingJobStatus"),
    "TrainingJob": ("training-jobs", "training-job", "TrainingJobName", "TrainingJobStatus"),
    "HyperParameterTuningJob": (
        "tuning-jobs",
        "hyper-parameter-tuning-job",
        "HyperParameterTuningJobName",
        "HyperParameterTuningJobStatus",
    ),
}
_JOB_NOUNS = {re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower(): kind for kind in JOB_KINDS}  # training_job -> ...
JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")  # SageMaker's job name pattern (it names a file here)


def arn(
    resource_type: str, name: str, *, service: str = "sagemaker", region: str = REGION, account: str = ACCOUNT_ID
) -> str:
    """The ARN of a local resource, the one place they are made: SageMaker's lower-case the name; IAM's have no
    region and keep the case."""
    partition = names.partition_for_region(region)
    if service == "iam":
        return f"arn:{partition}:iam::{account}:{resource_type}/{name}"
    return f"arn:{partition}:{service}:{region}:{account}:{resource_type}/{name.lower()}"


ROLE_ARN = arn("role", "local-pipeline", service="iam")  # a placeholder execution role


def client_error(operation: str, message: str, code: str = "ValidationException") -> ClientError:
    """The error botocore raises for a refused call."""
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


def not_found(operation: str, what: str) -> ClientError:
    return client_error(operation, f"Could not find {what}.")


def _time(value: Any) -> Any:
    """A stored ISO time as boto3 answers it (a datetime), anything else as it is."""
    try:
        return dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    except ValueError:
        return value


class EndpointHost(Protocol):
    """What serves an endpoint here (the runner's host starts the local server)."""

    def serve(self, endpoint_name: str, package: dict[str, Any]) -> dict[str, Any]: ...

    def status(self, endpoint_name: str) -> dict[str, Any] | None: ...


class _Paginator:
    def __init__(self, method: Any) -> None:
        self.method = method

    def paginate(self, **request: Any) -> Iterator[dict[str, Any]]:
        yield self.method(**request)  # everything local fits one page


class LocalSageMaker:
    """boto3's SageMaker client, answered from ``workdir``. ``endpoints`` serves CreateEndpoint/UpdateEndpoint
    (without one those calls are refused)."""

    region = REGION

    def __init__(self, workdir: Path, endpoints: EndpointHost | None = None) -> None:
        self.workdir = workdir
        self.endpoints = endpoints
        self.registry = LocalModelRegistry(workdir, arn)
        self.store = ObjectStore(workdir)
        self.state_path = workdir / STATE_FILE

    def get_paginator(self, operation_name: str) -> _Paginator:
        return _Paginator(getattr(self, operation_name))

    # --- model packages ---------------------------------------------------------------------------------------
    def create_model_package(self, **request: Any) -> dict[str, Any]:
        """A new version in the group, whatever earlier versions hold; s3:// files come from the object store."""
        try:
            files = {uri: self._object(uri) for uri in s3_uris(request)}
            package = self.registry.register(request, files)
        except (RegistryError, ObjectStoreError, fsutil.WorkdirBusy) as error:
            raise client_error("CreateModelPackage", str(error)) from error
        return {"ModelPackageArn": package["ModelPackageArn"]}

    def _object(self, uri: str) -> Path:
        path = self.store.path(uri)
        if not path.exists():
            raise ObjectStoreError(f"{uri} holds no object (looked in {path})")
        return path

    def describe_model_package(self, ModelPackageName: str) -> dict[str, Any]:
        package = self._package(ModelPackageName, "DescribeModelPackage")
        return {key: _time(value) for key, value in package.items()}

    def _package(self, name: str, operation: str) -> dict[str, Any]:
        try:
            self.registry.check()
        except RegistryError as error:  # a damaged registry is not a missing package
            raise client_error(operation, str(error)) from error
        try:
            return self.registry.by_arn(name)
        except RegistryError as error:
            raise not_found(operation, f"model package {name}") from error

    def list_model_packages(
        self,
        ModelPackageGroupName: str,
        ModelApprovalStatus: str | None = None,
        SortBy: str = "CreationTime",
        SortOrder: str = "Ascending",
        MaxResults: int | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        """The group's versions as ListModelPackages summarises them (an unknown group: an empty list)."""
        try:
            packages = self.registry.list_model_packages(ModelPackageGroupName)
        except RegistryError as error:
            raise client_error("ListModelPackages", str(error)) from error
        if ModelApprovalStatus:
            packages = [p for p in packages if p["ModelApprovalStatus"] == ModelApprovalStatus]
        packages.sort(key=lambda p: p["ModelPackageVersion"], reverse=SortOrder == "Descending")
        summary_keys = (
            "ModelPackageGroupName",
            "ModelPackageVersion",
            "ModelPackageArn",
            "ModelPackageDescription",
            "CreationTime",
            "ModelPackageStatus",
            "ModelApprovalStatus",
        )
        summaries = [{k: _time(p[k]) for k in summary_keys if k in p} for p in packages]
        return {"ModelPackageSummaryList": summaries[:MaxResults] if MaxResults else summaries}

    def update_model_package(
        self, ModelPackageArn: str, ModelApprovalStatus: str | None = None, ApprovalDescription: str = "", **_: Any
    ) -> dict[str, Any]:
        """The one call that changes a version's approval status."""
        package = self._package(ModelPackageArn, "UpdateModelPackage")
        if ModelApprovalStatus is not None:
            if ModelApprovalStatus not in APPROVAL_STATUSES:
                message = f"ModelApprovalStatus {ModelApprovalStatus!r} is not one of {', '.join(APPROVAL_STATUSES)}"
                raise client_error("UpdateModelPackage", message)
            group, version = package["ModelPackageGroupName"], package["ModelPackageVersion"]
            try:
                self.registry.update_approval(group, version, ModelApprovalStatus, ApprovalDescription)
            except (RegistryError, fsutil.WorkdirBusy) as error:
                raise client_error("UpdateModelPackage", str(error)) from error
        return {"ModelPackageArn": ModelPackageArn}

    def describe_model_package_group(self, ModelPackageGroupName: str) -> dict[str, Any]:
        for group in self.registry.groups():
            if group["ModelPackageGroupName"] == ModelPackageGroupName:
                return {key: _time(value) for key, value in group.items()}
        raise not_found("DescribeModelPackageGroup", f"model package group {ModelPackageGroupName}")

    def verified_package(self, ModelPackageName: str) -> dict[str, Any]:
        """DescribeModelPackage, refused when a registered file's bytes changed since registration."""
        package = self.describe_model_package(ModelPackageName)
        changed = changed_files(package)
        if changed:
            version = f"{package['ModelPackageGroupName']} version {package['ModelPackageVersion']}"
            raise client_error(
                "DescribeModelPackage",
                f"{version} is not served: its file {changed[0]} changed after registration ("
                + ("it is gone" if not Path(changed[0]).exists() else "sha256 differs from the one recorded")
                + "); register the model again",
            )
        return package

    # --- jobs -------------------------------------------------------------------------------------------------
    def _job_path(self, kind: str, name: str, operation: str) -> Path:
        if not isinstance(name, str) or not JOB_NAME.fullmatch(name):
            raise client_error(operation, f"{kind} name {name!r} does not match SageMaker's pattern for it")
        return self.workdir / JOBS_DIR / JOB_KINDS[kind][0] / f"{name}.json"

    def _create_job(self, kind: str, request: dict[str, Any]) -> dict[str, Any]:
        """Create<kind>. A name is refused while a job of that name is in progress; a finished job's record under
        the same name is replaced: local job names carry their run's ID, which comes back only when that run's
        folder was deleted."""
        _, resource, name_key, status_key = JOB_KINDS[kind]
        name = request.get(name_key)
        path = self._job_path(kind, name, f"Create{kind}")
        if (_read_record(path) or {}).get(status_key) == "InProgress":
            message = f"a {kind} named {name} is in progress ({path}); if no run executes it, delete that file"
            raise client_error(f"Create{kind}", message, "ResourceInUse")
        answer = {name_key.replace("Name", "Arn"): arn(resource, name)}
        fsutil.write_json_atomic(
            path, {**request, **answer, status_key: "InProgress", "CreationTime": fsutil.utc_now()}
        )
        return answer

    def end_job(self, kind: str, name: str, status: str, **described: Any) -> dict[str, Any]:
        """What SageMaker records when a job ends (the local executors call it): its status and Describe fields."""
        path = self._job_path(kind, name, f"Describe{kind}")
        record = {**(_read_record(path) or {}), **described, JOB_KINDS[kind][3]: status, "EndTime": fsutil.utc_now()}
        fsutil.write_json_atomic(path, record)
        return record

    def _describe_job(self, kind: str, name: str) -> dict[str, Any]:
        record = _read_record(self._job_path(kind, name, f"Describe{kind}"))
        if record is None:
            raise not_found(f"Describe{kind}", f"{kind} {name}")
        return {key: _time(value) for key, value in record.items()}

    def _list_jobs(self, kind: str) -> dict[str, Any]:
        folder, _, name_key, status_key = JOB_KINDS[kind]
        summaries = []
        for path in sorted((self.workdir / JOBS_DIR / folder).glob("*.json")):
            record = _read_record(path)
            if record is not None:
                keys = (name_key, name_key.replace("Name", "Arn"), status_key, "CreationTime", "EndTime")
                summaries.append({key: _time(record[key]) for key in keys if key in record})
        summaries.sort(key=lambda summary: str(summary.get("CreationTime")), reverse=True)
        return {f"{kind}Summaries": summaries}

    def _stop_job(self, kind: str, name: str) -> dict[str, Any]:
        status = self._describe_job(kind, name)[JOB_KINDS[kind][3]]
        reason = "a local job stops with its run: interrupt `local` (Ctrl-C or SIGTERM)"
        if status != "InProgress":
            reason = f"The request was rejected because the {kind} is in status {status}."
        raise client_error(f"Stop{kind}", reason)

    def __getattr__(self, operation: str) -> Any:
        """``create_``, ``describe_``, ``list_`` and ``stop_`` of each kind of :data:`JOB_KINDS`
        (``describe_training_job(TrainingJobName=...)``, ``list_hyper_parameter_tuning_jobs()``): made from the
        table, as botocore makes a client's methods from the service model."""
        verb, _, noun = operation.partition("_")
        kind = _JOB_NOUNS.get(noun.removesuffix("s") if verb == "list" else noun)
        if kind is None or verb not in ("create", "describe", "list", "stop"):
            raise AttributeError(f"{type(self).__name__} has no attribute {operation!r}")
        name_key = JOB_KINDS[kind][2]
        calls: dict[str, Callable[..., dict[str, Any]]] = {
            "create": lambda **request: self._create_job(kind, request),
            "describe": lambda **request: self._describe_job(kind, request[name_key]),
            "list": lambda **request: self._list_jobs(kind),
            "stop": lambda **request: self._stop_job(kind, request[name_key]),
        }
        return calls[verb]

    # --- models, endpoint configs, endpoints ------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        try:
            state = fsutil.read_state(self.state_path, _state_problem, "set aside; its models and configs are remade")
        except fsutil.StateFileError as error:
            aside = fsutil.set_aside(self.state_path)
            print(f"{error} ({aside})", file=sys.stderr, flush=True)
            state = None
        return state or {"Models": {}, "EndpointConfigs": {}, "Endpoints": {}}

    def _save(self, kind: str, name: str, value: dict[str, Any]) -> None:
        with fsutil.workdir_lock(self.workdir, f"recording {kind[:-1]} {name}"):
            state = self._state()
            state[kind][name] = value
            fsutil.write_json_atomic(self.state_path, state)

    def _describe(self, kind: str, name: str, operation: str) -> dict[str, Any]:
        found = self._state()[kind].get(name)
        if found is None:
            raise not_found(operation, f'{kind[:-1]} "{name}"')
        return found

    def describe_model(self, ModelName: str) -> dict[str, Any]:
        return self._describe("Models", ModelName, "DescribeModel")

    def create_model(self, ModelName: str, **request: Any) -> dict[str, Any]:
        model_arn = arn("model", ModelName)
        self._save("Models", ModelName, {"ModelName": ModelName, "ModelArn": model_arn, **request})
        return {"ModelArn": model_arn}

    def describe_endpoint_config(self, EndpointConfigName: str) -> dict[str, Any]:
        return self._describe("EndpointConfigs", EndpointConfigName, "DescribeEndpointConfig")

    def create_endpoint_config(self, EndpointConfigName: str, **request: Any) -> dict[str, Any]:
        config_arn = arn("endpoint-config", EndpointConfigName)
        record = {"EndpointConfigName": EndpointConfigName, "EndpointConfigArn": config_arn, **request}
        self._save("EndpointConfigs", EndpointConfigName, record)
        return {"EndpointConfigArn": config_arn}

    def describe_endpoint(self, EndpointName: str) -> dict[str, Any]:
        """InService while the endpoint's server runs; "not found" otherwise (a stopped one is created again)."""
        known = self._state()["Endpoints"].get(EndpointName)
        running = self.endpoints.status(EndpointName) if self.endpoints else None
        if known is None or running is None or running["EndpointStatus"] != "InService":
            raise not_found("DescribeEndpoint", f'endpoint "{EndpointName}"')
        return {**known, "EndpointStatus": "InService", "url": running["url"]}

    def create_endpoint(self, EndpointName: str, EndpointConfigName: str, **_: Any) -> dict[str, Any]:
        return self._serve(EndpointName, EndpointConfigName, "CreateEndpoint")

    def update_endpoint(self, EndpointName: str, EndpointConfigName: str, **_: Any) -> dict[str, Any]:
        return self._serve(EndpointName, EndpointConfigName, "UpdateEndpoint")

    def _serve(self, endpoint_name: str, config_name: str, operation: str) -> dict[str, Any]:
        if self.endpoints is None:
            raise client_error(operation, "this LocalSageMaker has no endpoint host: nothing here can serve")
        endpoint_config = self._describe("EndpointConfigs", config_name, operation)
        model = self._describe("Models", endpoint_config["ProductionVariants"][0]["ModelName"], operation)
        package = self.verified_package(model["PrimaryContainer"]["ModelPackageName"])
        self.endpoints.serve(endpoint_name, self.registry.by_arn(package["ModelPackageArn"]))
        endpoint_arn = arn("endpoint", endpoint_name)
        record = {"EndpointName": endpoint_name, "EndpointArn": endpoint_arn, "EndpointConfigName": config_name}
        self._save("Endpoints", endpoint_name, record)
        return {"EndpointArn": endpoint_arn}

    # --- pipeline executions (the runs of the workdir) --------------------------------------------------------
    def _runs(self, pipeline_name: str | None = None) -> list[dict[str, Any]]:
        records = [runs.read_run(folder) for folder in runs.run_folders(self.workdir)]
        if pipeline_name is not None:
            pipeline_arn = arn("pipeline", pipeline_name)
            records = [record for record in records if record.get("PipelineArn") == pipeline_arn]
        return records

    def describe_pipeline(self, PipelineName: str) -> dict[str, Any]:
        found = self._runs(PipelineName)
        if not found:
            raise client_error("DescribePipeline", f"Pipeline '{arn('pipeline', PipelineName)}' does not exist.",
                               "ResourceNotFound")  # fmt: skip
        definition = Path(found[-1].get("RunFolder", "")) / "definition.json"
        text = definition.read_text(encoding="utf-8") if definition.is_file() else "{}"
        return {"PipelineName": PipelineName, "PipelineArn": found[-1]["PipelineArn"], "PipelineDefinition": text}

    def list_pipeline_executions(self, PipelineName: str, SortOrder: str = "Descending", **_: Any) -> dict[str, Any]:
        summaries = [
            {
                "PipelineExecutionArn": record["PipelineExecutionArn"],
                "StartTime": _time(record.get("StartTime")),
                "PipelineExecutionStatus": runs.shown_status(record),
                "PipelineExecutionDisplayName": record.get("PipelineExecutionDisplayName", record.get("RunId")),
            }
            for record in self._runs(PipelineName)
        ]
        return {"PipelineExecutionSummaries": summaries[::-1] if SortOrder == "Descending" else summaries}

    def _execution(self, execution_arn: str, operation: str) -> dict[str, Any]:
        for record in self._runs():
            if record.get("PipelineExecutionArn") == execution_arn:
                return record
        raise client_error(operation, f"Pipeline execution '{execution_arn}' does not exist.", "ResourceNotFound")

    def describe_pipeline_execution(self, PipelineExecutionArn: str) -> dict[str, Any]:
        record = self._execution(PipelineExecutionArn, "DescribePipelineExecution")
        keys = ("PipelineArn", "PipelineExecutionArn", "PipelineExecutionDisplayName", "FailureReason")
        described = {key: record[key] for key in keys if key in record}
        described["PipelineExecutionStatus"] = runs.shown_status(record)
        described["CreationTime"] = _time(record.get("StartTime"))
        return described

    def list_pipeline_execution_steps(self, PipelineExecutionArn: str, **_: Any) -> dict[str, Any]:
        record = self._execution(PipelineExecutionArn, "ListPipelineExecutionSteps")
        return {"PipelineExecutionSteps": runs.shown_steps(record)}


def _read_record(path: Path) -> dict[str, Any] | None:
    """A job's record; a damaged one (derived state, as the run's own record keeps the job) counts as none."""
    try:
        record = fsutil.read_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _state_problem(state: Any) -> str | None:
    kinds = ("Models", "EndpointConfigs", "Endpoints")
    if not isinstance(state, dict) or not all(isinstance(state.get(kind), dict) for kind in kinds):
        return f"it does not hold the {', '.join(kinds)} objects"
    return None
