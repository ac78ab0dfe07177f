"""The deploy function (``steps/deploy.py``) run in-process against the local registry and the local endpoint.

The handler's code path is the one the Lambda runs: :func:`steps.deploy.invoke` with settings parsed from the
environment ``upsert`` would give the function, and with the engine's
:class:`pipelines.local.sagemaker.LocalSageMaker` as its SageMaker client. What is project-aware here is the
endpoint host handed to it: ``CreateEndpoint`` / ``UpdateEndpoint`` serve the config's model package with
:func:`pipelines.serving.endpoint.deploy` (the local endpoint restarts on the new model; there is no blue/green
fleet here), and ``DescribeEndpoint`` is InService while that server runs.

Each invocation holds the workdir's lock from the first call to the last, so two approvals at once deploy one
after the other and the second finds the endpoint already on its config ("unchanged").
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pipelines import config
from pipelines.local import sagemaker
from pipelines.serving import endpoint
from pipelines.util import fsutil
from steps import deploy


class EndpointHost:
    """Serves the local SageMaker's endpoints with this project's servers (light, or Ray Serve's)."""

    def __init__(self, workdir: Path, port: int = config.LOCAL_ENDPOINT_PORT, ray: bool = False) -> None:
        self.workdir, self.port, self.ray = workdir, port, ray

    def serve(self, endpoint_name: str, package: dict[str, Any]) -> dict[str, Any]:
        return endpoint.deploy(self.workdir, endpoint_name, package, port=self.port, ray=self.ray)

    def status(self, endpoint_name: str) -> dict[str, Any] | None:
        try:
            return endpoint.status(self.workdir, endpoint_name)
        except endpoint.DamagedRecord:  # CreateEndpoint stops what it finds of it and starts it anew
            return None


def local_sagemaker(workdir: Path, port: int = config.LOCAL_ENDPOINT_PORT, ray: bool = False) -> Any:
    """The engine's LocalSageMaker for ``workdir``, serving endpoints here."""
    return sagemaker.LocalSageMaker(workdir, EndpointHost(workdir, port, ray))


def function_environment(model_package_group: str, endpoint_name: str) -> dict[str, str]:
    """The environment ``upsert`` gives the function, with the local endpoint's name and a placeholder role."""
    return {
        "MODEL_PACKAGE_GROUP_NAME": model_package_group,
        "EXECUTION_ROLE_ARN": sagemaker.ROLE_ARN,
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
    *,
    model_package_group: str,
    endpoint_name: str,
    port: int,
    ray: bool = False,
) -> Callable[[Any, Path], Mapping[str, Any]]:
    """The deploy function as the local Lambda executor calls it: (event, log file) in, the handler's answer out."""
    settings = deploy.DeploySettings.from_env(function_environment(model_package_group, endpoint_name))
    clients = deploy.DeployClients(sagemaker=local_sagemaker(workdir, port, ray))

    def invoke(event: Any, log_path: Path) -> Mapping[str, Any]:
        purpose = f"the deploy function's run for endpoint {endpoint_name}"
        with fsutil.workdir_lock(workdir, purpose), function_log(log_path):
            # the local endpoint is never busy (it starts before create/update returns): nothing to wait for
            return deploy.invoke(event, settings, clients, deadline=time.monotonic())

    return invoke


def approval_event(package: Mapping[str, Any]) -> dict[str, Any]:
    """The EventBridge event SageMaker sends when a package is approved (what ``approve --local`` sends)."""
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
