"""The local model registry: one JSON file in the workdir, shaped like SageMaker's model registry.

``<workdir>/model-registry.json`` holds model package groups and their versioned model packages with the
field names of ``DescribeModelPackageGroup`` / ``DescribeModelPackage`` (``ModelPackageArn``,
``ModelPackageVersion``, ``ModelApprovalStatus``, ``InferenceSpecification.Containers[].ModelDataUrl``,
``ModelMetrics.ModelStatistics``, ...). ARNs use the region ``local`` and a placeholder account of zeros.

Each version's artifacts (``model.tar.gz`` and ``evaluation.json``) are hard-linked into
``<workdir>/registry/<group>/<version>/`` so a version outlives the run folder that produced it. Registering
the same model bytes again (a fully cached re-run) returns the existing version instead of adding a copy.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from pipelines import config
from pipelines.local import fsutil

REGISTRY_FILE = "model-registry.json"
ARTIFACTS_DIR = "registry"
REGION = "local"
PLACEHOLDER_ACCOUNT = "000000000000"  # not an account: local ARNs only need the shape
APPROVAL_STATUSES = ("PendingManualApproval", "Approved", "Rejected")


class RegistryError(Exception):
    """A registry request that cannot be served (unknown group or version, bad status)."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def group_arn(group: str) -> str:
    return f"arn:aws:sagemaker:{REGION}:{PLACEHOLDER_ACCOUNT}:model-package-group/{group.lower()}"


def package_arn(group: str, version: int) -> str:
    return f"arn:aws:sagemaker:{REGION}:{PLACEHOLDER_ACCOUNT}:model-package/{group.lower()}/{version}"


class LocalModelRegistry:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.path = workdir / REGISTRY_FILE

    # --- reading ----------------------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        return fsutil.read_json(self.path, default=None) or {"ModelPackageGroups": {}}

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

    # --- writing ----------------------------------------------------------------------------------------------
    def register(
        self,
        group: str,
        model_tarball: Path,
        evaluation_file: Path,
        *,
        approval_status: str = config.APPROVAL_STATUS,
        description: str = "",
        metadata: dict[str, str] | None = None,
        environment: dict[str, str] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Add a version (or return the existing one holding the same model bytes). Returns (package, created)."""
        if approval_status not in APPROVAL_STATUSES:
            raise RegistryError(f"approval status {approval_status!r} is not one of {', '.join(APPROVAL_STATUSES)}")
        model_sha256 = fsutil.file_sha256(model_tarball)
        with fsutil.locked(self.path):
            data = self._load()
            groups = data["ModelPackageGroups"]
            if group not in groups:
                groups[group] = {
                    "ModelPackageGroupName": group,
                    "ModelPackageGroupArn": group_arn(group),
                    "ModelPackageGroupDescription": "Image classifiers registered by the local pipeline",
                    "CreationTime": _now(),
                    "ModelPackageGroupStatus": "Completed",
                    "ModelPackages": [],
                }
            packages = groups[group]["ModelPackages"]
            for package in packages:
                if package["CustomerMetadataProperties"].get("ModelSha256") == model_sha256:
                    return package, False
            version = max((p["ModelPackageVersion"] for p in packages), default=0) + 1
            folder = self.workdir / ARTIFACTS_DIR / group / str(version)
            stored_model = fsutil.link_tree(model_tarball, folder / "model.tar.gz")
            stored_evaluation = fsutil.link_tree(evaluation_file, folder / config.EVALUATION_FILE)
            now = _now()
            package = {
                "ModelPackageGroupName": group,
                "ModelPackageVersion": version,
                "ModelPackageArn": package_arn(group, version),
                "ModelPackageDescription": description,
                "CreationTime": now,
                "LastModifiedTime": now,
                "ModelPackageStatus": "Completed",
                "ModelApprovalStatus": approval_status,
                "InferenceSpecification": {
                    "Containers": [
                        {
                            "Image": "local:pytorch-inference",
                            "ModelDataUrl": stored_model.resolve().as_uri(),
                            "Environment": environment or {},
                            "Framework": "PYTORCH",
                            "FrameworkVersion": config.INFERENCE_FRAMEWORK_VERSION,
                        }
                    ],
                    "SupportedContentTypes": list(config.REQUEST_CONTENT_TYPES),
                    "SupportedResponseMIMETypes": list(config.RESPONSE_CONTENT_TYPES),
                    "SupportedRealtimeInferenceInstanceTypes": list(config.INFERENCE_INSTANCE_TYPES),
                    "SupportedTransformInstanceTypes": list(config.TRANSFORM_INSTANCE_TYPES),
                },
                "ModelMetrics": {
                    "ModelStatistics": {
                        "ContentType": "application/json",
                        "S3Uri": stored_evaluation.resolve().as_uri(),
                    }
                },
                "Domain": "COMPUTER_VISION",
                "Task": "IMAGE_CLASSIFICATION",
                "CustomerMetadataProperties": {**(metadata or {}), "ModelSha256": model_sha256},
            }
            packages.append(package)
            fsutil.write_json_atomic(self.path, data)
        return package, True

    def update_approval(self, group: str, version: int, status: str, description: str = "") -> dict[str, Any]:
        """``UpdateModelPackage(ModelApprovalStatus=...)``."""
        if status not in APPROVAL_STATUSES:
            raise RegistryError(f"approval status {status!r} is not one of {', '.join(APPROVAL_STATUSES)}")
        with fsutil.locked(self.path):
            data = self._load()
            group_data = data["ModelPackageGroups"].get(group)
            if not group_data:
                raise RegistryError(f"model package group {group!r} does not exist in {self.path}")
            for package in group_data["ModelPackages"]:
                if package["ModelPackageVersion"] == version:
                    package["ModelApprovalStatus"] = status
                    package["LastModifiedTime"] = _now()
                    if description:
                        package["ApprovalDescription"] = description
                    fsutil.write_json_atomic(self.path, data)
                    return package
        raise RegistryError(f"{group!r} has no version {version}")


def model_data_path(package: dict[str, Any]) -> Path:
    """The local path of a package's ``ModelDataUrl`` (a file:// URI)."""
    from urllib.parse import unquote, urlparse

    url = package["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
    parsed = urlparse(url)
    if parsed.scheme != "file":
        raise RegistryError(f"model data {url} is not a local file")
    return Path(unquote(parsed.path))


def accuracy_of(package: dict[str, Any]) -> str:
    return package.get("CustomerMetadataProperties", {}).get("accuracy", "?")
