"""The pipeline's code objects: the two processing scripts and the training ``sourcedir.tar.gz``, named by content.

``code_artifacts`` is pure (it reads local files); ``upload_code_artifacts`` puts the objects in S3 (``upsert``
does that before creating or updating the pipeline); the local executor serves the same bytes under the same URIs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import config
from pipelines.util import fsutil

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class CodeArtifact:
    """One code object the pipeline's jobs read from S3, addressed by the hash of its content."""

    s3_uri: str
    body: bytes


@dataclass(frozen=True)
class CodeArtifacts:
    """The jobs' code: the processing scripts, the data contract beside them, the training ``sourcedir.tar.gz``."""

    preprocess: CodeArtifact
    evaluate: CodeArtifact
    training: CodeArtifact
    contract: CodeArtifact  # entrypoints/contract.py, shipped beside the preprocessing script
    tracking: CodeArtifact | None = None  # entrypoints/tracking.py beside the evaluation script (MLflow tracking on)

    def all(self) -> list[CodeArtifact]:
        extra = [self.tracking] if self.tracking is not None else []
        return [self.preprocess, self.evaluate, self.training, self.contract, *extra]


def s3_uri(bucket: str, *parts: str) -> str:
    """``s3://bucket/part/part...``, each part stripped of its own slashes."""
    return "s3://" + "/".join([bucket, *(part.strip("/") for part in parts)])


def _source_files(directory: Path) -> list[tuple[str, bytes]]:
    """(relative POSIX path, content) of every shipped file under directory (no caches, nothing hidden), sorted."""
    paths = sorted(fsutil.iter_files(directory, skip_hidden=True), key=lambda path: path.relative_to(directory).parts)
    return [(path.relative_to(directory).as_posix(), path.read_bytes()) for path in paths]


def _content_hash(files: list[tuple[str, bytes]]) -> str:
    """SHA-256 over relative names and contents: the same on every machine and checkout folder.

    (The SDK's own code hash includes the absolute path of the checkout, which changes with every CodeBuild
    run, and the bytes of __pycache__, which change whenever tests run; either would defeat step caching.)
    It is the code objects' S3 address, so its formula stays as it is (``fsutil.content_hash``, the local cache
    key of a folder, hashes files on disk differently): changing it would move every code URI in the definition.
    """
    digest = hashlib.sha256()
    for name, body in files:
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(hashlib.sha256(body).digest())
    return digest.hexdigest()


# The training image's Python ("py312" -> "3.12") and machine: the marker on every wheelhouse requirement, so a
# container on another Python skips the wheels (and goes on untracked) instead of failing to install them.
TRAINING_IMAGE_PYTHON = f"{config.PYTHON_VERSION[2]}.{config.PYTHON_VERSION[3:]}"
TRAINING_IMAGE_MACHINE = "x86_64"
# The Tune and Train jobs' input channel holding the wheelhouse's tracking/ folder (with --serving-wheels-uri).
TRACKING_CHANNEL = "tracking"
TRACKING_WHEELS_FOLDER = "tracking"


def requirement_marker(python_version: str, machine: str) -> str:
    """The environment marker that limits a wheelhouse's requirement to the image its wheels were fetched for."""
    return f'python_version == "{python_version}" and platform_machine == "{machine}"'


def tracking_requirements_text(find_links: str | None, marker: str, requirements: tuple[str, ...] = ()) -> str:
    """The MLflow client's pinned requirements (``requirements``, default tracking.JOB_REQUIREMENTS), each with
    ``marker``: the wheelhouse's ``tracking/requirements.txt`` (``find_links`` None: the installer names the
    folder), and what a training job with a wheelhouse appends to its requirements (``find_links`` its channel: no
    package index is asked)."""
    from entrypoints import tracking

    lines = ["# MLflow tracking: the client and SageMaker's auth plugin, from a wheelhouse's tracking/ wheels"]
    if find_links is not None:
        lines += ["--no-index", f"--find-links {find_links}"]
    lines += [f"{requirement} ; {marker}" for requirement in requirements or tracking.JOB_REQUIREMENTS]
    return "\n".join(lines) + "\n"


def training_requirements(project_root: Path | None = None) -> tuple[str, ...]:
    """The requirement lines of the training source directory's requirements.txt (no comments, no options)."""
    path = (Path(project_root) if project_root else PROJECT_ROOT) / "entrypoints" / "requirements.txt"
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line and not line.startswith("-"))


def with_tracking_requirements(
    files: list[tuple[str, bytes]], wheels_dir: str | None = None
) -> list[tuple[str, bytes]]:
    """The training files with the MLflow client appended to requirements.txt (entrypoints/tracking.py's list),
    which the training toolkit pip-installs before train.py starts: from the package index, or with ``wheels_dir``
    (the tracking channel's folder) from those wheels only, with no index."""
    from entrypoints import tracking

    if wheels_dir is None:
        lines = "\n# MLflow tracking (--mlflow-tracking-arn): the client and SageMaker's auth plugin\n"
        lines += "".join(f"{requirement}\n" for requirement in tracking.JOB_REQUIREMENTS)
    else:
        marker = requirement_marker(TRAINING_IMAGE_PYTHON, TRAINING_IMAGE_MACHINE)
        lines = "\n" + tracking_requirements_text(wheels_dir, marker)
    files = dict(files)
    files["requirements.txt"] = files.get("requirements.txt", b"") + lines.encode()
    return sorted(files.items(), key=lambda item: Path(item[0]).parts)


def code_artifacts(
    bucket: str,
    pipeline_name: str,
    project_root: Path | None = None,
    tracking: bool = False,
    tracking_wheels_dir: str | None = None,
) -> CodeArtifacts:
    """The code objects, at ``s3://<bucket>/<pipeline_name>/code/<content hash>/<file>``.

    Pure: reads local files only. ``upload_code_artifacts`` puts them in S3 (``upsert`` does that). With
    ``tracking`` the training requirements also install the MLflow client, and tracking.py is an object of its
    own for the Evaluate step; without, the objects are what they were. ``tracking_wheels_dir`` (with
    ``tracking``): the training jobs install the client from the wheels in that folder, with no index.
    """
    root = Path(project_root) if project_root else PROJECT_ROOT

    def artifact(files: list[tuple[str, bytes]], file_name: str, body: bytes) -> CodeArtifact:
        return CodeArtifact(s3_uri(bucket, pipeline_name, "code", _content_hash(files), file_name), body)

    scripts = {}
    for path in (
        root / "steps" / "preprocess.py",
        root / "steps" / "evaluate.py",
        root / "entrypoints" / "contract.py",
    ):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the processing jobs run it")
        files = [(path.name, path.read_bytes())]
        scripts[path.name] = artifact(files, path.name, files[0][1])
    training_dir = root / "entrypoints"
    training_files = _source_files(training_dir)
    if "train.py" not in dict(training_files):
        raise FileNotFoundError(f"training entry point {training_dir / 'train.py'} is missing")
    tracking_artifact = None
    if tracking:
        training_files = with_tracking_requirements(training_files, tracking_wheels_dir)
        path = root / "entrypoints" / "tracking.py"
        files = [(path.name, path.read_bytes())]
        tracking_artifact = artifact(files, path.name, files[0][1])
    return CodeArtifacts(
        preprocess=scripts["preprocess.py"],
        evaluate=scripts["evaluate.py"],
        training=artifact(training_files, "sourcedir.tar.gz", fsutil.tar_gz_bytes(training_files)),
        contract=scripts["contract.py"],
        tracking=tracking_artifact,
    )


def upload_code_artifacts(boto_session: Any, artifacts: CodeArtifacts, kms_key: str | None = None) -> list[str]:
    """Put the code objects in S3 (idempotent: same content, same key). Returns their URIs."""
    s3 = boto_session.client("s3")
    extra: dict[str, str] = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key} if kms_key else {}
    uris = []
    for item in artifacts.all():
        bucket, _, key = item.s3_uri.removeprefix("s3://").partition("/")
        s3.put_object(Bucket=bucket, Key=key, Body=item.body, **extra)
        uris.append(item.s3_uri)
    return uris
