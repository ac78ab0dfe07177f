"""The one flag that picks where a command works: SageMaker (boto3), or a local workdir (``--local``).

``status``, ``models``, ``approve``, ``reject``, ``deploy``, ``predict`` and ``endpoint-test`` take ``--local``
and ``--workdir DIR``; their command functions take a SageMaker client, boto3's or the engine's
:class:`pipelines.local.sagemaker.LocalSageMaker`, and run the same code on either. What SageMaker reads from S3
(a package's evaluation report) the local side reads from its registry's copies or its object store.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipelines import config, validation
from pipelines.definition import names
from pipelines.util.errors import CommandError


def workdir_argument(text: str) -> Path:
    path = Path(text)
    try:
        is_file = path.exists() and not path.is_dir()
    except OSError as error:  # a path longer than the system takes (ENAMETOOLONG), a folder not readable
        raise argparse.ArgumentTypeError(
            f"a path of {len(text)} characters cannot be used ({error.strerror})"
        ) from None
    if is_file:
        raise argparse.ArgumentTypeError(f"{text} is a file: pass a folder")
    return path


def add_workdir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        type=workdir_argument,
        default=Path(config.LOCAL_WORKDIR),
        help="folder of runs, step cache, local model registry and endpoints",
    )


def add_backend_arguments(parser: argparse.ArgumentParser, what: str = "the local workdir's") -> None:
    """``--local`` and ``--workdir DIR``."""
    parser.add_argument(
        "--local",
        action="store_true",
        help=f"work on {what} state instead of SageMaker's (no AWS account needed)",
    )
    parser.add_argument(
        "--workdir",
        type=workdir_argument,
        default=Path(config.LOCAL_WORKDIR),
        help="with --local: the folder of runs, registry and endpoints (default: %(default)s)",
    )


def add_local_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a local approval's deployment serves (what the deploy function's settings say on SageMaker)."""
    group = parser.add_argument_group("with --local: the approval deploys, as the deploy function does on SageMaker")
    group.add_argument("--no-deploy", action="store_true", help="change the status only; deploy nothing")
    add_local_endpoint_arguments(group)


def add_local_endpoint_arguments(parser: Any, name_flag: str | None = "--endpoint-name") -> None:
    """The local endpoint a command serves on: its name (under ``name_flag``), ``--port`` and ``--ray``."""
    if name_flag:
        add_endpoint_name_argument(parser, name_flag)
    parser.add_argument(
        "--port",
        type=validation.port_argument,
        default=config.LOCAL_ENDPOINT_PORT,
        help="port of the local endpoint (default: %(default)s)",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="serve on a local Ray Serve cluster as AWS's Ray Serve container does (slower start; needs ray[serve])",
    )


def add_endpoint_name_argument(parser: Any, flag: str) -> None:
    """A local endpoint's name, checked against SageMaker's pattern (it names files in the workdir)."""
    parser.add_argument(
        flag,
        type=names.name_argument("endpoint"),
        default=config.LOCAL_ENDPOINT_NAME,
        help="the local endpoint (default: %(default)s)",
    )


def local_client(args: argparse.Namespace) -> Any:
    """The LocalSageMaker of ``--workdir``, serving endpoints on ``--port`` (with ``--ray``, on Ray Serve)."""
    from pipelines.local.deploy_function import local_sagemaker

    port = getattr(args, "port", None) or config.LOCAL_ENDPOINT_PORT
    return local_sagemaker(args.workdir.resolve(), port, bool(getattr(args, "ray", False)))


def local_report_reader(workdir: Path) -> Any:
    """Reads a JSON report named by a file:// URI (the registry's copies) or an s3:// URI of the object store."""
    from pipelines.local.objectstore import ObjectStore, ObjectStoreError
    from pipelines.util import fsutil

    store = ObjectStore(workdir.resolve())

    def read(uri: str) -> dict[str, Any]:
        try:
            path = fsutil.file_uri_path(uri) if uri.startswith("file://") else store.path(uri)
        except (ValueError, ObjectStoreError) as error:
            raise ValueError(f"{uri}: {error}") from error
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ValueError(f"{uri}: {error.strerror}") from error

    return read


def deploy_on_approval(args: argparse.Namespace, client: Any, package_arn: str) -> None:
    """What EventBridge does on SageMaker when a package is approved: the approval event to the deploy function
    (run in-process against the local endpoint)."""
    from pipelines.local import deploy_function
    from pipelines.serving import endpoint as local_endpoint

    workdir = args.workdir.resolve()
    endpoint_name = args.endpoint_name or config.LOCAL_ENDPOINT_NAME
    package = client.describe_model_package(ModelPackageName=package_arn)
    function = deploy_function.deploy_function(
        workdir,
        model_package_group=package["ModelPackageGroupName"],
        endpoint_name=endpoint_name,
        port=args.port,
        ray=args.ray,
    )
    log_path = workdir / local_endpoint.ENDPOINTS_DIR / f"{endpoint_name}-deploy-function.log"
    try:
        answer = function(deploy_function.approval_event(package), log_path)
    except Exception as error:  # the function's own failure, as its log would show on SageMaker
        raise CommandError(f"the deploy function failed: {error} (its log: {log_path})") from error
    state = local_endpoint.status(workdir, endpoint_name)
    where = f" at {state['url']} (pid {state['pid']})" if state and state["EndpointStatus"] == "InService" else ""
    action = "unchanged (it already serves this version)" if answer["action"] == "unchanged" else answer["action"]
    print(f"{endpoint_name}: {action}, version {package['ModelPackageVersion']}{where}")


def previous_approved_package(sagemaker_client: Any, group: str, before_version: int) -> dict[str, Any] | None:
    """The newest Approved package of ``group`` older than ``before_version``, or None (a rollback's target, on
    SageMaker or locally)."""
    best: dict[str, Any] | None = None
    paginator = sagemaker_client.get_paginator("list_model_packages")
    for page in paginator.paginate(ModelPackageGroupName=group, ModelApprovalStatus="Approved"):
        for summary in page.get("ModelPackageSummaryList", []):
            version = summary.get("ModelPackageVersion")
            newer = best is None or (isinstance(version, int) and version > best["ModelPackageVersion"])
            if isinstance(version, int) and version < before_version and newer:
                best = summary
    return best


def disk_error_line(error: OSError, workdir: Path) -> str:
    """A failed write or read of the workdir (a full disk, no permission) in one line. Its state files are written
    whole or not at all, so what was there before is still there."""
    where = Path(error.filename).parent if error.filename else workdir
    return f"{error.strerror or error} in {where}: nothing was changed; free space or fix the folder and try again"
