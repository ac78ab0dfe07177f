"""Serving handlers for the SageMaker PyTorch inference container (and any plain Python caller).

The container's toolkit (``sagemaker-pytorch-inference``) imports this file as the top-level module
``inference`` from ``<model>/code/`` and calls, per request::

    model = model_fn(model_dir)                      # once per worker process
    data = input_fn(body, content_type)              # bytes/str -> Batch of normalised images
    prediction = predict_fn(data, model)             # Batch -> Prediction (top-k per image)
    body, content_type = output_fn(prediction, accept)

Requests (``contract.REQUEST_CONTENT_TYPES``):

- ``image/jpeg``, ``image/png``, ``application/x-image``: the body is one image (JPEG, PNG, WebP, BMP or GIF;
  the bytes decide, not the header). ``contract.DEFAULT_TOP_K`` classes come back.
- ``application/json``: ``{"instances": [{"b64": "<base64 image>"}, ...], "top_k": 3}``; ``top_k`` is optional;
  at most ``contract.MAX_BATCH_IMAGES`` instances.

Response (``application/json``), one entry per image in request order, classes by descending probability::

    {"predictions": [{"class": "001.Affenpinscher", "index": 0, "probability": 0.91,
                      "top_k": [{"class": "001.Affenpinscher", "index": 0, "probability": 0.91}, ...]}]}

Bad input raises :class:`InferenceError` (a ``ValueError`` with ``status_code`` and a machine-readable
``code``); under the toolkit it is also a ``GenericInferenceToolkitError``, so the client gets that status and
message and the worker goes on serving. Codes: ``unsupported_content_type`` (415), ``unsupported_accept``
(406), ``empty_body``, ``not_an_image``, ``truncated_image``, ``corrupt_image``, ``invalid_json``,
``invalid_request``, ``invalid_base64`` (400), ``image_too_large`` and ``batch_too_large`` (413).

Speed (``bench/inference_bench.py`` measures it): the network is loaded once, at the precision the artifact's
evaluation chose (``serving.json``, written by the Evaluate step): int8 runs the statically quantised network
(``model.int8.onnx``) with ONNX Runtime; fp32 runs the fastest runtime that gives the eager model's answers --
ONNX Runtime (exported in memory at load time when the image has ``onnx`` and ``onnxruntime``), else a traced,
frozen TorchScript module, else eager PyTorch; each fp32 candidate is checked against eager on a probe batch
(within 1e-4), and the log names the one chosen. int8 is off on a GPU, and where onnxruntime is missing (AWS's
Ray Serve image, unless the artifact ships its wheels in ``code/wheels``) the model serves fp32 and the log says
why. Large JPEGs are decoded at 1/2, 1/4 or 1/8 size in the DCT domain (PIL ``draft``) when the reduced image still
has ``INFERENCE_JPEG_DRAFT_FACTOR`` times the pixels the resize needs. Environment variables (names in
``contract``): ``INFERENCE_PRECISION`` (auto, fp32, int8), ``INFERENCE_RUNTIME``, ``INFERENCE_NUM_THREADS``,
``INFERENCE_JPEG_DRAFT_FACTOR``.

The same four functions serve on AWS's Ray Serve inference image: the artifact's ``deployment.py`` wraps them.

Shipped in ``<model>/code/``: imports only the standard library, numpy, PIL, torch, its siblings, and
(optionally) onnx/onnxruntime and the toolkit's error class.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

try:  # works both as ``entrypoints.inference`` and as the top-level module the serving toolkit imports
    from . import contract, modeling, transforms
except ImportError:  # pragma: no cover - exercised inside containers and through the toolkit in tests
    import contract  # type: ignore[no-redef]
    import modeling  # type: ignore[no-redef]
    import transforms  # type: ignore[no-redef]

try:  # the serving toolkit turns this exception class into an HTTP status instead of a 500
    from sagemaker_inference.errors import GenericInferenceToolkitError as _ToolkitError
except ImportError:  # plain Python use (local HTTP server, evaluation): same attributes, no toolkit

    class _ToolkitError(Exception):  # type: ignore[no-redef]
        def __init__(self, status_code: int, message: str | None = None, phrase: str | None = None) -> None:
            self.status_code = status_code
            self.message = message or "Invalid Request"
            self.phrase = phrase or self.message
            super().__init__(status_code, self.message, self.phrase)


logger = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "torchscript", "eager")
AUTO_RUNTIME = "auto"
# Formats PIL may open here: what cameras and browsers send. Others (TIFF, PSD, ...) are refused unopened.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # PIL opens camera MPO files through its JPEG plugin
# Decode a JPEG at reduced size only while the reduced image keeps this many times the pixels (per side) that
# the resize to ``resize_size`` needs: at 2 the reduced image still gets antialiased by the resize.
DEFAULT_JPEG_DRAFT_FACTOR = 2.0
# Largest softmax difference from the eager model that a faster runtime may show on the probe batch.
RUNTIME_TOLERANCE = 1e-4


class InferenceError(_ToolkitError, ValueError):
    """A request the handlers refuse: ``status_code`` is the HTTP status, ``code`` names the problem."""

    def __init__(self, message: str, status_code: int = 400, code: str = "invalid_request") -> None:
        super().__init__(status_code, message, message)
        self.code = code

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> str:
        """The body an HTTP server sends with ``status_code``: ``{"error": message, "code": code}``."""
        return json.dumps({"error": self.message, "code": self.code})


@dataclass
class Batch:
    """What :func:`input_fn` hands to :func:`predict_fn`: normalised images and how many classes to return."""

    images: np.ndarray  # (N, 3, input_size, input_size) float32
    top_k: int = contract.DEFAULT_TOP_K


@dataclass
class EncodedRequest:
    """A request parsed and checked, its images not yet decoded: ``(image bytes, name in errors)`` each.

    A server decodes them one at a time (:meth:`decode_one`), so a small request waits at most a few image
    decodes behind a large batch rather than the whole batch.
    """

    images: list[tuple[bytes, str]]
    top_k: int

    def decode(self, preprocess: Preprocessor) -> Batch:
        size = preprocess.config.input_size
        images = np.empty((len(self.images), 3, size, size), dtype=np.float32)
        for position, (data, name) in enumerate(self.images):
            images[position] = preprocess(data, name)
        return Batch(images=images, top_k=self.top_k)


@dataclass
class Prediction:
    """What :func:`predict_fn` hands to :func:`output_fn`: per image, class indices and probabilities."""

    indices: np.ndarray  # (N, k) int, most probable first
    probabilities: np.ndarray  # (N, k) float
    class_names: list[str] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        predictions = []
        for row_indices, row_probabilities in zip(self.indices, self.probabilities, strict=True):
            top = [
                {"class": self.class_names[int(i)], "index": int(i), "probability": float(p)}
                for i, p in zip(row_indices, row_probabilities, strict=True)
            ]
            predictions.append({**top[0], "top_k": top})
        return {"predictions": predictions}


# --- decoding and preprocessing --------------------------------------------------------------------------------


@dataclass
class Preprocessor:
    """Image bytes -> ``(3, S, S)`` float32 array: serving's decoding, then evaluation's one preprocessing
    (``transforms.resize_crop`` and ``transforms.normalization``, which training's validation runs too).

    Checks come before any pixel is decoded (format, size); a large JPEG is decoded at reduced size (see
    ``draft_factor``). Picklable, so evaluation can run it in DataLoader workers.
    """

    config: modeling.ModelConfig
    draft_factor: float = DEFAULT_JPEG_DRAFT_FACTOR
    max_pixels: int = contract.MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        self._scale, self._offset = transforms.normalization(self.config.mean, self.config.std)

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "draft_factor": self.draft_factor, "max_pixels": self.max_pixels}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def __call__(self, data: bytes, name: str = "the image") -> np.ndarray:
        return transforms.normalized_array(self.crop(data, name), self._scale, self._offset)

    def crop(self, data: bytes, name: str = "the image") -> np.ndarray:
        """Image bytes -> ``(S, S, 3)`` uint8 RGB: the centre crop :meth:`__call__` normalises."""
        return transforms.resize_crop(self.open(data, name), self.config.input_size, self.config.resize_size)

    def open(self, data: bytes, name: str = "the image") -> Image.Image:
        """Decode ``data`` (a large JPEG at reduced size), in its stored mode (``transforms.resize_crop``
        converts it to RGB); refuse what is not an image."""
        if not data:
            raise InferenceError(f"{name} is empty: send the image bytes as the request body", code="empty_body")
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            raise InferenceError(
                f"{name} is not an image PIL can read as one of {', '.join(IMAGE_FORMATS)}",
                code="not_an_image",
            ) from None
        except Image.DecompressionBombError as error:  # PIL's own limit, far above ours
            raise InferenceError(
                f"{name} is too large: {error}; send a smaller image", status_code=413, code="image_too_large"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:  # starts like an image, then breaks
            raise _decode_error(name, error) from None
        width, height = image.size
        if width < 1 or height < 1:
            raise InferenceError(f"{name} has no pixels ({width}x{height})", code="corrupt_image")
        if width * height > self.max_pixels:
            raise InferenceError(
                f"{name} is {width}x{height} = {width * height} pixels, over the limit of {self.max_pixels}: "
                "send a smaller image",
                status_code=413,
                code="image_too_large",
            )
        if image.format in ("JPEG", "MPO") and self.draft_factor > 0:
            # Smallest DCT scale whose result keeps draft_factor x resize_size pixels on the short side.
            wanted = max(1, round(self.draft_factor * self.config.resize_size))
            image.draft("RGB", (wanted, wanted))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning) as error:
            raise _decode_error(name, error) from None
        return image


def _decode_error(name: str, error: Exception) -> InferenceError:
    text = str(error)
    if isinstance(error, EOFError) or "truncated" in text.lower():
        return InferenceError(
            f"{name} is truncated: the image data ends early ({text}); send the whole file", code="truncated_image"
        )
    return InferenceError(f"{name} is a damaged image that cannot be decoded: {text}", code="corrupt_image")


def jpeg_draft_factor_from_env() -> float:
    value = os.environ.get(contract.ENV_JPEG_DRAFT_FACTOR, "").strip()
    if not value:
        return DEFAULT_JPEG_DRAFT_FACTOR
    try:
        factor = float(value)
    except ValueError:
        raise ValueError(f"{contract.ENV_JPEG_DRAFT_FACTOR}={value!r} must be a number (0 turns it off)") from None
    if factor < 0:
        raise ValueError(f"{contract.ENV_JPEG_DRAFT_FACTOR}={value!r} must be >= 0 (0 turns it off)")
    return factor


# --- the model and its runtime ---------------------------------------------------------------------------------


@dataclass
class ServingModel:
    """What :func:`model_fn` returns: the network behind its fastest runtime, its config and preprocessing."""

    config: modeling.ModelConfig
    runtime: str
    forward: Callable[[np.ndarray], np.ndarray] = field(repr=False)  # (N,3,S,S) float32 -> (N,C) logits
    preprocess: Preprocessor = field(repr=False)
    precision: str = "fp32"
    precision_reason: str = ""

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.forward(np.ascontiguousarray(images, dtype=np.float32))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(images))


def env_count(name: str, environ: Mapping[str, str] | None = None) -> int | None:
    """A positive whole number from the environment (None where unset); anything else is refused, naming it."""
    value = (os.environ if environ is None else environ).get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer (or unset for the default)")
    return int(value)


def inference_threads() -> int:
    """Intra-op threads for this worker: the env setting, else CPUs shared among the server's workers."""
    threads = env_count(contract.ENV_INFERENCE_THREADS)
    if threads:
        return threads
    workers = os.environ.get(contract.ENV_MODEL_SERVER_WORKERS, "").strip()
    if workers.isdigit() and int(workers) > 0:
        return max(1, contract.available_cpus() // int(workers))
    return max(1, torch.get_num_threads())


def _eager_forward(model: torch.nn.Module, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    def forward(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images).to(device)).float().cpu().numpy()

    return forward


def _torchscript_forward(model: torch.nn.Module, input_size: int) -> Callable[[np.ndarray], np.ndarray]:
    example = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices on newer torch
        traced = torch.jit.trace(model, example, check_trace=False)  # select_runtime checks it on a probe
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    def forward(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return frozen(torch.from_numpy(images)).numpy()

    return forward


def export_onnx(model: torch.nn.Module, input_size: int) -> bytes:
    """The network as an ONNX model (opset 17, dynamic batch): input ``input``, output ``logits``.

    Used at load time for the fp32 ONNX Runtime and by the evaluation step, which quantises it to int8.
    """
    example = torch.zeros(1, 3, input_size, input_size)
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:  # torch >= 2.5: keep the TorchScript exporter
        options["dynamo"] = False
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            **options,
        )
    return buffer.getvalue()


def onnxruntime_forward(
    onnx_model: bytes | str | Path, input_size: int, threads: int, what: str = "the exported network"
) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime CPU session over ``onnx_model`` (bytes or a file), checked on a batch of two."""
    import onnxruntime  # optional: the callers fall back when it is missing

    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = threads
    session_options.inter_op_num_threads = 1
    session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Workers that spin-wait between runs take the CPU that decoding threads beside them need (the replica decodes
    # on the same vCPUs): without spinning, int8 ResNet-50 on a busy 2-core machine took 22 ms instead of 46.
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session_options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    source = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model
    try:
        session = onnxruntime.InferenceSession(source, session_options, providers=["CPUExecutionProvider"])
        session.run(["logits"], {"input": np.zeros((2, 3, input_size, input_size), dtype=np.float32)})
    except Exception as error:  # onnxruntime's exception types derive from Exception only: make them RuntimeError
        raise RuntimeError(f"onnxruntime cannot run {what}: {error}") from error

    def forward(images: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input": images})[0]

    return forward


def _onnxruntime_forward(model: torch.nn.Module, input_size: int, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    return onnxruntime_forward(export_onnx(model, input_size), input_size, threads)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _probe_batch(input_size: int) -> np.ndarray:
    generator = np.random.default_rng(20240601)
    return generator.standard_normal((2, 3, input_size, input_size), dtype=np.float32)


def select_runtime(
    model: torch.nn.Module, config: modeling.ModelConfig, requested: str = AUTO_RUNTIME, threads: int | None = None
) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """The fastest runtime that reproduces the eager model on a probe batch, and its forward function.

    ``requested`` is ``auto`` (ONNX Runtime, else TorchScript, else eager) or one runtime name, which must
    then work. On a GPU the eager model runs there (the CPU runtimes would only be slower).
    """
    if requested != AUTO_RUNTIME and requested not in RUNTIMES:
        raise ValueError(f"{contract.ENV_INFERENCE_RUNTIME}={requested!r}: choose auto or one of {', '.join(RUNTIMES)}")
    if torch.cuda.is_available() and requested in (AUTO_RUNTIME, "eager"):
        device = torch.device("cuda")
        return "eager-cuda", _eager_forward(model.to(device), device)
    threads = threads or inference_threads()
    eager = _eager_forward(model, torch.device("cpu"))
    candidates = RUNTIMES if requested == AUTO_RUNTIME else (requested,)
    probe = _probe_batch(config.input_size)
    reference = _softmax(eager(probe))
    for name in candidates:
        if name == "eager":
            return name, eager
        try:
            if name == "onnxruntime":
                forward = _onnxruntime_forward(model, config.input_size, threads)
            else:
                forward = _torchscript_forward(model, config.input_size)
            difference = float(np.abs(_softmax(forward(probe)) - reference).max())
        except (ImportError, RuntimeError, ValueError, TypeError, OSError) as error:
            if requested != AUTO_RUNTIME:
                raise RuntimeError(f"the {name} runtime was asked for but cannot be used: {error}") from error
            logger.warning(
                "runtime %s is not available (%s: %s); trying the next one", name, type(error).__name__, error
            )
            continue
        if difference <= RUNTIME_TOLERANCE:
            return name, forward
        message = f"runtime {name} differs from eager by {difference:.2e} on the probe batch"
        if requested != AUTO_RUNTIME:
            raise RuntimeError(message)
        logger.warning("%s (tolerance %.0e); trying the next one", message, RUNTIME_TOLERANCE)
    return "eager", eager  # pragma: no cover - the loop always ends at eager


# --- the four handlers -----------------------------------------------------------------------------------------

# input_fn's signature is fixed by the toolkit (no model argument), so model_fn records the model it loaded
# and input_fn preprocesses with that model's settings. A model-server worker process loads exactly one model;
# plain Python callers with several models call load_serving_model and decode_request directly.
_LOADED: dict[str, ServingModel] = {}


def read_serving_decision(model_dir: str | Path) -> dict[str, Any]:
    """The evaluation step's precision decision in the artifact (``serving.json``); fp32 for an artifact without."""
    path = Path(model_dir) / contract.SERVING_DECISION_FILE
    if not path.is_file():
        return {"precision": "fp32", "reason": f"the artifact has no {contract.SERVING_DECISION_FILE} (not evaluated)"}
    try:
        decision = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}): evaluate the model again") from None
    if not isinstance(decision, dict) or decision.get("precision") not in contract.PRECISIONS:
        raise ValueError(f"{path} names no precision of {', '.join(contract.PRECISIONS)}: evaluate the model again")
    return decision


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # one of contract.PRECISIONS
    reason: str
    insisted: bool = False  # asked for by name: loading fails where it cannot run, instead of falling back


def choose_precision(model_dir: str | Path, requested: str | None = None) -> PrecisionChoice:
    """``requested``, else ``INFERENCE_PRECISION``, else ``auto``: the artifact's decision (``serving.json``).

    ``fp32`` is the switch that turns int8 off; ``int8`` insists; under ``auto`` int8 is off on a GPU, where
    the fp32 network runs on the device instead.
    """
    if requested is None:
        requested = os.environ.get(contract.ENV_INFERENCE_PRECISION, AUTO_RUNTIME).strip().lower() or AUTO_RUNTIME
    if requested not in (AUTO_RUNTIME, *contract.PRECISIONS):
        raise ValueError(
            f"{contract.ENV_INFERENCE_PRECISION}={requested!r}: choose auto or one of {', '.join(contract.PRECISIONS)}"
        )
    if requested != AUTO_RUNTIME:
        return PrecisionChoice(requested, f"{requested} was asked for ({contract.ENV_INFERENCE_PRECISION})", True)
    decision = read_serving_decision(model_dir)
    if decision["precision"] == "int8" and torch.cuda.is_available():
        return PrecisionChoice("fp32", "int8 is off on GPU instances: the fp32 network runs on the GPU")
    return PrecisionChoice(decision["precision"], str(decision.get("reason", "")))


def _int8_forward(model_dir: Path, config: modeling.ModelConfig, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    path = model_dir / contract.INT8_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the artifact holds no int8 network")
    forward = onnxruntime_forward(path, config.input_size, threads, what=str(path))
    shape = forward(np.zeros((1, 3, config.input_size, config.input_size), dtype=np.float32)).shape
    if shape != (1, config.num_classes):
        raise RuntimeError(f"{path} answers {shape} for one image, not (1, {config.num_classes}): evaluate again")
    return forward


def load_serving_model(model_dir: str | Path, precision: str | None = None) -> ServingModel:
    """Load an artifact: weights without unpickling code, eval mode, then the network at its chosen precision.

    int8 runs the artifact's quantised network with ONNX Runtime; fp32 runs the fastest runtime with eager's
    answers (:func:`select_runtime`). When the artifact chose int8 but it cannot run here (no onnxruntime: the
    wheels in ``code/wheels`` were not installed), it serves fp32 and the log says why; ``precision="int8"``
    (or ``INFERENCE_PRECISION=int8``) makes that an error instead.
    """
    model_dir = Path(model_dir)
    threads = inference_threads()
    if os.environ.get(contract.ENV_INFERENCE_THREADS) or os.environ.get(contract.ENV_MODEL_SERVER_WORKERS):
        torch.set_num_threads(threads)
    model, config = modeling.load_model(model_dir, device="cpu")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    choice = choose_precision(model_dir, precision)
    chosen, reason = choice.precision, choice.reason
    runtime, forward = "", None
    if chosen == "int8":
        try:
            runtime, forward = "onnxruntime-int8", _int8_forward(model_dir, config, threads)
        except (ImportError, RuntimeError, OSError) as error:
            cause = f"{type(error).__name__}: {error}"
            if isinstance(error, ImportError):
                cause = (
                    f"onnxruntime is not installed ({error}); an artifact evaluated with a serving wheelhouse "
                    f"installs it from {contract.CODE_DIR}/{contract.WHEELS_DIR} at start"
                )
            if choice.insisted:
                raise RuntimeError(f"int8 was asked for but cannot run: {cause}") from error
            reason = f"the evaluation chose int8, but it cannot run here: {cause}"
            logger.warning("%s: serving fp32", reason)
            chosen = "fp32"
    if forward is None:
        requested = os.environ.get(contract.ENV_INFERENCE_RUNTIME, AUTO_RUNTIME).strip().lower() or AUTO_RUNTIME
        runtime, forward = select_runtime(model, config, requested, threads)
    preprocess = Preprocessor(config, jpeg_draft_factor_from_env())
    serving = ServingModel(config, runtime, forward, preprocess, precision=chosen, precision_reason=reason)
    serving.logits(np.zeros((1, 3, config.input_size, config.input_size), dtype=np.float32))  # warm up
    logger.info(
        "loaded %s (%d classes) from %s: %s with the %s runtime on %d threads (%s)",
        config.architecture,
        config.num_classes,
        model_dir,
        chosen,
        runtime,
        threads,
        reason,
    )
    return serving


def model_fn(model_dir: str) -> ServingModel:
    """Load the model once per worker (see :func:`load_serving_model`); input_fn uses its preprocessing."""
    serving = load_serving_model(model_dir)
    _LOADED["model"] = serving
    return serving


def input_fn(request_body: bytes | bytearray | str | None, request_content_type: str | None) -> Batch:
    """Request body -> :class:`Batch` of normalised images, preprocessed for the model ``model_fn`` loaded."""
    check_content_type(request_content_type)
    serving = _LOADED.get("model")
    if serving is None:
        raise RuntimeError("input_fn was called before model_fn loaded a model")
    return decode_request(request_body, request_content_type, serving.preprocess)


def predict_fn(data: Batch, model: ServingModel) -> Prediction:
    """Run the network on the batch and keep the ``top_k`` most probable classes of each image."""
    return top_k_prediction(model.probabilities(data.images), data.top_k, model.class_names)


def top_k_prediction(probabilities: np.ndarray, top_k: int, class_names: list[str]) -> Prediction:
    """The ``top_k`` most probable classes of each row of ``probabilities`` (ties: the lower index first)."""
    k = min(top_k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return Prediction(order, np.take_along_axis(probabilities, order, axis=1), class_names)


def output_fn(prediction: Prediction, accept: str | None) -> tuple[str, str]:
    """:class:`Prediction` -> ``(JSON body, "application/json")``; refuses an Accept that excludes JSON."""
    acceptable = {_media_type(part) for part in (accept or "").split(",")} - {""}
    if acceptable and not acceptable & {contract.JSON_CONTENT_TYPE, "*/*", "application/*"}:
        raise InferenceError(
            f"accept {accept!r} is not supported: responses are {', '.join(contract.RESPONSE_CONTENT_TYPES)}",
            status_code=406,
            code="unsupported_accept",
        )
    return json.dumps(prediction.to_dict()), contract.JSON_CONTENT_TYPE


# --- request parsing -------------------------------------------------------------------------------------------

_JSON_SHAPE = '{"instances": [{"b64": "<base64 image>"}, ...], "top_k": 3} (top_k optional)'


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def check_content_type(content_type: str | None) -> str:
    """The media type of a request's Content-Type, or a 415 :class:`InferenceError`."""
    media_type = _media_type(content_type)
    if media_type not in contract.REQUEST_CONTENT_TYPES:
        raise InferenceError(
            f"content type {content_type!r} is not supported: send one of {', '.join(contract.REQUEST_CONTENT_TYPES)}",
            status_code=415,
            code="unsupported_content_type",
        )
    return media_type


def decode_request(body: bytes | bytearray | str | None, content_type: str | None, preprocess: Preprocessor) -> Batch:
    """Parse and preprocess one request for the model ``preprocess`` belongs to (no global state)."""
    return parse_request(body, content_type, preprocess).decode(preprocess)


def parse_request(
    body: bytes | bytearray | str | None, content_type: str | None, preprocess: Preprocessor
) -> EncodedRequest:
    """Parse and check one request (content type, JSON shape, base64, top_k) without decoding its images."""
    media_type = check_content_type(content_type)
    if body is None or len(body) == 0:
        raise InferenceError("the request body is empty: send an image or a JSON batch", code="empty_body")
    default_top_k = min(contract.DEFAULT_TOP_K, preprocess.config.num_classes)
    if media_type in contract.IMAGE_CONTENT_TYPES:
        data = body.encode("latin-1") if isinstance(body, str) else bytes(body)
        return EncodedRequest([(data, "the request body")], default_top_k)
    return _json_request(body, preprocess, default_top_k)


def _json_request(body: bytes | bytearray | str, preprocess: Preprocessor, default_top_k: int) -> EncodedRequest:
    if isinstance(body, (bytes, bytearray)):  # the toolkit decodes only an exact "application/json"
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InferenceError(f"the JSON body is not UTF-8 text: {error}", code="invalid_json") from None
    try:
        payload = json.loads(body)
    except ValueError as error:  # JSONDecodeError, and numbers too long to convert
        raise InferenceError(f"the body is not valid JSON ({error}): send {_JSON_SHAPE}", code="invalid_json") from None
    except RecursionError:
        raise InferenceError(
            f"the JSON is nested too deeply to parse: send {_JSON_SHAPE}", code="invalid_json"
        ) from None
    if not isinstance(payload, dict) or "instances" not in payload:
        raise InferenceError(f"the JSON has no 'instances' list: send {_JSON_SHAPE}", code="invalid_request")
    unknown = sorted(set(payload) - {"instances", "top_k"})
    if unknown:
        raise InferenceError(f"the JSON has unknown keys {unknown}: send {_JSON_SHAPE}", code="invalid_request")
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise InferenceError(f"'instances' must be a non-empty list: send {_JSON_SHAPE}", code="invalid_request")
    if len(instances) > contract.MAX_BATCH_IMAGES:
        raise InferenceError(
            f"the batch has {len(instances)} instances, over the limit of {contract.MAX_BATCH_IMAGES}: "
            "split it into smaller requests",
            status_code=413,
            code="batch_too_large",
        )
    top_k = payload.get("top_k", default_top_k)
    num_classes = preprocess.config.num_classes
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_classes:
        raise InferenceError(
            f"'top_k' must be an integer from 1 to {num_classes}, got {top_k!r}", code="invalid_request"
        )
    encoded = []
    for position, instance in enumerate(instances):
        name = f"instances[{position}]"
        if not isinstance(instance, dict) or set(instance) != {"b64"} or not isinstance(instance["b64"], str):
            raise InferenceError(f'{name} must be an object {{"b64": "<base64 image>"}}', code="invalid_request")
        try:
            encoded.append((base64.b64decode(instance["b64"], validate=True), name))
        except (binascii.Error, ValueError) as error:
            raise InferenceError(f"{name}.b64 is not valid base64: {error}", code="invalid_base64") from None
    return EncodedRequest(encoded, top_k)
