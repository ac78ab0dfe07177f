"""The deploy function (``steps/deploy.py``) run in-process against the local registry and the local endpoint.

The handler's code path is the one the Lambda runs: :func:`steps.deploy.invoke` with settings parsed from the
environment ``upsert`` would give the function, and with :class:`LocalSageMaker` standing in for its SageMaker
client. That stand-in answers the calls the handler makes:

- ``DescribeModelPackage``: the local registry;
- ``CreateModel`` / ``DescribeModel`` and ``CreateEndpointConfig`` / ``DescribeEndpointConfig``: records in
  ``<workdir>/local-sagemaker.json``;
- ``CreateEndpoint`` / ``UpdateEndpoint``: :func:`pipelines.serving.endpoint.deploy` of the config's model package
  (the local endpoint restarts on the new model; there is no blue/green fleet here);
- ``DescribeEndpoint``: InService while the endpoint's server runs, "not found" otherwise (so a stopped endpoint
  is created again).

Missing resources are answered with the ``ValidationException`` "Could not find ..." SageMaker sends, as a
botocore ``ClientError``, so the handler's own error handling runs.

Each invocation holds the workdir's lock from the first call to the last, so two approvals at once deploy one
after the other and the second finds the endpoint already on its config ("unchanged"). The records file is
derived state: a damaged one is reported, set aside, and its models and configs are made again.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from pipelines import config
from pipelines.local.registry import LocalModelRegistry, RegistryError
from pipelines.serving import endpoint
from pipelines.util import fsutil
from steps import deploy

STATE_FILE = "local-sagemaker.json"


def _not_found(operation: str, what: str) -> ClientError:
    return ClientError({"Error": {"Code": "ValidationException", "Message": f"Could not find {what}."}}, operation)


class LocalSageMaker:
    """The SageMaker client calls of steps/deploy.py, answered on this machine."""

    def __init__(self, workdir: Path, registry: LocalModelRegistry, port: int, ray: bool = False) -> None:
        self.workdir = workdir
        self.registry = registry
        self.port = port
        self.ray = ray  # serve on a local Ray Serve cluster, as the Ray Serve container does
        self.state_path = workdir / STATE_FILE

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
            raise _not_found(operation, f'{kind[:-1]} "{name}"')
        return found

    # --- the calls --------------------------------------------------------------------------------------------
    def describe_model_package(self, ModelPackageName: str) -> dict[str, Any]:
        try:
            return self.registry.by_arn(ModelPackageName)
        except RegistryError as error:
            raise _not_found("DescribeModelPackage", f"model package {ModelPackageName}") from error

    def describe_model(self, ModelName: str) -> dict[str, Any]:
        return self._describe("Models", ModelName, "DescribeModel")

    def create_model(self, ModelName: str, **request: Any) -> dict[str, Any]:
        self._save("Models", ModelName, {"ModelName": ModelName, **request})
        return {"ModelArn": f"arn:aws:sagemaker:local:{config.LOCAL_ACCOUNT_ID}:model/{ModelName.lower()}"}

    def describe_endpoint_config(self, EndpointConfigName: str) -> dict[str, Any]:
        return self._describe("EndpointConfigs", EndpointConfigName, "DescribeEndpointConfig")

    def create_endpoint_config(self, EndpointConfigName: str, **request: Any) -> dict[str, Any]:
        self._save("EndpointConfigs", EndpointConfigName, {"EndpointConfigName": EndpointConfigName, **request})
        return {}

    def describe_endpoint(self, EndpointName: str) -> dict[str, Any]:
        known = self._state()["Endpoints"].get(EndpointName)
        try:
            running = endpoint.status(self.workdir, EndpointName)
        except endpoint.DamagedRecord:  # CreateEndpoint stops what it finds of it and starts it anew
            running = None
        if known is None or running is None or running["EndpointStatus"] != "InService":
            raise _not_found("DescribeEndpoint", f'endpoint "{EndpointName}"')
        return {**known, "EndpointStatus": "InService", "url": running["url"]}

    def create_endpoint(self, EndpointName: str, EndpointConfigName: str, **_: Any) -> dict[str, Any]:
        self._serve(EndpointName, EndpointConfigName, "CreateEndpoint")
        return {}

    def update_endpoint(self, EndpointName: str, EndpointConfigName: str, **_: Any) -> dict[str, Any]:
        self._serve(EndpointName, EndpointConfigName, "UpdateEndpoint")
        return {}

    def _serve(self, endpoint_name: str, config_name: str, operation: str) -> None:
        endpoint_config = self._describe("EndpointConfigs", config_name, operation)
        model = self._describe("Models", endpoint_config["ProductionVariants"][0]["ModelName"], operation)
        package = self.describe_model_package(model["PrimaryContainer"]["ModelPackageName"])
        endpoint.deploy(self.workdir, endpoint_name, package, port=self.port, ray=self.ray)
        self._save("Endpoints", endpoint_name, {"EndpointName": endpoint_name, "EndpointConfigName": config_name})


def _state_problem(state: Any) -> str | None:
    kinds = ("Models", "EndpointConfigs", "Endpoints")
    if not isinstance(state, dict) or not all(isinstance(state.get(kind), dict) for kind in kinds):
        return f"it does not hold the {', '.join(kinds)} objects"
    return None


def function_environment(model_package_group: str, endpoint_name: str) -> dict[str, str]:
    """The environment ``upsert`` gives the function, with the local endpoint's name and a placeholder role."""
    return {
        "MODEL_PACKAGE_GROUP_NAME": model_package_group,
        "EXECUTION_ROLE_ARN": config.LOCAL_ROLE_ARN,
        "RESOURCE_NAME_PREFIX": config.ENDPOINT_NAME_PREFIX,
        "ENDPOINT_NAME": endpoint_name,
    }


@contextlib.contextmanager
def function_log(log_path: Path) -> Iterator[None]:
    """The handler's log lines into ``log_path`` (CloudWatch Logs keeps a Lambda's), not onto the console."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    propagate = deploy.logger.propagate
    deploy.logger.addHandler(handler)
    deploy.logger.propagate = False
    try:
        yield
    finally:
        deploy.logger.removeHandler(handler)
        deploy.logger.propagate = propagate
        handler.close()


def deploy_function(
    workdir: Path,
    registry: LocalModelRegistry,
    *,
    model_package_group: str,
    endpoint_name: str,
    port: int,
    ray: bool = False,
) -> Callable[[Any, Path], Mapping[str, Any]]:
    """The deploy function as the local Lambda executor calls it: (event, log file) in, the handler's answer out."""
    settings = deploy.DeploySettings.from_env(function_environment(model_package_group, endpoint_name))
    clients = deploy.DeployClients(sagemaker=LocalSageMaker(workdir, registry, port, ray))

    def invoke(event: Any, log_path: Path) -> Mapping[str, Any]:
        purpose = f"the deploy function's run for endpoint {endpoint_name}"
        with fsutil.workdir_lock(workdir, purpose), function_log(log_path):
            # the local endpoint is never busy (it starts before create/update returns): nothing to wait for
            return deploy.invoke(event, settings, clients, deadline=time.monotonic())

    return invoke


def approval_event(package: Mapping[str, Any]) -> dict[str, Any]:
    """The EventBridge event SageMaker sends when a package is approved (what ``local-models --approve`` sends)."""
    return {
        "version": "0",
        "id": f"local-approval-{package['ModelPackageVersion']}",
        "source": deploy.EVENT_SOURCE,
        "detail-type": deploy.EVENT_DETAIL_TYPE,
        "resources": [package["ModelPackageArn"]],
        "detail": {
            "ModelPackageGroupName": package["ModelPackageGroupName"],
            "ModelPackageVersion": package["ModelPackageVersion"],
            "ModelPackageArn": package["ModelPackageArn"],
            "ModelApprovalStatus": package["ModelApprovalStatus"],
        },
    }
