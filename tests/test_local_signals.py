"""A real `local` run stopped from outside, by a signal to the runner's PID alone (not its process group): SIGINT
or SIGTERM during Tune, and SIGHUP during Train after a trial was killed with SIGKILL. Every job process ends
within seconds, the run is recorded Stopped, and a tuning step with a trial ended by a signal is never cached.
(The mechanism on its own, with a job whose worker sits in a session of its own and ignores SIGTERM, is in
test_local_guards.py.) These runs track into the default store, the workdir's SQLite file, and one test reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines import demo_data
from pipelines.util import processes

pytestmark = pytest.mark.slow

# Long enough that a job is always running when the signal comes.
SMALL = ["--preset", "demo", "--image-size", "16", "--param", "Architecture=mobilenet_v3_small", "--port", "0"]
# The grace a job gets after SIGTERM, and what process start-up and teardown may add on a loaded machine.
STOP_WITHIN_SECONDS = processes.STOP_GRACE_SECONDS + 10


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_data.write_digits_archive(tmp_path_factory.mktemp("data") / "d.zip", image_size=16, per_class_limit=6)


def _start(workdir: Path, data: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipelines.run", "local", "--data", str(data), "--workdir", str(workdir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAGEMAKER_SUPPRESS_V2_WARNING": "1"}
    log = (workdir.parent / "local.log").open("w")
    return subprocess.Popen([*command, *SMALL, *extra], stdout=log, stderr=subprocess.STDOUT, env=env, text=True)


def _jobs(folder: Path) -> list[int]:
    """Live processes of the jobs under ``folder`` (their command lines name their job folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and processes.is_alive(int(entry.name)):
            with contextlib.suppress(OSError):
                if f"{folder}/".encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def _wait(what: str, condition: Callable[[], object], runner: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        log = Path(runner.args[runner.args.index("--workdir") + 1]).with_name("local.log").read_text()
        assert runner.poll() is None, f"the run ended before {what}:\n{log}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{log}"
        time.sleep(0.05)


def _stop(runner: subprocess.Popen, number: int, jobs: list[int]) -> float:
    """Send ``number`` to the runner alone; seconds until it and every job process had ended."""
    started = time.monotonic()
    os.kill(runner.pid, number)
    runner.wait(timeout=STOP_WITHIN_SECONDS * 3)
    while any(processes.is_alive(pid) for pid in jobs) and time.monotonic() - started < STOP_WITHIN_SECONDS * 3:
        time.sleep(0.05)
    assert not [pid for pid in jobs if processes.is_alive(pid)], "a job process outlived the run"
    return time.monotonic() - started


def _record(run: Path) -> tuple[dict, dict[str, dict]]:
    record = json.loads((run / "run.json").read_text())
    return record, {step["StepName"]: step for step in record["PipelineExecutionSteps"]}


def _cached_steps(workdir: Path) -> set[str]:
    return {json.loads(path.read_text())["step"] for path in (workdir / "cache").glob("*.json")}


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_tune_stops_every_trial_within_seconds_and_marks_the_run_stopped(
    tmp_path: Path, data: Path, number: signal.Signals
) -> None:
    workdir = (tmp_path / "runs").resolve()
    # Untracked: the SIGHUP test below stops a tracked run, the MLflow helper included.
    runner = _start(workdir, data, "--trials", "2", "--parallel", "2", "--tuning-epochs", "500", "--no-tracking")
    run = workdir / "run-0001"
    trials = [run / "tune" / "trial-01", run / "tune" / "trial-02"]
    _wait("two running trials", lambda: all(_jobs(trial) for trial in trials), runner)
    jobs = [pid for trial in trials for pid in _jobs(trial)]

    seconds = _stop(runner, number, jobs)

    assert seconds < STOP_WITHIN_SECONDS, seconds
    assert runner.returncode == 128 + number
    log = (tmp_path / "local.log").read_text()
    assert f"stopped by {number.name}: every job process was stopped; run-0001 is marked Stopped ({run})" in log
    record, steps = _record(run)
    assert record["PipelineExecutionStatus"] == "Stopped" and record["StoppedBy"] == number.name
    assert steps["Preprocess"]["StepStatus"] == "Succeeded" and steps["Tune"]["StepStatus"] == "Stopped"
    assert _cached_steps(workdir) == {"Preprocess"}
    status = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "local-status", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
    )
    assert "status    Stopped" in status.stdout and f"{'Tune':<24} Stopped" in status.stdout


def test_a_trial_killed_from_outside_is_never_cached_and_sighup_stops_the_training_job(
    tmp_path: Path, data: Path
) -> None:
    workdir = (tmp_path / "runs").resolve()
    runner = _start(workdir, data, "--trials", "2", "--parallel", "2", "--tuning-epochs", "1", "--epochs", "500")
    run = workdir / "run-0001"
    victim = run / "tune" / "trial-02"
    _wait("two running trials", lambda: _jobs(run / "tune" / "trial-01") and _jobs(victim), runner)
    for pid in _jobs(victim):
        os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer, or a user's kill -9, would
    _wait("the training job", lambda: _jobs(run / "train"), runner)

    seconds = _stop(runner, signal.SIGHUP, _jobs(run / "train"))  # the terminal closed

    assert seconds < STOP_WITHIN_SECONDS, seconds
    assert runner.returncode == 128 + signal.SIGHUP
    record, steps = _record(run)
    assert record["PipelineExecutionStatus"] == "Stopped" and record["StoppedBy"] == "SIGHUP"
    assert steps["Train"]["StepStatus"] == "Stopped"
    tune = steps["Tune"]
    assert tune["StepStatus"] == "Succeeded"  # the other trial finished: the run went on, as SageMaker's would
    assert "not cached: imgclf-tune-run-0001-002 ended by SIGKILL" in tune["Local"]["Detail"]
    assert _cached_steps(workdir) == {"Preprocess"}  # the weaker tuning result is never reused
    # By default a run tracks into the workdir's SQLite store: the finished trial's run is there, under the parent.
    from mlflow.tracking import MlflowClient

    from entrypoints import tracking
    from pipelines import config

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(config.PIPELINE_NAME).experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`{tracking.TAG_EXECUTION}` = 'run-0001'")
    (parent,) = [run for run in runs if run.data.tags[tracking.TAG_ROLE] == tracking.ROLE_PARENT]
    finished = [run for run in runs if run.data.tags[tracking.TAG_ROLE] == "trial" and run.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.tags[tracking.TAG_PARENT] == parent.info.run_id
    assert [m.step for m in client.get_metric_history(finished[0].info.run_id, "valid_accuracy")] == [1]
    # ... through the runner's server of that store, not by opening it (and importing MLflow) in the job
    line = next(line for line in (run / "tune" / "trial-01" / "log.txt").read_text().splitlines() if "MLflow" in line)
    assert re.search(r"^MLflow tracking: run \w+ in experiment .* at http://127\.0\.0\.1:\d+ under parent", line), line
    assert "Warning" not in (tmp_path / "local.log").read_text()  # nothing of the server's own on the run's output
