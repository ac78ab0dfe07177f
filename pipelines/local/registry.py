"""The local model registry: one JSON file in the workdir, shaped like SageMaker's model registry.

``<workdir>/model-registry.json`` holds model package groups and their versioned model packages: what the
pipeline's RegisterModel step asked for (its CreateModelPackage arguments) plus the fields of
``DescribeModelPackage`` (``ModelPackageArn``, ``ModelPackageVersion``, ``ModelApprovalStatus``, ...). It is the
storage behind :class:`pipelines.local.sagemaker.LocalSageMaker`, which builds the ARNs and answers the API calls.

Every file the request names (the model's ``ModelDataUrl``, the ``ModelMetrics`` reports) is copied into
``<workdir>/registry/<group>/<version>/`` (a copy, read-only, never a link to a run's files, so nothing edits it
in place) and named by a ``file://`` URI there, with its sha256 in ``FileSha256``; :func:`changed_files` checks
them before a version is served. Every registration adds a version, as SageMaker's CreateModelPackage does, even
for model bytes an earlier version holds: only :meth:`LocalModelRegistry.update_approval` changes a status.

The file is the registry's only record, so it is never rewritten from a damaged copy: it is read whole and checked
(:meth:`LocalModelRegistry.check`) before anything uses it, and a damaged one stops every command with one line
naming it and what to do. Changes hold the workdir's lock.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipelines.definition import names
from pipelines.util import fsutil

# CreateModelPackage's own default for a versioned package that names no ModelApprovalStatus
DEFAULT_APPROVAL_STATUS = "PendingManualApproval"

REGISTRY_FILE = "model-registry.json"
ARTIFACTS_DIR = "registry"
APPROVAL_STATUSES = ("PendingManualApproval", "Approved", "Rejected")


class RegistryError(Exception):
    """A registry request that cannot be served (unknown group or version, bad status), or a damaged registry."""


DAMAGED_REMEDY = (
    "restore it from a copy, or move it aside to start an empty registry (the versions' files stay in "
    f"{ARTIFACTS_DIR}/); nothing was changed"
)


Arn = Callable[[str, str], str]  # (resource type, name) -> ARN: pipelines.local.sagemaker.arn


class LocalModelRegistry:
    def __init__(self, workdir: Path, arn: Arn) -> None:
        self.workdir = workdir
        self.path = workdir / REGISTRY_FILE
        self.arn = arn

    # --- reading ----------------------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        try:
            data = fsutil.read_state(self.path, registry_problem, DAMAGED_REMEDY)
        except fsutil.StateFileError as error:
            raise RegistryError(str(error)) from error
        return {"ModelPackageGroups": {}} if data is None else data

    def check(self) -> None:
        """Read and check the whole file (RegistryError naming it and what to do, if it is damaged)."""
        self._load()

    def groups(self) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in group.items() if k != "ModelPackages"}
            for group in self._load()["ModelPackageGroups"].values()
        ]

    def list_model_packages(self, group: str) -> list[dict[str, Any]]:
        """Every version of ``group``, oldest first (an empty list for an unknown group)."""
        data = self._load()["ModelPackageGroups"].get(group)
        return list(data["ModelPackages"]) if data else []

    def describe(self, group: str, version: int | None = None) -> dict[str, Any]:
        """One version of ``group`` (the newest when ``version`` is None)."""
        packages = self.list_model_packages(group)
        if not packages:
            raise RegistryError(f"model package group {group!r} has no versions in {self.path}")
        if version is None:
            return packages[-1]
        for package in packages:
            if package["ModelPackageVersion"] == version:
                return package
        known = ", ".join(str(p["ModelPackageVersion"]) for p in packages)
        raise RegistryError(f"{group!r} has no version {version} (versions: {known})")

    def latest_approved(self, group: str) -> dict[str, Any] | None:
        approved = [p for p in self.list_model_packages(group) if p["ModelApprovalStatus"] == "Approved"]
        return approved[-1] if approved else None

    def by_arn(self, arn: str) -> dict[str, Any]:
        """``DescribeModelPackage(ModelPackageName=<arn>)``."""
        for group in self._load()["ModelPackageGroups"].values():
            for package in group["ModelPackages"]:
                if package["ModelPackageArn"] == arn:
                    return package
        raise RegistryError(f"no model package {arn} in {self.path}")

    # --- writing ----------------------------------------------------------------------------------------------
    def register(
        self,
        request: Mapping[str, Any],
        files: Mapping[str, Path],
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """``CreateModelPackage``: always a new version, with copies of its files.

        ``request`` holds the CreateModelPackage arguments; ``files`` maps each URI in it to the local file it
        names (at least the first container's ``ModelDataUrl``).
        """
        group = request.get("ModelPackageGroupName")
        try:
            names.check_name("model package group", group)
        except ValueError as error:
            raise RegistryError(str(error)) from error
        status = request.get("ModelApprovalStatus", DEFAULT_APPROVAL_STATUS)
        if status not in APPROVAL_STATUSES:
            raise RegistryError(f"approval status {status!r} is not one of {', '.join(APPROVAL_STATUSES)}")
        model_uri = request["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
        if model_uri not in files:
            raise RegistryError(f"the model {model_uri} has no local file")
        with fsutil.workdir_lock(self.workdir, f"registering a version of {group}"):
            data = self._load()
            packages = self._group(data, group)["ModelPackages"]
            version = max((p["ModelPackageVersion"] for p in packages), default=0) + 1
            try:
                folder = fsutil.contained(self.workdir, self.workdir / ARTIFACTS_DIR / group / str(version))
            except fsutil.OutsideWorkdir as error:
                raise RegistryError(str(error)) from error
            fsutil.remove_path(folder)  # what a registration that died before recording it left
            stored = {uri: _frozen_copy(path, folder / path.name) for uri, path in files.items()}
            now = fsutil.utc_now()
            package = {
                **_replace_strings(dict(request), {uri: path.as_uri() for uri, path in stored.items()}),
                "ModelPackageGroupName": group,
                "ModelPackageVersion": version,
                "ModelPackageArn": self.arn("model-package", f"{group}/{version}"),
                "CreationTime": now,
                "LastModifiedTime": now,
                "ModelPackageStatus": "Completed",
                "ModelApprovalStatus": status,
                "CustomerMetadataProperties": {
                    **request.get("CustomerMetadataProperties", {}),
                    **(metadata or {}),
                    "ModelSha256": fsutil.file_sha256(stored[model_uri]),
                },
                "FileSha256": {
                    path.as_uri(): fsutil.file_sha256(path) for copy in stored.values() for path in _files(copy)
                },
            }
            packages.append(package)
            fsutil.write_json_atomic(self.path, data)
        return package

    def _group(self, data: dict[str, Any], group: str) -> dict[str, Any]:
        groups = data["ModelPackageGroups"]
        if group not in groups:
            groups[group] = {
                "ModelPackageGroupName": group,
                "ModelPackageGroupArn": self.arn("model-package-group", group),
                "ModelPackageGroupDescription": "Image classifiers registered by the local pipeline",
                "CreationTime": fsutil.utc_now(),
                "ModelPackageGroupStatus": "Completed",
                "ModelPackages": [],
            }
        return groups[group]

    def update_approval(self, group: str, version: int, status: str, description: str = "") -> dict[str, Any]:
        """``UpdateModelPackage(ModelApprovalStatus=...)``."""
        if status not in APPROVAL_STATUSES:
            raise RegistryError(f"approval status {status!r} is not one of {', '.join(APPROVAL_STATUSES)}")
        with fsutil.workdir_lock(self.workdir, f"setting version {version} of {group} {status}"):
            data = self._load()
            group_data = data["ModelPackageGroups"].get(group)
            if not group_data:
                raise RegistryError(f"model package group {group!r} does not exist in {self.path}")
            for package in group_data["ModelPackages"]:
                if package["ModelPackageVersion"] == version:
                    package.update(ModelApprovalStatus=status, LastModifiedTime=fsutil.utc_now())
                    if description:
                        package["ApprovalDescription"] = description
                    fsutil.write_json_atomic(self.path, data)
                    return package
        raise RegistryError(f"{group!r} has no version {version}")


def registry_problem(data: Any) -> str | None:
    """What is wrong with the registry file's content (its shape, names, versions, ARNs), or None."""
    groups = data.get("ModelPackageGroups") if isinstance(data, dict) else None
    if not isinstance(groups, dict):
        return "it holds no ModelPackageGroups object"
    for name, group in groups.items():
        try:
            names.check_name("model package group", name)
        except ValueError as error:
            return str(error)
        if not isinstance(group, dict) or group.get("ModelPackageGroupName") != name:
            return f"group {name!r} is not a model package group of that name"
        packages = group.get("ModelPackages")
        if not isinstance(packages, list):
            return f"group {name!r} has no ModelPackages list"
        seen: set[int] = set()
        for index, package in enumerate(packages, start=1):
            problem = _package_problem(name, package, seen)
            if problem:
                return f"group {name!r}, package {index}: {problem}"
    return None


def _package_problem(group: str, package: Any, seen: set[int]) -> str | None:
    if not isinstance(package, dict):
        return "not an object"
    version = package.get("ModelPackageVersion")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1 or version in seen:
        return f"ModelPackageVersion {version!r} is not a new version number"
    seen.add(version)
    arn = package.get("ModelPackageArn")
    if (
        not str(arn).endswith(f":model-package/{group.lower()}/{version}")
        or package.get("ModelPackageGroupName") != group
    ):
        return f"version {version}: its ARN or group name is not this group's"
    if package.get("ModelApprovalStatus") not in APPROVAL_STATUSES:
        return f"version {version}: ModelApprovalStatus {package.get('ModelApprovalStatus')!r} is not a status"
    specification = package.get("InferenceSpecification")
    containers = specification.get("Containers") if isinstance(specification, dict) else None
    first = containers[0] if isinstance(containers, list) and containers else None
    if not isinstance(first, dict) or not str(first.get("ModelDataUrl", "")).startswith("file://"):
        return f"version {version}: no file:// ModelDataUrl in its first container"
    if not isinstance(package.get("CustomerMetadataProperties"), dict):
        return f"version {version}: CustomerMetadataProperties is not an object"
    return None


def model_data_path(package: dict[str, Any]) -> Path:
    """The local path of a package's ``ModelDataUrl`` (a file:// URI)."""
    url = package["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
    try:
        return fsutil.file_uri_path(url)
    except ValueError:
        raise RegistryError(f"model data {url} is not a local file") from None


def _files(path: Path) -> list[Path]:
    return sorted(fsutil.iter_files(path)) if path.is_dir() else [path]


def _frozen_copy(source: Path, destination: Path) -> Path:
    """A copy of a file or folder, read-only: a registered version's bytes are never the run's, never edited."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, destination)
    else:
        shutil.copyfile(source, destination)
    read_only = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
    for path in _files(destination):
        os.chmod(path, read_only)
    return destination.resolve()


def changed_files(package: Mapping[str, Any]) -> list[str]:
    """The registered files of ``package`` whose bytes no longer match the sha256 recorded at registration (a
    missing file counts); a version registered before hashes were recorded has only its model checked."""
    recorded = dict(package.get("FileSha256") or {})
    if not recorded:
        model = model_data_path(dict(package))
        recorded = {model.as_uri(): package.get("CustomerMetadataProperties", {}).get("ModelSha256")}
    changed = []
    for uri, sha256 in recorded.items():
        path = fsutil.file_uri_path(uri)
        if not path.is_file() or fsutil.file_sha256(path) != sha256:
            changed.append(str(path))
    return changed


def _replace_strings(value: Any, replacements: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return replacements.get(value, value)
    if isinstance(value, Mapping):
        return {key: _replace_strings(item, replacements) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_strings(item, replacements) for item in value]
    return value
