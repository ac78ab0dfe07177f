"""Serving speed side by side: the handlers (fp32 and int8) against the notebooks' handler, HTTP throughput with
dynamic batching on and off, and what reduced-size JPEG decoding does to a trained model's answers.

1. Handler latency on a 2-thread CPU. A ResNet50 artifact (133 classes, random weights made to behave like a
   trained network, see ``make_model``) answers photo-sized JPEGs (1600x1200, made from the sample photos that
   scikit-learn and matplotlib ship) through ``input_fn -> predict_fn -> output_fn``, request by request, beside
   the notebooks' way: ``PIL.Image.open`` + ``convert("RGB")``, torchvision ``Resize(256)`` / ``CenterCrop(224)``
   / ``ToTensor`` / ``Normalize``, eager fp32 under ``torch.no_grad()``, softmax, top-5 to JSON. Served: fp32 (the
   fastest runtime that matches eager), int8 (the evaluation step's quantisation, calibrated on crops of the
   photos), and fp32 with full-size JPEG decoding. The runtimes are compared with eager on the same decoded
   tensor (fp32 must be within 1e-4).
2. HTTP throughput through the served app (the int8 artifact on the local endpoint's light host, as
   ``local --approve`` runs it) at concurrency 1 and 8, with dynamic batching on (the defaults) and off
   (``INFERENCE_MAX_BATCH_SIZE=1``), in alternating rounds.
3. Reduced-size decoding judged by what users see: the demo's digits model (trained here on a shrunk train split,
   or ``--demo-model`` with ``--demo-test-dir``, e.g. a ``local`` run's) answers its test split as photo-sized
   JPEGs with full and with reduced decoding: top-1 agreement (>= 99%) and accuracy delta (<= 0.5 points). Its
   int8 network (calibrated on the validation split) is scored beside fp32 too.

    python bench/inference_bench.py                     # a few minutes on 2 idle cores
    python bench/inference_bench.py --repeats 5 --no-demo

The last line reads ``inference p50 ms: <int8 served> vs baseline <baseline> ratio=<baseline/int8 served>``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
DEMO_TRAIN_PER_CLASS = 30  # the demo model trained here: a shrunk train split...
DEMO_EPOCHS = 6  # ... for a few epochs (seconds to minutes on 2 cores)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed requests per image and handler")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per image and handler first")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every handler (2 vCPUs)")
    parser.add_argument("--architecture", default="resnet50", help="network of the served artifact")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and the photo grain")
    parser.add_argument("--rounds", type=int, default=2, help="HTTP rounds, batching on and off alternating")
    parser.add_argument("--requests", type=int, default=48, help="HTTP requests per round at concurrency 8")
    parser.add_argument("--no-http", dest="http", action="store_false", help="skip the HTTP throughput part")
    parser.add_argument("--no-demo", dest="demo", action="store_false", help="skip the demo model part")
    parser.add_argument("--demo-model", type=Path, default=None, help="a demo model artifact (folder or .tar.gz)")
    parser.add_argument("--demo-test-dir", type=Path, default=None, help="its test split (<class>/<image>)")
    parser.add_argument("--demo-valid-dir", type=Path, default=None, help="its validation split (int8 calibration)")
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
    artifact: Path, draft_factor: str | None, precision: str = "fp32"
) -> tuple[Callable[[bytes], str], Callable[[bytes], np.ndarray], inference.ServingModel]:
    """The project's handlers on the artifact, as the serving toolkit chains them."""
    if draft_factor is None:
        os.environ.pop(contract.ENV_JPEG_DRAFT_FACTOR, None)
    else:
        os.environ[contract.ENV_JPEG_DRAFT_FACTOR] = draft_factor
    serving = inference.load_serving_model(artifact, precision=precision)

    def handle(body: bytes) -> str:
        data = inference.decode_request(body, "image/jpeg", serving.preprocess)
        prediction = inference.predict_fn(data, serving)
        return inference.output_fn(prediction, "application/json")[0]

    def probabilities(body: bytes) -> np.ndarray:
        return serving.probabilities(inference.decode_request(body, "image/jpeg", serving.preprocess).images)[0]

    return handle, probabilities, serving


def int8_artifact(artifact: Path, folder: Path, seed: int) -> Path:
    """The artifact plus an int8 network built by the evaluation step's own code, calibrated on photo crops."""
    sys.path.insert(0, str(ROOT / "steps"))
    import evaluate  # steps/evaluate.py: the code the Evaluate step runs

    config = modeling.read_model_config(artifact)
    valid = folder / "calibration"
    torch.manual_seed(seed)
    crops = T.Compose([T.RandomResizedCrop(config.input_size, scale=(0.2, 1.0)), T.RandomHorizontalFlip()])
    (valid / config.class_names[0]).mkdir(parents=True)
    for index, path in enumerate(sample_photos() * 8):
        crops(Image.open(path).convert("RGB")).save(valid / config.class_names[0] / f"crop_{index:03d}.png")
    args = evaluate.get_args_parser().parse_args(["--valid-dir", str(valid), "--calibration-images", "64"])
    preprocess = inference.Preprocessor(config)
    plan = evaluate.build_int8(args, inference, artifact, preprocess, folder)
    if plan.path is None:
        raise SystemExit(f"int8 could not be built: {plan.reason}")
    served = folder / "served"
    shutil.copytree(artifact, served)
    shutil.copy2(plan.path, served / contract.INT8_MODEL_FILE)
    decision = {"precision": "int8", "reason": "the bench serves int8", "int8_model": contract.INT8_MODEL_FILE}
    (served / contract.SERVING_DECISION_FILE).write_text(json.dumps(decision))
    return served


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# --- 1. the handlers ----------------------------------------------------------------------------------------------


def compare_answers(images: list[tuple[str, bytes]], probabilities: dict[str, Callable[[bytes], np.ndarray]]) -> None:
    """Per handler: the largest probability difference from the baseline (all classes) and top-1 agreement."""
    reference = {name: probabilities["baseline"](body) for name, body in images}
    for handler in [name for name in probabilities if name != "baseline"]:
        differences, agree = [], []
        for name, body in images:
            answer = probabilities[handler](body)
            differences.append(float(np.abs(answer - reference[name]).max()))
            agree.append(int(answer.argmax()) == int(reference[name].argmax()))
        print(
            f"{handler}: largest probability difference from the baseline {max(differences):.2e}; "
            f"top-1 agrees on {sum(agree)}/{len(agree)} images"
        )


def compare_runtimes(model: torch.nn.Module, servings: dict[str, inference.ServingModel], tensor: np.ndarray) -> None:
    """Each runtime against eager PyTorch on the same decoded tensor: the fp32 criterion is 1e-4."""
    with torch.no_grad():
        eager = torch.softmax(model(torch.from_numpy(tensor)), dim=1).numpy()
    for name, serving in servings.items():
        difference = float(np.abs(serving.probabilities(tensor) - eager).max())
        verdict = f"within 1e-4: {'yes' if difference <= 1e-4 else 'NO'}" if serving.precision == "fp32" else ""
        print(f"{name} ({serving.runtime}) vs eager on the same tensor: {difference:.2e} {verdict}")


def time_handlers(handlers: dict[str, Callable[[bytes], str]], images: list, repeats: int, warmup: int) -> dict:
    """Milliseconds per request and handler, interleaved request by request so machine noise hits them alike."""
    for _ in range(warmup):
        for _, body in images:
            for handle in handlers.values():
                handle(body)
    timings: dict[str, list[float]] = {name: [] for name in handlers}
    for _ in range(repeats):
        for _, body in images:
            for handler, handle in handlers.items():
                started = time.perf_counter()
                handle(body)
                timings[handler].append((time.perf_counter() - started) * 1000)
    for handler, values in timings.items():
        print(f"{handler}: p50 {statistics.median(values):.1f} ms, p95 {percentile(values, 95):.1f} ms")
    return timings


# --- 2. HTTP throughput -------------------------------------------------------------------------------------------


def http_throughput(served: Path, folder: Path, images: list, rounds: int, requests: int) -> None:
    """Images per second and p50 through the light host at concurrency 1 and 8, batching on and off."""
    from bench.endpoint_load import post
    from pipelines.serving import endpoint
    from pipelines.util import fsutil

    tarball = fsutil.make_tarball(served, folder / "served.tar.gz")
    settings = {"batching on": {}, "batching off": {contract.ENV_SERVE_MAX_BATCH_SIZE: "1"}}
    ports = {}
    for version, (name, environment) in enumerate(settings.items(), start=1):
        package = {
            "ModelPackageArn": f"arn:aws:sagemaker:us-east-1:000000000000:model-package/bench/{version}",
            "ModelPackageGroupName": "bench",
            "ModelPackageVersion": version,
            "InferenceSpecification": {"Containers": [{"ModelDataUrl": tarball.as_uri(), "Environment": environment}]},
        }
        ports[name] = int(endpoint.deploy(folder / "workdir", f"bench-{version}", package, port=0)["port"])
    results: dict[tuple[str, int], list[tuple[float, list[float]]]] = {}
    bodies = [body for _, body in images]
    try:
        for _ in range(rounds):
            for clients in (1, 8):
                for name, port in ports.items():
                    count = requests if clients > 1 else requests // 2
                    for _ in range(2 * clients):  # warm
                        post(port, bodies[0], "image/jpeg")
                    started = time.perf_counter()
                    with ThreadPoolExecutor(clients) as pool:
                        answers = list(
                            pool.map(
                                lambda i, port=port: post(port, bodies[i % len(bodies)], "image/jpeg"), range(count)
                            )
                        )
                    seconds = time.perf_counter() - started
                    if any(status != 200 for status, _ in answers):
                        raise SystemExit(f"{name}: requests failed: {sorted({status for status, _ in answers})}")
                    results.setdefault((name, clients), []).append((count / seconds, [ms for _, ms in answers]))
    finally:
        for version in range(1, len(settings) + 1):
            endpoint.stop(folder / "workdir", f"bench-{version}")
    summary = {}
    for (name, clients), runs in results.items():
        rate = statistics.median(rate for rate, _ in runs)
        p50 = statistics.median(ms for _, latencies in runs for ms in latencies)
        summary[(name, clients)] = (rate, p50)
        print(f"HTTP {name}, concurrency {clients}: {rate:.1f} images/s, p50 {p50:.1f} ms")
    on8, off8 = summary[("batching on", 8)][0], summary[("batching off", 8)][0]
    cost = summary[("batching on", 1)][1] - summary[("batching off", 1)][1]
    print(f"concurrency 8: batching on gives {on8 / off8:.2f}x the images/s of batching off (target >= 1.3)")
    print(
        f"concurrency 1: batching costs {cost:+.1f} ms at p50 "
        f"(target <= the {contract.DEFAULT_BATCH_WAIT_MS:g} ms wait + 2 ms)"
    )


# --- 3. the demo model: reduced-size decoding and int8 ----------------------------------------------------------


def demo_model(folder: Path, args: argparse.Namespace) -> tuple[Path, Path, Path, str]:
    """(artifact, test split, validation split, how it was made): the given one, or one trained here."""
    if args.demo_model:
        if not (args.demo_test_dir and args.demo_valid_dir):
            raise SystemExit("--demo-model needs --demo-test-dir and --demo-valid-dir")
        artifact = args.demo_model
        if artifact.is_file():
            from pipelines.util import fsutil

            fsutil.safe_extract_tarball(artifact, folder / "demo-model")
            artifact = folder / "demo-model"
        return artifact, args.demo_test_dir, args.demo_valid_dir, f"from {args.demo_model}"
    from entrypoints import train
    from pipelines import demo_data

    splits = demo_data.write_digit_splits(folder / "digits")
    for class_folder in sorted(path for path in splits["train"].iterdir() if path.is_dir()):
        for extra in sorted(class_folder.iterdir())[DEMO_TRAIN_PER_CLASS:]:
            extra.unlink()
    flags = ["--train-dir", str(splits["train"]), "--valid-dir", str(splits["valid"])]
    flags += ["--model-dir", str(folder / "demo-model"), "--output-data-dir", str(folder / "demo-output")]
    flags += ["--checkpoint-dir", "none", "--tensorboard-dir", "none", "--architecture", "resnet18"]
    flags += ["--weights", "none", "--input-size", "32", "--epochs", str(DEMO_EPOCHS), "--batch-size", "16"]
    flags += ["--lr", "0.003", "--horizontal-flip", "false", "--trainable-blocks", "all", "--workers", "0"]
    print(f"training the demo model (resnet18, 32 px) on {DEMO_TRAIN_PER_CLASS} digits per class...", flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
        if train.main(flags) != 0:
            raise SystemExit("training the demo model failed")
    made = f"trained here on {10 * DEMO_TRAIN_PER_CLASS} digits for {DEMO_EPOCHS} epochs"
    return folder / "demo-model", splits["test"], splits["valid"], made


def demo_decoding_and_int8(folder: Path, args: argparse.Namespace) -> None:
    from pipelines import demo_data

    artifact, test_dir, valid_dir, made = demo_model(folder, args)
    class_names = modeling.read_model_config(artifact).class_names
    samples = sorted((path, class_names.index(path.parent.name)) for path in test_dir.glob("*/*") if path.is_file())
    labels = np.array([label for _, label in samples])
    serving = inference.load_serving_model(artifact, precision="fp32")
    config = serving.config
    decoders = {
        "full": inference.Preprocessor(config, draft_factor=0),
        "reduced": inference.Preprocessor(config, draft_factor=inference.DEFAULT_JPEG_DRAFT_FACTOR),
    }
    native = np.stack([decoders["full"](path.read_bytes()) for path, _ in samples])
    photos = [demo_data.photo_jpeg(path.read_bytes(), PHOTO_SIZE, seed) for seed, (path, _) in enumerate(samples)]
    top1 = {name: serving.logits(np.stack([d(photo) for photo in photos])).argmax(1) for name, d in decoders.items()}
    accuracy = {name: float(np.mean(answers == labels)) for name, answers in top1.items()}
    agreement = float(np.mean(top1["full"] == top1["reduced"]))
    delta = 100 * (accuracy["reduced"] - accuracy["full"])
    print(
        f"demo digits model ({made}); its test split, {len(samples)} images, as {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs:"
    )
    print(
        f"  top-1 agreement of reduced-size with full decoding {100 * agreement:.1f}% (criterion >= 99%); accuracy "
        f"{accuracy['full']:.4f} full, {accuracy['reduced']:.4f} reduced: {delta:+.2f} points (criterion <= 0.5)"
    )
    sys.path.insert(0, str(ROOT / "steps"))
    import evaluate

    plan = evaluate.build_int8(
        evaluate.get_args_parser().parse_args(["--valid-dir", str(valid_dir)]),
        inference,
        artifact,
        decoders["full"],
        folder,
    )
    if plan.path is None:
        print(f"  int8: not built: {plan.reason}")
        return
    int8 = inference.onnxruntime_forward(plan.path, config.input_size, args.threads)
    fp32_accuracy = float(np.mean(serving.logits(native).argmax(1) == labels))
    int8_answers = int8(native).argmax(1)
    _, reason = evaluate.int8_gate(fp32_accuracy, float(np.mean(int8_answers == labels)), 1.0)
    print(f"  int8 on its test split as stored: {reason}")


# --- main ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ[contract.ENV_INFERENCE_THREADS] = str(args.threads)
    os.environ.pop(contract.ENV_INFERENCE_PRECISION, None)
    images = photo_jpegs(args.seed)
    normalize = T.Compose([T.ToTensor(), T.Normalize(contract.IMAGENET_MEAN, contract.IMAGENET_STD)])
    model, config = make_model(args.architecture, args.seed, calibration_batch(normalize, args.seed))
    sizes = ", ".join(f"{name} {len(body) / 1e6:.2f} MB" for name, body in images)
    print(f"{len(images)} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}: {sizes}; load average {load_average()}")

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        artifact = modeling.save_artifact(model, folder / "model", config)
        started = time.perf_counter()
        served = int8_artifact(artifact, folder, args.seed)
        print(f"int8 network built in {time.perf_counter() - started:.1f} s", flush=True)
        handlers, probabilities, servings = {}, {}, {}
        handlers["baseline"], probabilities["baseline"] = baseline_handler(model)
        for name, source, draft, precision in (
            ("served fp32", artifact, None, "fp32"),
            ("served int8", served, None, "int8"),
            ("served fp32 full decode", artifact, "0", "fp32"),
        ):
            handlers[name], probabilities[name], servings[name] = served_handler(source, draft, precision)
        os.environ.pop(contract.ENV_JPEG_DRAFT_FACTOR, None)
        print(f"runtimes: fp32 {servings['served fp32'].runtime}, int8 {servings['served int8'].runtime}")
        compare_answers(images, probabilities)
        tensor = inference.decode_request(images[0][1], "image/jpeg", servings["served fp32"].preprocess).images
        compare_runtimes(model, {n: servings[n] for n in ("served fp32", "served int8")}, tensor)
        timings = time_handlers(handlers, images, args.repeats, args.warmup)
        if args.http:
            http_throughput(served, folder, images, args.rounds, args.requests)
        if args.demo:
            demo_decoding_and_int8(folder, args)
    baseline = statistics.median(timings["baseline"])
    fp32, int8 = statistics.median(timings["served fp32"]), statistics.median(timings["served int8"])
    print(f"targets: int8 {baseline / int8:.2f}x the baseline (>= 3.5), fp32 {baseline / fp32:.2f}x (>= 2.2)")
    print(f"load average at the end {load_average()}")
    print(f"inference p50 ms: {int8:.1f} vs baseline {baseline:.1f} ratio={baseline / int8:.2f}")
    return 0


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
