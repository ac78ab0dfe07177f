"""Step caching like SageMaker Pipelines': a step whose arguments and inputs are unchanged is reused.

SageMaker keys a cached step by its resolved arguments (which name the code object and the input URIs) and
reuses the earlier execution's result: its properties, so the steps downstream read the earlier outputs. Only
steps whose ``CacheConfig`` is enabled are cached, and an entry expires after its ``ExpireAfter``. Locally the
key is the hash of

- the step's arguments as they stand in the definition, resolved (parameters and upstream properties filled
  in), without what differs from run to run by design (the output locations);
- the content of every input the arguments name, the code object included (files by all of their bytes,
  archives too, folders by their files), so a step downstream of a re-run that produced the same output is still
  reused;
- what stands in for the container image (SageMaker's key holds it): the Python version and the versions of the
  packages the jobs import, as the runner names them (this project's: torch, torchvision, pillow, numpy), or of
  every installed distribution for a definition whose jobs' needs nobody named.

Entries live in ``<workdir>/cache/<key>.json`` and point at the outputs of the run that made them (paths
relative to the workdir: the run folder's and the object store's) and record every output file's size and
SHA-256. A hit is proven before it counts: each output must still hold exactly the files recorded, byte for
byte (a deleted image would otherwise shrink the split a cached Tune trains on); a difference re-runs the step
and says which file differs. The new run's step folder then gets hard links to the run-folder outputs, so every
run folder is complete on its own. An entry that cannot be read whole, or whose outputs lie outside the
workdir, is a miss, reported as such (the step runs and writes its entry anew). A step result marked not
cacheable (a tuning step with a trial ended by a signal) is never stored.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipelines.util import fsutil

CACHE_DIR = "cache"
# Outputs that are not verified on a hit (they must still exist): the checkpoint prefix is a sync folder that every
# later job given the same CheckpointConfig.S3Uri rewrites, as on SageMaker, and no later step reads it.
UNVERIFIED_OUTPUTS = frozenset({"s3:checkpoints"})


def runtime_versions(packages: Sequence[str] | None = None) -> dict[str, str]:
    """What stands in for the container image in the cache key (read from metadata: nothing is imported): the
    Python version and those of ``packages``, or of every installed distribution when None."""
    versions = {"python": platform.python_version()}
    if packages is None:
        installed = {dist.metadata["Name"]: dist.version for dist in importlib.metadata.distributions()}
        return {**versions, **dict(sorted((str(name).lower(), version) for name, version in installed.items()))}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


@dataclass
class CacheEntry:
    key: str
    step: str
    run_id: str
    outputs: dict[str, str]  # output name -> path relative to the workdir
    result: dict[str, Any] = field(default_factory=dict)  # what the step reported (metrics, summary)
    created: str = ""
    files: dict[str, dict[str, list[Any]]] | None = None  # output name -> fsutil.file_manifest; None: an old entry

    def output_paths(self, workdir: Path) -> dict[str, Path]:
        return {name: workdir / relative for name, relative in self.outputs.items()}


# What a step result keeps in an entry (executor.StepResult's fields a later run reuses).
RESULT_KEYS = ("properties", "metadata", "detail", "summary", "notes", "outcome")


def entry_problem(data: Any, key: str, workdir: Path) -> str | None:
    """What keeps ``data`` from being the cache entry ``key`` of ``workdir`` (None: it is one)."""
    names = {item.name for item in fields(CacheEntry)}
    if not isinstance(data, dict) or not names - {"files"} <= set(data) <= names:
        return f"it does not hold the fields of a cache entry ({', '.join(sorted(names))})"
    if data["key"] != key or not isinstance(data["result"], dict) or not set(data["result"]) <= set(RESULT_KEYS):
        return "its key or its step result is not this entry's"
    if not isinstance(data["outputs"], dict) or not all(isinstance(v, str) for v in data["outputs"].values()):
        return "its outputs are not paths"
    if not _is_file_lists(data.get("files")):
        return "its file lists are not maps of file names to [size, sha256]"
    try:
        dt.datetime.fromisoformat(data["created"])
        for relative in data["outputs"].values():
            fsutil.contained(workdir, workdir / relative)
    except (TypeError, ValueError) as error:
        return str(error)
    return None


def _is_file_lists(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, dict) and all(
        isinstance(files, dict)
        and all(
            isinstance(item, list) and len(item) == 2 and isinstance(item[0], int) and isinstance(item[1], str)
            for item in files.values()
        )
        for files in value.values()
    )


class StepCache:
    """Lookup and store of step results in a workdir; ``enabled=False`` looks nothing up but still stores.

    ``report`` gets one line for each entry found damaged (standard error by default).
    """

    def __init__(
        self,
        workdir: Path,
        enabled: bool = True,
        report: Callable[[str], None] | None = None,
        runtime_packages: Sequence[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.enabled = enabled
        self.folder = workdir / CACHE_DIR
        self.report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self.runtime = runtime_versions(runtime_packages)  # read once: the jobs of one run share this Python

    def key(self, step: str, parts: dict[str, Any]) -> str:
        return fsutil.json_hash({"step": step, "runtime": self.runtime, **parts})

    def lookup(self, key: str, expire_after: str | None = None) -> CacheEntry | None:
        if not self.enabled:
            return None
        path = self.folder / f"{key}.json"
        try:
            data = fsutil.read_state(path, lambda found: entry_problem(found, key, self.workdir), "counted as a miss")
        except fsutil.StateFileError as error:
            self.report(f"cache entry {error}: the step runs and its entry is written anew")
            return None
        if data is None:
            return None
        entry = CacheEntry(**data)
        age = dt.datetime.fromisoformat(fsutil.utc_now()) - dt.datetime.fromisoformat(entry.created)
        if expire_after and age > parse_duration(expire_after):
            return None
        if not all(path.exists() for path in entry.output_paths(self.workdir).values()):
            return None  # the run that made it was deleted: run the step again
        problem = self.output_problem(entry)
        if problem:
            self.report(f"cache: {entry.step}'s outputs from {entry.run_id} {problem}; the step runs again")
            return None
        return entry

    def output_problem(self, entry: CacheEntry) -> str | None:
        """How the entry's outputs differ from the file lists it recorded, as "changed (...)" (None: every file is
        as recorded)."""
        if entry.files is None:
            return "cannot be proven (an older version wrote the entry, with no file lists)"
        seen: dict[tuple[int, ...], str] = {}  # the run folder's outputs are hard links to the store's: read once
        for name, path in entry.output_paths(self.workdir).items():
            if name in UNVERIFIED_OUTPUTS:
                continue
            recorded = entry.files.get(name)
            if recorded is None:
                return f"cannot be proven (the entry has no file list for output {name})"
            difference = fsutil.manifest_difference(recorded, fsutil.file_manifest(path, seen))
            if difference:
                return f"changed ({entry.outputs[name]}: {difference})"
        return None

    def store(self, key: str, step: str, run_id: str, outputs: dict[str, Path], result: dict[str, Any]) -> CacheEntry:
        entry = CacheEntry(
            key=key,
            step=step,
            run_id=run_id,
            outputs={
                name: path.resolve().relative_to(self.workdir.resolve()).as_posix() for name, path in outputs.items()
            },
            result=result,
            created=fsutil.utc_now(),
            files=_manifests({name: path for name, path in outputs.items() if name not in UNVERIFIED_OUTPUTS}),
        )
        with fsutil.workdir_lock(self.workdir, f"caching {step}"):
            fsutil.write_json_atomic(fsutil.contained(self.workdir, self.folder / f"{key}.json"), entry.__dict__)
        return entry


def _manifests(outputs: dict[str, Path]) -> dict[str, dict[str, list[Any]]]:
    seen: dict[tuple[int, ...], str] = {}
    return {name: fsutil.file_manifest(path, seen) for name, path in outputs.items()}


_DURATION = re.compile(
    r"P(?:(?P<years>\d+)Y)?(?:(?P<months>\d+)M)?(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?"
)


def parse_duration(text: str) -> dt.timedelta:
    """An ISO 8601 duration (``CacheConfig.ExpireAfter``: P30D, PT12H, P1Y2M...; a year 365 days, a month 30)."""
    match = _DURATION.fullmatch(text)
    if not match or text in ("P", "PT"):
        raise ValueError(f"ExpireAfter {text!r} is not an ISO 8601 duration (for example P30D or PT12H)")
    parts = {name: int(value) for name, value in match.groupdict().items() if value}
    parts["days"] = parts.get("days", 0) + parts.pop("years", 0) * 365 + parts.pop("months", 0) * 30
    return dt.timedelta(**parts)
