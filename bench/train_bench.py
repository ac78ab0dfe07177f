"""Training input images/second: this project's pipeline (entrypoints/data.py) vs the notebooks' way.

(a) ``entrypoints.data``: libjpeg-turbo decode to uint8, crop-then-resize on uint8 tensors, uint8 batches,
    one normalisation per batch, persistent worker processes sized to the CPUs.
(b) baseline: ``torchvision.datasets.ImageFolder`` + PIL + per-image ``RandomResizedCrop(224)``,
    ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` with ``num_workers=0`` (the notebooks' loader).

Same images (photo-like JPEGs written the way the processing step writes them: short side 256, quality 90),
same 224 random crop + flip, same batch size, both ending in a normalised float32 batch; the model step is
excluded. Each arm runs one warm-up pass (worker start-up, page cache), then the arms take turns for
``--passes`` timed rounds (the same background load for all) and each arm's best pass counts.
The last line reads ``train input images/s: <a> vs baseline <b> ratio=<a/b>``.

``--with-model`` also times ResNet50 training steps at 224 (fed by pipeline (a)) in float32/NCHW and with
AMP + channels_last, on the GPU when there is one (on a CPU it runs the same code path, slowly; use
``--model-arch resnet18 --model-batches 2`` for a smoke check).

``--processes 1,2`` instead times the training loop of ``entrypoints/train.py`` itself under torchrun, once per
process count (``all`` = every GPU): the same images, ``--batch-size`` images per process (weak scaling: the
global batch grows with the processes), the machine's CPUs shared out between the processes (intra-op
threads and loader workers). Images/s are the script's own (all ranks' images over rank 0's epoch time),
averaged over the epochs after the first. The last line reads
``train images/s <N> procs: <x> vs 1 proc <y> ratio=<x/y>``; ratio / N is the scaling efficiency.

    python bench/train_bench.py                  # about a minute on 2 CPU cores
    python bench/train_bench.py --with-model     # on a GPU machine
    python bench/train_bench.py --processes 1,2  # CPU, gloo: resnet18 at 112, a few minutes on 2 cores
    python bench/train_bench.py --processes 1,all --model-arch resnet50 --size 224 --batch-size 64  # GPUs, nccl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entrypoints import contract, data, modeling

REPO = Path(__file__).resolve().parents[1]


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour field + sensor-like noise + a few solid shapes: compresses like a photo (~25 KB at 341x256)."""
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(10, 120)), int(rng.integers(10, 120))
        draw.ellipse([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def write_dataset(root: Path, classes: int, per_class: int, short_side: int, seed: int = 0) -> Path:
    """An ImageFolder with labels.json, as the processing step writes it (short side = ``short_side``)."""
    rng = np.random.default_rng(seed)
    names = [f"{i:03d}.class_{i}" for i in range(classes)]
    for name in names:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            long_side = int(short_side * rng.uniform(1.0, 1.6))
            size = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
            photo_like(*size, rng).save(folder / f"img_{i:04d}.jpg", quality=90)
    (root / contract.LABELS_FILE).write_text(json.dumps(names))
    return root


def _one_pass(loader, consume, epoch: int) -> float:
    """Images/s of one pass over ``loader`` (its sampler set to ``epoch`` when it has one)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    start = time.perf_counter()
    count = 0
    for images, _labels in loader:
        consume(images)
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def fast_arm(root: Path, batch_size: int, size: int, workers: int):
    """Pipeline (a): ``entrypoints.data`` as train.py uses it on a CPU, ending in a normalised float batch."""
    class_names = data.read_class_names(root)
    index = data.scan_channel(root, class_names)
    dataset = data.ImageDataset(index.samples, size, round(size * 256 / 224), train=True, seed=0)
    loader = data.make_loader(dataset, batch_size, shuffle=True, workers=workers, pin_memory=False, seed=0)
    normalize = data.BatchNormalizer(contract.IMAGENET_MEAN, contract.IMAGENET_STD, "cpu", reuse_output=True)

    def consume(images: torch.Tensor) -> None:
        out = normalize(images)
        assert out.dtype == torch.float32 and out.shape[-1] == size

    return lambda epoch: _one_pass(loader, consume, epoch)


def baseline_arm(root: Path, batch_size: int, size: int):
    """Pipeline (b): the notebooks' ImageFolder + PIL + per-image transforms, ``num_workers=0``."""
    from torchvision import datasets
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(contract.IMAGENET_MEAN, contract.IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)

    def consume(images: torch.Tensor) -> None:
        assert images.dtype == torch.float32 and images.shape[-1] == size

    return lambda epoch: _one_pass(loader, consume, epoch)


def interleaved_best(arms: dict[str, object], passes: int) -> dict[str, float]:
    """One warm-up pass per arm, then ``passes`` rounds that run every arm once; the best pass of each counts.

    Interleaving puts the arms under the same background load, which matters on a shared machine.
    """
    for arm in arms.values():
        arm(0)
    best = dict.fromkeys(arms, 0.0)
    for epoch in range(1, passes + 1):
        for name, arm in arms.items():
            best[name] = max(best[name], arm(epoch))
    return best


def bench_model(
    root: Path, arch: str, batch_size: int, size: int, workers: int, batches: int, amp_channels_last: bool
) -> float:
    """Training images/s of ``arch`` fed by the fast pipeline, float32/NCHW or AMP + channels_last."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    class_names = data.read_class_names(root)
    index = data.scan_channel(root, class_names)
    dataset = data.ImageDataset(index.samples, size, round(size * 256 / 224), train=True, seed=0)
    loader = data.make_loader(
        dataset, batch_size, shuffle=True, workers=workers, pin_memory=device.type == "cuda", drop_last=True
    )
    normalize = data.BatchNormalizer(contract.IMAGENET_MEAN, contract.IMAGENET_STD, device, amp_channels_last)
    config = modeling.ModelConfig(arch, len(class_names), class_names, input_size=size)
    model = modeling.build_model(config, weights="none").to(device)
    modeling.freeze_backbone(model, arch, None)
    if amp_channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        amp_dtype = torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_channels_last and amp_dtype == torch.float16)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        inputs = normalize(images)
        targets = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_channels_last):
            loss = criterion(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def run(steps: int) -> float:
        done, epoch = 0, 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        while done < steps:
            loader.sampler.set_epoch(epoch)
            for images, labels in loader:
                step(images, labels)
                done += 1
                if done == steps:
                    break
            epoch += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * batch_size / (time.perf_counter() - start)

    run(max(2, batches // 4))  # warm-up: cudnn autotuning, worker start-up
    return run(batches)


def process_counts(text: str) -> list[int]:
    """``1,2`` or ``1,all`` (every GPU, else every CPU) -> sorted distinct counts, starting with 1."""
    every = torch.cuda.device_count() or contract.available_cpus()
    counts = {every if item.strip() == "all" else int(item) for item in text.split(",") if item.strip()}
    if not counts or min(counts) < 1:
        raise SystemExit(f"--processes: expected counts such as 1,2 or 1,all, got {text!r}")
    return sorted(counts | {1})


def bench_processes(train_dir: Path, valid_dir: Path, processes: int, args: argparse.Namespace, scratch: Path):
    """Train-loop images/s of ``entrypoints/train.py`` under torchrun with ``processes`` processes."""
    out = scratch / f"run-{processes}"
    threads = max(1, contract.available_cpus() // processes)
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)),
        str(REPO / "entrypoints" / "train.py"),
        *("--train-dir", str(train_dir), "--valid-dir", str(valid_dir)),
        *("--model-dir", str(out / "model"), "--output-data-dir", str(out / "output")),
        *("--checkpoint-dir", "none", "--tensorboard-dir", "none", "--weights", "none"),
        *("--architecture", args.model_arch, "--trainable-blocks", "all", "--input-size", str(args.size)),
        *("--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--lr-scaling", "linear"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "SAGEMAKER_"))}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH="")  # torchrun would set 1 thread per process
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log = (done.stdout + done.stderr)[-3000:]
        raise SystemExit(f"{processes} processes failed (exit {done.returncode}):\n{log}")
    history = json.loads((out / "output" / "training_history.json").read_text())
    rates = history["images_per_second"][1:] or history["images_per_second"]
    print(
        f"{processes} process(es), {threads} thread(s) each: {sum(rates) / len(rates):.1f} train images/s "
        f"(epochs {[round(r, 1) for r in history['images_per_second']]}, {time.perf_counter() - start:.0f} s in all)",
        flush=True,
    )
    return sum(rates) / len(rates)


def run_process_bench(args: argparse.Namespace, scratch: Path) -> int:
    counts = process_counts(args.processes)
    root = Path(args.data_dir) if args.data_dir else scratch / "data"
    train_dir, valid_dir = root / "train", root / "valid"
    if not (train_dir / contract.LABELS_FILE).is_file():
        write_dataset(train_dir, 10, max(1, math.ceil(args.images / 10)), args.short_side)
        write_dataset(valid_dir, 10, 2, args.short_side, seed=1)
    device = f"cuda x{torch.cuda.device_count()}" if torch.cuda.is_available() else f"{contract.available_cpus()} CPUs"
    print(
        f"machine: {device}, torch {torch.__version__}; {args.model_arch} at {args.size}, {args.images} images, "
        f"batch {args.batch_size} per process, {args.epochs} epochs (the first is warm-up)",
        flush=True,
    )
    rates = {count: bench_processes(train_dir, valid_dir, count, args, scratch) for count in counts}
    largest = counts[-1]
    ratio = rates[largest] / rates[1]
    print(f"scaling efficiency with {largest} processes: {ratio / largest:.2f} (1.00 = linear)")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (other processes share these CPUs)")
    print(f"train images/s {largest} procs: {rates[largest]:.1f} vs 1 proc {rates[1]:.1f} ratio={ratio:.2f}")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--images", type=int, default=640, help="images to generate (10 classes)")
    parser.add_argument("--short-side", type=int, default=256, help="short side of the generated JPEGs")
    parser.add_argument(
        "--size", type=int, default=None, help="training crop (default 224; 112 for --processes without a GPU)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--workers", default="auto", help="workers of pipeline (a); 'auto' = one per CPU")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per arm after one warm-up pass")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the main process (both)")
    parser.add_argument("--data-dir", default=None, help="reuse/keep the generated images here (default: temporary)")
    parser.add_argument("--with-model", action="store_true", help="also time model training steps (GPU)")
    parser.add_argument(
        "--model-arch", default=None, help="network: resnet50 for --with-model, resnet18 for --processes (default)"
    )
    parser.add_argument("--model-batches", type=int, default=40, help="timed training steps per --with-model arm")
    parser.add_argument(
        "--processes", default=None, help="time train.py under torchrun with these process counts, e.g. 1,2 or 1,all"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs per --processes run (the first is warm-up)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    small = args.processes and not torch.cuda.is_available()  # a CPU trains a big network at 224 for many minutes
    args.size = args.size or (112 if small else 224)
    args.model_arch = args.model_arch or ("resnet18" if args.processes else "resnet50")
    if args.processes:
        with tempfile.TemporaryDirectory() as scratch:
            return run_process_bench(args, Path(scratch))
    torch.set_num_threads(args.threads)
    workers = data.auto_workers() if args.workers == "auto" else int(args.workers)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.data_dir) if args.data_dir else Path(scratch) / "train"
        if not (root / contract.LABELS_FILE).is_file():
            per_class = max(1, math.ceil(args.images / 10))
            start = time.perf_counter()
            write_dataset(root, 10, per_class, args.short_side)
            print(f"wrote {10 * per_class} JPEGs (short side {args.short_side}) in {time.perf_counter() - start:.1f}s")
        print(
            f"machine: {contract.available_cpus()} CPUs, torch {torch.__version__}, "
            f"crop {args.size}, batch {args.batch_size}, main-process threads {args.threads}"
        )
        arms = {
            "fast": fast_arm(root, args.batch_size, args.size, workers),
            "fast_serial": fast_arm(root, args.batch_size, args.size, 0),
            "baseline": baseline_arm(root, args.batch_size, args.size),
        }
        rates = interleaved_best(arms, args.passes)
        fast, baseline = rates["fast"], rates["baseline"]
        print(f"(a) entrypoints/data.py, {workers} workers: {fast:.0f} images/s")
        print(f"    same pipeline, 0 workers (decode/crop work alone): {rates['fast_serial']:.0f} images/s")
        print(f"(b) ImageFolder + PIL + per-image transforms, 0 workers: {baseline:.0f} images/s")
        print(f"load average during the run: {os.getloadavg()[0]:.1f} (other processes share these CPUs)")
        if args.with_model:
            device = "cuda " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no GPU)"
            plain = bench_model(root, args.model_arch, args.batch_size, args.size, workers, args.model_batches, False)
            fast_model = bench_model(
                root, args.model_arch, args.batch_size, args.size, workers, args.model_batches, True
            )
            print(f"{args.model_arch} training on {device}: fp32 NCHW {plain:.0f} images/s")
            print(f"{args.model_arch} training on {device}: AMP + channels_last {fast_model:.0f} images/s")
            ratio = fast_model / plain
            print(f"{args.model_arch} train images/s: {fast_model:.0f} vs baseline {plain:.0f} ratio={ratio:.2f}")
    print(f"train input images/s: {fast:.0f} vs baseline {baseline:.0f} ratio={fast / baseline:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
