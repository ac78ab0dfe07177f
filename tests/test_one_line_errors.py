"""What careful but unlucky users meet, each answered in one line with the state left as it was: a predict URL that
is not one, a server that answers HTML, a file over the payload limit, a proxy in the environment, a full disk, a
registry file gone, a damaged run record."""

from __future__ import annotations

import errno
import http.server
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.local import registry
from pipelines.local.sagemaker import arn
from pipelines.run import main
from pipelines.serving import endpoint
from pipelines.util import fsutil


class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's ``reply`` (status, content type, body) and counts them."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        status, content_type, body = self.server.reply  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def web() -> Iterator[http.server.HTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    server.requests, server.reply = [], (200, "application/json", b"{}")  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server: http.server.HTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.out, captured
    return lines[0]


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "digit.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    return path


# --- predict --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc", "http://[::1", "http://127.0.0.1:99999", "ftp://host"])
def test_predict_refuses_an_endpoint_url_that_is_not_one(url: str, image: Path, capsys) -> None:
    assert main(["predict", str(image), "--endpoint", url]) == 2
    line = _one_error(capsys)
    assert line.startswith("error: --endpoint ") and "http://HOST:PORT" in line


def test_predict_against_a_server_that_answers_html_says_so(web, image: Path, capsys) -> None:
    web.reply = (200, "text/html", b"<html>\n<body>Welcome to nginx!</body>\n</html>\n")
    assert main(["predict", str(image), "--endpoint", _url(web)]) == 2
    line = _one_error(capsys)
    assert "answered 200 with text/html, not the endpoint's JSON" in line and "Welcome to nginx" in line
    web.reply = (502, "text/html", b"<html>\n<h1>502 Bad Gateway</h1>\n</html>\n")
    assert main(["predict", str(image), "--endpoint", _url(web)]) == 2
    assert "the endpoint answered 502: <html> <h1>502 Bad Gateway</h1> </html>" in _one_error(capsys)


def test_predict_refuses_a_file_over_the_payload_limit_before_reading_it(web, tmp_path: Path, capsys) -> None:
    huge = tmp_path / "huge.jpg"
    with huge.open("wb") as handle:  # 100 MB, sparse: nothing to read but its size
        handle.truncate(100 * 2**20)
    assert main(["predict", str(huge), "--endpoint", _url(web)]) == 2
    line = _one_error(capsys)
    assert f"{huge} is a request of 100.0 MB, over the endpoint's 6 MB payload limit" in line
    assert web.requests == []  # nothing was sent


def test_local_addresses_bypass_a_proxy(web, image: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    with socket.socket() as probe:  # a proxy that is not there: any request through it fails
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead_port}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{dead_port}")
    web.reply = (200, "application/json", json.dumps({"predictions": [{"class": "cat", "top_k": []}]}).encode())

    port = web.server_address[1]
    assert main(["predict", str(image), "--endpoint", f"http://localhost:{port}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["class"] == "cat"

    record = {"EndpointName": "imgclf-local", "pid": os.getpid(), "url": _url(web), "port": port,
              "ModelPackageArn": "arn:x", "ModelPackageVersion": 1}  # fmt: skip
    fsutil.write_json_atomic(endpoint.record_path(tmp_path, "imgclf-local"), record)
    monkeypatch.setattr(endpoint, "_is_our_server", lambda pid: True)
    assert main(["endpoint", "status", "--workdir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"imgclf-local: InService at {_url(web)}")
    assert "/ping" in web.requests


# --- the registry and the endpoint under a full disk or a missing file -----------------------------------------


@pytest.fixture()
def versions(tmp_path: Path) -> registry.LocalModelRegistry:
    """A registry with version 1 Approved (its model a tiny model.tar.gz)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    tarball = fsutil.make_tarball(model, tmp_path / "model.tar.gz")
    local = registry.LocalModelRegistry(tmp_path / "work", arn)
    container = {"Image": "image", "ModelDataUrl": "s3://b/1/model.tar.gz"}
    request = {"ModelPackageGroupName": "Group", "ModelApprovalStatus": "Approved",
               "InferenceSpecification": {"Containers": [container]}}  # fmt: skip
    local.register(request, {"s3://b/1/model.tar.gz": tarball})
    return local


def _full_disk(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


def test_local_models_reject_on_a_full_disk_is_one_line_and_keeps_the_registry(versions, monkeypatch, capsys) -> None:
    workdir = versions.path.parent
    before = _state(workdir)
    monkeypatch.setattr(fsutil.os, "fdopen", _full_disk)
    assert main(["local-models", "--workdir", str(workdir), "--model-package-group", "Group", "--reject", "1"]) == 2
    line = _one_error(capsys)
    assert "No space left on device" in line and "nothing was changed" in line
    assert _state(workdir) == before
    assert versions.describe("Group", 1)["ModelApprovalStatus"] == "Approved"


@pytest.mark.parametrize("trouble", ["a full disk", "the model file gone"])
def test_endpoint_start_that_cannot_extract_leaves_no_folder_no_record_no_server(
    trouble: str, versions, monkeypatch, capsys
) -> None:
    workdir = versions.path.parent
    model = registry.model_data_path(versions.describe("Group", 1))
    if trouble == "the model file gone":
        model.unlink()
    else:

        def half_then_full(tarball: Path, destination: Path) -> Path:
            destination.mkdir(parents=True)
            (destination / "model.pt").write_bytes(b"wei")  # half a model, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(destination / "model.pt"))

        monkeypatch.setattr(fsutil, "safe_extract_tarball", half_then_full)
    started = []
    monkeypatch.setattr(endpoint, "_start_server", lambda *args: started.append(args))

    assert main(["endpoint", "start", "--workdir", str(workdir), "--model-package-group", "Group"]) == 2
    line = _one_error(capsys)
    if trouble == "a full disk":
        assert line.startswith("error: version 1's model ") and "cannot be extracted" in line
        assert "No space left on device" in line
    else:  # the registry's own check refuses it before any extraction
        assert line.startswith(f"error: Group version 1 is not served: its file {model} changed after registration")
        assert "it is gone" in line
    assert started == [] and not (workdir / "endpoints" / "imgclf-local" / "1").exists()  # nothing half-extracted
    assert not [path for path in (workdir / "endpoints").rglob("*") if path.is_file()]
    assert not endpoint.record_path(workdir, "imgclf-local").exists()


# --- local-status ---------------------------------------------------------------------------------------------


def test_local_status_shows_a_run_record_of_odd_types_as_damaged_and_ranks_runs_by_number(
    tmp_path: Path, capsys
) -> None:
    for run_id, status in (("run-9999", "Succeeded"), ("run-10000", "Executing")):
        (tmp_path / run_id).mkdir()
        record = {"RunId": run_id, "PipelineExecutionStatus": status, "StartTime": "2026-01-01T00:00:00"}
        (tmp_path / run_id / "run.json").write_text(json.dumps(record))
    odd = {"PipelineExecutionStatus": "Succeeded", "StartTime": {"at": 5},
           "PipelineExecutionSteps": [{"StepName": 7, "Metadata": {"TrainingJob": 3}}]}  # fmt: skip
    (tmp_path / "run-10000" / "run.json").write_text(json.dumps(odd))

    assert main(["local-status", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run       run-10000")  # the newest is the highest number
    assert "status    Unknown" in out
    assert "its StartTime, step Metadata, step StepName are not of the recorded type" in out
    assert main(["local-status", "--workdir", str(tmp_path), "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["run-9999", "run-10000"]
    assert main(["local-status", "--workdir", str(tmp_path), "run-9999"]) == 0
    assert "status    Succeeded" in capsys.readouterr().out
