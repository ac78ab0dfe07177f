"""The local endpoint's front end (pipelines/serving/server.py): the Ray Serve container adapter's semantics, and
robustness under careless or hostile clients -- every client error a 4xx with {"error", "code"}, idle and slow
connections cut, bursts of connections queued instead of dropped, the model loaded before /ping is green."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _http import exchange
from _serving import HOSTILE_REQUESTS, JPEG, VALID_REQUESTS, make_artifact

from entrypoints import contract
from pipelines.serving import server


class RecordingBackend:
    """A stand-in app: records what the front end forwards and answers with it."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, str, str, dict[str, str]]] = []

    def invoke(self, body: bytes, content_type: str, accept: str, headers: dict[str, str]) -> server.Answer:
        self.calls.append((body, content_type, accept, headers))
        return server.Answer(201, json.dumps({"bytes": len(body)}).encode(), "application/x-test")

    def ping(self) -> server.Answer:
        return server.Answer(200, b"{}")

    def close(self) -> None:
        pass


def _start(backend, limits: server.Limits | None = None, serve: bool = True) -> tuple[server.EndpointServer, str]:
    endpoint = server.bind_server("127.0.0.1", 0, backend, limits=limits)
    if serve:
        threading.Thread(target=endpoint.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return endpoint, f"http://127.0.0.1:{endpoint.server_address[1]}"


@pytest.fixture()
def recording() -> Iterator[tuple[RecordingBackend, str, server.EndpointServer]]:
    backend = RecordingBackend()
    endpoint, url = _start(backend, server.Limits(idle_timeout_s=1.0, read_timeout_s=2.0))
    yield backend, url, endpoint
    endpoint.shutdown()
    endpoint.server_close()


def _raw(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are; return everything the server sends before it closes the connection."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def _status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# --- the adapter's semantics ---------------------------------------------------------------------------------------


def test_invocations_forward_the_raw_body_the_two_headers_and_the_sagemaker_ones(recording) -> None:
    backend, url, _ = recording
    body = b"\x00\xffraw bytes\r\n"
    headers = {
        "Content-Type": "image/png",
        "Accept": "application/json",
        "X-Amzn-SageMaker-Custom-Attributes": "trace=1",
        "X-Amzn-SageMaker-Inference-Id": "abc",
        "Authorization": "not forwarded",
    }
    status, content_type, answer = exchange(url, "POST", "/invocations", body, headers)
    assert (status, content_type, json.loads(answer)) == (201, "application/x-test", {"bytes": len(body)})
    forwarded_body, forwarded_type, forwarded_accept, forwarded = backend.calls[-1]
    assert (forwarded_body, forwarded_type, forwarded_accept) == (body, "image/png", "application/json")
    assert forwarded == {"X-Amzn-SageMaker-Custom-Attributes": "trace=1", "X-Amzn-SageMaker-Inference-Id": "abc"}
    exchange(url, "POST", "/invocations", b"{}", {})  # no Content-Type, no Accept: both default to JSON
    assert backend.calls[-1][1:3] == ("application/json", "application/json")


@pytest.mark.slow
def test_ping_is_red_until_the_app_has_loaded(tmp_path: Path) -> None:
    switch = server.SwitchableBackend()
    endpoint, url = _start(switch)
    try:
        status, _, body = exchange(url, "GET", "/ping")
        assert status == 503 and json.loads(body)["code"] == "loading"
        status, _, body = exchange(url, "POST", "/invocations", JPEG, {"Content-Type": "image/jpeg"})
        assert status == 503 and json.loads(body)["code"] == "loading"
        switch.target = server.InProcessBackend(make_artifact(tmp_path))
        assert exchange(url, "GET", "/ping")[0] == 503  # the host exists but its replica has not loaded yet
        switch.target.load()
        switch.loaded = True
        status, _, body = exchange(url, "GET", "/ping")
        assert status == 200 and json.loads(body)["status"] == "Healthy"
        for request_body, content_type in VALID_REQUESTS.values():
            assert exchange(url, "POST", "/invocations", request_body, {"Content-Type": content_type})[0] == 200
    finally:
        endpoint.shutdown()
        endpoint.server_close()
        switch.close()


def test_an_artifact_without_a_ray_serve_app_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    with pytest.raises(server.HandlerSetupError, match=r"config\.yaml is missing.*train it again"):
        server.InProcessBackend(tmp_path).load()
    (tmp_path / "config.yaml").write_text("applications:\n  - route_prefix: /api\n    import_path: x:y\n")
    with pytest.raises(server.HandlerSetupError, match="exactly one application, at route prefix /"):
        server.InProcessBackend(tmp_path).load()


# --- every client error is a 4xx with {"error", "code"} -------------------------------------------------------------

_PROTOCOL_ERRORS = {
    # name -> (raw request, status, code)
    "unknown path": (b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404, "not_found"),
    "post to an unknown path": (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 404, "not_found"),
    "get of /invocations": (
        b"GET /invocations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        405,
        "method_not_allowed",
    ),
    "put": (b"PUT /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, "method_not_allowed"),
    "a method nobody knows": (b"BREW /invocations HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    "no content length": (b"POST /invocations HTTP/1.1\r\nHost: x\r\n\r\n", 411, "length_required"),
    "chunked body": (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        411,
        "length_required",
    ),
    "content length not a number": (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n",
        400,
        "bad_length",
    ),
    "content length in digits that are not ASCII": (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\nab",
        400,
        "bad_length",
    ),
    "negative content length": (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        400,
        "bad_length",
    ),
    "declared length over the limit": (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (contract.MAX_PAYLOAD_BYTES + 1),
        413,
        "payload_too_large",
    ),
    "garbage request line": (b"\x16\x03\x01 hello\r\n\r\n", 400, "bad_request"),
    "unsupported http version": (b"GET /ping HTTP/3.0\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "uri too long": (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
    "too many headers": (
        b"GET /ping HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
        431,
        "headers_too_large",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_PROTOCOL_ERRORS))
def test_the_servers_own_refusals_are_4xx_json_with_a_code_and_it_serves_on(recording, case: str) -> None:
    _, url, _ = recording
    request, expected_status, expected_code = _PROTOCOL_ERRORS[case]
    status, body = _status_and_json(_raw(url, request))
    assert (status, body["code"], set(body)) == (expected_status, expected_code, {"error", "code"}), body
    assert exchange(url, "GET", "/ping")[0] == 200


@pytest.mark.slow
def test_the_app_refusals_reach_the_client_unchanged(tmp_path: Path) -> None:
    backend = server.InProcessBackend(make_artifact(tmp_path))
    backend.load()
    endpoint, url = _start(backend)
    try:
        for case, (body, headers, expected_status, expected_code) in HOSTILE_REQUESTS.items():
            status, content_type, answer = exchange(url, "POST", "/invocations", body, headers)
            assert (status, content_type) == (expected_status, "application/json"), case
            assert json.loads(answer) == {"error": json.loads(answer)["error"], "code": expected_code}, case
            assert exchange(url, "POST", "/invocations", JPEG, {"Content-Type": "image/jpeg"})[0] == 200, case
    finally:
        endpoint.shutdown()
        endpoint.server_close()
        backend.close()


# --- slow and idle connections are cut ---------------------------------------------------------------------------


def _closed_within(url: str, data: bytes, trickle: bytes = b"", every: float = 0.0) -> tuple[float, bytes]:
    """Open a connection, send ``data`` (then ``trickle`` a byte at a time); seconds until the server closes it."""
    port = int(url.rsplit(":", 1)[1])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(data)
        received = b""
        connection.settimeout(every or 20)
        for byte in trickle:
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    break
                continue
            received += chunk
            if not chunk:
                break
        connection.settimeout(20)
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except OSError:
            pass
    return time.monotonic() - started, received


@pytest.mark.slow
def test_an_idle_connection_is_closed_after_the_idle_timeout(recording) -> None:
    _, url, _ = recording  # idle timeout 1 s
    elapsed, received = _closed_within(url, b"")
    assert elapsed < 10 and received == b""
    elapsed, _ = _closed_within(url, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive, then silence
    assert elapsed < 10


@pytest.mark.slow
def test_a_request_that_stops_half_way_is_cut(recording) -> None:
    _, url, _ = recording
    elapsed, received = _closed_within(url, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
    assert elapsed < 10 and _status_and_json(received) == (408, _status_and_json(received)[1])
    assert _status_and_json(received)[1]["code"] == "request_timeout"
    elapsed, received = _closed_within(url, b"POST /invocations HTTP/1.1\r\nHost: x\r\n")  # headers never end
    assert elapsed < 10


@pytest.mark.slow
def test_a_request_trickled_a_byte_at_a_time_is_cut_at_the_read_deadline(recording) -> None:
    _, url, _ = recording  # idle timeout 1 s, read deadline 2 s: a byte every 0.5 s never idles long enough
    header = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n"
    elapsed, received = _closed_within(url, header, trickle=b"x" * 200, every=0.5)
    assert elapsed < 10  # 200 bytes at 0.5 s each would take 100 s
    assert received.startswith(b"HTTP/1.1 408")


@pytest.mark.slow
def test_many_slow_connections_do_not_stop_others_from_being_served(recording) -> None:
    _, url, _ = recording
    port = int(url.rsplit(":", 1)[1])
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        for connection in slow:
            connection.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 999\r\n\r\n")
        status, _, body = exchange(url, "POST", "/invocations", b"abc", {"Content-Type": "image/png"})
        assert status == 201 and json.loads(body) == {"bytes": 3}
        time.sleep(4)  # past the read deadline: the server has let go of every slow connection
        assert all(connection.recv(65536).startswith(b"HTTP/1.1 408") for connection in slow)
    finally:
        for connection in slow:
            connection.close()


# --- bursts of connections are queued, not dropped ------------------------------------------------------------------


def test_a_burst_of_connections_waits_in_the_backlog_instead_of_being_dropped() -> None:
    """With the server not accepting yet, every connection of a burst completes its handshake at once (the kernel
    queues it); with the standard library's backlog of 5 most would wait for SYN retries, a second or more."""
    endpoint, url = _start(RecordingBackend(), serve=False)
    port = int(url.rsplit(":", 1)[1])
    connections = []
    try:
        for _ in range(100):
            connections.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
        threading.Thread(target=endpoint.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        for connection in connections:
            connection.settimeout(20)
            connection.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert all(connection.recv(65536).startswith(b"HTTP/1.1 200") for connection in connections)
    finally:
        for connection in connections:
            connection.close()
        endpoint.shutdown()
        endpoint.server_close()


def test_connections_beyond_the_cap_wait_their_turn() -> None:
    endpoint, url = _start(RecordingBackend(), server.Limits(idle_timeout_s=30, max_connections=2))
    port = int(url.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        for connection in held:  # two keep-alive connections occupy both slots
            connection.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")
        waiting = socket.create_connection(("127.0.0.1", port), timeout=10)
        waiting.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(65536)  # queued, not refused
        held[0].close()
        waiting.settimeout(10)
        assert waiting.recv(65536).startswith(b"HTTP/1.1 200")
        waiting.close()
    finally:
        for connection in held:
            connection.close()
        endpoint.shutdown()
        endpoint.server_close()


def test_the_ray_proxy_backend_maps_timeouts_to_504_and_no_proxy_to_503() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    try:
        slow = server.RayProxyBackend(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5)
        answer = slow.invoke(b"x", "image/png", "application/json", {})
        assert answer.status == 504 and json.loads(answer.body)["code"] == "backend_timeout"
    finally:
        listener.close()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    answer = server.RayProxyBackend(f"http://127.0.0.1:{port}").invoke(b"x", "image/png", "application/json", {})
    assert answer.status == 503 and json.loads(answer.body)["code"] == "backend_unavailable"
    assert server.RayProxyBackend(f"http://127.0.0.1:{port}").ping().status == 503
