"""Builders of tiny test datasets: images of every awkward kind, and zip/tar/folder/CIFAR-10 archives of them."""

from __future__ import annotations

import hashlib
import io
import pickle
import stat
import tarfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image


def _pixels(seed: str, width: int, height: int, channels: int = 3) -> np.ndarray:
    """Smooth-ish random content, different for every seed (tests must not make duplicates by accident)."""
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    small = rng.integers(0, 256, size=(max(2, height // 4), max(2, width // 4), channels), dtype=np.uint8)
    image = Image.fromarray(small if channels > 1 else small[..., 0]).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)


def image_bytes(
    seed: str = "image",
    size: tuple[int, int] = (20, 16),
    mode: str = "RGB",
    image_format: str = "JPEG",
    exif_orientation: int | None = None,
) -> bytes:
    """An image file of ``size`` (width, height) in ``mode`` and ``image_format``, with unique content."""
    width, height = size
    if mode == "RGB":
        image = Image.fromarray(_pixels(seed, width, height))
    elif mode in ("L", "CMYK", "RGBA", "LA"):
        image = Image.fromarray(_pixels(seed, width, height)).convert(mode)
    elif mode == "P":
        image = Image.fromarray(_pixels(seed, width, height)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
        image.info["transparency"] = 0
    elif mode == "I;16":
        gradient = np.linspace(0, 65535, width * height, dtype=np.float64).reshape(height, width)
        image = Image.fromarray(gradient.astype(np.uint16))
    else:
        raise ValueError(mode)
    buffer = io.BytesIO()
    options = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        options["exif"] = exif
    if mode == "P" and image_format == "PNG":
        options["transparency"] = 0
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def dog_entries(
    classes: Iterable[str] = ("001.Affenpinscher", "002.Afghan_hound"),
    per_split: Mapping[str, int] | None = None,
    size: tuple[int, int] = (20, 16),
    root: str = "dogImages",
) -> dict[str, bytes]:
    """``dogImages/{train,valid,test}/<class>/<Class>_<NNNNN>.jpg`` entries with unique images."""
    per_split = per_split or {"train": 3, "valid": 1, "test": 1}
    entries = {}
    for class_name in classes:
        stem = class_name.split(".", 1)[-1]
        number = 0
        for split, count in per_split.items():
            for _ in range(count):
                number += 1
                name = f"{root}/{split}/{class_name}/{stem}_{number:05d}.jpg"
                entries[name] = image_bytes(seed=name, size=size)
    return entries


def imagefolder_entries(
    classes: Mapping[str, int], size: tuple[int, int] = (16, 16), root: str = ""
) -> dict[str, bytes]:
    prefix = f"{root}/" if root else ""
    return {
        f"{prefix}{class_name}/img_{number:03d}.jpg": image_bytes(seed=f"{class_name}/{number}", size=size)
        for class_name, count in classes.items()
        for number in range(count)
    }


def write_zip(path: Path, entries: Mapping[str, bytes], symlinks: Mapping[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def write_tar(
    path: Path,
    entries: Mapping[str, bytes],
    links: Mapping[str, tuple[bytes, str]] | None = None,
    mode: str = "w:gz",
) -> Path:
    """``links`` maps a member name to (tarfile.SYMTYPE or LNKTYPE, link target)."""
    with tarfile.open(path, mode) as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            archive.addfile(info)
    return path


def write_folder(root: Path, entries: Mapping[str, bytes]) -> Path:
    for name, data in entries.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


CIFAR_CLASSES = ("airplane", "automobile", "bird")


def cifar_batch(labels: list[int], seed: str, batch_label: str) -> dict[bytes, object]:
    """A batch as CIFAR-10's Python 2 pickles hold it (bytes keys, uint8 rows of 1024 R, 1024 G, 1024 B)."""
    rows = np.stack([_pixels(f"{seed}/{row}", 32, 32).transpose(2, 0, 1).reshape(-1) for row in range(len(labels))])
    return {
        b"batch_label": batch_label.encode(),
        b"labels": list(labels),
        b"data": rows.astype(np.uint8),
        b"filenames": [f"{seed}_{row:06d}.png".encode() for row in range(len(labels))],
    }


def write_cifar_tarball(
    path: Path,
    train_per_class: int = 4,
    test_per_class: int = 2,
    classes: tuple[str, ...] = CIFAR_CLASSES,
    batches: int = 2,
    meta: object | None = None,
) -> Path:
    """A ``cifar-10-python.tar.gz`` of pickled batches in the real format: ``cifar-10-batches-py/data_batch_N``,
    ``test_batch``, ``batches.meta`` and ``readme.html``."""
    files: dict[str, bytes] = {}
    train_labels = [label for _ in range(train_per_class) for label in range(len(classes))]
    for number in range(1, batches + 1):
        labels = train_labels[number - 1 :: batches]
        batch = cifar_batch(labels, f"data_batch_{number}", f"training batch {number} of {batches}")
        files[f"cifar-10-batches-py/data_batch_{number}"] = pickle.dumps(batch, protocol=2)
    test_labels = [label for _ in range(test_per_class) for label in range(len(classes))]
    files["cifar-10-batches-py/test_batch"] = pickle.dumps(
        cifar_batch(test_labels, "test", "testing batch"), protocol=2
    )
    if meta is None:
        meta = {
            b"num_cases_per_batch": len(train_labels) // batches,
            b"label_names": [name.encode() for name in classes],
            b"num_vis": 3072,
        }
    files["cifar-10-batches-py/batches.meta"] = meta if isinstance(meta, bytes) else pickle.dumps(meta, protocol=2)
    files["cifar-10-batches-py/readme.html"] = b"<html>CIFAR-10</html>"
    return write_tar(path, files)
