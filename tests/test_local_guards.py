"""The local side under a careless or hostile user: one test per mechanism, each with the cases that were reported
and others of the same kind.

- path containment: names that become paths are checked against SageMaker's patterns, and paths made from them
  are proven inside the workdir (links resolved) before anything is written or deleted;
- the workdir lock: concurrent approvals deploy once, the second says it changed nothing, and a command that finds
  the lock held waits, naming who holds it;
- signals: a job's whole process tree (a grandchild in a session of its own included) stops within seconds, and
  a run whose process has gone shows as such;
- damaged state files: registry, cache entries, endpoint records; the user's umask;
- early validation: every value checked before the first step against the scripts', SageMaker's and the config's
  rules.

The end-to-end signal cases (a real `local` run stopped with SIGINT and SIGTERM) are in test_local_signals.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines import config, validation
from pipelines.definition import names
from pipelines.local import cache, containers, registry
from pipelines.local.sagemaker import arn
from pipelines.run import main
from pipelines.serving import endpoint
from pipelines.util import fsutil, processes

GROUP = config.MODEL_PACKAGE_GROUP
NAME = config.LOCAL_ENDPOINT_NAME


def _run(*argv: str) -> tuple[int, str, str]:
    """``python -m pipelines.run`` in this process: (exit status, stdout, stderr); argparse refusals included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, out.getvalue(), err.getvalue()


def _registered(workdir: Path, folder: Path, servable: bool = True) -> dict[str, Any]:
    """Version 1 of the default group, pending approval, holding a small real artifact (as the Register step makes);
    ``servable=False``: a stand-in for one, where nothing may ever be served."""
    if servable:
        from _serving import make_artifact

        make_artifact(folder)
    else:
        folder.mkdir(parents=True)
        (folder / "model.tar.gz").write_bytes(b"never served")
    request = {
        "ModelPackageGroupName": GROUP,
        "ModelApprovalStatus": "PendingManualApproval",
        "InferenceSpecification": {"Containers": [{"Image": "image", "ModelDataUrl": "s3://b/model.tar.gz"}]},
    }
    package = registry.LocalModelRegistry(workdir, arn).register(
        request, {"s3://b/model.tar.gz": folder / "model.tar.gz"}
    )
    return package


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _server_pids(workdir: Path) -> list[int]:
    return endpoint.servers_of(workdir.resolve(), NAME)


# --- path containment -------------------------------------------------------------------------------------------------


def test_names_that_would_be_paths_are_refused_and_nothing_outside_the_workdir_is_touched(tmp_path: Path) -> None:
    workdir, victim = tmp_path / "runs", tmp_path / "victim"
    (victim / "1").mkdir(parents=True)
    (victim / "1" / "keep.txt").write_text("mine")
    _registered(workdir, tmp_path / "artifact", servable=False)
    before = _tree(tmp_path)
    w = str(workdir)
    refused = {  # the reported cases first, then others of the same kinds
        "absolute endpoint name": ("local-models", "--workdir", w, "--approve", "1", "--endpoint-name", str(victim)),
        "relative endpoint name": ("local-models", "--workdir", w, "--approve", "1", "--endpoint-name", "../../victim"),
        "endpoint stop by a path": ("endpoint", "stop", "--workdir", w, "--name", "../victim"),
        "endpoint start by a nested name": ("endpoint", "start", "--workdir", w, "--name", "a/b"),
        "underscore (no SageMaker endpoint name has one)": ("endpoint", "status", "--workdir", w, "--name", "imgclf_x"),
        "group as a path": ("local-models", "--workdir", w, "--group", "../victim", "--approve", "1"),
        "local's endpoint name": ("local", "--workdir", w, "--endpoint-name", "..", "--no-cache"),
        "local's group": ("local", "--workdir", w, "--model-package-group", "../../victim"),
    }
    for case, argv in refused.items():
        code, _, err = _run(*argv)
        assert code == 2, case
        assert "is not a SageMaker EndpointName" in err or "is not a SageMaker EntityName" in err, (case, err)
    assert _tree(tmp_path) == before  # nothing written, nothing deleted, not even inside the workdir

    # A link inside the workdir that leads out of it: nothing is deleted or written through it.
    package = registry.LocalModelRegistry(workdir, arn).update_approval(GROUP, 1, "Approved")
    (workdir / endpoint.ENDPOINTS_DIR).mkdir()
    (workdir / endpoint.ENDPOINTS_DIR / NAME).symlink_to(victim)
    with pytest.raises(endpoint.EndpointError, match="outside"):
        endpoint.deploy(workdir.resolve(), NAME, package, port=0)
    (workdir / registry.ARTIFACTS_DIR).rename(tmp_path / "registry-moved")
    (workdir / registry.ARTIFACTS_DIR).symlink_to(victim)
    model = tmp_path / "other.tar.gz"
    request = {"ModelPackageGroupName": GROUP, "InferenceSpecification": {"Containers": [{"ModelDataUrl": "s3://b/m"}]}}
    model.write_bytes(b"other bytes: a new version")
    with pytest.raises(registry.RegistryError, match="outside"):
        registry.LocalModelRegistry(workdir, arn).register(request, {"s3://b/m": model})
    assert _tree(victim) == {"1/keep.txt": b"mine"}


def test_a_workdir_inside_the_data_folder_or_too_long_a_path_is_refused_before_any_work(tmp_path: Path) -> None:
    data = tmp_path / "photos"
    (data / "cat").mkdir(parents=True)
    (data / "cat" / "1.jpg").write_bytes(b"not read")
    before = _tree(tmp_path)
    for workdir in (data / "runs", data):
        code, _, err = _run("local", "--data", str(data), "--workdir", str(workdir), "--no-cache")
        assert code == 2, err
        assert err.strip().splitlines() == [
            f"error: --workdir {workdir} lies inside --data {data}: the run copies the data folder into the "
            "workdir's store, which would copy itself; pass a --workdir outside the data folder; nothing ran"
        ], err
    assert not (data / "runs").exists() and _tree(tmp_path) == before  # no run folder, no store

    deep = tmp_path.joinpath(*["d" * 200] * 20)  # about 4,000 characters
    code, _, err = _run("local", "--data", str(data), "--workdir", str(deep), "--no-cache")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--workdir is a path of" in err and "use a workdir path of at most 1024 bytes; nothing ran" in err
    assert not (tmp_path / ("d" * 200)).exists()  # not even the workdir was made

    for workdir in (tmp_path / ("x" * 300) / "runs", tmp_path.joinpath(*["d" * 200] * 30)):  # more than the OS takes
        code, _, err = _run("local", "--data", str(data), "--workdir", str(workdir))
        assert code == 2 and err.strip().splitlines()[-1].endswith("cannot be used (File name too long)"), err
    assert _tree(tmp_path) == before


def test_the_name_patterns_are_sagemakers_own() -> None:
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    shapes = {
        "endpoint": ("CreateEndpoint", "EndpointName"),
        "model package group": ("CreateModelPackageGroup", "ModelPackageGroupName"),
    }
    for kind, (operation, member) in shapes.items():
        shape = model.operation_model(operation).input_shape.members[member]
        assert names.SAGEMAKER_NAME_PATTERNS[kind] == (shape.name, shape.metadata["pattern"])
        assert shape.metadata["max"] == 63
    assert names.check_name("endpoint", "a" * 63) and names.check_name("endpoint", "imgclf--local-2")
    for bad in ("a" * 64, "-x", "x-", ".", "", "x\0y", "x y", "ümlaut"):
        with pytest.raises(ValueError, match="not a SageMaker EndpointName"):
            names.check_name("endpoint", bad)


# --- the workdir lock -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_approvals_deploy_once_and_the_second_says_it_changed_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "runs"
    _registered(workdir, tmp_path / "artifact")
    command = [sys.executable, "-m", "pipelines.run", "local-models", "--workdir", str(workdir), "--approve", "1"]
    both = [
        subprocess.Popen([*command, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=240) for process in both]
        assert [process.returncode for process in both] == [0, 0], outputs
        said = sorted(out.splitlines()[-1].split(": ", 1)[1].split(",")[0] for out, _ in outputs)
        assert said == ["created", "unchanged (it already serves this version)"], outputs
        record = endpoint.read_record(workdir.resolve(), NAME)
        assert _server_pids(workdir) == [record["pid"]]  # one server, and the record holds it
    finally:
        code, out, _ = _run("endpoint", "stop", "--workdir", str(workdir))
    assert code == 0 and "stopped" in out
    assert not _server_pids(workdir)


@pytest.mark.slow
def test_a_command_that_finds_the_workdir_locked_waits_and_says_who_holds_it(tmp_path: Path) -> None:
    workdir = tmp_path / "runs"
    model = tmp_path / "model.tar.gz"
    model.write_bytes(b"model")
    request = {"ModelPackageGroupName": GROUP, "InferenceSpecification": {"Containers": [{"ModelDataUrl": "s3://b/m"}]}}
    registry.LocalModelRegistry(workdir, arn).register(request, {"s3://b/m": model})
    holds = (
        "import time; from pathlib import Path; from pipelines.util import fsutil\n"
        f"with fsutil.workdir_lock(Path({str(workdir)!r}), 'a long deploy', 60):\n"
        "    print('held', flush=True); time.sleep(3)"
    )
    holder = subprocess.Popen([sys.executable, "-c", holds], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    busy = pytest.raises(fsutil.WorkdirBusy, match=rf"locked by pid {holder.pid} \(a long deploy\)")
    with busy, fsutil.workdir_lock(workdir, "an impatient change", 0.3):
        pass
    code, out, err = _run("local-models", "--workdir", str(workdir), "--reject", "1")
    holder.wait(timeout=30)
    assert code == 0 and "Rejected" in out
    assert f"waiting for pid {holder.pid} (a long deploy) to finish with {workdir.resolve()}" in err
    assert time.monotonic() - started > 2  # it waited for the holder instead of writing beside it
    assert registry.LocalModelRegistry(workdir, arn).describe(GROUP, 1)["ModelApprovalStatus"] == "Rejected"


# --- signals ----------------------------------------------------------------------------------------------------------

# A job like torchrun: it starts a worker in a session of its own, and both ignore SIGTERM.
STUBBORN_LAUNCHER = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                           "print('worker', flush=True); time.sleep(600)"], start_new_session=True)
print("launcher", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_stop_signal_ends_every_process_of_every_job_within_seconds(tmp_path: Path) -> None:
    from pipelines.local.executor import RunStopped
    from pipelines.local.runner import stopped_by_signals

    seen: list[str] = []
    script = tmp_path / "launcher.py"
    script.write_text(STUBBORN_LAUNCHER)

    def on_line(line: str) -> None:
        seen.append(line)
        if len(seen) == 2:  # launcher and worker are both up: hang up, as a closed terminal does
            os.kill(os.getpid(), signal.SIGHUP)

    started = time.monotonic()
    with pytest.raises(RunStopped) as stopped, stopped_by_signals(grace_seconds=1.0):
        containers.run_logged(
            [sys.executable, str(script)], cwd=tmp_path, env=containers.base_environment(),
            log_path=tmp_path / "log.txt", job_name="stubborn", on_line=on_line,
        )  # fmt: skip
    assert stopped.value.signal_name == "SIGHUP"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _processes_running(script):
        time.sleep(0.1)
    assert not _processes_running(script), "a job process outlived the stop"
    assert time.monotonic() - started < 15
    with pytest.raises(containers.JobError, match="not started") as refused:  # no job starts once stopping
        containers.run_logged([sys.executable, "-c", "pass"], cwd=tmp_path, env={}, log_path=tmp_path / "2.txt",
                              job_name="late")  # fmt: skip
    assert refused.value.signal_name == "SIGHUP"
    containers.JOBS.allow()


def _processes_running(script: Path) -> bool:
    """A launcher of ``script`` or its worker is alive (found by their command lines, for the test only)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and processes.is_alive(int(entry.name)):
            with contextlib.suppress(OSError):
                command = (entry / "cmdline").read_bytes()
                if str(script).encode() in command or b"print('worker'" in command:
                    return True
    return False


def test_exit_statuses_of_stopped_jobs_name_their_signal() -> None:
    assert containers.signal_of(-9) == "SIGKILL" and containers.signal_of(-15) == "SIGTERM"
    assert containers.signal_of(143) == "SIGTERM" and containers.signal_of(130) == "SIGINT"  # the scripts' own
    assert containers.signal_of(1) is None and containers.signal_of(2) is None and containers.signal_of(139) is None


def test_a_run_left_executing_by_a_gone_process_shows_as_stopped(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    identity = processes.identity(sleeper.pid)
    steps = [{"StepName": "Tune", "StepStatus": "Executing"}]
    for run_id, process in (("run-0001", identity), ("run-0002", {**processes.identity(), "StartTicks": -1})):
        record = {"PipelineExecutionStatus": "Executing", "StartTime": "t", "Process": process}
        fsutil.write_json_atomic(tmp_path / run_id / "run.json", {**record, "PipelineExecutionSteps": steps})
    (tmp_path / "run-0003").mkdir()
    (tmp_path / "run-0003" / "run.json").write_text('{"PipelineExecutionStatus": "Exec')

    code, out, _ = _run("local-status", "--workdir", str(tmp_path), "run-0001")
    assert code == 0 and "status    Executing" in out  # its process runs
    sleeper.kill()
    sleeper.wait()
    code, out, _ = _run("local-status", "--workdir", str(tmp_path), "run-0001")
    assert "status    Stopped (process gone)" in out and f"{'Tune':<24} Stopped (process gone)" in out
    code, out, _ = _run("local-status", "--workdir", str(tmp_path), "--all")
    lines = out.splitlines()
    assert "Stopped (process gone)" in lines[0]  # the killed process
    assert "Stopped (process gone)" in lines[1]  # a live PID that is another process now
    assert "Unknown" in lines[2]  # a damaged run.json does not hide the others
    assert json.loads((tmp_path / "run-0001" / "run.json").read_text())["PipelineExecutionStatus"] == "Executing"
    assert _run("local-status", "--workdir", str(tmp_path), "../run-0001")[0] == 2


# --- damaged state files ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_damaged_registry_stops_every_command_with_one_line_and_is_never_rewritten(tmp_path: Path) -> None:
    workdir = tmp_path / "runs"
    data = tmp_path / "data.zip"
    data.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    path = workdir / registry.REGISTRY_FILE
    good = json.dumps({"ModelPackageGroups": {}})
    damages = {
        "truncated": good[:17],
        "not an object": "[]",
        "a group named by a path": json.dumps({"ModelPackageGroups": {"../x": {"ModelPackageGroupName": "../x"}}}),
        "a version that is text": json.dumps(
            {
                "ModelPackageGroups": {
                    GROUP: {"ModelPackageGroupName": GROUP, "ModelPackages": [{"ModelPackageVersion": "1"}]}
                }
            }
        ),
        "not UTF-8": b"\xff\xfe{".decode("latin-1"),
    }
    commands = (
        ("local", "--workdir", str(workdir), "--data", str(data)),
        ("local-models", "--workdir", str(workdir)),
        ("local-models", "--workdir", str(workdir), "--approve", "1"),
        ("endpoint", "start", "--workdir", str(workdir)),
    )
    for damage, text in damages.items():
        workdir.mkdir(exist_ok=True)
        path.write_bytes(text.encode("latin-1"))
        for argv in commands:
            code, _, err = _run(*argv)
            assert code == 2, (damage, argv, err)
            assert err.count("\n") == 1 and f"{path.resolve()} is damaged" in err, (damage, argv, err)
            assert "restore it from a copy, or move it aside" in err and "Traceback" not in err
            assert path.read_bytes() == text.encode("latin-1"), (damage, argv)  # never rewritten
        assert not list(workdir.glob("run-*")), damage  # `local` stopped before any step, with no run folder
    path.unlink()
    path.mkdir()  # not a file at all
    assert "is damaged: it is not a regular file" in _run(*commands[1])[2]


def test_a_damaged_cache_entry_is_a_reported_miss(tmp_path: Path) -> None:
    output = tmp_path / "run-0001" / "out.txt"
    output.parent.mkdir()
    output.write_text("x")
    lines: list[str] = []
    step_cache = cache.StepCache(tmp_path, report=lines.append)
    entry = step_cache.store("key", "Preprocess", "run-0001", {"out": output}, {})
    path = step_cache.folder / "key.json"
    good = path.read_text()
    for damaged in (good[: len(good) // 2], json.dumps({**entry.__dict__, "outputs": {"out": "../../etc/passwd"}}),
                    json.dumps({**entry.__dict__, "result": {"anything": 1}}), "null"):  # fmt: skip
        path.write_text(damaged)
        assert step_cache.lookup("key") is None
        assert lines and f"cache entry {path} is damaged" in lines[-1] and "counted as a miss" in lines[-1]
    step_cache.store("key", "Preprocess", "run-0001", {"out": output}, {})  # the step ran again: a new entry
    assert step_cache.lookup("key") is not None


@pytest.mark.slow
def test_a_damaged_endpoint_record_is_reported_and_stop_still_stops_the_server(tmp_path: Path) -> None:
    from _serving import JPEG, make_artifact, package_for

    workdir = (tmp_path / "runs").resolve()
    make_artifact(tmp_path / "artifact")
    served = endpoint.deploy(workdir, NAME, package_for(tmp_path / "artifact" / "model.tar.gz"), port=0)
    path = endpoint.record_path(workdir, NAME)
    try:
        path.write_text(path.read_text()[:40])  # truncated
        code, _, err = _run("endpoint", "status", "--workdir", str(workdir))
        assert code == 2 and f"{path} is damaged" in err and "endpoint stop --name imgclf-local" in err
        (tmp_path / "x.jpg").write_bytes(JPEG)
        code, _, err = _run("predict", str(tmp_path / "x.jpg"), "--workdir", str(workdir))
        assert code == 2 and f"{path} is damaged" in err
        code, out, err = _run("endpoint", "stop", "--workdir", str(workdir))
        assert code == 0 and f"processes: {served['pid']}" in out and "set aside" in out, (out, err)
    finally:
        endpoint.stop(workdir, NAME)
    assert not processes.is_alive(served["pid"]) and not _server_pids(workdir)
    assert not path.exists() and len(list(path.parent.glob(f"{NAME}.json.damaged-*"))) == 1  # kept to inspect
    path.write_text(json.dumps({"pid": "12", "url": "http://x"}))  # whole JSON, but not a record
    assert "its pid is missing or not a number" in _run("endpoint", "status", "--workdir", str(workdir))[2]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_state_files_keep_the_users_umask(tmp_path: Path, umask: int) -> None:
    model = tmp_path / "model.tar.gz"
    model.write_bytes(b"model")
    request = {"ModelPackageGroupName": GROUP, "InferenceSpecification": {"Containers": [{"ModelDataUrl": "s3://b/m"}]}}
    previous = os.umask(umask)
    try:
        registry.LocalModelRegistry(tmp_path, arn).register(request, {"s3://b/m": model})
        cache.StepCache(tmp_path).store("key", "Preprocess", "run-1", {}, {})
    finally:
        os.umask(previous)
    for path in (tmp_path / registry.REGISTRY_FILE, tmp_path / cache.CACHE_DIR / "key.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary left behind


# --- early validation -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_values_that_could_only_fail_late_are_refused_before_anything_runs(tmp_path: Path) -> None:
    workdir = tmp_path / "runs"
    data = tmp_path / "data.zip"
    data.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    local = ("local", "--workdir", str(workdir), "--data", str(data))
    flags = {  # refused as they are read
        ("--threshold", "2"): "AccuracyThreshold=2.0 is outside 0 to 1",
        ("--threshold", "-1"): "AccuracyThreshold=-1.0 is outside 0 to 1",
        ("--threshold", "nan"): "expected a number in ASCII digits, got 'nan'",  # not a form SageMaker reads
        ("--port", "70000"): "a port is 0 to 65535",
        ("--port", "-1"): "a port is 0 to 65535",
        ("--image-size", "1"): "ImageSize=1 is outside 8 to 2048",
        ("--image-size", "100000"): "ImageSize=100000 is outside 8 to 2048",
    }
    for argv, message in flags.items():
        code, _, err = _run(*local, *argv)
        assert code == 2 and message in err, (argv, err)
    assert _run("endpoint", "start", "--workdir", str(workdir), "--port", "99999")[0] == 2

    definition_level = {  # refused once the definition is built, before the run folder
        ("--hp", "epochs=50"): "--hp epochs=50 does not reach the training jobs as given: Tune takes epochs from "
        "--param TuningEpochs; Train takes epochs from --param TrainingEpochs",
        ("--hp", "model-dir=/tmp/elsewhere"): "--hp model-dir=/tmp/elsewhere: the container contract sets --model-dir",
        ("--hp", "workers=4"): "--hp workers=4: the local executor passes --workers 0",
        ("--param", "ImageSize=1"): "ImageSize=1 is outside 8 to 2048",
        ("--param", "MaxTuningJobs=0"): "MaxTuningJobs=0: Tune.Arguments.HyperParameterTuningJobConfig.ResourceLimits."
        "MaxNumberOfTrainingJobs: 0 is below the minimum 1",
        ("--param", "TrainingInstanceType=ml.banana"): "TrainingInstanceType=ml.banana: Tune.Arguments.",
        ("--param", "ModelPackageGroupName=../x"): "model package group name '../x' is not a SageMaker EntityName",
    }
    code, _, err = _run(*local, *(item for argv in definition_level for item in argv))
    assert code == 2 and "values refused (listed above); nothing ran" in err
    for message in definition_level.values():
        assert message in err, (message, err)

    script_level = {  # the scripts' own parsers and cross-checks, in their words, naming the source
        ("--hp", "lr=abc"): "Tune, Train: train.py refuses argument --lr: expected a number, got 'abc' (from --hp lr)",
        ("--hp", "nosuchparam=1"): "train.py refuses unrecognized arguments: --nosuchparam 1 (from --hp nosuchparam)",
        ("--hp", "dropout=1.5"): "train.py refuses argument --dropout: must be <= 1, got '1.5' (from --hp dropout)",
        ("--hp", "trainable-blocks=9"): "resnet50 has 5 backbone blocks, got 9",
        ("--param", "Architecture=resnet9000"): "got 'resnet9000' (from --param Architecture)",
        ("--param", "TuningEpochs=0"): "Tune: train.py refuses argument --epochs: must be > 0, got '0' "
        "(from --param TuningEpochs)",
        ("--param", "ValidFraction=0.6"): "Preprocess: preprocess.py refuses --valid-fraction 0.6 and --test-fraction "
        "0.5 must each be in [0, 1) and leave a share for train",
        ("--param", "TestFraction=0.5"): "",
    }
    code, _, err = _run(*local, *(item for argv in script_level for item in argv))
    assert code == 2 and f"{len(script_level) - 1} values refused" in err, err
    for message in script_level.values():
        assert message in err, (message, err)
    assert not workdir.exists() or not list(workdir.glob("run-*"))


@pytest.mark.slow
def test_arguments_a_script_accepted_are_not_parsed_again_until_they_or_the_code_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.local.runner import LocalRunOptions, build_definition

    definition = build_definition(LocalRunOptions(preset="demo"))[0]
    values = validation.parameter_values(definition, [])
    marks = tmp_path / "accepted"
    assert validation.script_argument_problems(definition, values, {}, True, marks) == []
    assert len(list(marks.iterdir())) == 4  # Preprocess, Tune, Train, Evaluate
    parsed: list[list[str]] = []
    real = validation._parse_all
    monkeypatch.setattr(validation, "_parse_all", lambda *args: parsed.append(args[1]) or real(*args))
    assert validation.script_argument_problems(definition, values, {}, True, marks) == []
    assert parsed == []  # nothing changed: nothing parsed, train.py (torch) not needed
    changed = {**values, "TuningEpochs": 0}
    assert validation.script_argument_problems(definition, changed, {}, True, marks)  # a new value: checked
    assert parsed and len(list(marks.iterdir())) == 4  # and a refused one leaves no mark
