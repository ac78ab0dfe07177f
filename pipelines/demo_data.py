"""The built-in demo dataset: scikit-learn's bundled digits written as a dog-breed-layout archive.

``dogImages/{train,valid,test}/<NNN.name>/<name>_<NNNNN>.jpg`` with classes ``000.zero`` .. ``009.nine``; the 8x8
digits are upscaled to ``image_size`` pixels (RGB JPEG) so a CNN can use them. The archive is byte-identical for
the same arguments (fixed split seed, fixed zip timestamps), so the pipeline's input checksum and step caching
stay stable. Nothing is downloaded: the digits ship with scikit-learn.

    python -m pipelines.run demo-data digits.zip [--image-size 32] [--per-class-limit 20]
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import config, validation
from pipelines.util import fsutil
from pipelines.util.errors import CommandError

if TYPE_CHECKING:  # numpy and PIL load with the archive's writing, not with the command line
    import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASS_NAMES = tuple(f"{index:03d}.{name}" for index, name in enumerate(DIGIT_NAMES))
ARCHIVE_ROOT = "dogImages"
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can hold: no build time leaks into the archive
DEMO_JPEG_QUALITY = 95


def _split_counts(count: int, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Valid and test counts for one class: each at least one image once the class has three, train keeps one."""
    n_valid = max(1, round(count * valid_fraction)) if count >= 3 and valid_fraction > 0 else 0
    n_test = max(1, round(count * test_fraction)) if count >= 3 and test_fraction > 0 else 0
    while n_valid + n_test > count - 1 and n_valid + n_test > 0:
        if n_test >= n_valid:
            n_test -= 1
        else:
            n_valid -= 1
    return n_valid, n_test


def _digit_jpeg(pixels: np.ndarray, image_size: int) -> bytes:
    """One 8x8 digit (values 0..16, ink high) as an RGB JPEG: dark ink on white, like a scanned digit."""
    import numpy as np
    from PIL import Image

    gray = (255 - np.clip(pixels, 0, 16) * (255 / 16)).astype(np.uint8)
    image = Image.fromarray(gray, "L").resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=DEMO_JPEG_QUALITY)
    return buffer.getvalue()


def write_digits_archive(
    path: Path,
    image_size: int = config.DEMO_IMAGE_SIZE,
    *,
    per_class_limit: int | None = None,
    valid_fraction: float = config.VALID_FRACTION,
    test_fraction: float = config.TEST_FRACTION,
    seed: int = config.SPLIT_SEED,
) -> Path:
    """Write the digits as ``dogImages/{train,valid,test}/<NNN.name>/*.jpg`` into the zip at ``path``.

    ``per_class_limit`` keeps only that many images per class (tests use a handful); the split is stratified per
    class and the same for the same ``seed``. The zip is written next to ``path`` and renamed into place.
    Returns ``path``.
    """
    import numpy as np
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    size_problem = validation.bound_problem("ImageSize", image_size)  # the bound `local` applies to ImageSize
    if size_problem:
        raise ValueError(size_problem)
    if per_class_limit is not None and per_class_limit < 1:
        raise ValueError(f"per_class_limit must be at least 1, got {per_class_limit}")
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError("valid_fraction and test_fraction must be in [0, 1) and leave a share for train")
    digits = load_digits()
    images, targets = digits.images, digits.target
    rng = np.random.default_rng(seed)
    entries: list[tuple[str, bytes]] = []
    for label, class_name in enumerate(CLASS_NAMES):
        indices = np.flatnonzero(targets == label)
        indices = indices[rng.permutation(len(indices))]
        if per_class_limit is not None:
            indices = indices[:per_class_limit]
        n_valid, n_test = _split_counts(len(indices), valid_fraction, test_fraction)
        splits = ["test"] * n_test + ["valid"] * n_valid + ["train"] * (len(indices) - n_test - n_valid)
        for number, (index, split) in enumerate(zip(indices, splits, strict=True), start=1):
            name = f"{ARCHIVE_ROOT}/{split}/{class_name}/{DIGIT_NAMES[label]}_{number:05d}.jpg"
            entries.append((name, _digit_jpeg(images[index], image_size)))
    path = Path(path)
    with (
        fsutil.atomic_output(path, make_parents=True) as stream,  # whole or not at all, never through a link
        zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED) as archive,
    ):
        for name, data in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return path


def write_digit_splits(folder: Path, image_size: int = config.DEMO_IMAGE_SIZE) -> dict[str, Path]:
    """The demo archive's splits as ``folder/{train,valid,test}/<class>/<image>`` with ``labels.json``: what the
    Preprocess step makes of it (the images are already at size), for benches and tests that train without the
    pipeline."""
    archive = write_digits_archive(Path(folder) / "digits.zip", image_size)
    splits = {}
    with zipfile.ZipFile(archive) as source:
        for name in source.namelist():
            _, split, class_name, file_name = name.split("/")
            target = Path(folder) / split / class_name / file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read(name))
            splits[split] = Path(folder) / split
    for path in splits.values():
        (path / "labels.json").write_text(json.dumps(list(CLASS_NAMES)), encoding="utf-8")
    return splits


def photo_jpeg(data: bytes, size: tuple[int, int] = (1600, 1200), seed: int = 0) -> bytes:
    """A small image as a camera photo of it: upscaled to the photo's height, centred on a canvas of its corner
    colour (the paper a digit is written on), with a little film grain (sigma 3 grey levels), JPEG quality 90.

    The centre crop of evaluation sees the same part of it as of the small image, so a model's answers on the two
    compare (the reduced-size JPEG decoding of the serving handlers is judged this way).
    """
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as small:
        small = small.convert("RGB")
        width, height = size
        canvas = Image.new("RGB", size, small.getpixel((0, 0)))
        square = small.resize((height * small.width // small.height, height), Image.Resampling.BICUBIC)
        canvas.paste(square, ((width - square.width) // 2, 0))
    grain = np.random.default_rng(seed).normal(0.0, 3.0, (height, width, 1))
    pixels = np.clip(np.asarray(canvas, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def add_commands(subparsers: Any) -> None:
    """Add ``demo-data`` to ``python -m pipelines.run``."""
    parser = subparsers.add_parser(
        "demo-data",
        help="write the built-in demo dataset (scikit-learn's digits) as a dog-breed-layout zip",
        description="Write scikit-learn's digits as a dog-breed-layout zip (the built-in demo dataset). Nothing is "
        "downloaded; the zip is byte-identical for the same arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("output", type=Path, help="the zip file to write")
    parser.add_argument(
        "--image-size",
        type=validation.parameter_argument("ImageSize", int),  # the bounds of local's --image-size
        default=config.DEMO_IMAGE_SIZE,
        help="side of the upscaled square images",
    )
    parser.add_argument("--per-class-limit", type=int, default=None, help="keep at most this many images per class")
    parser.add_argument("--valid-fraction", type=float, default=config.VALID_FRACTION, help="share of each class")
    parser.add_argument("--test-fraction", type=float, default=config.TEST_FRACTION, help="share of each class")
    parser.add_argument("--seed", type=int, default=config.SPLIT_SEED, help="seed of the split")
    parser.set_defaults(func=cmd_demo_data)


def cmd_demo_data(args: argparse.Namespace) -> int:
    try:
        fsutil.check_output_path(args.output)  # a folder, or a missing one: refused before any work
        path = write_digits_archive(
            args.output,
            args.image_size,
            per_class_limit=args.per_class_limit,
            valid_fraction=args.valid_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
        )
    except ValueError as error:
        raise CommandError(str(error)) from error
    except OSError as error:  # a full disk, no permission: the archive is left as it was
        raise CommandError(f"cannot write {args.output}: {error.strerror or error}; nothing was written") from error
    with zipfile.ZipFile(path) as archive:
        count = sum(1 for name in archive.namelist() if name.endswith(".jpg"))
    print(f"wrote {count} digit images ({len(CLASS_NAMES)} classes, {args.image_size} px) to {path}")
    return 0
