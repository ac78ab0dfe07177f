#!/usr/bin/env python3
"""The pipeline's processing step: an image archive in, validated ``train/valid/test`` ImageFolders out.

Runs as the SageMaker ProcessingStep (input under ``/opt/ml/processing/input/data``, outputs under
``/opt/ml/processing/output/{train,valid,test}``) and as a plain command::

    python steps/preprocess.py --input dogImages.zip --output-dir data/

The layout is detected, not configured:

* the dog-breed layout ``dogImages/{train,valid,test}/<NNN.Class_Name>/<image>`` (its split is kept; a missing
  ``valid/`` or ``test/`` is carved out of ``train/``, stratified),
* the CIFAR-10 python tarball (``data_batch_1..5``, ``test_batch``, ``batches.meta``; ``valid`` is a stratified
  share of the training batches),
* any ImageFolder ``<class>/<image>`` (a stratified train/valid/test split by ``--valid-fraction``,
  ``--test-fraction`` and ``--seed``),

as a zip, a tar (gz/bz2/xz) or an already-extracted folder. Every image is decoded in parallel (JPEGs at reduced
size through ``Image.draft``), made upright (EXIF), converted to RGB and shrunk so its short side is at most
``--image-size``, then written as JPEG. Bad files are skipped and listed with the reason in ``manifest.json``;
identical files never sit in two splits. Archives that would write outside their folder, fewer than two classes,
a class with no usable image and unknown layouts are refused with a one-line error and exit status 2.

In a processing container it imports the standard library, numpy and PIL, and ``contract.py`` (the data
contract's names), which the Preprocess step ships as its ``contract`` input beside the code input.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import io
import json
import lzma
import multiprocessing
import os
import pickle
import random
import re
import shutil
import signal
import stat
import struct
import sys
import tarfile
import tempfile
import time
import unicodedata
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The data contract (entrypoints/contract.py), never copied here. Imported as ``steps.preprocess``: the package's.
# Run as a script: in a processing container, the Preprocess step's "contract" input, a folder beside the code
# input (/opt/ml/processing/input/{code,contract}); in a checkout (``python steps/preprocess.py``), entrypoints/.
if __package__:
    from entrypoints import contract
else:
    _ROOT = Path(os.path.abspath(__file__)).parent.parent  # abspath: a linked script still finds its neighbours
    for _folder in (_ROOT / "contract", _ROOT / "entrypoints"):
        if (_folder / "contract.py").is_file():
            sys.path.insert(0, str(_folder))
            break
    import contract  # type: ignore[no-redef]

LABELS_FILE = contract.LABELS_FILE
MANIFEST_FILE = contract.MANIFEST_FILE
SPLITS = contract.SPLITS

DEFAULT_INPUT = "/opt/ml/processing/input/data"
DEFAULT_OUTPUT_DIR = "/opt/ml/processing/output"
DEFAULT_IMAGE_SIZE = contract.DEFAULT_RESIZE_SIZE  # the short side training resizes to before its crop
DEFAULT_VALID_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1
DEFAULT_SEED = 42
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb warning threshold (about 0.25 GiB of RGB)
DEFAULT_JPEG_QUALITY = 95
MAX_FILE_BYTES = 1 << 30  # no image worth training on is larger; bounds what one archive entry may take in memory
MANIFEST_VERSION = 1

LAYOUT_DOG_BREED = "dog_breed"
LAYOUT_CIFAR10 = "cifar10"
LAYOUT_IMAGEFOLDER = "imagefolder"

ARCHIVE_SUFFIXES = {
    ".zip": "zip",
    ".tar": "tar",
    ".tar.gz": "tar",
    ".tgz": "tar",
    ".tar.bz2": "tar",
    ".tbz2": "tar",
    ".tar.xz": "tar",
    ".txz": "tar",
}
# Folder names the dog-breed layout accepts for each split.
SPLIT_FOLDER_NAMES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}
SYSTEM_FILE_NAMES = {"Thumbs.db", "desktop.ini", "__MACOSX"}
CIFAR_META = "batches.meta"
CIFAR_TEST = "test_batch"
CIFAR_TRAIN_PATTERN = re.compile(r"data_batch_(\d+)")
CIFAR_SIDE = 32

# What PIL and its plugins raise on a malformed file: such a file is skipped with the error as its reason.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, zlib.error)
# Bilinear with PIL's antialiasing, as torchvision's Resize does; images many times larger than the target are
# first box-reduced by an integer factor (``reducing_gap``), which costs little quality and much time otherwise.
RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 3.0
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class PreprocessError(Exception):
    """Input that cannot become a dataset: reported as one line on stderr, exit status 2."""


class _SkipFile(Exception):
    """One file that is skipped; the message is the reason written to the manifest."""


# --------------------------------------------------------------------------------------------------------------
# Input: an archive or a folder, read into a list of files by their path relative to the input's top
# --------------------------------------------------------------------------------------------------------------

# A file's source, in a form that pickles cheaply to worker processes:
#   ("file", absolute path) | ("zip", member name in the input zip) | ("array", CHW uint8 bytes, height, width)
Source = tuple


@dataclass
class _InputTree:
    """Every file of the input by its POSIX path relative to the input's top, plus explicit folders."""

    files: dict[str, Source] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    zip_path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _archive_kind_by_name(name: str) -> str | None:
    return next((kind for suffix, kind in ARCHIVE_SUFFIXES.items() if name.lower().endswith(suffix)), None)


def _archive_kind(path: Path) -> str | None:
    kind = _archive_kind_by_name(path.name)
    if kind:
        return kind
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    return None


def resolve_input(path: Path) -> tuple[str, Path]:
    """The input's kind (``zip``, ``tar`` or ``folder``) and path; a folder holding exactly one archive is that
    archive (how a SageMaker ProcessingInput delivers a single S3 object)."""
    if not path.exists():
        raise PreprocessError(f"input {path} does not exist: pass --input <archive.zip|.tar|.tar.gz or folder>")
    if path.is_file():
        kind = _archive_kind(path)
        if kind is None:
            raise PreprocessError(f"input {path} is not a zip or tar archive: pass an archive or a folder of images")
        return kind, path
    entries = [entry for entry in sorted(path.iterdir()) if not entry.name.startswith(".")]
    archives = [entry for entry in entries if entry.is_file() and _archive_kind_by_name(entry.name)]
    if len(entries) == 1 and len(archives) == 1:
        return _archive_kind_by_name(archives[0].name) or "zip", archives[0]
    if len(archives) > 1 and len(archives) == len(entries):
        names = ", ".join(entry.name for entry in archives)
        raise PreprocessError(f"input folder {path} holds {len(archives)} archives ({names}): pass one with --input")
    return "folder", path


def _safe_relpath(name: str) -> str:
    """An archive entry's name as a relative POSIX path; refuses names that would land outside the target."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise PreprocessError(
            f"archive entry {name!r} has an absolute path: refusing an archive that writes outside its folder"
        )
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise PreprocessError(
            f"archive entry {name!r} climbs out of the archive with '..': refusing an archive that writes "
            "outside its folder"
        )
    if any("\x00" in part for part in parts):
        raise PreprocessError(f"archive entry {name!r} has a NUL character in its name: refusing the archive")
    return "/".join(parts)


def _read_zip(path: Path) -> _InputTree:
    tree = _InputTree(zip_path=str(path))
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise PreprocessError(f"input {path.name} is not a readable zip archive ({error}): check the upload") from None
    with archive:
        infos = archive.infolist()
    # Check every entry before anything is read, so a hostile archive is refused as a whole.
    for info in infos:
        relpath = _safe_relpath(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise PreprocessError(
                f"archive entry {info.filename!r} is a symbolic link: links are refused because they can point "
                "outside the target folder"
            )
        if not relpath:
            continue
        if info.is_dir():
            tree.dirs.add(relpath)
        elif info.flag_bits & 0x1:
            tree.skipped.append((relpath, "encrypted archive entry (cannot be read without a password)"))
        elif info.file_size > MAX_FILE_BYTES:
            tree.skipped.append((relpath, f"file of {info.file_size} bytes is larger than {MAX_FILE_BYTES} bytes"))
        else:
            if relpath in tree.files:
                tree.skipped.append((relpath, "duplicate archive entry (the later one is used)"))
            tree.files[relpath] = ("zip", info.filename)
    tree.info = {"name": path.name, "format": "zip", "bytes": path.stat().st_size}
    return tree


def _read_tar(path: Path, extract_dir: Path) -> _InputTree:
    """Extracts regular files by copying their bytes (never ``extractall``): links, devices and names outside
    the target are refused before anything of theirs is written."""
    tree = _InputTree()
    extract_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                relpath = _safe_relpath(member.name)
                if member.issym() or member.islnk():
                    kind = "symbolic" if member.issym() else "hard"
                    raise PreprocessError(
                        f"archive entry {member.name!r} is a {kind} link: links are refused because they can "
                        "point outside the target folder"
                    )
                if not (member.isreg() or member.isdir()):
                    raise PreprocessError(
                        f"archive entry {member.name!r} is a device or pipe, not a file: refusing the archive"
                    )
                if not relpath:
                    continue
                if member.isdir():
                    tree.dirs.add(relpath)
                    continue
                if member.size > MAX_FILE_BYTES:
                    tree.skipped.append((relpath, f"file of {member.size} bytes is larger than {MAX_FILE_BYTES} bytes"))
                    continue
                target = extract_dir / relpath
                if not target.resolve().is_relative_to(extract_dir.resolve()):  # defence in depth
                    raise PreprocessError(f"archive entry {member.name!r} would be written outside the target folder")
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = archive.extractfile(member)
                    if source is None:
                        raise PreprocessError(f"archive entry {member.name!r} cannot be read")
                    with source, target.open("wb") as sink:
                        shutil.copyfileobj(source, sink, 1 << 20)
                except (NotADirectoryError, IsADirectoryError, FileExistsError):
                    raise PreprocessError(
                        f"archive entry {member.name!r} is both a file and a folder in this archive: refusing it"
                    ) from None
                if relpath in tree.files:
                    tree.skipped.append((relpath, "duplicate archive entry (the later one is used)"))
                tree.files[relpath] = ("file", str(target))
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise  # a file-system error (disk full, permissions), not a bad archive
        raise PreprocessError(
            f"input {path.name} is not a readable tar archive or is truncated ({type(error).__name__}: {error}): "
            "check the upload"
        ) from None
    tree.info = {"name": path.name, "format": "tar", "bytes": path.stat().st_size}
    return tree


def _read_folder(path: Path) -> _InputTree:
    tree = _InputTree()
    total_bytes = 0
    for folder, dirnames, filenames in os.walk(path, followlinks=False):
        folder_path = Path(folder)
        dirnames.sort()
        for dirname in list(dirnames):
            relpath = (folder_path / dirname).relative_to(path).as_posix()
            if (folder_path / dirname).is_symlink():
                tree.skipped.append((relpath, "symbolic link to a folder (not followed)"))
                dirnames.remove(dirname)
            else:
                tree.dirs.add(relpath)
        for filename in sorted(filenames):
            file_path = folder_path / filename
            relpath = file_path.relative_to(path).as_posix()
            if file_path.is_symlink():
                tree.skipped.append((relpath, "symbolic link (not followed)"))
                continue
            size = file_path.stat().st_size
            if size > MAX_FILE_BYTES:
                tree.skipped.append((relpath, f"file of {size} bytes is larger than {MAX_FILE_BYTES} bytes"))
                continue
            total_bytes += size
            tree.files[relpath] = ("file", str(file_path))
    tree.info = {"name": path.name, "format": "folder", "files": len(tree.files), "bytes": total_bytes}
    return tree


def _read_source(source: Source, archive: zipfile.ZipFile | None) -> bytes:
    if source[0] == "file":
        return Path(source[1]).read_bytes()
    if source[0] == "zip":
        if archive is None:
            raise RuntimeError("a zip member was given without its archive")
        try:
            return archive.read(source[1])
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError) as error:
            raise _SkipFile(f"cannot read the archive entry ({type(error).__name__}: {error})") from None
    raise ValueError(f"unknown source kind {source[0]!r}")


# --------------------------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Item:
    """One image to be processed."""

    relpath: str  # where it came from, relative to the input's top (written to the manifest)
    class_name: str
    name: str  # its path inside the class folder, flattened; the output file is named after its stem
    source: Source
    split: str | None = None  # the split the input gave it (dog-breed layout, CIFAR test batch)


@dataclass
class _Layout:
    name: str
    root: str
    classes: list[str]
    items: list[_Item]
    skipped: list[tuple[str, str]]
    missing_splits: dict[str, float]  # split -> fraction carved out of the pool below
    split_note: dict[str, str]


def _is_system_path(relpath: str) -> bool:
    return any(part.startswith(".") or part in SYSTEM_FILE_NAMES for part in relpath.split("/"))


def _children(paths: Sequence[str], dirs: set[str], prefix: str) -> tuple[set[str], set[str]]:
    """Names of the folders and files directly inside ``prefix`` ("" = the top)."""
    start = len(prefix) + 1 if prefix else 0
    child_dirs: set[str] = set()
    child_files: set[str] = set()
    for relpath in paths:
        if prefix and not relpath.startswith(prefix + "/"):
            continue
        rest = relpath[start:]
        head, sep, _ = rest.partition("/")
        (child_dirs if sep else child_files).add(head)
    for relpath in dirs:
        if prefix and not relpath.startswith(prefix + "/"):
            continue
        child_dirs.add(relpath[start:].partition("/")[0])
    return child_dirs, child_files


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _flat_name(parts: Sequence[str]) -> str:
    return "__".join(parts)


def detect_layout(tree: _InputTree, valid_fraction: float, test_fraction: float) -> _Layout:
    skipped = list(tree.skipped)
    paths = []
    for relpath in sorted(tree.files):
        if _is_system_path(relpath):
            skipped.append((relpath, "hidden or system file (not part of the dataset)"))
        else:
            paths.append(relpath)
    dirs = {relpath for relpath in tree.dirs if not _is_system_path(relpath)}
    if not paths:
        raise PreprocessError(
            f"input {tree.info.get('name')} holds no files: expected dogImages/{{train,valid,test}}/<class>/<image>, "
            "the CIFAR-10 python batches, or <class>/<image>"
        )
    # Wrapper folders (``dogImages/``, ``cifar-10-batches-py/``) lead to the dataset's root.
    root = ""
    while True:
        child_dirs, child_files = _children(paths, dirs, root)
        if len(child_dirs) == 1 and not child_files:
            root = _join(root, next(iter(child_dirs)))
            continue
        break
    where = f"{root}/" if root else "the top of the input"
    if (
        CIFAR_META in child_files
        and CIFAR_TEST in child_files
        and any(CIFAR_TRAIN_PATTERN.fullmatch(name) for name in child_files)
    ):
        return _cifar_layout(tree, paths, root, skipped)
    if "train" in child_dirs:
        return _dog_breed_layout(tree, paths, dirs, root, child_dirs, skipped, valid_fraction, test_fraction)
    if child_dirs:
        return _imagefolder_layout(tree, paths, dirs, root, child_dirs, skipped)
    raise PreprocessError(
        f"unknown layout: {where} holds {len(child_files)} files and no class folders; expected "
        "dogImages/{train,valid,test}/<class>/<image>, the CIFAR-10 python batches, or <class>/<image>"
    )


def _dog_breed_layout(
    tree: _InputTree,
    paths: list[str],
    dirs: set[str],
    root: str,
    child_dirs: set[str],
    skipped: list[tuple[str, str]],
    valid_fraction: float,
    test_fraction: float,
) -> _Layout:
    split_of_folder: dict[str, str] = {}
    for folder in sorted(child_dirs):
        split = SPLIT_FOLDER_NAMES.get(folder)
        if split is None:
            raise PreprocessError(
                f"unexpected folder {_join(root, folder)!r} next to train/: the split layout takes only train/, "
                "valid/ (or val/) and test/"
            )
        if split in split_of_folder.values():
            raise PreprocessError(f"two folders for the {split} split in {root or 'the input'}: keep one")
        split_of_folder[folder] = split
    classes: set[str] = set()
    for folder in split_of_folder:
        class_dirs, _ = _children(paths, dirs, _join(root, folder))
        classes.update(class_dirs)
    items = _class_items(tree, paths, root, skipped, split_of_folder)
    present = set(split_of_folder.values())
    missing = {}
    if "valid" not in present:
        missing["valid"] = valid_fraction
    if "test" not in present:
        missing["test"] = test_fraction
    note = {split: "kept from the input" for split in present}
    for split, fraction in missing.items():
        note[split] = f"stratified share {fraction:g} of the input's train/"
    if missing:
        note["train"] = "the input's train/ less the shares carved out for " + " and ".join(missing)
    return _Layout(LAYOUT_DOG_BREED, root, sorted(classes), items, skipped, missing, note)


def _imagefolder_layout(
    tree: _InputTree,
    paths: list[str],
    dirs: set[str],
    root: str,
    child_dirs: set[str],
    skipped: list[tuple[str, str]],
) -> _Layout:
    items = _class_items(tree, paths, root, skipped)
    note = {"train": "stratified split of the class folders", "valid": "stratified share", "test": "stratified share"}
    return _Layout(LAYOUT_IMAGEFOLDER, root, sorted(child_dirs), items, skipped, {}, note)


def _class_items(
    tree: _InputTree, paths: list[str], root: str, skipped: list[tuple[str, str]], splits: dict[str, str] | None = None
) -> list[_Item]:
    """An item per file in a class folder below ``root`` (below its split folder where ``splits`` maps them)."""
    depth = 0 if splits is None else 1
    expected = "<split>/<class>/<image>" if depth else "<class>/<image>"
    start = len(root) + 1 if root else 0
    items: list[_Item] = []
    for relpath in paths:
        parts = relpath[start:].split("/")
        if len(parts) < depth + 2:
            skipped.append((relpath, f"not inside a class folder (expected {expected})"))
            continue
        split = splits[parts[0]] if splits is not None else None
        items.append(_Item(relpath, parts[depth], _flat_name(parts[depth + 1 :]), tree.files[relpath], split))
    return items


# --- CIFAR-10: the python batches are pickles, read with an unpickler that can only rebuild numpy arrays ---------

_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]
_NUMPY_SCALAR = np.float64(0).__reduce__()[0]
_ALLOWED_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,  # how Python 3 writes bytes in protocol-2 pickles
}
_ALLOWED_BUILTINS = frozenset(
    {"list", "dict", "tuple", "set", "frozenset", "bytearray", "bytes", "str", "int", "float", "complex", "bool"}
)


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds plain containers and numpy arrays only: any other global (``os.system``, ``eval``, ...) is refused,
    so a hostile CIFAR batch cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_PICKLE_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module in ("builtins", "__builtin__") and name in _ALLOWED_BUILTINS:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refused to load the global {module}.{name}")


def restricted_loads(data: bytes) -> Any:
    """Unpickle CIFAR-10 data (Python 2 pickles, hence ``encoding="bytes"``) without running arbitrary code."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _load_cifar_pickle(tree: _InputTree, relpath: str) -> dict[str, Any]:
    with _open_zip(tree.zip_path) as archive:
        data = _read_source(tree.files[relpath], archive)
    try:
        loaded = restricted_loads(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise PreprocessError(f"cannot read CIFAR-10 file {relpath}: {error}") from None
    if not isinstance(loaded, dict):
        raise PreprocessError(f"CIFAR-10 file {relpath} holds a {type(loaded).__name__}, not a dict")
    return {_text(key): value for key, value in loaded.items()}


def _cifar_class_names(meta: dict[str, Any], relpath: str) -> list[str]:
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise PreprocessError(f"CIFAR-10 file {relpath} has no label_names list")
    classes = [_text(name).strip() for name in names]
    for name in classes:
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
            raise PreprocessError(f"CIFAR-10 label name {name!r} in {relpath} cannot be a folder name")
    if len(set(classes)) != len(classes):
        raise PreprocessError(f"CIFAR-10 label names in {relpath} are not unique: {classes}")
    return classes


def _cifar_layout(tree: _InputTree, paths: list[str], root: str, skipped: list[tuple[str, str]]) -> _Layout:
    batch_names = sorted(
        (name for name in _children(paths, set(), root)[1] if CIFAR_TRAIN_PATTERN.fullmatch(name)),
        key=lambda name: int(CIFAR_TRAIN_PATTERN.fullmatch(name).group(1)),  # type: ignore[union-attr]
    )
    wanted = {_join(root, name) for name in (CIFAR_META, CIFAR_TEST, *batch_names)}
    for relpath in paths:
        if relpath not in wanted:
            skipped.append((relpath, "not a CIFAR-10 batch"))
    meta_path = _join(root, CIFAR_META)
    classes = _cifar_class_names(_load_cifar_pickle(tree, meta_path), meta_path)
    items: list[_Item] = []
    for batch_name in (*batch_names, CIFAR_TEST):
        relpath = _join(root, batch_name)
        batch = _load_cifar_pickle(tree, relpath)
        data, labels, filenames = batch.get("data"), batch.get("labels"), batch.get("filenames")
        side = CIFAR_SIDE
        if not (
            isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * side**2
        ):
            raise PreprocessError(
                f"CIFAR-10 batch {relpath} is not in the expected format: 'data' must be a uint8 array of shape "
                f"(N, {3 * side**2})"
            )
        if not isinstance(labels, list) or len(labels) != len(data):
            raise PreprocessError(f"CIFAR-10 batch {relpath} has no 'labels' list of the same length as its data")
        if not all(isinstance(label, (int, np.integer)) and 0 <= label < len(classes) for label in labels):
            raise PreprocessError(f"CIFAR-10 batch {relpath} has labels outside 0..{len(classes) - 1}")
        if not (isinstance(filenames, list) and len(filenames) == len(data)):
            filenames = [f"{batch_name}_{row:05d}" for row in range(len(data))]
        split = "test" if batch_name == CIFAR_TEST else None
        for row, (label, filename) in enumerate(zip(labels, filenames, strict=True)):
            name = _text(filename).replace("/", "_").replace("\\", "_")
            source = ("array", data[row].tobytes(), side, side)
            items.append(_Item(f"{relpath}[{row}]", classes[int(label)], name, source, split))
    note = {
        "train": f"{', '.join(batch_names)} less the valid share",
        "valid": "stratified share of the training batches",
        "test": CIFAR_TEST,
    }
    return _Layout(LAYOUT_CIFAR10, root, classes, items, skipped, {}, note)


# --------------------------------------------------------------------------------------------------------------
# Image work (runs in worker processes)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageOptions:
    image_size: int
    max_pixels: int
    jpeg_quality: int


@dataclass(frozen=True)
class ImageResult:
    index: int
    reason: str | None  # None when the image was written
    sha256: str | None
    size: tuple[int, int] | None
    notes: tuple[str, ...] = ()


_WORKER_OPTIONS: ImageOptions | None = None
_WORKER_ZIP: zipfile.ZipFile | None = None
_WORKER_ZIP_PATH: str | None = None


@contextmanager
def _open_zip(zip_path: str | None) -> Iterator[zipfile.ZipFile | None]:
    if zip_path is None:
        yield None
        return
    with zipfile.ZipFile(zip_path) as archive:
        yield archive


def _init_worker(options: ImageOptions, zip_path: str | None) -> None:
    """Set a worker up. It touches no input: workers start before the input is checked, and an error here would
    print a traceback per worker ahead of the step's own one-line message. The archive opens on first use."""
    global _WORKER_OPTIONS, _WORKER_ZIP_PATH
    # The step checks the pixel count itself (and writes the reason to the manifest); PIL's own check would
    # only warn or raise a different error.
    Image.MAX_IMAGE_PIXELS = None
    _WORKER_OPTIONS = options
    _WORKER_ZIP_PATH = zip_path


def _worker_zip() -> zipfile.ZipFile | None:
    """This worker's handle on the input zip, opened on first use (the main process has checked it by then)."""
    global _WORKER_ZIP
    if _WORKER_ZIP is None and _WORKER_ZIP_PATH is not None:
        _WORKER_ZIP = zipfile.ZipFile(_WORKER_ZIP_PATH)
    return _WORKER_ZIP


def target_size(width: int, height: int, image_size: int) -> tuple[int, int] | None:
    """The size after shrinking the short side to ``image_size`` (torchvision ``Resize(int)``'s arithmetic, so
    the output matches what the notebooks produced); None when the image is already small enough (no upscaling)."""
    short, long = (width, height) if width <= height else (height, width)
    if short <= image_size:
        return None
    new_short, new_long = image_size, int(image_size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(0x0112, 1)
    except DECODE_ERRORS:  # a malformed EXIF block: the pixels may still be fine
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image, None
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        array = np.asarray(image)
        if mode in SIXTEEN_BIT_MODES:
            gray = (array.astype(np.uint32) >> 8).astype(np.uint8)
        elif mode == "I":
            scaled = array // 257 if array.size and array.max() > 255 else array  # 16-bit data read as 32-bit
            gray = np.clip(scaled, 0, 255).astype(np.uint8)
        else:
            scaled = array * 255.0 if array.size and np.nanmax(array) <= 1.0 else array
            gray = np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB"), f"{mode} to RGB"
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat, f"{mode} with transparency to RGB on white"
    return image.convert("RGB"), f"{mode} to RGB"


def _convert_image(data: bytes, destination: str, options: ImageOptions) -> tuple[tuple[int, int], list[str]]:
    notes: list[str] = []
    with Image.open(io.BytesIO(data)) as opened:
        width, height = opened.size
        if width * height > options.max_pixels:
            raise _SkipFile(
                f"{width}x{height} = {width * height} pixels is over the limit of {options.max_pixels} "
                "(--max-image-pixels): possible decompression bomb"
            )
        orientation = _orientation(opened)
        upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        target = target_size(*upright, options.image_size)
        source_format, source_mode = opened.format, opened.mode
        icc_profile = opened.info.get("icc_profile") if source_mode == "RGB" else None
        if target is not None and source_format in ("JPEG", "MPO"):
            # Reduced-size decoding (1/2, 1/4, 1/8 by the DCT) to no less than the target: most of the speed.
            raw_target = (target[1], target[0]) if orientation in (5, 6, 7, 8) else target
            opened.draft(None, raw_target)
        opened.load()
        if target is None and orientation == 1 and source_format == "JPEG" and source_mode == "RGB":
            # Already an upright RGB JPEG of the right size: keep its bytes (no second lossy encoding).
            Path(destination).write_bytes(data)
            return (width, height), ["kept original JPEG"]
        image: Image.Image = opened
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
            notes.append("EXIF orientation made upright")
        image, conversion = _to_rgb(image)
        if conversion:
            notes.append(conversion)
        if target is not None:
            image = image.resize(target, RESAMPLE, reducing_gap=REDUCING_GAP)
            notes.append("resized")
        image.save(destination, "JPEG", quality=options.jpeg_quality, icc_profile=icc_profile)
        return image.size, notes


def _convert_array(raw: bytes, height: int, width: int, destination: str, options: ImageOptions) -> ImageResult:
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(3, height, width).transpose(1, 2, 0)
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    notes = []
    target = target_size(width, height, options.image_size)
    if target is not None:
        image = image.resize(target, RESAMPLE, reducing_gap=REDUCING_GAP)
        notes.append("resized")
    image.save(destination, "JPEG", quality=options.jpeg_quality)
    return ImageResult(-1, None, hashlib.sha256(raw).hexdigest(), image.size, tuple(notes))


IMAGE_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _claimed_format(data: bytes) -> str | None:
    """The format a file's first bytes announce: tells a damaged image from a file that is no image at all."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for signature, name in IMAGE_SIGNATURES if data.startswith(signature)), None)


def _error_text(error: BaseException) -> str:
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(error))  # object addresses would make the manifest vary
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def process_task(task: tuple[int, Source, str]) -> ImageResult:
    """Decode, validate, make upright, convert and shrink one image; write it to ``destination`` as JPEG."""
    index, source, destination = task
    options = _WORKER_OPTIONS
    if options is None:
        raise RuntimeError("process_task runs only after _init_worker")
    if source[0] == "array":
        result = _convert_array(source[1], source[2], source[3], destination, options)
        return ImageResult(index, None, result.sha256, result.size, result.notes)
    try:
        data = _read_source(source, _worker_zip())
        if not data:
            raise _SkipFile("zero-byte file")
        digest = hashlib.sha256(data).hexdigest()
        size, notes = _convert_image(data, destination, options)
    except _SkipFile as skip:
        reason = str(skip)
    except UnidentifiedImageError:
        claimed = _claimed_format(data)
        reason = (
            f"corrupt image (starts like a {claimed} file but cannot be read)"
            if claimed
            else "not an image (no image format recognised)"
        )
    except Image.DecompressionBombError as error:
        reason = f"possible decompression bomb ({_error_text(error)})"
    except DECODE_ERRORS as error:
        reason = f"corrupt or truncated image ({_error_text(error)})"
    else:
        return ImageResult(index, None, digest, size, tuple(notes))
    Path(destination).unlink(missing_ok=True)  # a partly written file must not be published
    return ImageResult(index, reason, None, None)


def _start_pool(workers: int, options: ImageOptions, zip_path: str | None) -> ProcessPoolExecutor:
    """Worker processes, started now so that their start-up overlaps with reading the input.

    "spawn": no fork of a process that holds threads (numpy's BLAS, torch in tests); the workers import only
    this file, PIL and numpy. A worker that dies (out of memory) fails the run instead of hanging it.
    """
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(options, zip_path)
    )
    # Ctrl-C reaches the whole process group. The workers inherit an ignored SIGINT through exec (Python keeps
    # it ignored), so the main process alone stops the run and cleans up, and no worker prints a traceback.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for _ in range(workers):
            pool.submit(int)  # a no-op per worker: processes start on demand, this starts them all at once
    finally:
        signal.signal(signal.SIGINT, previous)
    return pool


def _run_tasks(
    tasks: list[tuple[int, Source, str]], options: ImageOptions, zip_path: str | None, pool: ProcessPoolExecutor | None
) -> list[ImageResult]:
    """Process every task, in the pool or (without one) in this process; results in task order."""
    global _WORKER_ZIP, _WORKER_OPTIONS, _WORKER_ZIP_PATH
    results: list[ImageResult] = []
    progress = _Progress(len(tasks))
    if pool is None:
        previous_limit = Image.MAX_IMAGE_PIXELS
        _init_worker(options, zip_path)
        try:
            for task in tasks:
                results.append(process_task(task))
                progress.update()
        finally:
            Image.MAX_IMAGE_PIXELS = previous_limit
            if _WORKER_ZIP is not None:
                _WORKER_ZIP.close()
            _WORKER_ZIP, _WORKER_OPTIONS, _WORKER_ZIP_PATH = None, None, None
    else:
        workers = pool._max_workers
        chunksize = max(1, min(64, len(tasks) // (workers * 8)))
        try:
            for result in pool.map(process_task, tasks, chunksize=chunksize):
                results.append(result)
                progress.update()
        except BrokenProcessPool:
            raise PreprocessError(
                "a worker process died while decoding images (out of memory?): run again with fewer --workers"
            ) from None
    progress.close()
    return results


class _Progress:
    """A tqdm bar on a terminal; otherwise a line every 10 % (what CloudWatch shows for a processing job)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit="img", file=sys.stderr, desc="preprocess")
        self.every = max(100, total // 10)

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.done % self.every == 0 or self.done == self.total:
            rate = self.done / max(time.monotonic() - self.started, 1e-9)
            print(f"processed {self.done}/{self.total} images ({rate:.0f} images/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------------------
# Splitting, leakage check, output
# --------------------------------------------------------------------------------------------------------------


def _share(count: int, fraction: float) -> int:
    if fraction <= 0:
        return 0
    share = int(count * fraction + 0.5)
    return max(share, 1) if count >= 3 else share  # every split sees each class once a class has 3 images


def stratified_split(
    indices_by_class: dict[str, list[int]], valid_fraction: float, test_fraction: float, seed: int
) -> dict[int, str]:
    """Per class: shuffle with a seed of its own (a class's split does not depend on the other classes), take
    the test share, then the valid share; the rest is train, at least one image."""
    split_of: dict[int, str] = {}
    for class_name, indices in indices_by_class.items():
        order = sorted(indices)
        random.Random(f"{seed}/{class_name}").shuffle(order)  # noqa: S311 - a reproducible split, not a secret
        n_valid, n_test = _share(len(order), valid_fraction), _share(len(order), test_fraction)
        while n_valid + n_test > len(order) - 1 and n_valid + n_test > 0:
            if n_test >= n_valid:
                n_test -= 1
            else:
                n_valid -= 1
        for position, index in enumerate(order):
            split_of[index] = "test" if position < n_test else "valid" if position < n_test + n_valid else "train"
    return split_of


def _output_name(name: str, used: set[str]) -> str:
    """``<stem>.jpg``, made unique in its folder (``a.png`` and ``a.jpg`` give ``a.jpg`` and ``a_2.jpg``). Names
    are compared case-insensitively, so no file replaces another on macOS or Windows file systems."""
    stem = name.rsplit(".", 1)[0] if "." in name.rsplit("__", 1)[-1] else name
    stem = stem or "image"
    candidate, counter = f"{stem}.jpg", 1
    while candidate.casefold() in used:
        counter += 1
        candidate = f"{stem}_{counter}.jpg"
    used.add(candidate.casefold())
    return candidate


def _check_output_folder(output_dir: Path) -> None:
    """Only this step's earlier outputs (with a manifest) are replaced; anything else there is left alone."""
    for split in SPLITS:
        target = output_dir / split
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise PreprocessError(f"output path {target} exists and is not a folder: choose another --output-dir")
        if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_FILE).is_file():
            raise PreprocessError(
                f"output folder {target} holds files this step did not write: empty it or choose another --output-dir"
            )


def _publish(work_dir: Path, output_dir: Path) -> None:
    for split in SPLITS:
        source, target = work_dir / split, output_dir / split
        if not target.exists():
            os.replace(source, target)
            continue
        # The folder may be a mount point (SageMaker creates the output folders): replace its contents.
        for child in target.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        for child in source.iterdir():
            os.replace(child, target / child.name)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def check_options(
    image_size: int,
    valid_fraction: float,
    test_fraction: float,
    workers: int = 1,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
) -> None:
    """The values' own rules, as a PreprocessError naming the flag (the local pipeline checks a run's with this)."""
    if image_size < 1:
        raise PreprocessError(f"--image-size must be at least 1, got {image_size}")
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise PreprocessError(
            f"--valid-fraction {valid_fraction} and --test-fraction {test_fraction} must each be in [0, 1) "
            "and leave a share for train"
        )
    if max_image_pixels < 1:
        raise PreprocessError(f"--max-image-pixels must be at least 1, got {max_image_pixels}")
    if not 1 <= jpeg_quality <= 100:
        raise PreprocessError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    if workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {workers}")


def check_arguments(args: argparse.Namespace) -> None:
    """:func:`check_options` of parsed flags."""
    check_options(
        args.image_size, args.valid_fraction, args.test_fraction, args.workers, args.max_image_pixels, args.jpeg_quality
    )


def preprocess(
    input_path: Path,
    output_dir: Path,
    image_size: int = DEFAULT_IMAGE_SIZE,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = DEFAULT_SEED,
    workers: int = 1,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
) -> dict[str, Any]:
    """Turn ``input_path`` into ``output_dir/{train,valid,test}``; returns the manifest."""
    check_options(image_size, valid_fraction, test_fraction, workers, max_image_pixels, jpeg_quality)
    kind, source_path = resolve_input(input_path)
    output_dir = output_dir.absolute()
    if kind == "folder" and output_dir.resolve().is_relative_to(source_path.resolve()):
        raise PreprocessError(f"--output-dir {output_dir} is inside the input folder {source_path}: choose another")
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_output_folder(output_dir)
    started = time.monotonic()
    # Work next to the output (same file system, so publishing is a rename); removed whatever happens.
    work_dir = Path(tempfile.mkdtemp(prefix=".preprocess-", dir=output_dir))
    options = ImageOptions(image_size, max_image_pixels, jpeg_quality)
    pool = _start_pool(workers, options, str(source_path) if kind == "zip" else None) if workers > 1 else None
    # The archive's checksum is read in a thread while the images are processed (hashlib releases the GIL).
    hashing = ThreadPoolExecutor(1)
    digest: Future[str] | None = hashing.submit(contract.file_sha256, source_path) if kind != "folder" else None
    try:
        if kind == "zip":
            tree = _read_zip(source_path)
        elif kind == "tar":
            tree = _read_tar(source_path, work_dir / "extracted")
        else:
            tree = _read_folder(source_path)
        layout = detect_layout(tree, valid_fraction, test_fraction)
        print(
            f"input {tree.info['name']} ({tree.info['format']}): layout {layout.name} at "
            f"{layout.root or '.'}/, {len(layout.classes)} classes, {len(layout.items)} images",
            flush=True,
        )
        if len(layout.classes) < 2:
            found = ", ".join(repr(name) for name in layout.classes) or "none"
            raise PreprocessError(
                f"found {len(layout.classes)} class ({found}) in {layout.root or 'the input'}: a classifier needs "
                "at least two class folders"
            )
        reserved = [name for name in layout.classes if name in (LABELS_FILE, MANIFEST_FILE)]
        if reserved:
            raise PreprocessError(f"class folder {reserved[0]!r} has the name of an output file: rename it")
        _refuse_colliding_classes(layout.classes)
        class_index = {name: index for index, name in enumerate(layout.classes)}
        split_rank = {split: rank for rank, split in enumerate(SPLITS)}
        items = sorted(
            layout.items, key=lambda item: (class_index[item.class_name], split_rank.get(item.split or "", -1))
        )
        # Items keep the layout's order inside a class (sorted paths, or batch rows for CIFAR).
        staging = work_dir / "staging"
        staging.mkdir()
        tasks = [(index, item.source, str(staging / f"{index:07d}.jpg")) for index, item in enumerate(items)]
        results = _run_tasks(tasks, options, tree.zip_path, pool)
        if digest is not None:
            tree.info["sha256"] = digest.result()

        skipped = list(layout.skipped)
        usable: dict[str, list[int]] = defaultdict(list)
        skipped_in_class: dict[str, list[tuple[str, str]]] = defaultdict(list)
        conversions: Counter[str] = Counter()
        for result in results:
            if result.reason is not None:
                skipped.append((items[result.index].relpath, result.reason))
                skipped_in_class[items[result.index].class_name].append(skipped[-1])
            else:
                usable[items[result.index].class_name].append(result.index)
                conversions.update(result.notes)
        for class_name in layout.classes:
            if not usable.get(class_name):
                bad = skipped_in_class[class_name]
                example = f"; e.g. {bad[0][0]}: {bad[0][1]}" if bad else ""
                raise PreprocessError(
                    f"class {class_name!r} has no usable images ({len(bad)} files skipped{example}): add images to "
                    "it or remove its folder"
                )

        split_of = _assign_splits(layout, items, usable, valid_fraction, test_fraction, seed)
        kept, duplicates = _remove_cross_split_duplicates(items, results, split_of)
        manifest = _write_splits(
            work_dir, layout, items, kept, split_of, duplicates, skipped, conversions, tree.info, options,
            valid_fraction, test_fraction, seed,
        )  # fmt: skip
        _publish(work_dir, output_dir)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        hashing.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(work_dir, ignore_errors=True)
    totals = manifest["totals"]
    elapsed = time.monotonic() - started
    print(
        f"wrote train={totals['train']} valid={totals['valid']} test={totals['test']} images of "
        f"{len(layout.classes)} classes to {output_dir}; skipped {len(manifest['skipped'])} files, removed "
        f"{len(manifest['duplicates_removed'])} cross-split duplicates; {elapsed:.1f} s "
        f"({len(items) / max(elapsed, 1e-9):.0f} images/s)",
        flush=True,
    )
    return manifest


def _caseless(name: str) -> str:
    """Unicode's canonical caseless form (NFD(casefold(NFD(name))), the standard's D145): one key for 'Cat' and
    'cat', and for the composed and decomposed spellings of 'café'."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def _refuse_colliding_classes(classes: Sequence[str]) -> None:
    """Refuse two class folders that are one name up to Unicode form and case, naming both.

    Refused, not merged: 'Cat'/'cat' and the NFC/NFD spellings of 'café' (macOS writes NFD names into archives,
    most tools NFC) are one folder on a case-insensitive or normalising file system (macOS, Windows), so the
    split written there would mix two classes, and a merge would pick a label the user never chose, for images
    that may have been sorted apart on purpose. The user decides: rename one folder or move its images.
    """
    seen: dict[str, str] = {}
    for name in classes:
        other = seen.setdefault(_caseless(name), name)
        if other == name:
            continue
        same_letters = unicodedata.normalize("NFC", other) == unicodedata.normalize("NFC", name)
        how = "two Unicode spellings of one name" if same_letters else "one name in two cases"
        raise PreprocessError(
            f"class folders {other!r} and {name!r} are one class ({how}: {other!a} and {name!a}); a "
            "case-insensitive file system would merge them: rename one, or move its images into the other"
        )


def _assign_splits(
    layout: _Layout,
    items: list[_Item],
    usable: dict[str, list[int]],
    valid_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[int, str]:
    split_of: dict[int, str] = {}
    pool: dict[str, list[int]] = defaultdict(list)  # per class, the images the step splits itself
    for class_name in layout.classes:
        for index in usable.get(class_name, []):
            given = items[index].split
            if given is None or (given == "train" and layout.missing_splits):
                pool[class_name].append(index)
            else:
                split_of[index] = given
    if layout.name == LAYOUT_IMAGEFOLDER:
        split_of.update(stratified_split(pool, valid_fraction, test_fraction, seed))
    elif layout.name == LAYOUT_CIFAR10:
        split_of.update(stratified_split(pool, valid_fraction, 0.0, seed))
    elif pool:
        missing = layout.missing_splits
        split_of.update(stratified_split(pool, missing.get("valid", 0.0), missing.get("test", 0.0), seed))
    return split_of


def _remove_cross_split_duplicates(
    items: list[_Item], results: list[ImageResult], split_of: dict[int, str]
) -> tuple[list[int], list[dict[str, str]]]:
    """An identical file (same SHA-256) stays in the earliest split (train, valid, test) and leaves the later."""
    rank = {split: position for position, split in enumerate(SPLITS)}
    by_index = {result.index: result for result in results if result.reason is None}
    first_seen: dict[str, int] = {}
    kept: list[int] = []
    duplicates: list[dict[str, str]] = []
    for index in sorted(split_of, key=lambda index: (rank[split_of[index]], index)):
        digest = by_index[index].sha256 or ""
        earlier = first_seen.get(digest)
        if earlier is not None and split_of[earlier] != split_of[index]:
            duplicates.append(
                {
                    "path": items[index].relpath,
                    "class": items[index].class_name,
                    "split": split_of[index],
                    "same_as": items[earlier].relpath,
                    "same_as_split": split_of[earlier],
                }
            )
            continue
        first_seen.setdefault(digest, index)
        kept.append(index)
    return kept, duplicates


def _write_splits(
    work_dir: Path,
    layout: _Layout,
    items: list[_Item],
    kept: list[int],
    split_of: dict[int, str],
    duplicates: list[dict[str, str]],
    skipped: list[tuple[str, str]],
    conversions: Counter[str],
    input_info: dict[str, Any],
    options: ImageOptions,
    valid_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, Any]:
    counts = {split: dict.fromkeys(layout.classes, 0) for split in SPLITS}
    used_names: dict[tuple[str, str], set[str]] = defaultdict(set)
    for split in SPLITS:
        (work_dir / split).mkdir()
    for index in sorted(kept):
        item, split = items[index], split_of[index]
        counts[split][item.class_name] += 1
        class_dir = work_dir / split / item.class_name
        if not used_names[(split, item.class_name)]:  # the class's first image in this split
            class_dir.mkdir()
        name = _output_name(item.name, used_names[(split, item.class_name)])
        os.replace(work_dir / "staging" / f"{index:07d}.jpg", class_dir / name)
    kept_set = set(kept)
    for index in split_of:
        if index not in kept_set:
            (work_dir / "staging" / f"{index:07d}.jpg").unlink()
    without_train = [name for name in layout.classes if counts["train"][name] == 0]
    if without_train:
        raise PreprocessError(
            f"class {without_train[0]!r} has no training images ({len(without_train)} classes without any): a "
            "class must have images in train/"
        )
    missing = {
        split: [name for name in layout.classes if counts[split][name] == 0]
        for split in SPLITS
        if any(counts[split][name] == 0 for name in layout.classes)
    }
    for split, names in missing.items():
        print(f"warning: {len(names)} classes have no images in {split}: {', '.join(names[:5])}", file=sys.stderr)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "layout": layout.name,
        "dataset_root": layout.root,
        "input": input_info,
        "parameters": {
            "image_size": options.image_size,
            "valid_fraction": valid_fraction,
            "test_fraction": test_fraction,
            "seed": seed,
            "max_image_pixels": options.max_pixels,
            "jpeg_quality": options.jpeg_quality,
        },
        "splits_from": {split: layout.split_note.get(split, "") for split in SPLITS},
        "classes": layout.classes,
        "counts": counts,
        "totals": {split: sum(counts[split].values()) for split in SPLITS},
        "classes_missing_from_split": missing,
        "conversions": dict(sorted(conversions.items())),
        "skipped": [{"path": path, "reason": reason} for path, reason in sorted(skipped)],
        "duplicates_removed": sorted(duplicates, key=lambda entry: (entry["split"], entry["path"])),
    }
    labels_bytes, manifest_bytes = _json_bytes(layout.classes), _json_bytes(manifest)
    for split in SPLITS:
        (work_dir / split / LABELS_FILE).write_bytes(labels_bytes)
        (work_dir / split / MANIFEST_FILE).write_bytes(manifest_bytes)
    return manifest


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def default_workers() -> int:
    return contract.available_cpus()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Validate, split and resize an image dataset archive into train/valid/test ImageFolders.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    flags = {  # flag: (type, default, help)
        "--input": (
            Path,
            Path(DEFAULT_INPUT),
            "archive (.zip, .tar, .tar.gz, .tgz) or folder; a folder holding exactly one archive means that archive",
        ),
        "--output-dir": (Path, Path(DEFAULT_OUTPUT_DIR), "splits go to <output-dir>/{train,valid,test}"),
        "--image-size": (
            int,
            DEFAULT_IMAGE_SIZE,
            "largest short side in pixels: larger images shrink to it, smaller ones are not enlarged",
        ),
        "--valid-fraction": (float, DEFAULT_VALID_FRACTION, "share of each class for valid where the input has none"),
        "--test-fraction": (float, DEFAULT_TEST_FRACTION, "share of each class for test where the input has none"),
        "--seed": (int, DEFAULT_SEED, "seed of the stratified split"),
        "--workers": (int, default_workers(), "processes decoding images (all CPUs this process may use)"),
        "--max-image-pixels": (
            int,
            DEFAULT_MAX_IMAGE_PIXELS,
            "images with more pixels are skipped as possible decompression bombs",
        ),
        "--jpeg-quality": (int, DEFAULT_JPEG_QUALITY, "quality of the re-encoded JPEG files"),
    }
    for flag, (kind, default, help_text) in flags.items():
        parser.add_argument(flag, type=kind, default=default, help=help_text)
    return parser


class _Stopped(Exception):
    """SIGTERM (StopProcessingJob, or the local runner stopping a run): unwind so that nothing half-written stays."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_stopped)
    options = vars(args)  # every flag is a keyword of preprocess(), --input its first argument
    try:
        preprocess(options.pop("input"), **options)
    except PreprocessError as error:
        message = " ".join(str(error).split())  # one line, whatever the file names hold
        print(f"error: {message}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Stopped) as stop:
        name = "SIGINT" if isinstance(stop, KeyboardInterrupt) else stop
        print(f"stopped by {name} before the splits were published: run it again", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
