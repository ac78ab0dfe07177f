"""Images per second of the processing step against the notebooks' way, on the same photo-sized archive.

Builds a dog-breed-like zip (``dogImages/{train,valid,test}/<NNN.Breed>/<Breed>_<NNNNN>.jpg``) of photo-like JPEGs
in mixed sizes from 300x300 to 2000x1500, then times

* this step: ``steps/preprocess.py`` on the zip with all cores (reading the archive, hashing, reduced-size JPEG
  decoding, resizing, writing, the manifest), and
* the baseline: each already-extracted file opened with PIL, ``.convert("RGB")``, ``torchvision.transforms.Resize``
  and saved, one at a time (how the notebooks prepare images; extracting the zip is not counted against it),

checks that both give every image the same output size, and prints as its last line
``preprocess images/s: <step> vs baseline <baseline> ratio=<step / baseline>``.

    python bench/preprocess_bench.py            # 800 images, about a minute on 2 cores
    python bench/preprocess_bench.py --images 2000
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steps import preprocess  # the repository root is put on the path above

# Photo sizes between 300x300 and 2000x1500, landscape and portrait.
PHOTO_SIZES = (
    (300, 300),
    (500, 375),
    (640, 480),
    (480, 640),
    (800, 600),
    (1024, 768),
    (768, 1024),
    (1280, 960),
    (1600, 1200),
    (1200, 1600),
    (2000, 1500),
    (1500, 2000),
)
BREEDS = ("Affenpinscher", "Afghan_hound", "Airedale_terrier", "Akita", "Alaskan_malamute", "American_eskimo_dog")


GRAIN_SIDE = 2048  # one tile of sensor-like grain, cropped at random offsets (cheaper than fresh noise per image)


class PhotoMaker:
    """Photo-like JPEGs: smooth colour regions plus fine grain. They compress like photos (about 600 KB at
    2000x1500, quality 90), unlike flat colour or pure noise; every image is different."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.grain = Image.fromarray(self.rng.integers(0, 13, size=(GRAIN_SIDE, GRAIN_SIDE, 3), dtype=np.uint8))

    def jpeg(self, size: tuple[int, int], quality: int = 90) -> bytes:
        width, height = size
        small = (max(2, width // 8), max(2, height // 8))
        coarse = self.rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        regions = Image.fromarray(coarse).resize(small, Image.Resampling.BICUBIC)
        texture = Image.fromarray(self.rng.integers(0, 256, size=(small[1], small[0], 3), dtype=np.uint8))
        image = Image.blend(regions, texture, 0.3).resize(size, Image.Resampling.BILINEAR)
        left = int(self.rng.integers(0, GRAIN_SIDE - width + 1))
        top = int(self.rng.integers(0, GRAIN_SIDE - height + 1))
        image = ImageChops.add(image, self.grain.crop((left, top, left + width, top + height)), offset=-6)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return buffer.getvalue()


def build_archive(path: Path, images: int, classes: int, seed: int) -> list[str]:
    """Write the zip; returns its image names. Splits 80/10/10 per class, like the dog dataset."""
    photos = PhotoMaker(seed)
    picker = random.Random(seed)
    names = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for number in range(images):
            class_index = number % classes
            breed = BREEDS[class_index % len(BREEDS)] + ("" if class_index < len(BREEDS) else f"_{class_index}")
            position = number // classes
            split = "test" if position % 10 == 9 else "valid" if position % 10 == 8 else "train"
            name = f"dogImages/{split}/{class_index + 1:03d}.{breed}/{breed}_{number + 1:05d}.jpg"
            archive.writestr(name, photos.jpeg(picker.choice(PHOTO_SIZES)))
            names.append(name)
    return names


def run_baseline(extracted: Path, names: list[str], output: Path, image_size: int, quality: int) -> float:
    """The notebooks' way: PIL open, convert, torchvision Resize, one image at a time. Returns seconds."""
    from torchvision import transforms

    resize = transforms.Resize(image_size)
    started = time.perf_counter()
    for name in names:
        relative = Path(name).relative_to("dogImages")
        image = Image.open(extracted / name).convert("RGB")
        image = resize(image)
        target = output / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, "JPEG", quality=quality)
    return time.perf_counter() - started


def _spin(count: int) -> int:
    total = 0
    for number in range(count):
        total += number * number
    return total


def parallel_capacity(workers: int, rounds: int = 8, count: int = 1_500_000) -> float:
    """How many times the work of one process ``workers`` processes get done here now (other load shares the
    cores): the most the step's parallelism can add on this machine at this moment."""
    started = time.perf_counter()
    for _ in range(rounds):
        _spin(count)
    alone = time.perf_counter() - started
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(int, range(workers)))  # started before the clock runs
        started = time.perf_counter()
        list(pool.map(_spin, [count] * rounds * workers))
        together = time.perf_counter() - started
    return alone * workers / together


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the step's worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_step(archive: Path, output: Path, image_size: int, workers: int, quality: int) -> float | None:
    """The processing step, whole (archive in, splits and manifest out). Returns seconds, None if it failed."""
    started = time.perf_counter()
    status = preprocess.main(
        [
            "--input", str(archive),
            "--output-dir", str(output),
            "--image-size", str(image_size),
            "--workers", str(workers),
            "--jpeg-quality", str(quality),
        ]
    )  # fmt: skip
    if status != 0:
        print(f"the step failed with status {status}", file=sys.stderr)
        return None
    return time.perf_counter() - started


def output_sizes(root: Path) -> dict[str, tuple[int, int]]:
    sizes = {}
    for path in root.rglob("*.jpg"):
        with Image.open(path) as image:
            sizes[path.relative_to(root).as_posix()] = image.size
    return sizes


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=800, help="images in the archive")
    parser.add_argument("--classes", type=int, default=6, help="breeds (class folders)")
    parser.add_argument("--image-size", type=int, default=preprocess.DEFAULT_IMAGE_SIZE, help="short side after")
    parser.add_argument("--workers", type=int, default=preprocess.default_workers(), help="step's worker processes")
    parser.add_argument("--jpeg-quality", type=int, default=preprocess.DEFAULT_JPEG_QUALITY, help="output quality")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated archive")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="preprocess-bench-", dir=args.workdir) as temporary:
        work = Path(temporary)
        archive = work / "dogImages.zip"
        started = time.perf_counter()
        names = build_archive(archive, args.images, args.classes, args.seed)
        megabytes = archive.stat().st_size / 1e6
        print(
            f"built {archive.name}: {len(names)} photo-like JPEGs, {args.classes} classes, {megabytes:.0f} MB "
            f"in {time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs, step workers={args.workers}",
            flush=True,
        )
        with zipfile.ZipFile(archive) as opened:
            opened.extractall(work / "extracted")  # the baseline's input; not timed

        step_output = work / "step"
        cpu_before = cpu_seconds()
        step_seconds = run_step(archive, step_output, args.image_size, args.workers, args.jpeg_quality)
        step_cpu = cpu_seconds() - cpu_before
        if step_seconds is None:
            return 1
        if args.workers > 1:  # how much comes from one core's work, how much from using them all
            one_worker = run_step(archive, work / "step1", args.image_size, 1, args.jpeg_quality)
            if one_worker is None:
                return 1
            print(f"step with 1 worker: {len(names) / one_worker:.1f} images/s", flush=True)

        baseline_output = work / "baseline"
        cpu_before = cpu_seconds()
        baseline_seconds = run_baseline(work / "extracted", names, baseline_output, args.image_size, args.jpeg_quality)
        baseline_cpu = cpu_seconds() - cpu_before

        step_sizes, baseline_sizes = output_sizes(step_output), output_sizes(baseline_output)
        if step_sizes != baseline_sizes:
            differing = sorted(set(step_sizes.items()) ^ set(baseline_sizes.items()))[:5]
            print(f"output sizes differ between the step and the baseline: {differing}", file=sys.stderr)
            return 1
        print(f"same output size for all {len(step_sizes)} images (short side {args.image_size})")
        step_rate = len(names) / step_seconds
        baseline_rate = len(names) / baseline_seconds
        print(f"step: {step_seconds:.2f} s, baseline: {baseline_seconds:.2f} s for {len(names)} images")
        if args.workers > 1:
            capacity = parallel_capacity(args.workers)
            print(f"parallel capacity now: {args.workers} processes get {capacity:.2f}x the work of one done")
        # CPU time does not depend on what else the machine runs: the work each way needs, whatever the cores.
        print(
            f"CPU seconds per image: step {1000 * step_cpu / len(names):.1f} ms (all its processes, start-up "
            f"included), baseline {1000 * baseline_cpu / len(names):.1f} ms; load average {os.getloadavg()[0]:.1f}"
        )
        ratio = step_rate / baseline_rate
        print(f"preprocess images/s: {step_rate:.1f} vs baseline {baseline_rate:.1f} ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
