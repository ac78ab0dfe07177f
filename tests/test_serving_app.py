"""The artifact's Ray Serve app (entrypoints/deployment.py) without Ray: layout, sizing, the replica's handling of
requests, its concurrency (decoding outside the one-at-a-time model thread) and a start with no package index."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from _serving import HOSTILE_REQUESTS, JPEG, PNG, VALID_REQUESTS, b64, encode, image, make_artifact

from entrypoints import contract, deployment, inference

ARTIFACT_MODULES = ("deployment", "inference", "modeling", "transforms", "contract")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact"))


@pytest.fixture(scope="module")
def replica(artifact: Path) -> Iterator[deployment.ImageClassifier]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(contract.ENV_INFERENCE_THREADS, "2")
        patch.delenv(contract.ENV_INFERENCE_RUNTIME, raising=False)
        yield deployment.ImageClassifier(str(artifact), threads=2)


def _handle(replica: deployment.ImageClassifier, body: bytes, headers: dict[str, str]) -> deployment.Reply:
    content_type = headers.get("Content-Type", contract.JSON_CONTENT_TYPE)  # the adapter's defaults
    accept = headers.get("Accept", contract.JSON_CONTENT_TYPE)
    return asyncio.run(replica.handle("POST", body, content_type, accept))


# --- the artifact ----------------------------------------------------------------------------------------------


def test_the_artifact_carries_one_ray_serve_app_at_its_root(artifact: Path) -> None:
    config = yaml.safe_load((artifact / contract.RAY_SERVE_CONFIG_FILE).read_text())
    (application,) = config["applications"]
    assert application["route_prefix"] == "/"
    module, builder = application["import_path"].split(":")
    assert (artifact / f"{module}.py").is_file() and builder == "build_app"
    assert "deployments" not in application  # sizing comes from the environment, which config options would override
    assert (artifact / contract.CODE_DIR / "inference.py").is_file()  # and the legacy image's handlers


@pytest.mark.parametrize("version", ["3.12.1", "3.13.0"])
def test_the_deployment_module_compiles_on_the_images_pythons(artifact: Path, version: str) -> None:
    python = Path(f"/root/.pyenv/versions/{version}/bin/python")
    if not python.is_file():
        pytest.skip(f"Python {version} is not installed here")
    for path in (artifact / "deployment.py", *sorted((artifact / "code").glob("*.py"))):
        result = subprocess.run([python, "-m", "py_compile", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_requirements_install_with_no_package_index_reachable(artifact: Path, tmp_path: Path) -> None:
    """What the container does at every start, under network isolation: no index, no configured mirror."""
    environment = {**os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--target", str(tmp_path)]
    result = subprocess.run(
        [*command, "-r", str(artifact / "code" / "requirements.txt")], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert not [path for path in tmp_path.iterdir() if path.name != "bin"]  # nothing needed, nothing fetched
    # the check has teeth: a requirement that needs an index fails the same way the container's start would
    (tmp_path / "needs-index.txt").write_text("onnxruntime\n")
    result = subprocess.run(
        [*command, "-r", str(tmp_path / "needs-index.txt")], env=environment, capture_output=True, text=True
    )
    assert result.returncode != 0


# --- sizing ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instance", "cpus", "gpus", "expected"),
    [
        ("ml.m5.large", 2, 0, (1, 2, 8, 0.0)),  # at least a batch (8) at once
        ("ml.m5.xlarge", 4, 0, (1, 4, 8, 0.0)),
        ("ml.c5.9xlarge", 36, 0, (9, 4, 8, 0.0)),
        ("ml.g4dn.xlarge", 4, 1, (1, 4, 8, 1.0)),
        ("ml.g5.12xlarge", 48, 4, (4, 12, 24, 1.0)),
    ],
)
def test_the_serving_plan_is_sized_for_the_instance(instance: str, cpus: int, gpus: int, expected: tuple) -> None:
    plan = deployment.serving_plan(cpus, gpus, environ={})
    assert (plan.replicas, plan.threads, plan.max_ongoing_requests, plan.gpus_per_replica) == expected, instance


def test_the_serving_plan_takes_the_models_environment() -> None:
    environ = {
        contract.ENV_SERVE_REPLICAS: "3",
        contract.ENV_INFERENCE_THREADS: "1",
        contract.ENV_SERVE_MAX_ONGOING_REQUESTS: "16",
    }
    assert deployment.serving_plan(8, 0, environ) == deployment.ServingPlan(3, 1, 16, 0.0, 8, 5.0)
    batching = {contract.ENV_SERVE_MAX_BATCH_SIZE: "16", contract.ENV_SERVE_BATCH_WAIT_MS: "2.5"}
    assert deployment.serving_plan(8, 0, {**environ, **batching}) == deployment.ServingPlan(3, 1, 16, 0.0, 16, 2.5)
    assert deployment.serving_plan(2, 0, {contract.ENV_SERVE_MAX_BATCH_SIZE: "1"}).max_ongoing_requests == 4
    assert deployment.serving_plan(8, 2, {contract.ENV_SERVE_REPLICAS: "4"}).gpus_per_replica == 0.5
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match=f"{contract.ENV_SERVE_REPLICAS}='{bad}' must be a positive integer"):
            deployment.serving_plan(8, 0, {contract.ENV_SERVE_REPLICAS: bad})
    for bad in ("-1", "soon", "5000", "nan"):
        with pytest.raises(ValueError, match=f"{contract.ENV_SERVE_BATCH_WAIT_MS}='{bad}' must be a number"):
            deployment.serving_plan(8, 0, {contract.ENV_SERVE_BATCH_WAIT_MS: bad})


# --- where the model is found -----------------------------------------------------------------------------------------


@pytest.fixture()
def artifact_module(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """The artifact's own deployment.py, imported as the container imports it (model and code/ on the path)."""
    saved = {name: sys.modules.pop(name) for name in ARTIFACT_MODULES if name in sys.modules}
    monkeypatch.syspath_prepend(str(artifact / contract.CODE_DIR))
    monkeypatch.syspath_prepend(str(artifact))
    yield importlib.import_module("deployment")
    for name in ARTIFACT_MODULES:
        sys.modules.pop(name, None)
    sys.modules.update(saved)


@pytest.mark.slow
def test_the_model_folder_is_the_modules_own_or_sm_model_dir_never_the_cwd(
    artifact_module, artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Path(artifact_module.__file__).resolve() == (artifact / "deployment.py").resolve()
    decoy = make_artifact(tmp_path / "decoy", seed=1)
    monkeypatch.chdir(decoy)  # a model in the current folder is not the one served
    monkeypatch.delenv(contract.ENV_SERVE_MODEL_DIR, raising=False)
    assert artifact_module.resolve_model_dir() == artifact.resolve()
    monkeypatch.setenv(contract.ENV_SERVE_MODEL_DIR, str(decoy))
    assert artifact_module.resolve_model_dir() == decoy.resolve()
    monkeypatch.setenv(contract.ENV_SERVE_MODEL_DIR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"holds no model_config\.json"):
        artifact_module.resolve_model_dir()


# --- the replica ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_model_loads_once_then_one_warm_up_request_runs(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(contract.ENV_INFERENCE_THREADS, "1")  # the replica sets it for model_fn
    calls: list[str] = []
    for name in ("model_fn", "input_fn", "predict_fn", "output_fn"):
        original = getattr(inference, name)
        monkeypatch.setattr(inference, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    replica = deployment.ImageClassifier(str(artifact), threads=1)
    assert calls == ["model_fn", "input_fn", "predict_fn", "output_fn"]  # loaded, then warmed through every handler
    assert _handle(replica, JPEG, {"Content-Type": "image/jpeg"}).status == 200
    assert calls.count("model_fn") == 1


@pytest.mark.parametrize("content_type", list(VALID_REQUESTS))
def test_each_content_type_is_answered_as_the_handlers_answer_it(replica, content_type: str) -> None:
    body, media_type = VALID_REQUESTS[content_type]
    reply = _handle(replica, body, {"Content-Type": media_type})
    assert (reply.status, reply.content_type) == (200, "application/json")
    expected, _ = inference.output_fn(
        inference.predict_fn(inference.input_fn(body, media_type), replica.model), "application/json"
    )
    assert json.loads(reply.body) == json.loads(expected)


def test_a_large_batch_is_predicted_in_chunks_with_the_same_answers(replica) -> None:
    images = [JPEG, PNG] * 10  # 20 images: three forwards of at most 8
    body = json.dumps({"instances": [{"b64": b64(data)} for data in images], "top_k": 2}).encode()
    forwards: list[int] = []
    original = inference.predict_fn

    def counting(data, model):
        forwards.append(len(data.images))
        return original(data, model)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inference, "predict_fn", counting)
        reply = _handle(replica, body, {"Content-Type": "application/json"})
    assert forwards == [8, 8, 4]
    whole = inference.predict_fn(inference.input_fn(body, "application/json"), replica.model)
    assert json.loads(reply.body) == whole.to_dict()


@pytest.mark.parametrize("case", [name for name in HOSTILE_REQUESTS if "no content type" not in name])
def test_hostile_requests_get_a_4xx_with_error_and_code_and_the_replica_serves_on(replica, case: str) -> None:
    body, headers, status, code = HOSTILE_REQUESTS[case]
    reply = _handle(replica, body, headers)
    answer = json.loads(reply.body)
    assert (reply.status, answer["code"], set(answer)) == (status, code, {"error", "code"}), answer
    assert _handle(replica, JPEG, {"Content-Type": "image/jpeg"}).status == 200


def test_a_handler_failure_is_a_500_with_error_and_code_and_no_trace(replica, monkeypatch) -> None:
    def broken(data, model):
        raise RuntimeError("weights went missing")

    monkeypatch.setattr(inference, "predict_fn", broken)
    reply = _handle(replica, JPEG, {"Content-Type": "image/jpeg"})
    assert reply.status == 500
    assert json.loads(reply.body) == {
        "error": "the model server failed on this request: weights went missing",
        "code": "internal_error",
    }
    monkeypatch.undo()
    assert _handle(replica, JPEG, {"Content-Type": "image/jpeg"}).status == 200


def test_get_answers_the_replicas_health_and_other_methods_405(replica) -> None:
    health = asyncio.run(replica.handle("GET", b"", None, None))
    assert health.status == 200 and json.loads(health.body)["status"] == "Healthy"
    refused = asyncio.run(replica.handle("DELETE", b"", None, None))
    assert refused.status == 405 and json.loads(refused.body)["code"] == "method_not_allowed"


class _Request:
    """The parts of a Starlette request the Ray entry reads; reading the body of an oversized one fails."""

    def __init__(self, body: bytes, headers: dict[str, str], method: str = "POST", readable: bool = True) -> None:
        self.method, self.headers, self._body, self._readable = method, headers, body, readable

    async def stream(self):
        if not self._readable:
            raise AssertionError("the body of an oversized request was read")
        for start in range(0, len(self._body), 65536):
            yield self._body[start : start + 65536]


def test_the_ray_entry_refuses_a_body_over_the_payload_limit_before_reading_it(replica) -> None:
    length = str(contract.MAX_PAYLOAD_BYTES + 1)
    response = asyncio.run(replica(_Request(b"", {"content-length": length}, readable=False)))
    assert response.status_code == 413 and json.loads(response.body)["code"] == "payload_too_large"
    # without a declared length (chunked) it stops reading at the limit
    response = asyncio.run(replica(_Request(b"\0" * (contract.MAX_PAYLOAD_BYTES + 70000), {})))
    assert response.status_code == 413
    response = asyncio.run(replica(_Request(JPEG, {"content-type": "image/jpeg", "accept": "application/json"})))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"


# --- decoding happens outside the model thread ------------------------------------------------------------------------


def _concurrently(replica, first: tuple[bytes, str], second: tuple[bytes, str], hold: str) -> dict[str, float]:
    """Send ``first`` then ``second`` while ``first`` is held inside ``hold`` (input_fn or predict_fn)."""
    entered, release, finished = threading.Event(), threading.Event(), {}
    original = getattr(inference, hold)

    def held(*args):
        if not entered.is_set() and (hold != "parse_request" or args[0] == first[0]):
            entered.set()
            assert release.wait(30)
        return original(*args)

    async def run() -> None:
        async def send(name: str, body: bytes, content_type: str) -> None:
            reply = await replica.handle("POST", body, content_type, "application/json")
            assert reply.status == 200, reply.body
            finished[name] = time.monotonic()

        first_task = asyncio.create_task(send("first", *first))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
        await asyncio.wait_for(send("second", *second), 30)  # done while the first is still held
        release.set()
        await first_task

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inference, hold, held)
        asyncio.run(run())
    return finished


def test_a_batch_still_decoding_does_not_hold_up_a_small_request(replica) -> None:
    batch = json.dumps({"instances": [{"b64": b64(PNG)}] * 32}).encode()
    finished = _concurrently(replica, (batch, "application/json"), (JPEG, "image/jpeg"), hold="parse_request")
    assert finished["second"] < finished["first"]


@pytest.mark.slow
def test_two_large_batches_decoding_hold_a_small_request_up_for_a_few_image_decodes_only(replica) -> None:
    """Both decode threads busy with batches of slow images: the small request waits a decode or two, not a batch."""
    decode_s, images = 0.15, 16  # each batch: 2.4 s of decoding
    original = inference.Preprocessor.__call__

    def slow_for_batches(self, data: bytes, name: str = "the image"):
        if name.startswith("instances["):
            time.sleep(decode_s)
        return original(self, data, name)

    batch = json.dumps({"instances": [{"b64": b64(PNG)}] * images}).encode()

    async def run() -> dict[str, float]:
        started, finished = time.monotonic(), {}

        async def send(name: str, body: bytes, content_type: str) -> None:
            reply = await replica.handle("POST", body, content_type, "application/json")
            assert reply.status == 200, reply.body
            finished[name] = time.monotonic() - started

        batches = [asyncio.create_task(send(f"batch {n}", batch, "application/json")) for n in (1, 2)]
        await asyncio.sleep(0.3)  # both threads are decoding batch images
        small_sent = time.monotonic() - started
        await send("small", JPEG, "image/jpeg")
        await asyncio.gather(*batches)
        return {**finished, "small": finished["small"] - small_sent}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inference.Preprocessor, "__call__", slow_for_batches)
        took = asyncio.run(run())
    assert took["batch 1"] > images * decode_s and took["batch 2"] > images * decode_s
    assert took["small"] < 1.0, took  # a whole batch's decoding is 2.4 s


def test_a_request_decodes_while_another_holds_the_model(replica) -> None:
    decoded: list[int] = []
    original = inference.parse_request
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            inference, "parse_request", lambda body, *args: decoded.append(len(body)) or original(body, *args)
        )
        entered, release = threading.Event(), threading.Event()
        predict = inference.predict_fn

        def slow_predict(data, model):
            entered.set()
            assert release.wait(30)
            return predict(data, model)

        patch.setattr(inference, "predict_fn", slow_predict)

        async def run() -> None:
            first = asyncio.create_task(replica.handle("POST", JPEG, "image/jpeg", "application/json"))
            await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
            second = asyncio.create_task(replica.handle("POST", PNG, "image/png", "application/json"))
            while len(decoded) < 2:  # the second request is decoded while the first holds the model thread
                await asyncio.sleep(0.01)
            assert not second.done()  # ... and then waits for the model thread, one forward at a time
            release.set()
            assert (await first).status == 200 and (await second).status == 200

        asyncio.run(run())
    assert decoded == [len(JPEG), len(PNG)]


def test_predictions_are_the_handlers_probabilities(replica) -> None:
    reply = _handle(replica, PNG, {"Content-Type": "image/png"})
    top = json.loads(reply.body)["predictions"][0]["top_k"]
    logits = replica.model.logits(inference.input_fn(PNG, "image/png").images)
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose([t["probability"] for t in top], np.sort(probabilities[0])[::-1][:5], atol=1e-6)


# --- dynamic batching ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batching_replica(artifact: Path) -> Iterator[deployment.ImageClassifier]:
    """A replica that batches up to 8 single-image requests, waiting up to 200 ms for them (long, to be sure)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(contract.ENV_INFERENCE_RUNTIME, raising=False)
        yield deployment.ImageClassifier(str(artifact), threads=2, max_batch_size=8, batch_wait_ms=200)


def _burst(replica: deployment.ImageClassifier, bodies: list[tuple[bytes, str]]) -> list[deployment.Reply]:
    """Send every request at once, on one event loop (as concurrent clients reach one replica)."""

    async def run() -> list[deployment.Reply]:
        return await asyncio.gather(*(replica.handle("POST", body, kind, "application/json") for body, kind in bodies))

    return list(asyncio.run(run()))


def _pictures(count: int) -> list[bytes]:
    return [encode(image(40 + 3 * i, 36, seed=100 + i), "PNG") for i in range(count)]


def test_concurrent_single_image_requests_share_a_forward_and_each_gets_its_own_answer(batching_replica) -> None:
    pictures = _pictures(6)
    batching_replica.batch_sizes.clear()
    replies = _burst(batching_replica, [(body, "image/png") for body in pictures])
    assert batching_replica.batch_sizes == {6: 1}  # one forward for all six
    for body, reply in zip(pictures, replies, strict=True):
        alone = inference.predict_fn(inference.input_fn(body, "image/png"), batching_replica.model).to_dict()
        answer = json.loads(reply.body)
        assert reply.status == 200
        assert [k["index"] for k in answer["predictions"][0]["top_k"]] == [
            k["index"] for k in alone["predictions"][0]["top_k"]
        ]
        np.testing.assert_allclose(
            [k["probability"] for k in answer["predictions"][0]["top_k"]],
            [k["probability"] for k in alone["predictions"][0]["top_k"]],
            atol=1e-5,
        )


def test_a_batch_holding_one_corrupt_image_answers_400_for_that_request_only(batching_replica) -> None:
    pictures = _pictures(7)
    corrupt = JPEG[: len(JPEG) // 2]
    batching_replica.batch_sizes.clear()
    replies = _burst(
        batching_replica,
        [(body, "image/png") for body in pictures[:3]]
        + [(corrupt, "image/jpeg")]
        + [(body, "image/png") for body in pictures[3:]],
    )
    statuses = [reply.status for reply in replies]
    assert statuses == [200, 200, 200, 400, 200, 200, 200, 200]
    assert json.loads(replies[3].body)["code"] == "truncated_image"
    assert sum(size * count for size, count in batching_replica.batch_sizes.items()) == 7  # the others, batched
    assert max(batching_replica.batch_sizes) > 1
    assert len({reply.body for reply in replies}) == 8  # every request its own answer


def test_a_lone_request_does_not_wait_for_company(batching_replica) -> None:
    _handle(batching_replica, PNG, {"Content-Type": "image/png"})  # warm
    started = time.perf_counter()
    reply = _handle(batching_replica, PNG, {"Content-Type": "image/png"})
    assert reply.status == 200 and time.perf_counter() - started < 0.2  # well under the 200 ms wait


@pytest.mark.slow
def test_batching_is_off_with_a_batch_size_of_one(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(contract.ENV_SERVE_MAX_BATCH_SIZE, "1")
    monkeypatch.setenv(contract.ENV_INFERENCE_THREADS, "1")
    replica = deployment.build_replica({"model_dir": str(artifact)})
    replies = _burst(replica, [(body, "image/png") for body in _pictures(3)])
    assert [reply.status for reply in replies] == [200] * 3 and not replica.batch_sizes
    assert json.loads(replica.health().body)["max_batch_size"] == 1


def test_the_batcher_waits_at_most_its_wait_runs_full_batches_at_once_and_shares_failures() -> None:
    calls: list[list[int]] = []

    async def double(items: list[int]) -> list[int]:
        calls.append(items)
        if -1 in items:
            raise ValueError("the model broke")
        return [2 * item for item in items]

    batcher = deployment.MicroBatcher(double, max_batch_size=3, wait_s=0.15)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await batcher(1) == 2  # alone: runs when the wait is over
        assert 0.15 <= loop.time() - started < 0.3
        started = loop.time()
        assert await asyncio.gather(batcher(1), batcher(2), batcher(3), batcher(4)) == [2, 4, 6, 8]
        assert calls[1:] == [[1, 2, 3], [4]]  # full at three: no wait for the first batch
        results = await asyncio.gather(batcher(5), batcher(-1), return_exceptions=True)
        assert [type(result) for result in results] == [ValueError, ValueError]  # one forward, one failure
        assert await batcher(6) == 12  # and the batcher goes on

    asyncio.run(run())
