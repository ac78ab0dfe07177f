"""The local object store: ``s3://<bucket>/<key>`` is ``<workdir>/s3/<bucket>/<key>``.

The local executor reads and writes every S3 URI of the definition here: the code objects (put by the runner
the way ``upsert`` uploads them), the input data, and the steps' outputs (processing outputs, model artifacts,
checkpoints). Objects are never modified in place: a step's outputs go to URIs of its own (the execution ID or
the job name is part of them), so hard links between the store and the run folders are safe.

Prefix semantics follow ``S3DataType: S3Prefix`` for folders: a URI naming a folder stands for the objects
under it, a URI naming a file for that one object. Bucket and key parts are checked, so no URI reaches outside
the store.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.util import fsutil

STORE_DIR = "s3"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class ObjectStoreError(Exception):
    """A URI that is not an s3:// URI, names no object, or would lead outside the store."""


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key), checked (no empty, ``.`` or ``..`` parts)."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ObjectStoreError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ObjectStoreError(f"{uri}: {bucket!r} is not an S3 bucket name")
    parts = [part for part in key.split("/") if part]
    if any(part in (".", "..") or "\\" in part or "\0" in part for part in parts):
        raise ObjectStoreError(f"{uri}: the key may not hold '.', '..', backslashes or NUL")
    return bucket, "/".join(parts)


class ObjectStore:
    def __init__(self, workdir: Path) -> None:
        self.root = workdir / STORE_DIR
        self._hashes: dict[str, str] = {}

    def path(self, uri: str) -> Path:
        bucket, key = split_uri(uri)
        try:  # a link inside the store may not lead out of it
            return fsutil.contained(self.root, self.root / bucket / key if key else self.root / bucket)
        except fsutil.OutsideWorkdir as error:
            raise ObjectStoreError(f"{uri}: {error}") from error

    def exists(self, uri: str) -> bool:
        return self.path(uri).exists()

    def put_bytes(self, uri: str, body: bytes) -> Path:
        """Write one object (content-addressed objects that exist already are left as they are)."""
        path = self.path(uri)
        if path.is_file() and path.read_bytes() == body:
            return path
        return fsutil.write_atomic(path, body, make_parents=True)

    def put(self, uri: str, source: Path) -> Path:
        """Upload a file or a folder's files to ``uri`` (hard links where possible), replacing what was there."""
        return fsutil.link_tree(source, self.path(uri))

    def get(self, uri: str, destination: Path) -> Path:
        """Download ``uri`` to a container folder: a folder's files into it, one object under its own name."""
        source = self.path(uri)
        if not source.exists():
            raise ObjectStoreError(f"{uri} holds no object (looked in {source})")
        if source.is_dir():
            return fsutil.link_tree(source, destination)
        destination.mkdir(parents=True, exist_ok=True)
        return fsutil.link_tree(source, destination / source.name)

    def content_hash(self, uri: str) -> str:
        """The content hash of what ``uri`` holds (objects never change once written, so it is computed once)."""
        if uri not in self._hashes:
            path = self.path(uri)
            if not path.exists():
                raise ObjectStoreError(f"{uri} holds no object (looked in {path})")
            self._hashes[uri] = fsutil.content_hash(path)
        return self._hashes[uri]


def s3_uris(value: Any) -> list[str]:
    """Every ``s3://`` string in a request or a definition (its mappings and lists walked, a hyperparameter's JSON
    string read), in order."""
    if isinstance(value, str):
        text = value[1:-1] if value.startswith('"s3://') and value.endswith('"') else value
        return [text] if text.startswith("s3://") else []
    if isinstance(value, Mapping):
        return [uri for item in value.values() for uri in s3_uris(item)]
    if isinstance(value, list):
        return [uri for item in value for uri in s3_uris(item)]
    return []
