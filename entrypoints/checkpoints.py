"""Per-epoch training checkpoints: written atomically, keyed by what they were trained on, resumed only by a run
with the same key.

A checkpoint's name carries the first 16 hex digits of the SHA-256 of its *fingerprint*: every input that
changes the result. That is every hyperparameter (``--epochs`` too: the learning-rate schedule decays over the
run's epochs, so 8 epochs continued to 9 are not a 9-epoch training), the starting weights, the global batch,
the data (``data.channel_fingerprint`` of both channels), and the code (this folder's Python files, and the
torch and torchvision versions). So a run resumes only a checkpoint of the same training, stopped part way (a
spot interruption, a retried job); runs with anything else never resume, overwrite or prune each other's files,
even in one folder they all use (a SageMaker job's ``checkpoint_s3_uri`` brings back every file it ever held,
and the pipeline keys that prefix by the best trial, which a cached Tune reuses).

Files hold only tensors and plain values: they load with ``torch.load(weights_only=True)``. Shipped in the
training ``source_dir``: imports only torch (torchvision for its version), the standard library and its sibling
``contract.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:  # works both as ``entrypoints.checkpoints`` and beside ``python train.py`` inside the training container
    from . import contract
except ImportError:  # pragma: no cover - exercised by the script-mode tests in a subprocess
    import contract  # type: ignore[no-redef]

FORMAT = 2  # 1: unkeyed names, no data in the fingerprint (read only to explain why it is not resumed)
KEPT = 2  # newest checkpoints kept per key
_NAME = re.compile(r"^checkpoint-(?:(?P<key>[0-9a-f]{16})-)?epoch-(?P<epoch>\d+)\.pt$")
_DIGEST_KEYS = ("train-data", "valid-data", "code")  # fingerprint values shown shortened in messages


def code_digest(folder: Path | None = None) -> str:
    """SHA-256 over the names and bytes of the training code (this folder's ``.py`` files) and the versions of
    torch and torchvision: other code may train other weights from the same settings."""
    folder = folder or Path(__file__).resolve().parent
    digest = hashlib.sha256(f"torch {torch.__version__}\0".encode())
    try:
        import torchvision

        digest.update(f"torchvision {torchvision.__version__}\0".encode())
    except ImportError:  # the training script needs it; a missing one is reported where it is imported
        pass
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    return f"sha256:{contract.file_sha256(path)}"


def key_of(fingerprint: dict[str, Any]) -> str:
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_name(key: str, epoch: int) -> str:
    return f"checkpoint-{key}-epoch-{epoch:04d}.pt"


@dataclass(frozen=True)
class Entry:
    key: str | None  # None: a checkpoint of format 1, named without a key
    epoch: int
    path: Path


def entries(checkpoint_dir: Path) -> list[Entry]:
    """Every checkpoint file in the folder, newest epoch first; temporary and foreign files are ignored."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append(Entry(match.group("key"), int(match.group("epoch")), path))
    return sorted(found, key=lambda e: (e.epoch, e.path.name), reverse=True)


def save(checkpoint_dir: Path, key: str, epoch: int, state: dict[str, Any]) -> Path:
    """Write atomically (temporary file, fsync, rename); keep this key's newest ``KEPT`` up to ``epoch``.

    Files of other keys, and this key's files past ``epoch``, are left alone.
    """
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / file_name(key, epoch)
    temporary = checkpoint_dir / f".{final.name}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    own = [e for e in entries(checkpoint_dir) if e.key == key and e.epoch <= epoch]
    for old in own[KEPT:]:
        old.path.unlink(missing_ok=True)
    return final


def load(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's state; ``ValueError`` with the reason when it does not load or is not one of ours."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:  # truncated upload, foreign
        raise ValueError(f"checkpoint {path} does not load ({' '.join(str(error).split())[:200]})") from error
    if not isinstance(state, dict) or state.get("format") not in (1, FORMAT):
        raise ValueError(f"checkpoint {path} is not in this script's format")
    return state


def differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``name: old -> new`` for every fingerprint value that differs (data digests shortened)."""

    def show(name: str, value: Any) -> str:
        if value is None:
            return "(not recorded)"
        digest = isinstance(value, str) and (name in _DIGEST_KEYS or value.startswith("sha256:"))
        return repr(value[:19] if value.startswith("sha256:") else value[:12]) if digest else repr(value)

    names = list(new) + [name for name in old if name not in new]
    changed = [name for name in names if old.get(name) != new.get(name)]
    return ", ".join(f"{name}: {show(name, old.get(name))} -> {show(name, new.get(name))}" for name in changed)


@dataclass
class Choice:
    """What to resume (``state`` and ``path``, or None for a fresh start) and the lines that say why."""

    state: dict[str, Any] | None = None
    path: Path | None = None
    notes: tuple[str, ...] = ()
    reason: str | None = None  # one line when the folder held checkpoints but none of them is resumed


def same_training(fingerprint: dict[str, Any]) -> str:
    """Why a resumed checkpoint is this training's, in words (a line of the job's log)."""
    data = ", ".join(f"{name} {fingerprint[name][:12]}" for name in ("train-data", "valid-data") if name in fingerprint)
    shown = [name for name in fingerprint if name not in _DIGEST_KEYS]
    return (
        f"the same training: its fingerprint {key_of(fingerprint)} matches in every value ({', '.join(shown)}; "
        f"data {data}; code {str(fingerprint.get('code'))[:12]})"
    )


def choose(checkpoint_dir: Path, fingerprint: dict[str, Any]) -> Choice:
    """The newest loadable checkpoint of this fingerprint; else why none is resumed."""
    key = key_of(fingerprint)
    found = entries(checkpoint_dir)
    own = [e for e in found if e.key == key]
    notes = []
    for entry in own:
        try:
            state = load(entry.path)
        except ValueError as error:
            notes.append(f"{error}; trying an older one")
            continue
        if state.get("fingerprint") == fingerprint and state.get("format") == FORMAT:
            return Choice(state, entry.path, tuple(notes))
        notes.append(f"checkpoint {entry.path} has a name of these settings but other contents; trying an older one")
    others = [e for e in found if e.key != key]
    if not others:
        return Choice(notes=tuple(notes))
    newest = others[0]
    try:
        detail = differences(load(newest.path, mmap=True).get("fingerprint") or {}, fingerprint)
    except ValueError as error:
        detail = str(error)
    reason = (
        f"starting fresh: {newest.path.name} in {checkpoint_dir} is another run's checkpoint "
        f"({detail or 'an older checkpoint format'}); it is left in place"
    )
    return Choice(notes=tuple(notes), reason=reason)
