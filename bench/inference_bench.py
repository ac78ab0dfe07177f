"""Single-image latency of the serving handlers vs the notebooks' handler, on a 2-thread CPU.

Serves a ResNet50 artifact (133 classes, random weights made to behave like a trained network, see
``make_model``) and times ``input_fn -> predict_fn -> output_fn`` on photo-sized JPEGs (1600x1200, made from
the sample photos scikit-learn and matplotlib ship), side by side, request by request, with a baseline done the
notebooks' way: ``PIL.Image.open`` + ``convert("RGB")``, torchvision ``Resize(256)`` / ``CenterCrop(224)`` /
``ToTensor`` / ``Normalize``, eager fp32 ``model(x)`` under ``torch.no_grad()``, softmax, top-5 to JSON.

It also serves the same artifact with full-size JPEG decoding (``INFERENCE_JPEG_DRAFT_FACTOR=0``), to show
what the reduced-size decoding buys and what it changes, and prints per image the largest probability
difference from the baseline (all 133 classes) and whether the top-1 class agrees. For scale it prints how much
the baseline's own probabilities move when its input gets +-0.5 grey levels of noise.

    python bench/inference_bench.py                 # about 30 s on 2 idle cores
    python bench/inference_bench.py --repeats 5     # quicker, noisier

The last line reads ``inference p50 ms: <served> vs baseline <baseline> ratio=<baseline/served>``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from entrypoints import contract, inference, modeling  # noqa: E402

NUM_CLASSES = 133
PHOTO_SIZE = (1600, 1200)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed requests per image and handler")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per image and handler first")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every handler (2 vCPUs)")
    parser.add_argument("--architecture", default="resnet50", help="network of the served artifact")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and the photo grain")
    return parser


# --- test images ----------------------------------------------------------------------------------------------


def sample_photos() -> list[Path]:
    """Real photographs that installed packages ship (scikit-learn's china/flower, matplotlib's Grace Hopper)."""
    found = []
    try:
        import sklearn.datasets

        folder = Path(sklearn.datasets.__file__).parent / "images"
        found += [folder / "china.jpg", folder / "flower.jpg"]
    except ImportError:
        pass
    try:
        import matplotlib

        found.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except ImportError:
        pass
    return [path for path in found if path.is_file()]


def photo_jpegs(seed: int) -> list[tuple[str, bytes]]:
    """1600x1200 JPEGs (quality 90, 4:2:0) of each sample photo and its mirror image.

    The photos are cropped to 4:3, upscaled with Lanczos and given a little film grain (sigma 3 grey levels),
    so the files have the size and entropy of camera photos (~0.4-0.6 MB), not of smooth upscales.
    """
    rng = np.random.default_rng(seed)
    sources = sample_photos()
    if not sources:
        raise SystemExit("no sample photos found: install scikit-learn or matplotlib (both are project requirements)")
    jpegs = []
    for mirror in (False, True):
        for path in sources:
            image = Image.open(path).convert("RGB")
            if mirror:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            width, height = image.size
            crop_width = min(width, height * 4 // 3)
            crop_height = crop_width * 3 // 4
            left, top = (width - crop_width) // 2, (height - crop_height) // 2
            image = image.crop((left, top, left + crop_width, top + crop_height)).resize(PHOTO_SIZE, Image.LANCZOS)
            grain = rng.normal(0.0, 3.0, (PHOTO_SIZE[1], PHOTO_SIZE[0], 1))
            pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
            jpegs.append((f"{path.stem}{'-mirrored' if mirror else ''}", buffer.getvalue()))
    return jpegs


# --- the model --------------------------------------------------------------------------------------------------


def make_model(architecture: str, seed: int, calibration: torch.Tensor) -> tuple[torch.nn.Module, modeling.ModelConfig]:
    """Random weights, adjusted so the network behaves like a trained one where the comparison needs it.

    A freshly initialised network is a poor stand-in: its batch-norm layers hold mean 0 / variance 1 (so in
    eval mode activations drift layer after layer), its 7x7 stem filters are white noise (so it reacts to single
    grey levels the way no trained network does), and its head gives near-uniform probabilities over 133
    classes (so every probability difference looks tiny). Here: the stem filters are smoothed with a Gaussian
    (sigma 1.5 px, as trained first-layer filters are smooth), each residual branch's last batch-norm scale is
    set to 0.2 (trained ResNets keep these small; torchvision's ``zero_init_residual`` starts them at 0),
    batch-norm statistics are calibrated on crops of the sample photos, and the head is scaled so logits spread
    with a standard deviation of 3 across classes (top-1 probabilities of roughly 0.2-0.7, like a trained
    classifier that is not sure).
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    torch.manual_seed(seed)
    names = [f"{i + 1:03d}.Class_{i + 1:03d}" for i in range(NUM_CLASSES)]
    config = modeling.ModelConfig(architecture, NUM_CLASSES, names)
    model = modeling.build_model(config)
    stem = next(module for module in model.modules() if isinstance(module, torch.nn.Conv2d))
    with torch.no_grad():
        size = stem.kernel_size[0]
        offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        kernel = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
        kernel /= kernel.sum()
        weight = stem.weight
        flat = weight.reshape(-1, 1, size, size)
        smoothed = F.conv2d(F.pad(flat, [size // 2] * 4, mode="reflect"), kernel[None, None]).reshape(weight.shape)
        weight.copy_(smoothed * (weight.std() / smoothed.std()))
    for module in model.modules():
        last_norm = (
            module.bn3 if isinstance(module, Bottleneck) else module.bn2 if isinstance(module, BasicBlock) else None
        )
        if last_norm is not None:
            with torch.no_grad():
                last_norm.weight.fill_(0.2)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(calibration)
    model.eval()
    head = modeling.head_module(model, architecture)[-1]
    with torch.no_grad():
        spread = model(calibration).std(dim=1).mean().item()
        head.weight.mul_(3.0 / spread)
        head.bias.mul_(3.0 / spread)
    return model, config


def calibration_batch(config_transform: T.Compose, seed: int) -> torch.Tensor:
    """Eight random crops of each sample photo, normalised: what batch-norm statistics are calibrated on."""
    torch.manual_seed(seed)
    crops = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), config_transform])
    batch = []
    for path in sample_photos():
        image = Image.open(path).convert("RGB")
        batch += [crops(image) for _ in range(8)]
    return torch.stack(batch)


# --- handlers ---------------------------------------------------------------------------------------------------


def baseline_handler(model: torch.nn.Module) -> tuple[Callable[[bytes], str], Callable[[bytes], np.ndarray]]:
    """The notebooks' handler: full decode, torchvision transforms, eager fp32 under no_grad."""
    transform = T.Compose(
        [
            T.Resize(256),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    names = [f"{i + 1:03d}.Class_{i + 1:03d}" for i in range(NUM_CLASSES)]

    def probabilities(body: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(body)).convert("RGB")
        with torch.no_grad():
            return F.softmax(model(transform(image).unsqueeze(0)), dim=1)[0].numpy()

    def handle(body: bytes) -> str:
        image = Image.open(io.BytesIO(body)).convert("RGB")
        tensor = transform(image).unsqueeze(0)
        with torch.no_grad():
            output = model(tensor)
        top = F.softmax(output, dim=1).topk(5)
        return json.dumps(
            [
                {"class": names[i], "probability": p}
                for p, i in zip(top.values[0].tolist(), top.indices[0].tolist(), strict=True)
            ]
        )

    return handle, probabilities


def served_handler(
    artifact: Path, draft_factor: str | None
) -> tuple[Callable[[bytes], str], Callable[[bytes], np.ndarray], str]:
    """The project's handlers on the artifact, as the serving toolkit chains them."""
    if draft_factor is None:
        os.environ.pop(contract.ENV_JPEG_DRAFT_FACTOR, None)
    else:
        os.environ[contract.ENV_JPEG_DRAFT_FACTOR] = draft_factor
    serving = inference.load_serving_model(artifact)

    def handle(body: bytes) -> str:
        data = inference.decode_request(body, "image/jpeg", serving.preprocess)
        prediction = inference.predict_fn(data, serving)
        return inference.output_fn(prediction, "application/json")[0]

    def probabilities(body: bytes) -> np.ndarray:
        data = inference.decode_request(body, "image/jpeg", serving.preprocess)
        logits = serving.logits(data.images)
        return torch.softmax(torch.from_numpy(logits), dim=1)[0].numpy()

    return handle, probabilities, serving.runtime


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ[contract.ENV_INFERENCE_THREADS] = str(args.threads)
    images = photo_jpegs(args.seed)
    normalize = T.Compose([T.ToTensor(), T.Normalize(contract.IMAGENET_MEAN, contract.IMAGENET_STD)])
    model, config = make_model(args.architecture, args.seed, calibration_batch(normalize, args.seed))
    sizes = ", ".join(f"{name} {len(body) / 1e6:.2f} MB" for name, body in images)
    print(f"{len(images)} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}: {sizes}")

    with tempfile.TemporaryDirectory() as folder:
        artifact = modeling.save_artifact(model, Path(folder) / "model", config)
        handlers: dict[str, Callable[[bytes], str]] = {}
        full_probabilities: dict[str, Callable[[bytes], np.ndarray]] = {}
        handlers["baseline"], full_probabilities["baseline"] = baseline_handler(model)
        start = time.perf_counter()
        handlers["served"], full_probabilities["served"], runtime = served_handler(artifact, None)
        print(f"served: runtime {runtime}, model_fn took {time.perf_counter() - start:.1f} s")
        handlers["served-full-decode"], full_probabilities["served-full-decode"], _ = served_handler(artifact, "0")
        os.environ.pop(contract.ENV_JPEG_DRAFT_FACTOR, None)

        # Answers first (untimed): every class's probability, per image, against the baseline's.
        reference = {name: full_probabilities["baseline"](body) for name, body in images}
        for handler in ("served", "served-full-decode"):
            differences, agree = [], []
            for name, body in images:
                probabilities = full_probabilities[handler](body)
                differences.append(float(np.abs(probabilities - reference[name]).max()))
                agree.append(int(probabilities.argmax()) == int(reference[name].argmax()))
            print(
                f"{handler}: largest probability difference {max(differences):.2e} "
                f"(per image {', '.join(f'{d:.1e}' for d in differences)}); "
                f"top-1 agrees on {sum(agree)}/{len(agree)} images: {'yes' if all(agree) else 'NO'}"
            )
        top1 = [float(reference[name].max()) for name, _ in images]
        print(f"baseline top-1 probabilities: {', '.join(f'{p:.2f}' for p in top1)}")
        generator = torch.Generator().manual_seed(args.seed)
        noise_floor = 0.0
        transform = T.Compose([T.Resize(256), T.CenterCrop(224), normalize])
        for name, body in images:
            tensor = transform(Image.open(io.BytesIO(body)).convert("RGB")).unsqueeze(0)
            noise = (
                (torch.rand(tensor.shape, generator=generator) * 2 - 1)
                * (0.5 / 255)
                / torch.tensor(contract.IMAGENET_STD).view(1, 3, 1, 1)
            )
            with torch.no_grad():
                moved = F.softmax(model(tensor + noise), dim=1)[0].numpy()
            noise_floor = max(noise_floor, float(np.abs(moved - reference[name]).max()))
        print(f"for scale: +-0.5 grey levels of noise moves the baseline's probabilities by up to {noise_floor:.2e}")

        # Latency: handlers interleaved request by request, so machine noise hits them alike.
        for _ in range(args.warmup):
            for _, body in images:
                for handle in handlers.values():
                    handle(body)
        timings: dict[str, list[float]] = {name: [] for name in handlers}
        for _ in range(args.repeats):
            for _, body in images:
                for handler, handle in handlers.items():
                    start = time.perf_counter()
                    handle(body)
                    timings[handler].append((time.perf_counter() - start) * 1000)
    for handler, values in timings.items():
        print(
            f"{handler}: p50 {statistics.median(values):.1f} ms, p95 {percentile(values, 95):.1f} ms "
            f"over {len(values)} requests"
        )
    served = statistics.median(timings["served"])
    baseline = statistics.median(timings["baseline"])
    print(f"inference p50 ms: {served:.1f} vs baseline {baseline:.1f} ratio={baseline / served:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
