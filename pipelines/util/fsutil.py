"""Files: content hashes for step caching, cheap copies of step outputs, deterministic tarballs, atomic JSON, and
the workdir's guards: paths proven inside it, state files read whole or reported damaged, and its lock."""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
# Folders and files that are never part of shipped code or of a step's content.
IGNORED_NAMES = frozenset({"__pycache__", ".DS_Store", ".ipynb_checkpoints", ".pytest_cache"})


# A SageMaker resource name (model package group, step, job): safe as one folder name.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,255}")


def is_safe_name(name: str) -> bool:
    """Letters, digits, hyphens and underscores, starting with a letter or digit: never a path of its own."""
    return isinstance(name, str) and bool(_SAFE_NAME.fullmatch(name))


def is_ignored_name(name: str) -> bool:
    """A cache folder or file, or a compiled module: never shipped in code and never part of a content hash."""
    return name in IGNORED_NAMES or Path(name).suffix in (".pyc", ".pyo")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def iter_files(root: Path, skip_hidden: bool = False) -> Iterator[Path]:
    """Every file under ``root`` in a stable order (sorted relative paths), skipping caches.

    ``skip_hidden`` also skips every file and folder whose name starts with a dot (code that is shipped).
    """
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_NAMES and not (skip_hidden and d.startswith(".")))
        for name in sorted(filenames):
            if not is_ignored_name(name) and not (skip_hidden and name.startswith(".")):
                yield Path(dirpath) / name


def content_hash(path: str | Path) -> str:
    """A hash of what ``path`` holds: a folder's relative paths and file bytes, a file's bytes (archives included).

    An archive is keyed by all of its bytes, read in one streaming pass: a key made of its member names, sizes
    and CRC-32s alone is shared by archives whose images differ (a CRC-32 is forged with 4 bytes).
    """
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256(b"folder-v1\0")
        for file in iter_files(path):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
        return digest.hexdigest()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return file_sha256(path)


def file_manifest(path: Path, seen: dict[tuple[int, ...], str] | None = None) -> dict[str, list[Any]]:
    """``{relative path: [size, sha256]}`` of every file ``path`` holds (a file alone: under the name ".").

    Files ``iter_files`` skips (caches) are left out, as ``link_tree`` leaves them out of a copy. ``seen`` maps
    an inode (device, number, size, change time) to its hash, so a file hard-linked into several outputs (a run
    folder's and the object store's copy) is read once.
    """
    if path.is_dir():
        files = {file.relative_to(path).as_posix(): file for file in iter_files(path)}
    elif path.is_file():
        files = {".": path}
    else:
        return {}
    seen = {} if seen is None else seen
    manifest = {}
    for name, file in files.items():
        status = file.stat()
        inode = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
        if inode not in seen:
            seen[inode] = file_sha256(file)
        manifest[name] = [status.st_size, seen[inode]]
    return manifest


def manifest_difference(recorded: dict[str, list[Any]], found: dict[str, list[Any]]) -> str | None:
    """The first difference between two ``file_manifest`` results, in words (None: they are equal)."""
    for name in sorted(set(recorded) | set(found)):
        if name not in found:
            return f"{name} is missing"
        if name not in recorded:
            return f"{name} was added"
        if found[name][0] != recorded[name][0]:
            return f"{name} is {found[name][0]} bytes, {recorded[name][0]} were recorded"
        if found[name][1] != recorded[name][1]:
            return f"{name} has other bytes than were recorded (same size)"
    return None


def json_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _link_or_copy(source: str, destination: str) -> None:
    """Hard link where the file system allows it (step outputs are never modified in place), else copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def link_tree(source: Path, destination: Path) -> Path:
    """A copy of ``source`` (file or folder) at ``destination`` made of hard links where possible."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists() or destination.is_symlink():
        remove_path(destination)
    if source.is_dir():
        shutil.copytree(source, destination, copy_function=_link_or_copy, ignore=_ignore_caches)
    else:
        _link_or_copy(str(source), str(destination))
    return destination


def _ignore_caches(_directory: str, names: list[str]) -> set[str]:
    return {name for name in names if is_ignored_name(name)}


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def normalise_tar_entry(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """No time, owner or mode of the machine that packed it: the same contents give the same archive bytes."""
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def tar_gz_bytes(files: list[tuple[str, bytes]]) -> bytes:
    """A .tar.gz of (relative POSIX name, content) pairs, in the order given, byte-identical for the same files.

    Compressed in one piece by ``gzip.compress``, whose header names the OS as Unix (GzipFile's says unknown): the
    code archive's bytes are what SageMaker downloads, so they stay as they have always been.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, body in files:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(normalise_tar_entry(info), io.BytesIO(body))
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def make_tarball(source_dir: Path, tarball: Path) -> Path:
    """``tar czf`` of a folder's contents, byte-identical for identical contents (as SageMaker packs model.tar.gz).

    Entries are sorted, owners, times and modes are normalised and the gzip header carries no time or name,
    so the archive's hash (and so the cache key of the steps that read it) depends on the contents only.
    """
    with (
        atomic_output(tarball, make_parents=True) as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        entries: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(source_dir):
            dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_NAMES)
            entries.extend(Path(dirpath) / d for d in dirnames)
            entries.extend(Path(dirpath) / f for f in sorted(filenames) if not is_ignored_name(f))
        for path in sorted(entries, key=lambda p: p.relative_to(source_dir).as_posix()):
            info = normalise_tar_entry(archive.gettarinfo(str(path), arcname=path.relative_to(source_dir).as_posix()))
            if info.isfile():
                with path.open("rb") as handle:
                    archive.addfile(info, handle)
            else:
                archive.addfile(info)
    return tarball


def safe_extract_tarball(tarball: Path, destination: Path) -> Path:
    """Extract a model.tar.gz refusing entries that would land outside ``destination`` (links, ``..``, absolute)."""
    destination.mkdir(parents=True, exist_ok=True)
    root = destination.resolve()
    with tarfile.open(tarball, "r:*") as archive:
        members = archive.getmembers()
        for member in members:
            target = (root / member.name).resolve()
            if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
                raise ValueError(f"{tarball}: entry {member.name!r} is a link or points outside the archive's folder")
        archive.extractall(destination, members=members, filter="data")
    return destination


class OutputPathError(ValueError):
    """An output path that cannot take a file (a folder, or a folder that is missing or is a file): nothing written."""


def check_output_path(path: Path) -> Path:
    """``path`` once it can take a file: not a folder, in a folder that exists. OutputPathError (one line) else."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a folder: name a file to write, e.g. {path / 'out.json'}")
    parent = path.parent
    if not parent.is_dir():
        what = "is a file, not a folder" if parent.exists() else "does not exist"
        raise OutputPathError(
            f"cannot write {path}: its folder {parent} {what}; create the folder or name another path"
        )
    return path


@contextlib.contextmanager
def atomic_output(path: Path, make_parents: bool = False, replace: bool = True) -> Iterator[Any]:
    """A binary stream whose bytes appear at ``path`` whole, or not at all: the one way this project writes a file.

    The bytes go to a temporary file of a fresh random name in the same folder, created with O_EXCL and
    O_NOFOLLOW (never through a link someone planted there), as any file the user writes (mode 0666 less the
    umask); a rename then puts it in place, replacing ``path`` itself even if ``path`` is a link. An error,
    interruption or full disk removes the temporary and leaves ``path`` as it was. ``make_parents`` creates
    missing folders (the workdir's own state); without it a missing folder is refused (OutputPathError).
    ``replace=False`` puts the file in place only where nothing is (a hard link, not a rename): whatever
    appeared at ``path`` meanwhile, a link included, is kept and FileExistsError raised.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    check_output_path(path)
    temporary = path.with_name(f".{path.name[:200]}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(temporary, flags, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            yield stream
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
            temporary.unlink()
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str, make_parents: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`atomic_output`; returns ``path``."""
    with atomic_output(path, make_parents=make_parents) as stream:
        stream.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_output(path: Path, data: bytes | str) -> Path:
    """A command's output file, written by :func:`write_atomic`; any failure (a folder, a missing folder, a full
    disk, no permission) is an OutputPathError of one line, and ``path`` is left as it was."""
    try:
        return write_atomic(path, data)
    except OSError as error:
        raise OutputPathError(f"cannot write {path}: {error.strerror or error}; it was left as it was") from error


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON so a reader never sees half a file (:func:`atomic_output`, creating missing folders)."""
    text = json.dumps(value, indent=2, sort_keys=False, default=str) + "\n"
    write_atomic(path, text, make_parents=True)


def utc_now() -> str:
    """The time a record written now carries: UTC, ISO 8601, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path, default: Any = None) -> Any:
    if not path.is_file():
        return default
    return json.loads(path.read_text())


# --- the workdir's guards ---------------------------------------------------------------------------------------


class OutsideWorkdir(ValueError):
    """A path that, with its links resolved, leads outside the folder it must stay in: nothing was written there."""


def contained(root: Path, path: Path) -> Path:
    """``path`` itself, once proven to lie inside ``root`` with every symbolic link on the way resolved."""
    resolved, base = path.resolve(), root.resolve()
    if not resolved.is_relative_to(base):
        raise OutsideWorkdir(
            f"{path} leads to {resolved}, outside {base}: refusing to write or delete there (a name that is a "
            "path, or a link inside the folder pointing out of it)"
        )
    return path


class StateFileError(Exception):
    """A state file of the workdir that cannot be read as what it must be. Nothing was written to it."""


def read_state(path: Path, check: Callable[[Any], str | None] | None = None, remedy: str = "") -> Any:
    """A JSON state file read whole and checked (``check`` returns what is wrong, or None); None if it is absent.

    Raises :class:`StateFileError` naming the file, what is wrong and ``remedy`` (what the user can do).
    """
    if not path.exists() and not path.is_symlink():
        return None
    try:
        if not path.is_file():
            raise ValueError("it is not a regular file")
        data = json.loads(path.read_bytes().decode("utf-8"))
        problem = check(data) if check is not None else None
    except json.JSONDecodeError as error:
        problem = f"it is not complete JSON ({error.msg} at line {error.lineno} column {error.colno})"
    except UnicodeDecodeError:
        problem = "it is not UTF-8 text"
    except OSError as error:
        problem = f"it cannot be read ({error.strerror})"
    except ValueError as error:
        problem = str(error)
    if problem:
        raise StateFileError(f"{path} is damaged: {problem}; {remedy or 'move it aside'}")
    return data


def set_aside(path: Path) -> Path:
    """Rename a damaged state file to ``<name>.damaged-<time>`` beside it (kept to inspect); returns the new path."""
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}")
    path.rename(target)
    return target


LOCK_FILE = ".lock"
_held: dict[Path, list[Any]] = {}  # workdir -> [depth, open lock file, threading.RLock]
_held_guard = threading.Lock()


class WorkdirBusy(Exception):
    """Another command kept the workdir's lock longer than a command waits."""


# A command that finds the workdir's lock held waits this long, saying who holds it: longer than a Ray endpoint's start.
LOCK_WAIT_SECONDS = 900.0


@contextlib.contextmanager
def workdir_lock(workdir: Path, purpose: str, wait_seconds: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """The workdir's exclusive lock, for a change of its shared state (registry, endpoint records, cache).

    Held by one command at a time (``flock`` on ``<workdir>/.lock``, released by the kernel if the process dies),
    and re-entrant within a process: a deploy that registers holds it once. A command that finds it held says
    who holds it (pid and purpose, written in the file) and waits up to ``wait_seconds``.
    """
    import fcntl

    key = workdir.resolve()
    with _held_guard:
        slot = _held.setdefault(key, [0, None, threading.RLock()])
    with slot[2]:  # one thread of this process at a time
        if slot[0] == 0:
            key.mkdir(parents=True, exist_ok=True)
            handle = open(key / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - kept open while held
            try:
                _acquire(handle, key, purpose, wait_seconds, fcntl)
            except BaseException:
                handle.close()
                raise
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} ({purpose})\n")
            handle.flush()
            slot[1] = handle
        slot[0] += 1
        try:
            yield
        finally:
            slot[0] -= 1
            if slot[0] == 0:
                handle, slot[1] = slot[1], None
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()


def _acquire(handle: Any, workdir: Path, purpose: str, wait_seconds: float, fcntl: Any) -> None:
    deadline = time.monotonic() + wait_seconds
    said = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = (workdir / LOCK_FILE).read_text(errors="replace").strip() or "another command"
        if time.monotonic() > deadline:
            raise WorkdirBusy(
                f"{workdir} is locked by {holder} for more than {wait_seconds:.0f} s, so {purpose} did not "
                "start: try again once that command has finished"
            )
        if not said:
            print(f"waiting for {holder} to finish with {workdir} before {purpose}", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.1)


def tail_lines(path: Path, count: int = 20) -> list[str]:
    """The last ``count`` lines of a text file (a log), read from the end."""
    if not path.is_file():
        return []
    with path.open("rb") as handle:
        handle.seek(0, io.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    return text.splitlines()[-count:]


def file_uri_path(url: str) -> Path:
    """The local path of a ``file://`` URI (what the local registry's ``ModelDataUrl`` holds); ValueError otherwise."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(url)
    if parsed.scheme != "file":
        raise ValueError(f"{url} is not a local file")
    return Path(unquote(parsed.path))
