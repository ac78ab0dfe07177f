"""Latency of the local endpoint under load: idle bursts, then bursts beside slow clients and a large batch.

Serves a ResNet-18 artifact (133 classes, 224 px input, random weights) on the local endpoint exactly as
``local --approve`` does (a detached ``pipelines.serving.server`` process; ``--ray`` for the Ray Serve host), then
sends, from 16 client threads, each request on a new connection:

1. idle: 200 single-JPEG requests (640x480). Targets: p99 under 3x p50, and no request over 1 s.
2. under burst: the same 200 while 8 slow clients hold connections open (a request trickled one byte a second)
   and a legal batch of 32 large PNGs (3000x3000, about 8 s of decoding) is always in flight. Target: p99 under
   5x the idle p50. The baseline is the idle p50 of the same run.

    python bench/endpoint_load.py              # about a minute on 2 idle cores
    python bench/endpoint_load.py --ray        # the same against the Ray Serve host (adds Ray's cold start)

The last line reads ``endpoint p99 ms under burst: <X> vs idle p50 <Y> ratio=<Y/X>`` (above 0.2 meets the target).

``--two-batches`` measures instead a small request (one 640x480 JPEG) sent again and again while two JSON batches
of 32 PNGs of 4000x4000 px are decoded: its slowest latency must stay under max(1 s, 5x its solo latency). With
``--baseline-rev REV`` the same is measured first on an artifact whose serving code (``code/inference.py`` and the
app's ``deployment.py``) is that git revision's, side by side on the same machine:

    python bench/endpoint_load.py --two-batches --baseline-rev f2f5079   # about 3 minutes on 2 cores

Its last line reads ``small request max ms beside two batches: <X> vs baseline <Y> ratio=<Y/X>`` (the baseline
is the revision's figure, or without one the request's solo latency).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from entrypoints import contract, modeling  # noqa: E402
from pipelines.serving import endpoint  # noqa: E402
from pipelines.util import fsutil  # noqa: E402

NUM_CLASSES = 133


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests per phase")
    parser.add_argument("--clients", type=int, default=16, help="client threads")
    parser.add_argument("--slow-clients", type=int, default=8, help="slow connections held open under burst")
    parser.add_argument("--batch-images", type=int, default=contract.MAX_BATCH_IMAGES, help="images in the batch")
    parser.add_argument("--batch-image-size", type=int, default=3000, help="side of each batch PNG, pixels")
    parser.add_argument("--architecture", default="resnet18", help="network of the served artifact")
    parser.add_argument("--ray", action="store_true", help="serve on the Ray Serve host instead of the light one")
    parser.add_argument("--two-batches", action="store_true", help="a small request beside two large batches")
    parser.add_argument("--baseline-rev", default=None, help="with --two-batches: git revision of the baseline")
    parser.add_argument("--small-requests", type=int, default=8, help="with --two-batches: small requests sent")
    return parser


# --- requests ---------------------------------------------------------------------------------------------------


def small_jpeg(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    pixels = np.stack([(np.sin(xx / (30 + 7 * c)) * np.cos(yy / 45) * 0.5 + 0.5) * 255 for c in range(3)], -1)
    pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def large_batch(images: int, size: int) -> bytes:
    """A legal JSON batch (under 6 MB) of large, highly compressible PNGs: cheap to send, slow to decode."""
    rng = np.random.default_rng(1)
    instances = []
    for _ in range(images):
        blocks = rng.integers(0, 256, (size // 100 + 1, size // 100 + 1, 3), dtype=np.uint8)
        pixels = np.kron(blocks, np.ones((100, 100, 1), dtype=np.uint8))[:size, :size]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG", compress_level=9)
        instances.append({"b64": base64.b64encode(buffer.getvalue()).decode()})
    body = json.dumps({"instances": instances}).encode()
    if len(body) > contract.MAX_PAYLOAD_BYTES:
        raise SystemExit(f"the batch is {len(body)} bytes, over the payload limit: use smaller --batch-image-size")
    return body


def post(port: int, body: bytes, content_type: str, timeout: float = 120) -> tuple[int, float]:
    """One request on a new connection: (status, milliseconds)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/invocations", body, {"Content-Type": content_type})
        response = connection.getresponse()
        response.read()
        return response.status, (time.perf_counter() - started) * 1000
    finally:
        connection.close()


def burst(port: int, body: bytes, requests: int, clients: int) -> list[float]:
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: post(port, body, "image/jpeg"), range(requests)))
    failed = [status for status, _ in results if status != 200]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed: statuses {sorted(set(failed))}")
    return [milliseconds for _, milliseconds in results]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def describe(name: str, latencies: list[float]) -> str:
    p50, p99 = statistics.median(latencies), quantile(latencies, 0.99)
    return f"{name}: {len(latencies)} requests: p50 {p50:.1f} ms p99 {p99:.1f} ms max {max(latencies):.1f} ms"


# --- the hostile neighbours ------------------------------------------------------------------------------------


class SlowClients:
    """Connections that send a request's headers, then trickle its body one byte a second."""

    def __init__(self, port: int, count: int) -> None:
        self.stop = threading.Event()
        self.sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        for connection in self.sockets:
            connection.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stop.wait(1.0):
            for connection in self.sockets:
                with contextlib.suppress(OSError):  # the server cut it: it stays closed
                    connection.sendall(b"x")

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for connection in self.sockets:
            connection.close()


class BatchInFlight:
    """Keeps one large batch in flight: sends it again as soon as the last one is answered."""

    def __init__(self, port: int, body: bytes) -> None:
        self.stop, self.latencies = threading.Event(), []
        self.port, self.body = port, body
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            status, milliseconds = post(self.port, self.body, "application/json", timeout=300)
            if status != 200:
                raise SystemExit(f"the large batch failed with status {status}")
            self.latencies.append(milliseconds)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


# --- the endpoint -----------------------------------------------------------------------------------------------


def serve(folder: Path, architecture: str, ray: bool) -> dict:
    torch.manual_seed(0)
    names = [f"{i + 1:03d}.Class_{i + 1:03d}" for i in range(NUM_CLASSES)]
    config = modeling.ModelConfig(architecture, NUM_CLASSES, names)
    model_dir = modeling.save_artifact(modeling.build_model(config), folder / "model", config)
    tarball = fsutil.make_tarball(model_dir, folder / "model.tar.gz")
    package = {
        "ModelPackageArn": "arn:aws:sagemaker:us-east-1:000000000000:model-package/bench/1",
        "ModelPackageGroupName": "bench",
        "ModelPackageVersion": 1,
        "InferenceSpecification": {"Containers": [{"ModelDataUrl": tarball.as_uri(), "Environment": {}}]},
    }
    return endpoint.deploy(folder / "workdir", "bench", package, port=0, ray=ray)


# --- a small request beside two large batches ------------------------------------------------------------------

TWO_BATCH_IMAGES, TWO_BATCH_SIZE = 32, 4000


def repeated_batch(images: int, size: int, distinct: int = 4) -> bytes:
    """A legal JSON batch of ``images`` PNGs of ``size`` px, ``distinct`` of them encoded (the decode is the cost)."""
    one = json.loads(large_batch(distinct, size))["instances"]
    body = json.dumps({"instances": [one[i % distinct] for i in range(images)]}).encode()
    if len(body) > contract.MAX_PAYLOAD_BYTES:
        raise SystemExit(f"the batch is {len(body)} bytes, over the payload limit")
    return body


def baseline_code(model_dir: Path, revision: str) -> None:
    """Replace the artifact's serving code with a git revision's (what the endpoint ran before a change)."""
    import subprocess

    targets = {"inference.py": model_dir / contract.CODE_DIR, contract.RAY_SERVE_MODULE_FILE: model_dir}
    for name, folder in targets.items():
        code = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:entrypoints/{name}"],
                              capture_output=True, check=True).stdout  # fmt: skip
        (folder / name).write_bytes(code)


def deploy_artifact(folder: Path, architecture: str, revision: str | None) -> dict:
    torch.manual_seed(0)
    names = [f"{i + 1:03d}.Class_{i + 1:03d}" for i in range(NUM_CLASSES)]
    config = modeling.ModelConfig(architecture, NUM_CLASSES, names)
    model_dir = modeling.save_artifact(modeling.build_model(config), folder / "model", config)
    if revision:
        baseline_code(model_dir, revision)
    tarball = fsutil.make_tarball(model_dir, folder / "model.tar.gz")
    package = {
        "ModelPackageArn": "arn:aws:sagemaker:us-east-1:000000000000:model-package/bench/1",
        "ModelPackageGroupName": "bench",
        "ModelPackageVersion": 1,
        "InferenceSpecification": {"Containers": [{"ModelDataUrl": tarball.as_uri(), "Environment": {}}]},
    }
    return endpoint.deploy(folder / "workdir", "bench", package, port=0)


def small_beside_batches(folder: Path, args: argparse.Namespace, revision: str | None, batch: bytes) -> tuple:
    """(solo ms, slowest ms beside two batches, batch seconds) of a small request on one served artifact."""
    record = deploy_artifact(folder, args.architecture, revision)
    port, jpeg = int(record["port"]), small_jpeg()
    try:
        burst(port, jpeg, 5, 1)  # warm up
        solo = statistics.median(post(port, jpeg, "image/jpeg")[1] for _ in range(10))
        with ThreadPoolExecutor(2) as pool:
            batches = [pool.submit(post, port, batch, "application/json", 600) for _ in range(2)]
            time.sleep(1.0)  # both batches are being decoded
            beside = []
            while len(beside) < args.small_requests and not all(future.done() for future in batches):
                status, milliseconds = post(port, jpeg, "image/jpeg")
                if status != 200:
                    raise SystemExit(f"the small request failed with status {status}")
                beside.append(milliseconds)
                time.sleep(0.2)
            took = [future.result() for future in batches]
        if any(status != 200 for status, _ in took):
            raise SystemExit(f"a batch failed: {took}")
        if not beside:
            raise SystemExit("the batches finished before a small request was sent: send larger ones")
    finally:
        endpoint.stop(folder / "workdir", "bench")
    return solo, max(beside), beside, [milliseconds / 1000 for _, milliseconds in took]


def two_batches(args: argparse.Namespace) -> int:
    batch = repeated_batch(TWO_BATCH_IMAGES, TWO_BATCH_SIZE)
    results = {}
    for label, revision in ((f"baseline {args.baseline_rev}", args.baseline_rev), ("this checkout", None)):
        if label.startswith("baseline") and not revision:
            continue
        with tempfile.TemporaryDirectory(prefix="endpoint-two-batches-") as scratch:
            solo, slowest, beside, took = small_beside_batches(Path(scratch), args, revision, batch)
        results[label] = (solo, slowest)
        print(f"{label}: small request solo {solo:.0f} ms; beside two batches of {TWO_BATCH_IMAGES} PNGs of "
              f"{TWO_BATCH_SIZE} px ({len(batch)} bytes each, answered in {took[0]:.1f} s and {took[1]:.1f} s): "
              f"{', '.join(f'{ms:.0f}' for ms in beside)} ms", flush=True)  # fmt: skip
    solo, slowest = results["this checkout"]
    limit = max(1000.0, 5 * solo)
    verdict = "met" if slowest < limit else "MISSED"
    print(f"target: slowest {slowest:.0f} ms under max(1 s, 5x solo) = {limit:.0f} ms: {verdict}")
    baseline = results[f"baseline {args.baseline_rev}"][1] if args.baseline_rev else solo
    print(f"small request max ms beside two batches: {slowest:.1f} vs baseline {baseline:.1f} "
          f"ratio={baseline / slowest:.2f}")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.two_batches:
        return two_batches(args)
    with tempfile.TemporaryDirectory(prefix="endpoint-load-") as scratch:
        print(f"serving {args.architecture} ({'Ray Serve host' if args.ray else 'light host'})...", flush=True)
        record = serve(Path(scratch), args.architecture, args.ray)
        port = int(record["port"])
        try:
            jpeg = small_jpeg()
            batch = large_batch(args.batch_images, args.batch_image_size)
            burst(port, jpeg, 20, 4)  # warm up
            idle = burst(port, jpeg, args.requests, args.clients)
            print(describe("idle", idle), flush=True)
            slow = SlowClients(port, args.slow_clients)
            in_flight = BatchInFlight(port, batch)
            time.sleep(1.0)  # the batch is being decoded
            try:
                loaded = burst(port, jpeg, args.requests, args.clients)
            finally:
                slow.close()
                in_flight.close()
            print(describe(f"under burst ({args.slow_clients} slow clients, a batch always in flight)", loaded))
            batches = ", ".join(f"{milliseconds / 1000:.1f} s" for milliseconds in in_flight.latencies)
            print(f"large batch: {args.batch_images} PNGs of {args.batch_image_size} px, {len(batch)} bytes: {batches}")
        finally:
            endpoint.stop(Path(scratch) / "workdir", "bench")
    idle_p50, idle_p99 = statistics.median(idle), quantile(idle, 0.99)
    loaded_p99 = quantile(loaded, 0.99)
    print(f"targets: idle p99/p50 {idle_p99 / idle_p50:.2f} (< 3), idle max {max(idle):.0f} ms (< 1000), ")
    print(f"         burst p99/idle p50 {loaded_p99 / idle_p50:.2f} (< 5)")
    print(f"endpoint p99 ms under burst: {loaded_p99:.1f} vs idle p50 {idle_p50:.1f} ratio={idle_p50 / loaded_p99:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
