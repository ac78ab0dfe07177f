"""The serving handlers, called the way the SageMaker PyTorch serving toolkit calls them, and on their own."""

from __future__ import annotations

import base64
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from _notebook import eval_transform
from _serving import huge_png_header
from PIL import Image

from entrypoints import contract, inference, modeling

CLASSES = ["cat", "dog", "fox", "owl", "elk", "yak", "emu"]
SERVING_MODULES = ("inference", "modeling", "transforms", "contract")


def _config() -> modeling.ModelConfig:
    return modeling.ModelConfig("resnet18", len(CLASSES), CLASSES, input_size=32, resize_size=36)


def _image(width: int = 48, height: int = 40, mode: str = "RGB", seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = modeling.build_model(_config())
    return modeling.save_artifact(model, tmp_path_factory.mktemp("artifact") / "model", _config())


@pytest.fixture(scope="module")
def reference_model(artifact: Path) -> torch.nn.Module:
    model, _ = modeling.load_model(artifact)
    return model


def _reference_probabilities(model: torch.nn.Module, body: bytes) -> np.ndarray:
    """What the notebooks' way gives: PIL open, eval_transform, eager model, softmax."""
    image = Image.open(io.BytesIO(body)).convert("RGB")
    with torch.no_grad():
        return torch.softmax(model(eval_transform(_config())(image).unsqueeze(0)), dim=1)[0].numpy()


# --- the toolkit ------------------------------------------------------------------------------------------------


class _RequestProcessor:
    def __init__(self, headers: dict[str, str]) -> None:
        self._headers = headers

    def get_request_properties(self) -> dict[str, str]:
        return self._headers


class _Context:
    """The parts of TorchServe's ``Context`` that the toolkit's handler service uses."""

    def __init__(self, model_dir: Path, headers: dict[str, str] | None = None) -> None:
        self.system_properties = {"model_dir": str(model_dir)}
        self.request_processor = [_RequestProcessor(headers or {})]
        self.model_name = "model"
        self.status: tuple[int, str] | None = None
        self.content_type: str | None = None

    def set_response_status(self, code: int, phrase: str) -> None:
        self.status = (code, phrase)

    def set_response_content_type(self, index: int, value: str) -> None:
        self.content_type = value


class _Endpoint:
    """The toolkit's HandlerService over an artifact, as TorchServe drives it in the container."""

    def __init__(self, model_dir: Path) -> None:
        from sagemaker_pytorch_serving_container.handler_service import HandlerService

        self.model_dir = model_dir
        self.service = HandlerService()
        self.service.initialize(_Context(model_dir))

    def invoke(self, body: bytes, content_type: str | None, accept: str | None = None) -> tuple[int, str, str | None]:
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if accept is not None:
            headers["Accept"] = accept
        context = _Context(self.model_dir, headers)
        response = self.service.handle([{"body": body}], context)
        status = context.status[0] if context.status else 200
        text = response[0].decode() if isinstance(response[0], bytes) else response[0]
        return status, text, context.content_type


@pytest.fixture(scope="module")
def endpoint(artifact: Path) -> Iterator[_Endpoint]:
    """The handler service with <model>/code importable, as TorchServe's PYTHONPATH makes it in the container."""
    code_dir = str(artifact / contract.CODE_DIR)
    saved = {name: sys.modules.pop(name) for name in SERVING_MODULES if name in sys.modules}
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(contract.ENV_INFERENCE_RUNTIME, raising=False)
        patch.setenv("PYTHONPATH", "")  # the service prepends code/ to it for its workers
        patch.syspath_prepend(code_dir)
        yield _Endpoint(artifact)
    for name in SERVING_MODULES:
        sys.modules.pop(name, None)
    sys.modules.update(saved)


def test_the_toolkit_loads_the_handlers_from_the_artifacts_code_folder(endpoint: _Endpoint, artifact: Path) -> None:
    loaded = sys.modules["inference"]
    assert Path(loaded.__file__).resolve() == (artifact / "code" / "inference.py").resolve()
    assert loaded._LOADED["model"].runtime == "onnxruntime"  # onnxruntime is installed here: the fastest


@pytest.mark.parametrize(
    ("content_type", "fmt"),
    [("image/jpeg", "JPEG"), ("image/png", "PNG"), ("application/x-image", "JPEG"), ("application/x-image", "PNG")],
)
def test_image_requests_round_trip_with_the_reference_answers(
    endpoint: _Endpoint, reference_model: torch.nn.Module, content_type: str, fmt: str
) -> None:
    body = _encode(_image(seed=1), fmt)
    status, text, response_type = endpoint.invoke(body, content_type, "application/json")
    assert status == 200, text
    assert response_type == "application/json"
    predictions = json.loads(text)["predictions"]
    assert len(predictions) == 1
    top = predictions[0]["top_k"]
    assert len(top) == contract.DEFAULT_TOP_K
    expected = _reference_probabilities(reference_model, body)
    order = np.argsort(-expected)[: contract.DEFAULT_TOP_K]
    assert [entry["index"] for entry in top] == order.tolist()
    assert [entry["class"] for entry in top] == [CLASSES[i] for i in order]
    np.testing.assert_allclose([entry["probability"] for entry in top], expected[order], atol=1e-4)
    assert predictions[0]["class"] == top[0]["class"] and predictions[0]["probability"] == top[0]["probability"]


def test_json_batches_round_trip_in_order_with_their_top_k(
    endpoint: _Endpoint, reference_model: torch.nn.Module
) -> None:
    bodies = [_encode(_image(seed=s), "PNG") for s in (2, 3, 4)]
    request = {"instances": [{"b64": base64.b64encode(b).decode()} for b in bodies], "top_k": 2}
    status, text, response_type = endpoint.invoke(json.dumps(request).encode(), "application/json", "*/*")
    assert status == 200, text
    assert response_type == "application/json"
    predictions = json.loads(text)["predictions"]
    assert len(predictions) == 3
    for body, prediction in zip(bodies, predictions, strict=True):
        expected = _reference_probabilities(reference_model, body)
        assert [entry["index"] for entry in prediction["top_k"]] == np.argsort(-expected)[:2].tolist()
        np.testing.assert_allclose(prediction["probability"], expected.max(), atol=1e-4)


def test_json_with_a_charset_parameter_is_accepted(endpoint: _Endpoint) -> None:
    request = {"instances": [{"b64": base64.b64encode(_encode(_image(), "JPEG")).decode()}]}
    status, text, _ = endpoint.invoke(json.dumps(request).encode(), "application/json; charset=utf-8")
    assert status == 200, text
    assert len(json.loads(text)["predictions"][0]["top_k"]) == contract.DEFAULT_TOP_K


def _b64(body: bytes) -> str:
    return base64.b64encode(body).decode()


_JPEG = _encode(_image(64, 48, seed=5), "JPEG", quality=90)
_PNG = _encode(_image(64, 48, seed=6), "PNG")
_BAD_REQUESTS = {
    "unsupported content type": (b"a,b\n1,2\n", "text/csv", None, 415, "content type 'text/csv' is not supported"),
    "unsupported image type": (_JPEG, "image/gif", None, 415, "content type 'image/gif' is not supported"),
    "no content type": (_JPEG, None, None, 415, "is not supported"),
    "unsupported accept": (_JPEG, "image/jpeg", "text/csv", 406, "accept 'text/csv' is not supported"),
    "empty body": (b"", "image/jpeg", None, 400, "empty"),
    "not an image": (b"this is plain text, not a picture", "image/jpeg", None, 400, "is not an image"),
    "truncated jpeg": (_JPEG[: len(_JPEG) // 2], "image/jpeg", None, 400, "is truncated"),
    "truncated png": (_PNG[: len(_PNG) // 2], "image/png", None, 400, "is truncated"),
    "over the pixel limit": (huge_png_header(8000, 6000), "image/png", None, 413, "over the limit of 40000000"),
    "far over the pixel limit": (huge_png_header(30000, 20000), "image/png", None, 413, "is too large"),
    "json that is not json": (b"{not json", "application/json", None, 400, "not valid JSON"),
    "json list": (b"[1, 2]", "application/json", None, 400, "no 'instances' list"),
    "json without instances": (b'{"images": []}', "application/json", None, 400, "no 'instances' list"),
    "json empty instances": (b'{"instances": []}', "application/json", None, 400, "non-empty list"),
    "json unknown key": (
        json.dumps({"instances": [{"b64": _b64(_JPEG)}], "topk": 2}).encode(),
        "application/json",
        None,
        400,
        "unknown keys ['topk']",
    ),
    "json instance not an object": (b'{"instances": ["abc"]}', "application/json", None, 400, "instances[0] must be"),
    "json bad base64": (b'{"instances": [{"b64": "***"}]}', "application/json", None, 400, "not valid base64"),
    "json instance not an image": (
        json.dumps({"instances": [{"b64": _b64(_JPEG)}, {"b64": _b64(b"nope")}]}).encode(),
        "application/json",
        None,
        400,
        "instances[1] is not an image",
    ),
    "json top_k too large": (
        json.dumps({"instances": [{"b64": _b64(_JPEG)}], "top_k": 99}).encode(),
        "application/json",
        None,
        400,
        "'top_k' must be an integer from 1 to 7",
    ),
    "json top_k a string": (
        json.dumps({"instances": [{"b64": _b64(_JPEG)}], "top_k": "3"}).encode(),
        "application/json",
        None,
        400,
        "'top_k' must be an integer",
    ),
    "batch over the limit": (
        json.dumps({"instances": [{"b64": "x"}] * (contract.MAX_BATCH_IMAGES + 1)}).encode(),
        "application/json",
        None,
        413,
        f"over the limit of {contract.MAX_BATCH_IMAGES}",
    ),
}


@pytest.mark.parametrize("case", list(_BAD_REQUESTS))
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_worker_keeps_serving(endpoint: _Endpoint, case: str) -> None:
    body, content_type, accept, expected_status, expected_text = _BAD_REQUESTS[case]
    status, text, _ = endpoint.invoke(body, content_type, accept)
    assert status == expected_status, text
    assert expected_text in text.splitlines()[0]  # the first line is the message; the toolkit appends a trace
    status, text, _ = endpoint.invoke(_JPEG, "image/jpeg", "application/json")
    assert status == 200 and json.loads(text)["predictions"], text


# --- plain Python use -------------------------------------------------------------------------------------------


def test_inference_errors_are_value_errors_with_a_status_and_a_code(artifact: Path) -> None:
    from sagemaker_inference.errors import GenericInferenceToolkitError

    preprocess = inference.Preprocessor(_config())
    with pytest.raises(inference.InferenceError) as raised:
        inference.decode_request(b"", "image/png", preprocess)
    error = raised.value
    assert isinstance(error, ValueError) and isinstance(error, GenericInferenceToolkitError)
    assert (error.status_code, error.code) == (400, "empty_body")
    assert json.loads(error.to_json()) == {"error": str(error), "code": "empty_body"}  # what endpoints send
    with pytest.raises(inference.InferenceError) as raised:
        inference.decode_request(_JPEG, "image/gif", preprocess)
    assert (raised.value.status_code, raised.value.code) == (415, "unsupported_content_type")


def test_handlers_work_without_the_toolkit(artifact: Path, reference_model: torch.nn.Module) -> None:
    model = inference.model_fn(str(artifact))
    data = inference.input_fn(_PNG, "image/png")
    assert data.images.shape == (1, 3, 32, 32) and data.images.dtype == np.float32
    body, content_type = inference.output_fn(inference.predict_fn(data, model), None)
    assert content_type == "application/json"
    top = json.loads(body)["predictions"][0]["top_k"]
    expected = _reference_probabilities(reference_model, _PNG)
    np.testing.assert_allclose([t["probability"] for t in top], np.sort(expected)[::-1][:5], atol=1e-4)


@pytest.mark.parametrize(
    ("mode", "size", "fmt"),
    [("RGB", (48, 40), "PNG"), ("L", (40, 52), "PNG"), ("RGBA", (37, 61), "PNG"), ("P", (50, 50), "GIF")],
)
def test_preprocessing_equals_the_eval_transform(mode: str, size: tuple[int, int], fmt: str) -> None:
    body = _encode(_image(*size, mode=mode, seed=7), fmt)
    served = inference.Preprocessor(_config(), draft_factor=0)(body)
    expected = eval_transform(_config())(Image.open(io.BytesIO(body)).convert("RGB")).numpy()
    assert served.shape == expected.shape == (3, 32, 32)
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_large_jpegs_are_decoded_at_reduced_size_and_still_give_nearly_the_same_pixels() -> None:
    yy, xx = np.mgrid[0:600, 0:800]
    smooth = np.stack([(np.sin(xx / 40 + c) * np.cos(yy / 55) * 0.5 + 0.5) * 255 for c in range(3)], axis=-1)
    body = _encode(Image.fromarray(smooth.astype(np.uint8)), "JPEG", quality=95)
    reduced = inference.Preprocessor(_config(), draft_factor=2.0)
    full = inference.Preprocessor(_config(), draft_factor=0)
    # resize_size 36, factor 2: the short side needs >= 72 px; 600/8 = 75, so the DCT decodes at 1/8.
    assert reduced.open(body).size == (100, 75)
    assert full.open(body).size == (800, 600)
    difference = np.abs(reduced(body) - full(body))
    assert difference.mean() < 0.02  # normalised units: about 1 grey level
    assert inference.Preprocessor(_config(), draft_factor=2.0).open(_PNG).size == (64, 48)  # only JPEG is drafted


def test_the_draft_factor_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(contract.ENV_JPEG_DRAFT_FACTOR, "0")
    assert inference.jpeg_draft_factor_from_env() == 0.0
    monkeypatch.setenv(contract.ENV_JPEG_DRAFT_FACTOR, "lots")
    with pytest.raises(ValueError, match="must be a number"):
        inference.jpeg_draft_factor_from_env()
    monkeypatch.delenv(contract.ENV_JPEG_DRAFT_FACTOR)
    assert inference.jpeg_draft_factor_from_env() == inference.DEFAULT_JPEG_DRAFT_FACTOR


# --- runtimes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["onnxruntime", "torchscript", "eager"])
def test_every_runtime_gives_the_eager_answers(reference_model: torch.nn.Module, runtime: str) -> None:
    name, forward = inference.select_runtime(reference_model, _config(), runtime, threads=1)
    assert name == runtime
    images = np.random.default_rng(8).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = reference_model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(forward(images), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_auto_falls_back_when_onnxruntime_is_missing_or_disagrees(
    reference_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    name, _ = inference.select_runtime(reference_model, _config(), "auto", threads=1)
    assert name == "torchscript"
    assert "onnxruntime is not available" in caplog.text
    monkeypatch.setattr(
        inference, "_torchscript_forward", lambda model, size: lambda images: np.zeros((len(images), 7))
    )
    name, _ = inference.select_runtime(reference_model, _config(), "auto", threads=1)
    assert name == "eager"
    assert "torchscript differs from eager" in caplog.text
    with pytest.raises(RuntimeError, match="onnxruntime runtime was asked for"):
        inference.select_runtime(reference_model, _config(), "onnxruntime", threads=1)
    with pytest.raises(ValueError, match="choose auto or one of"):
        inference.select_runtime(reference_model, _config(), "tensorrt", threads=1)


def test_threads_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(contract.ENV_INFERENCE_THREADS, "3")
    assert inference.inference_threads() == 3
    monkeypatch.delenv(contract.ENV_INFERENCE_THREADS)
    monkeypatch.setattr(inference.contract, "available_cpus", lambda: 8)
    monkeypatch.setenv(contract.ENV_MODEL_SERVER_WORKERS, "4")
    assert inference.inference_threads() == 2
    monkeypatch.setenv(contract.ENV_INFERENCE_THREADS, "0")
    with pytest.raises(ValueError, match="positive integer"):
        inference.inference_threads()


def test_the_artifact_ships_the_handlers_and_a_requirements_file_that_needs_no_index(artifact: Path) -> None:
    code = artifact / contract.CODE_DIR
    assert {p.name for p in code.iterdir()} >= {*contract.SERVING_CODE_FILES, "requirements.txt"}
    lines = [line.strip() for line in (code / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == []  # both images have what it needs
