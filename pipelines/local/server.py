"""A local endpoint speaking SageMaker's serving contract, backed by the model artifact's own handlers.

``python -m pipelines.local.server --model-dir <extracted model.tar.gz> --port 8080`` serves

- ``GET /ping``: 200 once the model is loaded (SageMaker's health check);
- ``POST /invocations``: the request body and its ``Content-Type``/``Accept`` go through the artifact's
  ``code/inference.py`` exactly as the SageMaker PyTorch serving container calls it: the module is imported
  from ``<model>/code`` (``SAGEMAKER_PROGRAM``), ``model_fn(model_dir)`` runs once at start, and each request
  runs ``input_fn(body, content_type) -> predict_fn(data, model) -> output_fn(prediction, accept)`` (or
  ``transform_fn``). As in the toolkit, JSON and CSV bodies are decoded to ``str`` first, a missing or ``*/*``
  Accept means ``application/json``, and an ``(body, content_type)`` tuple from ``output_fn`` sets the
  response type.

Errors never reach the client as a stack trace and never stop the server: an exception that carries an HTTP
status (``status_code``, as the inference toolkit's errors do) answers with that status, anything else with
500; the body is ``{"error": "<message>"}`` and the traceback goes to the server's log. Bodies over SageMaker's
6 MB real-time payload limit get 413.
"""

from __future__ import annotations

import argparse
import errno
import http
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pipelines.local import fsutil

MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # SageMaker real-time endpoints refuse larger request bodies
DISCARD_LIMIT_BYTES = 64 * 1024 * 1024  # a refused body up to this size is read and dropped before answering
DEFAULT_ACCEPT = "application/json"
UTF8_CONTENT_TYPES = ("application/json", "text/csv")
DEFAULT_PROGRAM = "inference.py"

log = logging.getLogger("pipelines.local.server")


class HandlerSetupError(Exception):
    """The artifact's code cannot serve: no code/inference.py, or handlers missing."""


class ModelHandlers:
    """The artifact's inference module, loaded the way the serving container loads it."""

    def __init__(self, model_dir: Path, program: str = DEFAULT_PROGRAM) -> None:
        self.model_dir = model_dir
        code_dir = model_dir / "code"
        script = code_dir / program
        if not script.is_file():
            raise HandlerSetupError(f"{script} is missing: the artifact must carry code/{program}")
        if str(code_dir) not in sys.path:
            sys.path.insert(0, str(code_dir))
        module = importlib.import_module(Path(program).stem)
        self.module = module
        self.transform_fn = getattr(module, "transform_fn", None)
        missing = [name for name in ("model_fn", "input_fn", "predict_fn", "output_fn") if not hasattr(module, name)]
        if "model_fn" in missing or (self.transform_fn is None and missing):
            raise HandlerSetupError(f"{script} lacks {', '.join(missing)}")
        started = time.perf_counter()
        self.model = module.model_fn(str(model_dir))
        self.load_seconds = time.perf_counter() - started
        self._lock = threading.Lock()

    def invoke(self, body: bytes, content_type: str | None, accept: str | None) -> tuple[bytes, str]:
        accept = accept if accept and accept != "*/*" else DEFAULT_ACCEPT
        data: bytes | str = body
        base_type = (content_type or "").split(";")[0].strip().lower()
        if base_type in UTF8_CONTENT_TYPES:
            data = body.decode("utf-8")
        with self._lock:  # one request at a time per model, like one serving worker
            if self.transform_fn is not None:
                result = self.transform_fn(self.model, data, content_type, accept)
            else:
                module = self.module
                result = module.output_fn(module.predict_fn(module.input_fn(data, content_type), self.model), accept)
        response_type = accept
        if isinstance(result, tuple):
            result, response_type = result
        if isinstance(result, str):
            result = result.encode("utf-8")
        return bytes(result), response_type


def error_status(error: BaseException) -> int:
    """The HTTP status an exception carries (``status_code``, or ``status`` as an int), else 500."""
    for attribute in ("status_code", "status"):
        value = getattr(error, attribute, None)
        if isinstance(value, int) and 400 <= value <= 599:
            return value
    return int(http.HTTPStatus.INTERNAL_SERVER_ERROR)


def error_message(error: BaseException) -> str:
    message = getattr(error, "message", None)
    text = message if isinstance(message, str) and message else str(error)
    return text or type(error).__name__


def make_handler(handlers: ModelHandlers) -> type[BaseHTTPRequestHandler]:
    class InvocationHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "LocalSageMakerEndpoint/1"

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), format % args)

        def _send(self, status: int, body: bytes, content_type: str = "application/json", close: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _send_error_json(self, status: int, message: str, close: bool = False, code: str | None = None) -> None:
            body = json.dumps({"error": message, **({"code": code} if code else {})}).encode("utf-8")
            self._send(status, body, close=close)

        def _discard(self, length: int) -> None:
            """Read (and drop) a refused body, so the client gets the answer rather than a broken pipe."""
            remaining = min(length, DISCARD_LIMIT_BYTES)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)

        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/ping":
                self._send(200, b'{"status": "Healthy"}')
            elif self.path.split("?")[0] == "/invocations":
                self._send_error_json(405, "use POST for /invocations")
            else:
                self._send_error_json(404, f"no route {self.path}: use GET /ping or POST /invocations")

        def do_POST(self) -> None:
            path = self.path.split("?")[0]
            if path != "/invocations":
                self._send_error_json(404, f"no route {self.path}: use GET /ping or POST /invocations", close=True)
                return
            length_header = self.headers.get("Content-Length")
            if length_header is None:
                self._send_error_json(411, "the request needs a Content-Length header", close=True)
                return
            try:
                length = int(length_header)
            except ValueError:
                self._send_error_json(400, f"Content-Length {length_header!r} is not a number", close=True)
                return
            if length > MAX_PAYLOAD_BYTES:
                self._discard(length)
                self._send_error_json(
                    413, f"request body of {length} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit", close=True
                )
                return
            body = self.rfile.read(length) if length > 0 else b""
            started = time.perf_counter()
            try:
                response, response_type = handlers.invoke(
                    body, self.headers.get("Content-Type"), self.headers.get("Accept")
                )
            except Exception as error:  # any handler failure becomes an HTTP error; the server stays up
                status = error_status(error)
                if status >= 500:
                    log.error("invocation failed:\n%s", traceback.format_exc())
                else:
                    log.info("invocation refused (%s): %s", status, error_message(error))
                code = getattr(error, "code", None)
                self._send_error_json(status, error_message(error), code=code if isinstance(code, str) else None)
                return
            log.info("invocation ok in %.1f ms", (time.perf_counter() - started) * 1000)
            self._send(200, response, response_type)

        def do_PUT(self) -> None:
            self._send_error_json(405, "use GET /ping or POST /invocations", close=True)

        do_DELETE = do_PUT
        do_PATCH = do_PUT

    return InvocationHandler


def bind_server(host: str, port: int, handler: type[BaseHTTPRequestHandler], fallback: bool) -> ThreadingHTTPServer:
    """Bind ``host:port``; with ``fallback`` a busy port gives way to one the system picks."""
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as error:
        if not fallback or error.errno != errno.EADDRINUSE:
            raise
        log.warning("port %s is busy; using a free port instead", port)
        return ThreadingHTTPServer((host, 0), handler)


def serve(
    model_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    port_fallback: bool = False,
    ready_file: Path | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Load the model, bind, announce readiness (``ready_file`` JSON: pid, port, url), serve until SIGTERM/SIGINT."""
    handlers = ModelHandlers(model_dir, os.environ.get("SAGEMAKER_PROGRAM", DEFAULT_PROGRAM))
    log.info("model loaded from %s in %.1f s", model_dir, handlers.load_seconds)
    server = bind_server(host, port, make_handler(handlers), port_fallback)
    server.daemon_threads = True
    bound_port = server.server_address[1]
    url = f"http://{host}:{bound_port}"

    def stop(_signum: int, _frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    if ready_file is not None:
        fsutil.write_json_atomic(ready_file, {"pid": os.getpid(), "port": bound_port, "url": url})
    log.info("serving %s (GET /ping, POST /invocations)", url)
    if on_ready is not None:
        on_ready(url)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        log.info("stopped")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.local.server",
        description="Serve an extracted model artifact under SageMaker's serving contract "
        "(GET /ping, POST /invocations).",
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="folder holding the extracted model.tar.gz")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (SageMaker's containers use 8080)")
    parser.add_argument("--port-fallback", action="store_true", help="use a free port when --port is busy")
    parser.add_argument("--ready-file", type=Path, default=None, help="JSON written once the endpoint serves")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return serve(args.model_dir, args.host, args.port, port_fallback=args.port_fallback, ready_file=args.ready_file)
    except HandlerSetupError as error:
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
