"""The runner's MLflow work in a process of its own, started before the definition is built.

A tracked run needs MLflow in the runner twice: before the jobs start (the store's tables and the experiment, so
parallel trials do not race to create them) and at the end (the registered version's tags on its run). Importing
MLflow and migrating a new SQLite store take seconds of one core, and the definition build beside them uses one
core too: so the helper imports MLflow and migrates a template store in a temporary folder while the runner
builds, and the runner's two requests then cost a fraction of a second. The helper creates nothing in the workdir
until the run asks it to (``prepare``, after the run's values are checked and its folder exists): a refused run
leaves no store behind.

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


def _answer(request: dict[str, Any], uri: str, template: Path | None) -> Any:
    if request.get("op") == "prepare":
        if template is not None:  # a SQLite store's
            place_template(template, uri)
        return tracking.prepare(uri, str(request["experiment"]))
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
        if template is None:  # a server (or no template): MLflow imported before the first request all the same
            with contextlib.suppress(ImportError):  # tracking.prepare then says that MLflow is missing
                import mlflow.tracking  # noqa: F401
        for line in sys.stdin:
            try:
                result = _answer(json.loads(line), uri, template)
            except Exception as error:  # tracking never breaks the run: one line, and the runner goes on
                print(f"MLflow tracking: the runner's request failed ({type(error).__name__}: {error})")
                result = None
            replies.write(json.dumps({"result": result}, default=str) + "\n")
            replies.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
