"""The runner's MLflow work in a process of its own, started before the definition is built.

A tracked run needs MLflow in the runner twice: before the jobs start (the store's tables and the experiment, so
parallel trials do not race to create them) and at the end (the registered version's tags on its run). Importing
MLflow and migrating a new SQLite store take seconds of one core, and the definition build beside them uses one
core too: so the helper imports MLflow and migrates a template store in a temporary folder while the runner
builds, and the runner's two requests then cost a fraction of a second. The helper creates nothing in the workdir
until the run asks it to (``prepare``, after the run's values are checked and its folder exists): a refused run
leaves no store behind. Then it serves the SQLite store (``serve``), and the runner points the jobs that track
into it at that server: they log over HTTP with the standard library instead of each importing MLflow.

The runner and the helper speak JSON lines: a request ``{"op": ..., ...}`` on the helper's stdin, one reply
``{"result": ...}`` on its stdout. What MLflow and :mod:`entrypoints.tracking` say goes to the run's stderr. The
helper has a session of its own (a Ctrl-C at the terminal is the runner's to handle) and ends when its stdin
closes, also when the runner dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from entrypoints import tracking
from pipelines.util import fsutil

SQLITE = "sqlite:///"
TEMPLATE_NAME = "template.db"
SERVER_STORE_VARIABLE = "_MLFLOW_SERVER_FILE_STORE"  # mlflow.server.constants.BACKEND_STORE_URI_ENV_VAR
SERVER_ARTIFACTS_VARIABLE = "_MLFLOW_SERVER_ARTIFACT_ROOT"  # mlflow.server.constants.ARTIFACT_ROOT_ENV_VAR


class TrackingStore:
    """The runner's side: start the helper, ask it, close it. A helper that fails or dies costs one line, and the
    run goes on (the jobs then say for themselves whether they track)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.asked = False
        root = str(Path(__file__).resolve().parents[2])  # the checkout or site-packages that holds `pipelines`
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        env.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not "Creating initial MLflow database tables" of a template
        self.process: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", __name__, uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            start_new_session=True,
        )

    def _request(self, op: str, **fields: Any) -> Any:
        process = self.process
        if process is None or process.stdin is None or process.stdout is None:
            return None
        try:
            self.asked = True
            process.stdin.write(json.dumps({"op": op, **fields}, default=str) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
            return json.loads(line)["result"]
        except (OSError, ValueError, KeyError, TypeError) as error:  # a helper that died or answered nonsense
            print(f"MLflow tracking: the runner's tracking helper failed ({error}); the jobs go on", file=sys.stderr)
            self.close()
            return None

    def prepare(self, experiment: str) -> str | None:
        """The store's tables (a copy of the migrated template for a new SQLite store) and the experiment."""
        return self._request("prepare", experiment=experiment)

    def serve(self) -> str | None:
        """The URL where the helper now serves the SQLite store (None: the jobs open it themselves)."""
        return self._request("serve")  # the helper serves a SQLite store only

    def job_environment(self, served: str | None) -> Any:
        """What the runner hands the engine: a job whose definition tracks into this store talks to ``served``."""

        def environment(env: dict[str, str]) -> dict[str, str]:
            if served and env.get(tracking.ENV_TRACKING_URI) == self.uri:
                return {**env, tracking.ENV_TRACKING_URI: served}
            return env

        return environment

    def tag_registered_version(self, package: dict[str, Any]) -> str | None:
        return self._request("tag", package=package)

    def close(self) -> None:
        """Every request has had its answer: a helper still importing (a run refused after its start) is not
        waited for. SIGTERM lets it remove its template."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        try:
            process.wait(timeout=2 if self.asked else 0)  # an idle helper ends on its own when its stdin closes
        except subprocess.TimeoutExpired:
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def place_template(template: Path, uri: str) -> None:
    """A new SQLite store starts as a copy of the migrated template (fsutil.atomic_output, put in place only where
    nothing is, so a store that appeared meanwhile is kept); an existing one is left as it is."""
    database = Path(uri.removeprefix(SQLITE))
    if database.exists():
        return
    # a store that appeared meanwhile, or a folder that is not there (MLflow names it in its own error)
    with (
        contextlib.suppress(OSError, fsutil.OutputPathError),
        template.open("rb") as source,
        fsutil.atomic_output(database, replace=False) as stream,
    ):
        shutil.copyfileobj(source, stream)


def _migrated_template(folder: Path) -> Path | None:
    """A SQLite store with MLflow's tables, made while the runner builds the definition (None if that fails)."""
    template = folder / TEMPLATE_NAME
    return template if tracking.prepare(f"{SQLITE}{template}", None) is not None else None


def server_app(uri: str) -> Any:
    """MLflow's tracking-server app over a SQLite store, imported while the runner builds the definition (None, and
    one line, where it cannot be had: the jobs then open the store themselves).

    A job that imports MLflow and opens the store itself spends seconds of a core on it (MLflow 2.9 s, its SQL
    store 1.7 s); one that speaks to a server needs only the standard library (entrypoints.tracking.RestClient).
    The app is what ``mlflow server`` runs, here without its job runner and worker processes; it opens the store
    at its first request, so importing it early writes nothing. New experiments keep their artifacts where the
    SQLite store's would (``mlartifacts`` beside it), and the jobs copy theirs there."""
    import warnings

    # What `mlflow server` sets for its app, set before the app is imported (it reads them then, to decide on its
    # security middleware); mlflow.server.constants names them, but importing it imports the app.
    names = {"BACKEND_STORE_URI_ENV_VAR": SERVER_STORE_VARIABLE, "ARTIFACT_ROOT_ENV_VAR": SERVER_ARTIFACTS_VARIABLE}
    os.environ[SERVER_STORE_VARIABLE] = uri
    os.environ[SERVER_ARTIFACTS_VARIABLE] = str(tracking.artifact_location(uri))
    # Deprecations that MLflow's server app (and its FastAPI wrapper, imported at the first request) warns of are
    # MLflow's to act on, not the run's: the helper's stderr is the run's.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"starlette\b")
    try:
        from mlflow.server import app, constants
    except ImportError as error:  # mlflow-skinny alone: no server
        print(f"MLflow tracking: the jobs open the store themselves (no MLflow server: {error}; pip install mlflow)")
        return None
    if any(getattr(constants, name, None) != value for name, value in names.items()):
        print("MLflow tracking: the jobs open the store themselves (this MLflow's server reads other variables)")
        return None
    return app


def serve(app: Any) -> str | None:
    """Serve ``app`` on a free port of 127.0.0.1, in a thread of this helper that ends with it; its URL."""
    if app is None:
        return None
    import logging
    import threading

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, name="mlflow-server", daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}"


def _answer(request: dict[str, Any], uri: str, template: Path | None, app: Any) -> Any:
    if request.get("op") == "prepare":
        if template is not None:  # a SQLite store's
            place_template(template, uri)
        return tracking.prepare(uri, str(request["experiment"]))
    if request.get("op") == "serve":
        return serve(app)
    if request.get("op") == "tag":
        return tracking.tag_registered_version(request["package"], uri)
    raise ValueError(f"unknown request {request.get('op')!r}")


def main(argv: list[str]) -> int:
    """The helper: ``python -m pipelines.local.tracking_store URI``."""
    uri = argv[0]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the runner is done: unwind, removing the template
    replies, sys.stdout = sys.stdout, sys.stderr  # MLflow's and tracking's own lines are the run's stderr
    with tempfile.TemporaryDirectory(prefix="mlflow-template-") as scratch:
        template = _migrated_template(Path(scratch)) if uri.startswith(SQLITE) else None
        app = server_app(uri) if template is not None else None
        if template is None and not tracking.speaks_rest(uri):  # MLflow imported before the first request
            with contextlib.suppress(ImportError):  # tracking.prepare then says that MLflow is missing
                import mlflow.tracking  # noqa: F401
        for line in sys.stdin:
            try:
                result = _answer(json.loads(line), uri, template, app)
            except Exception as error:  # tracking never breaks the run: one line, and the runner goes on
                print(f"MLflow tracking: the runner's request failed ({type(error).__name__}: {error})")
                result = None
            replies.write(json.dumps({"result": result}, default=str) + "\n")
            replies.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
