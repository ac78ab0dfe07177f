"""The model artifact's Ray Serve app: a thin wrapper over ``code/inference.py`` for AWS's Ray Serve image.

AWS's Ray Serve inference container (``ray:serve-ml-sagemaker-cpu`` / ``-cuda``) extracts ``model.tar.gz`` to
``/opt/ml/model``, puts ``/opt/ml/model`` and ``/opt/ml/model/code`` on ``PYTHONPATH`` and runs
``serve run /opt/ml/model/config.yaml``; ``config.yaml`` names :func:`build_app` of this module (copied to the
artifact's root as ``deployment.py``). Its adapter forwards ``POST /invocations`` to route ``/`` with the raw
body, ``Content-Type`` and ``Accept``, and sends the app's status and body back unchanged.

Each replica (:class:`ImageClassifier`) loads the model once with ``model_fn``, answers one warm-up request,
then serves ``input_fn -> predict_fn -> output_fn``: decoding in a bounded pool of threads, the network in one
thread (one forward at a time, large batches in chunks so small requests are not held behind them). A refused
request gets its 4xx status and ``{"error": "...", "code": "..."}``; anything else gets 500 with the same shape,
the traceback going to the log only. ``GET`` at the route answers 200 with the model's health once it is loaded.

Sizing (:func:`serving_plan`) comes from the model's environment, else from the instance's CPUs and GPUs:
``INFERENCE_REPLICAS`` (one per GPU, else one per 4 vCPUs), ``INFERENCE_NUM_THREADS`` per replica (the vCPUs
shared among replicas), ``INFERENCE_MAX_ONGOING_REQUESTS`` per replica (twice the threads, at least 4 and at
least a batch), and dynamic batching of single-image requests: ``INFERENCE_MAX_BATCH_SIZE`` images per forward
(default 8; 1 turns it off) and ``INFERENCE_BATCH_WAIT_MS``, the longest a request waits for others (default 5).

The same class runs without Ray in the project's light local endpoint (:func:`build_replica`). Runs on the Ray
image's Python 3.13; imports only the standard library, PIL, the handlers and (in :func:`build_app`) Ray.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import io
import itertools
import json
import logging
import os
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

try:  # ``entrypoints.deployment`` in this repository; top-level ``deployment`` beside code/ in an artifact
    from . import contract, inference, modeling
except ImportError:  # pragma: no cover - exercised inside the artifact (Ray replicas, the local hosts)
    import contract  # type: ignore[no-redef]
    import inference  # type: ignore[no-redef]
    import modeling  # type: ignore[no-redef]

logger = logging.getLogger("ray.serve")

CPUS_PER_REPLICA = 4  # default replica size on CPU instances: ml.m5.xlarge runs one replica, ml.c5.9xlarge nine
PREDICT_CHUNK_IMAGES = 8  # a large batch runs in forwards of this many images, so others can run in between
JSON_CONTENT_TYPE = contract.JSON_CONTENT_TYPE


@dataclass(frozen=True)
class Reply:
    """One HTTP answer: status, body and content type (both hosts send exactly these bytes)."""

    status: int
    body: bytes
    content_type: str = JSON_CONTENT_TYPE


def error_reply(status: int, message: str, code: str) -> Reply:
    return Reply(status, json.dumps({"error": message, "code": code}).encode("utf-8"))


@dataclass(frozen=True)
class ServingPlan:
    """How many replicas run, and what each may use."""

    replicas: int
    threads: int  # intra-op threads of the network, and threads that decode images
    max_ongoing_requests: int
    gpus_per_replica: float = 0.0
    max_batch_size: int = contract.DEFAULT_MAX_BATCH_SIZE  # single-image requests per forward; 1: no batching
    batch_wait_ms: float = contract.DEFAULT_BATCH_WAIT_MS  # longest a request waits for others to join it


def _env_milliseconds(environ: Mapping[str, str], name: str, default: float) -> float:
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        milliseconds = float(value)
    except ValueError:
        milliseconds = -1.0
    if not 0 <= milliseconds <= 1000:
        raise ValueError(f"{name}={value!r} must be a number of milliseconds from 0 to 1000 (or unset for the default)")
    return milliseconds


def serving_plan(cpus: int, gpus: int = 0, environ: Mapping[str, str] | None = None) -> ServingPlan:
    """Replicas, threads, requests and batching per replica: the environment's values, else sized for the instance.

    A replica takes at least as many requests at once as it batches, so that a batch can fill.
    """
    environ = os.environ if environ is None else environ
    count = functools.partial(inference.env_count, environ=environ)
    cpus = max(1, cpus)
    replicas = count(contract.ENV_SERVE_REPLICAS) or (gpus or max(1, cpus // CPUS_PER_REPLICA))
    threads = count(contract.ENV_INFERENCE_THREADS) or max(1, cpus // replicas)
    batch = count(contract.ENV_SERVE_MAX_BATCH_SIZE) or contract.DEFAULT_MAX_BATCH_SIZE
    wait_ms = _env_milliseconds(environ, contract.ENV_SERVE_BATCH_WAIT_MS, contract.DEFAULT_BATCH_WAIT_MS)
    ongoing = count(contract.ENV_SERVE_MAX_ONGOING_REQUESTS) or max(4, 2 * threads, batch)
    gpus_per_replica = min(1.0, gpus / replicas) if gpus else 0.0
    return ServingPlan(replicas, threads, ongoing, gpus_per_replica, batch, wait_ms)


@dataclass
class _Waiting:
    item: Any
    future: asyncio.Future
    arrived: float


class MicroBatcher:
    """Ray Serve's ``@serve.batch`` rule, for the light host that runs the replica without Ray.

    ``await batcher(item)`` queues one item; ``function(items) -> results`` (a coroutine) runs on up to
    ``max_batch_size`` of them once the batch is full or the first has waited ``wait_s``, and each caller gets its
    own result (an exception in ``function`` goes to every caller of that batch). One batch runs at a time: items
    that arrive meanwhile form the next one, which starts as soon as the first is done if its wait is over.
    """

    def __init__(self, function: Any, max_batch_size: int, wait_s: float) -> None:
        self.function, self.max_batch_size, self.wait_s = function, max_batch_size, wait_s
        self._waiting: list[_Waiting] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run())
        self._waiting.append(_Waiting(item, loop.create_future(), loop.time()))
        assert self._arrived is not None
        self._arrived.set()
        return await self._waiting[-1].future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._arrived is not None
        while True:
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._waiting[0].arrived + self.wait_s
            while len(self._waiting) < self.max_batch_size and loop.time() < deadline:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
            batch = [entry for entry in self._waiting[: self.max_batch_size] if not entry.future.done()]
            del self._waiting[: self.max_batch_size]
            if not batch:
                continue
            try:
                results = list(await self.function([entry.item for entry in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function gave {len(results)} results for {len(batch)} items")
            except Exception as error:  # the batch's failure is each of its callers'
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(error)
                continue
            for entry, result in zip(batch, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)


class ModelThread:
    """The one thread that runs forwards, taking the lowest ``priority`` first (then the oldest).

    A one-image request (priority 0) waits for at most the forward that is running, not for every chunk of the
    batches queued before it.
    """

    def __init__(self) -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        threading.Thread(target=self._work, name="model", daemon=True).start()

    async def run(self, priority: int, function: Any, *args: Any) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((priority, next(self._order), future, function, args))
        return await asyncio.wrap_future(future)

    def _work(self) -> None:
        while True:
            _, _, future, function, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as error:  # handed to the awaiting request, which answers for it
                future.set_exception(error)


def resolve_model_dir(model_dir: str | os.PathLike[str] | None = None) -> Path:
    """The model folder: the argument, else ``SM_MODEL_DIR``, else the folder of this file (never the cwd)."""
    chosen = model_dir or os.environ.get(contract.ENV_SERVE_MODEL_DIR) or Path(__file__).resolve().parent
    path = Path(chosen).resolve()
    if not (path / contract.MODEL_CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{path} holds no {contract.MODEL_CONFIG_FILE}: set {contract.ENV_SERVE_MODEL_DIR} to the extracted "
            f"model artifact, or keep {contract.RAY_SERVE_MODULE_FILE} at the artifact's root"
        )
    return path


class ImageClassifier:
    """One replica of the endpoint: the model loaded once, requests through the artifact's handlers.

    Single-image requests that arrive together share a forward (dynamic batching, ``max_batch_size`` > 1): under
    Ray with ``@serve.batch``, in the light host with :class:`MicroBatcher`, the same two settings either way.
    A request alone in the replica skips the wait. Decoding comes first, per request, so a bad image is refused
    with its own 4xx before it could join a batch; the batch's forward answers each request with its own row.
    """

    def __init__(
        self,
        model_dir: str | None = None,
        threads: int | None = None,
        max_batch_size: int = 1,
        batch_wait_ms: float = 0.0,
        ray_batching: bool = False,
    ) -> None:
        self.model_dir = resolve_model_dir(model_dir)
        if threads:  # model_fn sizes the runtime from it
            os.environ[contract.ENV_INFERENCE_THREADS] = str(threads)
        self.model = inference.model_fn(str(self.model_dir))
        workers = threads or inference.inference_threads()
        # Two lanes of decode threads: requests of one image never queue behind the images of batches.
        self._decode_pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode")
        self._small_pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode-small")
        self._model_pool = ModelThread()  # one forward at a time, one-image requests first
        self.max_batch_size, self.batch_wait_ms = max(1, max_batch_size), batch_wait_ms
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # forwards of batched requests, by size
        self._requests = 0  # requests between arrival and answer: one alone does not wait for company
        self._batch: Any = None
        if self.max_batch_size > 1:
            if ray_batching:
                from ray import serve

                batch = serve.batch(max_batch_size=self.max_batch_size, batch_wait_timeout_s=batch_wait_ms / 1000)
                self._batch = batch(self._forward_batch)
            else:
                self._batch = MicroBatcher(self._forward_batch, self.max_batch_size, batch_wait_ms / 1000)
        self._warm_up()
        logger.info(
            "replica ready: %s, %s (%s runtime), %d decode threads, batches of up to %d images waiting %g ms",
            self.model_dir,
            self.model.precision,
            self.model.runtime,
            workers,
            self.max_batch_size,
            batch_wait_ms,
        )

    def _warm_up(self) -> None:
        """One request through every handler, so the first client does not pay for lazy initialisation."""
        buffer = io.BytesIO()
        size = self.model.config.input_size
        Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, "PNG")
        data = inference.input_fn(buffer.getvalue(), "image/png")
        inference.output_fn(inference.predict_fn(data, self.model), JSON_CONTENT_TYPE)
        if self.max_batch_size > 1:  # and the largest batch, whose buffers the runtime sizes on first use
            self.model.probabilities(np.repeat(data.images, self.max_batch_size, axis=0))

    def health(self) -> Reply:
        config = self.model.config
        body = {"status": "Healthy", "architecture": config.architecture, "classes": config.num_classes}
        serving = {"runtime": self.model.runtime, "precision": self.model.precision}
        batching = {"max_batch_size": self.max_batch_size, "batch_wait_ms": self.batch_wait_ms}
        return Reply(200, json.dumps({**body, **serving, **batching}).encode("utf-8"))

    async def handle(self, method: str, body: bytes, content_type: str | None, accept: str | None) -> Reply:
        """Answer one request (the adapter has applied its defaults to the headers)."""
        if method in ("GET", "HEAD"):
            return self.health()
        if method != "POST":
            return error_reply(
                405, f"method {method} is not allowed: send POST with the request body", "method_not_allowed"
            )
        if len(body) > contract.MAX_PAYLOAD_BYTES:
            return too_large_reply(len(body))
        loop = asyncio.get_running_loop()
        self._requests += 1
        try:
            data = await self._decode(loop, body, content_type)
            prediction = await self._predict(loop, data)
            response, response_type = inference.output_fn(prediction, accept)
        except inference.InferenceError as error:
            logger.info("refused (%d %s): %s", error.status_code, error.code, error.message)
            return Reply(error.status_code, error.to_json().encode("utf-8"))
        except Exception as error:  # a bug or a broken model: the client gets a 500, the replica goes on
            logger.exception("request failed")
            return error_reply(500, f"the model server failed on this request: {error}", "internal_error")
        finally:
            self._requests -= 1
        return Reply(200, response.encode("utf-8") if isinstance(response, str) else bytes(response), response_type)

    async def _decode(self, loop: asyncio.AbstractEventLoop, body: bytes, content_type: str | None) -> inference.Batch:
        """The request's images, decoded one per task, in turn with other requests' images.

        A request of one image is parsed and decoded in a lane of its own; a batch's images go one at a time
        through the batch lane, so each request has at most one image queued there. A small request so never
        waits for a batch's decoding, and a batch waits for at most one image of each other batch at a time.
        """
        preprocess = self.model.preprocess
        request = await loop.run_in_executor(self._small_pool, inference.parse_request, body, content_type, preprocess)
        pool = self._small_pool if len(request.images) == 1 else self._decode_pool
        size = preprocess.config.input_size
        images = np.empty((len(request.images), 3, size, size), dtype=np.float32)
        for position, (data, name) in enumerate(request.images):
            images[position] = await loop.run_in_executor(pool, preprocess, data, name)
        return inference.Batch(images=images, top_k=request.top_k)

    async def _forward_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One forward for the images of several requests: each gets its own row of probabilities back."""
        probabilities = await self._model_pool.run(0, self.model.probabilities, np.stack(images))
        self.batch_sizes[len(images)] += 1
        return list(probabilities)

    async def _predict(self, loop: asyncio.AbstractEventLoop, data: inference.Batch) -> inference.Prediction:
        if self._batch is not None and len(data.images) == 1 and self._requests > 1:
            probabilities = await self._batch(data.images[0])
            return inference.top_k_prediction(probabilities[np.newaxis], data.top_k, self.model.class_names)
        chunks = []
        for start in range(0, len(data.images), PREDICT_CHUNK_IMAGES):
            chunk = inference.Batch(data.images[start : start + PREDICT_CHUNK_IMAGES], data.top_k)
            first = 0 if len(data.images) == 1 else 1  # a one-image request goes before the chunks of batches
            chunks.append(await self._model_pool.run(first, inference.predict_fn, chunk, self.model))
        if len(chunks) == 1:
            return chunks[0]
        indices = np.concatenate([chunk.indices for chunk in chunks])
        probabilities = np.concatenate([chunk.probabilities for chunk in chunks])
        return inference.Prediction(indices, probabilities, chunks[0].class_names)

    async def __call__(self, request: Any) -> Any:
        """Ray Serve's entry: a Starlette request in, a Starlette response out."""
        from starlette.responses import Response

        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > contract.MAX_PAYLOAD_BYTES:
            reply = too_large_reply(int(declared))  # refused before reading, let alone decoding
        else:
            body = bytearray()
            async for piece in request.stream():
                body += piece
                if len(body) > contract.MAX_PAYLOAD_BYTES:
                    break
            content_type, accept = request.headers.get("content-type"), request.headers.get("accept")
            reply = await self.handle(request.method, bytes(body), content_type, accept)
        return Response(content=reply.body, status_code=reply.status, media_type=reply.content_type)


def too_large_reply(length: int) -> Reply:
    return error_reply(
        413,
        f"request body of {length} bytes exceeds the {contract.MAX_PAYLOAD_BYTES}-byte limit of SageMaker real-time "
        "endpoints: send fewer or smaller images",
        "payload_too_large",
    )


def _check_artifact(args: Mapping[str, Any] | None) -> Path:
    """Fail at build time, with the reason, on an artifact that cannot serve (not later in every replica)."""
    model_dir = resolve_model_dir((args or {}).get("model_dir"))
    modeling.read_model_config(model_dir)
    if not (model_dir / contract.WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{model_dir / contract.WEIGHTS_FILE} is missing: the artifact holds no weights")
    return model_dir


def build_app(args: Mapping[str, Any] | None = None) -> Any:
    """The Ray Serve application (``config.yaml``'s ``import_path``), sized by :func:`serving_plan`."""
    import ray
    from ray import serve

    model_dir = _check_artifact(args)
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    plan = serving_plan(int(resources.get("CPU") or os.cpu_count() or 1), int(resources.get("GPU", 0)))
    logger.info("serving plan: %s", plan)
    deployment = serve.deployment(ImageClassifier).options(
        num_replicas=plan.replicas,
        max_ongoing_requests=plan.max_ongoing_requests,
        ray_actor_options={"num_cpus": plan.threads, "num_gpus": plan.gpus_per_replica},
    )
    return deployment.bind(
        model_dir=str(model_dir),
        threads=plan.threads,
        max_batch_size=plan.max_batch_size,
        batch_wait_ms=plan.batch_wait_ms,
        ray_batching=True,
    )


def build_replica(args: Mapping[str, Any] | None = None) -> ImageClassifier:
    """The same replica without Ray (the light local endpoint): one replica with every CPU."""
    model_dir = _check_artifact(args)
    cpus = contract.available_cpus()
    plan = serving_plan(cpus, 0, {**os.environ, contract.ENV_SERVE_REPLICAS: "1"})
    return ImageClassifier(str(model_dir), plan.threads, plan.max_batch_size, plan.batch_wait_ms)
