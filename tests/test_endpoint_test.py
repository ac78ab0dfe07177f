"""``endpoint-test``: a served endpoint's answers on test images against the served artifact's own offline
answers; non-zero on any mismatch or failed request; a local rollback to the previous approved version."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serving import CLASSES, encode, image, make_artifact

from pipelines import run
from pipelines.cli import endpoint_test
from pipelines.local import registry
from pipelines.local.sagemaker import arn
from pipelines.serving import server


class Tampering:
    """Passes requests to the real app; the ``nth`` answer is changed by ``change`` (None: left alone)."""

    def __init__(self, backend: server.InProcessBackend) -> None:
        self.backend, self.count, self.nth, self.change = backend, 0, None, None

    def invoke(self, body, content_type, accept, headers) -> server.Answer:
        self.count += 1
        answer = self.backend.invoke(body, content_type, accept, headers)
        return self.change(answer) if self.count == self.nth and self.change else answer

    def ping(self) -> server.Answer:
        return self.backend.ping()

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("endpoint-test")
    model_dir = make_artifact(folder)
    test_dir = folder / "test"
    for index, name in enumerate(CLASSES[:3]):
        (test_dir / name).mkdir(parents=True)
        for number in range(3):
            picture = image(40 + 4 * number, 36, seed=10 * index + number)
            (test_dir / name / f"{number}.{'png' if number % 2 else 'jpg'}").write_bytes(
                encode(picture, "PNG" if number % 2 else "JPEG")
            )
    (test_dir / "labels.json").write_text(json.dumps(CLASSES))
    backend = server.InProcessBackend(model_dir)
    backend.load()
    tampering = Tampering(backend)
    endpoint = server.bind_server("127.0.0.1", 0, tampering)
    threading.Thread(target=endpoint.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield {
        "url": f"http://127.0.0.1:{endpoint.server_address[1]}",
        "model": model_dir,
        "tarball": folder / "model.tar.gz",
        "test_dir": test_dir,
        "tampering": tampering,
    }
    endpoint.shutdown()
    endpoint.server_close()
    backend.close()


@pytest.fixture()
def tampering(served) -> Iterator[Tampering]:
    served["tampering"].count, served["tampering"].nth, served["tampering"].change = 0, None, None
    yield served["tampering"]
    served["tampering"].nth = None


def _run(served, *extra: str) -> int:
    url, model, test_dir = served["url"], str(served["model"]), str(served["test_dir"])
    return run.main(["endpoint-test", "--test-dir", test_dir, "--endpoint", url, "--model", model, *extra])


@pytest.mark.slow
def test_a_faithful_endpoint_passes_with_its_latency(served, tampering, capsys) -> None:
    assert _run(served, "--images", "7") == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("endpoint-test: 7 images, 0 mismatches, 0 failed requests; latency p50 ")
    assert " p95 " in summary and summary.endswith("passed")
    assert tampering.count == 7


def test_the_images_are_taken_in_turn_from_each_class(served) -> None:
    chosen = endpoint_test.local_test_images(served["test_dir"], 4)
    assert [Path(name).parent.name for name, _ in chosen] == ["cat", "dog", "fox", "cat"]


@pytest.mark.slow
def test_one_answer_that_differs_fails_the_test_and_names_the_image(served, tampering, capsys) -> None:
    def another_class(answer: server.Answer) -> server.Answer:
        body = json.loads(answer.body)
        top = body["predictions"][0]["top_k"]
        outside = next(name for name in CLASSES if name not in {entry["class"] for entry in top})
        top[0]["class"] = body["predictions"][0]["class"] = outside  # a class the artifact ranks below its top 5
        return server.Answer(200, json.dumps(body).encode())

    tampering.nth, tampering.change = 2, another_class
    assert _run(served, "--images", "5") == 1
    out = capsys.readouterr().out
    (problem,) = [line for line in out.splitlines() if line.startswith("  ")]
    assert "/dog/" in problem and "differs from the artifact's" in problem  # the second image: the first dog
    assert "endpoint-test: 5 images, 1 mismatches, 0 failed requests; latency p50 " in out
    assert out.strip().endswith("FAILED")


@pytest.mark.slow
def test_a_server_error_fails_the_test(served, tampering, capsys) -> None:
    tampering.nth = 3
    tampering.change = lambda answer: server.error_answer(500, "the model server failed", "internal_error")
    assert _run(served, "--images", "4", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    failed = [check for check in report["checks"] if check["problem"]]
    assert len(failed) == 1 and failed[0]["status"] == 500 and "status 500" in failed[0]["problem"]


def test_a_near_tie_offline_is_not_a_mismatch() -> None:
    expected = {"top_k": [{"class": "cat", "probability": 0.4003}, {"class": "dog", "probability": 0.4000}]}
    answer = json.dumps({"predictions": [{"top_k": [{"class": "dog", "probability": 0.4002}]}]}).encode()
    assert endpoint_test.compare(200, answer, expected) == ("dog", None)
    expected["top_k"][1]["probability"] = 0.39
    assert "differs" in endpoint_test.compare(200, answer, expected)[1]


def test_what_it_needs_is_asked_for_clearly(served, capsys, tmp_path: Path) -> None:
    assert run.main(["endpoint-test", "--test-dir", str(tmp_path), "--endpoint", served["url"]]) == 2
    assert "--model is needed with --endpoint" in capsys.readouterr().err
    assert _run({**served, "test_dir": tmp_path / "none"}) == 2
    assert "is not a folder of <class>/<image> files" in capsys.readouterr().err
    assert run.main(["endpoint-test", "--test-dir", str(tmp_path), "--workdir", str(tmp_path)]) == 2
    assert "no local endpoint" in capsys.readouterr().err
    assert _run(served, "--rollback") == 2
    assert "--rollback works on the local endpoint" in capsys.readouterr().err


def test_a_local_rollback_serves_the_previous_approved_version_and_rejects_the_tested_one(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.serving import endpoint

    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text("{}")
    local = registry.LocalModelRegistry(tmp_path, arn)
    for seed in (1, 2):  # two versions (different bytes), both approved
        tarball = tmp_path / f"{seed}.tar.gz"
        tarball.write_bytes(served["tarball"].read_bytes() + bytes(seed))
        files = {f"s3://b/{seed}/model.tar.gz": tarball, "s3://b/evaluation.json": evaluation}
        request = {
            "ModelPackageGroupName": "Group",
            "ModelApprovalStatus": "Approved",
            "InferenceSpecification": {
                "Containers": [{"Image": "image", "ModelDataUrl": f"s3://b/{seed}/model.tar.gz"}]
            },
        }
        local.register(request, files)
    deployed: list[tuple] = []
    monkeypatch.setattr(
        endpoint, "deploy", lambda *args, **kwargs: deployed.append((args, kwargs)) or {"url": "http://x"}
    )
    record = {"ModelPackageGroupName": "Group", "ModelPackageVersion": 2, "port": 8123, "host": "ray"}

    message = endpoint_test.rollback_local(tmp_path, "imgclf-local", record, "endpoint-test failed")

    assert "serves version 1 again" in message and "version 2 is now Rejected" in message
    ((args, kwargs),) = deployed
    assert args[1] == "imgclf-local" and args[2]["ModelPackageVersion"] == 1
    assert kwargs == {"port": 8123, "ray": True}  # on the same host as before
    assert local.describe("Group", 2)["ModelApprovalStatus"] == "Rejected"
    record["ModelPackageVersion"] = 1
    assert "no rollback" in endpoint_test.rollback_local(tmp_path, "imgclf-local", record, "again")


@pytest.mark.slow
def test_a_rollback_whose_earlier_model_cannot_be_read_changes_nothing_and_says_so_in_one_line(
    served, tampering, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from pipelines.serving import endpoint

    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text("{}")
    local = registry.LocalModelRegistry(tmp_path, arn)
    for seed in (1, 2):
        tarball = tmp_path / f"{seed}.tar.gz"
        tarball.write_bytes(served["tarball"].read_bytes() + bytes(seed))  # two versions: other bytes
        files = {f"s3://b/{seed}/model.tar.gz": tarball, "s3://b/evaluation.json": evaluation}
        container = {"Image": "image", "ModelDataUrl": f"s3://b/{seed}/model.tar.gz"}
        request = {"ModelPackageGroupName": "Group", "ModelApprovalStatus": "Approved",
                   "InferenceSpecification": {"Containers": [container]}}  # fmt: skip
        local.register(request, files)
    earlier = registry.model_data_path(local.describe("Group", 1))
    earlier.unlink()  # the earlier version's tarball, damaged in place: not a gzip archive
    earlier.write_bytes(b"not a tarball")
    serving = {"ModelPackageGroupName": "Group", "ModelPackageVersion": 2, "port": 8123, "host": "light",
               "ModelPackageArn": arn("model-package", "Group/2"),
               "url": served["url"], "model_dir": str(served["model"]), "EndpointStatus": "InService"}  # fmt: skip
    monkeypatch.setattr(endpoint, "status", lambda workdir, name: dict(serving))  # version 2 serves, tested now
    started = []
    monkeypatch.setattr(endpoint, "_start_server", lambda *args: started.append(args))
    tampering.nth, tampering.change = 1, lambda answer: server.error_answer(500, "broken", "internal_error")

    code = run.main(["endpoint-test", "--test-dir", str(served["test_dir"]), "--workdir", str(tmp_path),
                     "--images", "2", "--rollback"])  # fmt: skip

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: no rollback: version 1 could not be served")
    assert "version 2 stays Approved and imgclf-local still serves version 2" in err[0]
    assert [p["ModelApprovalStatus"] for p in local.list_model_packages("Group")] == ["Approved", "Approved"]
    assert started == [] and not (tmp_path / "endpoints" / "imgclf-local" / "1").exists()  # nothing half-extracted
