"""A local endpoint that runs the model artifact's own Ray Serve app behind the Ray Serve container's adapter.

``python -m pipelines.serving.server --model-dir <extracted model.tar.gz> --port 8080 [--ray]`` serves

- ``GET /ping``: 200 once the model has loaded, 503 before;
- ``POST /invocations``: as the adapter of AWS's Ray Serve inference container does it, the raw body goes to
  the app at route ``/`` with ``Content-Type`` and ``Accept`` (each defaulting to ``application/json``) and the
  ``X-Amzn-SageMaker-*`` headers, and the app's status, body and content type come back unchanged.

The app is the artifact's: ``config.yaml`` names the deployment module (``import_path``), imported with the
model folder and its ``code/`` on the path, as the container's ``PYTHONPATH`` has them. Two hosts:

- the light host (default): one replica of the deployment class in this process (``build_replica`` of that
  module: ``model_fn`` once, a warm-up request, then ``input_fn -> predict_fn -> output_fn`` per request);
- ``--ray``: the container's own sequence on this machine (:mod:`pipelines.serving.ray_host`): ``pip install``
  of ``code/requirements.txt``, ``ray start``, ``serve start``, ``serve run config.yaml``; requests are forwarded
  to Ray's HTTP proxy (a timeout gives 504, a proxy out of reach 503).

Both answer the same requests with the same bytes. The front end holds under careless or hostile clients:
every client error is a 4xx with ``{"error": "...", "code": "..."}`` (its own 400/404/405/408/411/413/414/431
included, never a stack trace); bodies over SageMaker's 6 MB limit get 413 before anything is decoded; idle
connections close after ``--idle-timeout`` seconds and a request must arrive whole within ``--read-timeout``;
bursts of connections wait in a deep listen backlog instead of being dropped. The app decodes images outside
its one-at-a-time model thread, a batch's one image at a time and a one-image request in a lane of its own, so a
large batch does not hold small requests up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import http.client
import importlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from entrypoints import contract
from pipelines.serving.errors import HandlerSetupError
from pipelines.util import fsutil

MAX_PAYLOAD_BYTES = contract.MAX_PAYLOAD_BYTES
DISCARD_LIMIT_BYTES = 64 * 1024 * 1024  # a refused body up to this size is read and dropped before answering
DEFAULT_MEDIA_TYPE = contract.JSON_CONTENT_TYPE  # the adapter's default Content-Type and Accept
FORWARDED_HEADER_PREFIX = "x-amzn-sagemaker-"
BACKEND_TIMEOUT_S = float(os.environ.get("RAYSERVE_BACKEND_TIMEOUT", "300"))  # the container adapter's setting

log = logging.getLogger("pipelines.serving.server")

# The front end's own refusals: status -> machine-readable code.
ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
    503: "loading",
    504: "backend_timeout",
}


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = DEFAULT_MEDIA_TYPE


def error_answer(status: int, message: str, code: str | None = None) -> Answer:
    return Answer(status, json.dumps({"error": message, "code": code or ERROR_CODES.get(status, "error")}).encode())


@dataclass(frozen=True)
class Limits:
    """How long and how many: what keeps slow or numerous clients from holding the server."""

    idle_timeout_s: float = 15.0  # a connection with no byte coming for this long is closed
    read_timeout_s: float = 30.0  # a request (headers and body) must arrive whole within this
    backlog: int = 1024  # connections the kernel queues before they are accepted (capped by somaxconn)
    max_connections: int = 256  # connections served at once; more wait in the backlog


class Backend(Protocol):
    def invoke(self, body: bytes, content_type: str, accept: str, headers: dict[str, str]) -> Answer: ...

    def ping(self) -> Answer: ...

    def close(self) -> None: ...


# --- the light host: the deployment class in this process -------------------------------------------------------


def read_app_config(model_dir: Path) -> tuple[str, dict[str, Any]]:
    """The deployment module and args of the artifact's one Ray Serve application (route prefix ``/``)."""
    import yaml

    path = model_dir / contract.RAY_SERVE_CONFIG_FILE
    if not path.is_file():
        raise HandlerSetupError(
            f"{path} is missing: the artifact has no Ray Serve app (it was made before serving moved to the Ray "
            "Serve image); train it again, or register an artifact written by modeling.save_artifact"
        )
    try:
        applications = (yaml.safe_load(path.read_text()) or {}).get("applications") or []
    except (yaml.YAMLError, AttributeError) as error:
        raise HandlerSetupError(f"{path} is not a Ray Serve config: {error}") from None
    if len(applications) != 1 or applications[0].get("route_prefix", "/") != "/":
        raise HandlerSetupError(f"{path} must hold exactly one application, at route prefix /")
    module, _, attribute = str(applications[0].get("import_path", "")).partition(":")
    if not module or not attribute:
        raise HandlerSetupError(f"{path}: import_path must read <module>:<app builder>")
    return module, dict(applications[0].get("args") or {})


class InProcessBackend:
    """One replica of the artifact's deployment class, run on an event loop thread of this process."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.replica: Any = None
        self.load_seconds = 0.0
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="replica-loop", daemon=True).start()

    def load(self) -> None:
        """Import the deployment module as the container does and build the replica (loads the model)."""
        module_name, args = read_app_config(self.model_dir)
        for folder in (self.model_dir / contract.CODE_DIR, self.model_dir):
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
        module = importlib.import_module(module_name)
        if not hasattr(module, "build_replica"):
            raise HandlerSetupError(f"{module.__file__} has no build_replica(): serve it with --ray")
        started = time.perf_counter()
        self.replica = module.build_replica(args)
        self.load_seconds = time.perf_counter() - started

    def invoke(self, body: bytes, content_type: str, accept: str, headers: dict[str, str]) -> Answer:
        if self.replica is None:
            return error_answer(503, "the model is still loading: retry when GET /ping answers 200")
        coroutine = self.replica.handle("POST", body, content_type, accept)
        reply = asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()
        return Answer(reply.status, reply.body, reply.content_type)

    def ping(self) -> Answer:
        if self.replica is None:
            return error_answer(503, "the model is still loading")
        reply = self.replica.health()
        return Answer(reply.status, reply.body, reply.content_type)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


# --- the Ray host: forward to Ray Serve's HTTP proxy ---------------------------------------------------------------


class RayProxyBackend:
    """Forwards to the app at route ``/`` of a Ray Serve HTTP proxy, as the container's adapter does."""

    def __init__(self, url: str, timeout: float = BACKEND_TIMEOUT_S) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname or "127.0.0.1", parts.port or 8000, timeout

    def _request(self, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout: float) -> Answer:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return Answer(response.status, response.read(), response.getheader("Content-Type", DEFAULT_MEDIA_TYPE))
        finally:
            connection.close()

    def invoke(self, body: bytes, content_type: str, accept: str, headers: dict[str, str]) -> Answer:
        try:
            return self._request(
                "POST", "/", body, {**headers, "Content-Type": content_type, "Accept": accept}, self.timeout
            )
        except TimeoutError:
            return error_answer(504, f"the Ray Serve app did not answer within {self.timeout:.0f} s")
        except OSError as error:
            return error_answer(503, f"Ray Serve is out of reach: {error}", "backend_unavailable")

    def ping(self) -> Answer:
        """Green once Ray's proxy is healthy and the app itself answers (its replica has loaded the model)."""
        try:
            if self._request("GET", "/-/healthz", None, {}, 5.0).status != 200:
                return error_answer(503, "Ray Serve's proxy is not healthy yet")
            answer = self._request("GET", "/", None, {}, 5.0)
        except OSError as error:
            return error_answer(503, f"Ray Serve is out of reach: {error}", "backend_unavailable")
        return answer if answer.status == 200 else error_answer(503, "the Ray Serve app is not running yet")

    def close(self) -> None:
        pass


# --- the front end ---------------------------------------------------------------------------------------------------


class EndpointServer(ThreadingHTTPServer):
    """A threading HTTP server with a deep backlog, a cap on connections served at once, and request deadlines."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], limits: Limits) -> None:
        self.limits = limits
        self.request_queue_size = limits.backlog
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()
        super().__init__(address, handler)
        threading.Thread(target=self._enforce_deadlines, name="deadlines", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()  # beyond max_connections, new connections wait (in the kernel's backlog)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.set_deadline(request, None)
        super().shutdown_request(request)
        self._slots.release()

    def set_deadline(self, connection: socket.socket, seconds: float | None) -> None:
        with self._deadlines_lock:
            if seconds is None:
                self._deadlines.pop(connection, None)
            else:
                self._deadlines[connection] = time.monotonic() + seconds

    def _enforce_deadlines(self) -> None:
        """Cut connections whose request has not arrived whole in time (a client trickling bytes)."""
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            with self._deadlines_lock:
                late = [connection for connection, deadline in self._deadlines.items() if deadline < now]
                for connection in late:
                    self._deadlines.pop(connection, None)
            for connection in late:
                with contextlib.suppress(OSError):  # the blocked read returns; the handler answers 408
                    connection.shutdown(socket.SHUT_RD)


def make_handler(backend: Backend) -> type[BaseHTTPRequestHandler]:
    class InvocationHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        default_request_version = "HTTP/1.0"  # never HTTP/0.9: every answer, refusals too, has a status line
        server_version = "LocalSageMakerEndpoint/2"
        server: EndpointServer

        def setup(self) -> None:
            self.timeout = self.server.limits.idle_timeout_s  # per read: idle keep-alive connections end
            super().setup()

        def handle_one_request(self) -> None:
            self.server.set_deadline(self.connection, self.server.limits.read_timeout_s)
            try:
                super().handle_one_request()
            except (ConnectionError, TimeoutError):
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), format % args)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """The standard library's own refusals (bad request line, URI or headers too long...), as JSON."""
            if code in (501, 505):  # an unknown method or HTTP version is the client's mistake: a 4xx
                code, message = (405, f"method {self.command} is not allowed") if code == 501 else (400, message)
            self._send(error_answer(code, message or http.HTTPStatus(code).phrase), close=True)

        def _send(self, answer: Answer, close: bool = False) -> None:
            self.server.set_deadline(self.connection, None)
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer.body)

        def _route(self) -> str:
            return self.path.split("?", 1)[0]

        def do_GET(self) -> None:
            if self._route() == "/ping":
                self._send(backend.ping())
            elif self._route() == "/invocations":
                self._send(error_answer(405, "use POST for /invocations"))
            else:
                self._send(error_answer(404, f"no route {self._route()}: use GET /ping or POST /invocations"))

        do_HEAD = do_GET

        def do_POST(self) -> None:
            if self._route() != "/invocations":
                self._send(error_answer(404, f"no route {self._route()}: use GET /ping or POST /invocations"), True)
                return
            body = self._read_body()
            if body is None:
                return
            headers = {k: v for k, v in self.headers.items() if k.lower().startswith(FORWARDED_HEADER_PREFIX)}
            content_type = self.headers.get("Content-Type") or DEFAULT_MEDIA_TYPE
            accept = self.headers.get("Accept") or DEFAULT_MEDIA_TYPE
            started = time.perf_counter()
            answer = backend.invoke(body, content_type, accept, headers)
            log.info("invocation %d in %.1f ms", answer.status, (time.perf_counter() - started) * 1000)
            self._send(answer)

        def _read_body(self) -> bytes | None:
            """The request body, or None once a refusal was sent (no length, a bad one, too large, too slow)."""
            declared = self.headers.get("Content-Length")
            if declared is None:
                self._send(error_answer(411, "send the body with a Content-Length header (chunked is not read)"), True)
                return None
            if not re.fullmatch(r"[0-9]+", declared.strip()):  # ASCII digits: str.isdigit takes "²", int() does not
                self._send(error_answer(400, f"Content-Length {declared!r} is not a byte count", "bad_length"), True)
                return None
            length = int(declared)
            if length > MAX_PAYLOAD_BYTES:
                self._discard(length)
                message = f"request body of {length} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit of SageMaker"
                self._send(error_answer(413, message + " real-time endpoints: send fewer or smaller images"), True)
                return None
            try:
                body = self.rfile.read(length) if length else b""
            except (TimeoutError, ConnectionError, OSError):
                body = b""
            if len(body) < length:
                self._send(error_answer(408, f"the body ended after {len(body)} of {length} bytes"), True)
                return None
            self.server.set_deadline(self.connection, None)  # arrived whole: the answer may take its time
            return body

        def _discard(self, length: int) -> None:
            """Read (and drop) a refused body, so the client gets the answer rather than a broken pipe."""
            remaining = min(length, DISCARD_LIMIT_BYTES)
            try:
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            except (TimeoutError, OSError):
                pass

        def _not_allowed(self) -> None:
            self._send(error_answer(405, f"{self.command} is not allowed: use GET /ping or POST /invocations"), True)

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    return InvocationHandler


def bind_server(
    host: str, port: int, backend: Backend, fallback: bool = False, limits: Limits | None = None
) -> EndpointServer:
    """Bind ``host:port``; with ``fallback`` a busy port gives way to one the system picks."""
    handler, limits = make_handler(backend), limits or Limits()
    try:
        return EndpointServer((host, port), handler, limits)
    except OSError as error:
        if not fallback or error.errno != errno.EADDRINUSE:
            raise
        log.warning("port %s is busy; using a free port instead", port)
        return EndpointServer((host, 0), handler, limits)


def serve(
    model_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    ray: bool = False,
    port_fallback: bool = False,
    ready_file: Path | None = None,
    limits: Limits | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Bind, load the app (``/ping`` answers 503 meanwhile), announce readiness, serve until SIGTERM/SIGINT.

    ``ready_file`` gets ``{"pid", "port", "url"}`` once ``/ping`` is green.
    """
    front = SwitchableBackend()
    server = bind_server(host, port, front, port_fallback, limits)
    url = f"http://{host}:{server.server_address[1]}"
    stopping = threading.Event()

    def stop(_signum: int, _frame: Any) -> None:
        stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    serving.start()
    cluster = None
    try:
        started = time.perf_counter()
        if ray:
            from pipelines.serving.ray_host import RayServeCluster

            cluster = RayServeCluster(model_dir, work_dir=ready_file.parent if ready_file else model_dir.parent)
            front.target = RayProxyBackend(cluster.start(should_stop=stopping.is_set))
        else:
            backend = InProcessBackend(model_dir)
            front.target = backend
            backend.load()
            front.loaded = True
        log.info("app loaded from %s in %.1f s", model_dir, time.perf_counter() - started)
        if ready_file is not None and not stopping.is_set():
            fsutil.write_json_atomic(ready_file, {"pid": os.getpid(), "port": server.server_address[1], "url": url})
        log.info("serving %s (GET /ping, POST /invocations)", url)
        if on_ready is not None:
            on_ready(url)
        while serving.is_alive() and not stopping.is_set():
            serving.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        front.close()
        if cluster is not None:
            cluster.stop()
        log.info("stopped")
    return 0


class SwitchableBackend:
    """What the front end calls: 503 until the app has loaded, then the app's host."""

    def __init__(self) -> None:
        self.target: Backend | None = None
        self.loaded = False  # the light host's replica is built (the Ray host's ping asks Ray instead)

    def _ready(self) -> Backend | None:
        if isinstance(self.target, RayProxyBackend) or self.loaded:
            return self.target
        return None

    def invoke(self, body: bytes, content_type: str, accept: str, headers: dict[str, str]) -> Answer:
        target = self._ready()
        if target is None:
            return error_answer(503, "the model is still loading: retry when GET /ping answers 200")
        return target.invoke(body, content_type, accept, headers)

    def ping(self) -> Answer:
        target = self._ready()
        return error_answer(503, "the model is still loading") if target is None else target.ping()

    def close(self) -> None:
        if self.target is not None:
            self.target.close()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.serving.server",
        description="Serve an extracted model artifact's Ray Serve app behind SageMaker's serving contract "
        "(GET /ping, POST /invocations), in this process or (--ray) on a local Ray cluster.",
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="folder holding the extracted model.tar.gz")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (SageMaker's containers use 8080)")
    parser.add_argument("--port-fallback", action="store_true", help="use a free port when --port is busy")
    parser.add_argument("--ready-file", type=Path, default=None, help="JSON written once the endpoint serves")
    parser.add_argument("--ray", action="store_true", help="run the app on Ray Serve, as the container does")
    defaults = Limits()
    parser.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout_s, help="seconds (idle close)")
    parser.add_argument("--read-timeout", type=float, default=defaults.read_timeout_s, help="seconds per request")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections, help="served at once")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    limits = Limits(args.idle_timeout, args.read_timeout, max_connections=args.max_connections)
    try:
        return serve(
            args.model_dir.resolve(),
            args.host,
            args.port,
            ray=args.ray,
            port_fallback=args.port_fallback,
            ready_file=args.ready_file,
            limits=limits,
        )
    except (HandlerSetupError, FileNotFoundError, ValueError) as error:  # the Ray host's errors name the step
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
