"""MLflow experiment tracking (entrypoints/tracking.py): against real stores, never a mock.

- parallel jobs of one execution end with exactly one parent run (threads racing on a real SQLite store, with the
  race forced open; and two real train.py processes against a real ``mlflow server``);
- train.py with MLflow missing, or with a server that cannot be reached or stops halfway, trains the same model and
  prints the same metric lines, saying once that it does not track;
- the definition built with ``--mlflow-tracking-arn`` carries it on exactly Tune, Train and Evaluate, and the
  pipeline role's policy allows sagemaker-mlflow on that ARN alone; without the option neither appears;
- (a tiny local run tracked into a real ``mlflow server`` is test_local_pipeline.py's first run.)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _mlflow import MlflowServer, free_port, fresh_store
from _training import TRAIN_SCRIPT, subprocess_env, train_argv, write_split

from entrypoints import tracking
from pipelines.local.tracking_store import TrackingStore
from pipelines.run import main

mlflow = pytest.importorskip("mlflow")
from mlflow.entities import ViewType  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

ARN = "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/team"
ROLE = "arn:aws:iam::123456789012:role/PipelineRole"
METRIC_LINE = re.compile(r"^epoch=\d+ train_loss=\S+ valid_loss=\S+ valid_accuracy=\S+$", re.M)
NOT_TRACKING = "MLflow tracking: off"


def _env(uri: str, execution: str = "exec-1", step: str = "Tune", experiment: str = "Exp") -> dict[str, str]:
    return {
        tracking.ENV_TRACKING_URI: uri,
        tracking.ENV_EXPERIMENT: experiment,
        tracking.ENV_EXECUTION_ID: execution,
        tracking.ENV_STEP: step,
    }


def _runs(client: MlflowClient, experiment: str = "Exp", view: int = ViewType.ACTIVE_ONLY) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return list(client.search_runs([experiment_id], run_view_type=view, max_results=1000))


def _parents(runs: list) -> list:
    return [run for run in runs if run.data.tags.get(tracking.TAG_ROLE) == tracking.ROLE_PARENT]


# --- one parent per execution ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_jobs_racing_on_a_real_store_end_with_one_parent(tmp_path: Path) -> None:
    """Four jobs of one execution start at once and all find no parent, so each creates a candidate (the race,
    held open by a barrier); after they end, one parent is left and every child is under it."""
    uri = fresh_store(tmp_path / "mlflow.db")
    assert tracking.prepare(uri, "Exp") is not None
    jobs = 4
    barrier = threading.Barrier(jobs, timeout=60)
    errors: list[BaseException] = []

    def job(index: int) -> None:
        try:
            tracker = tracking.Tracker.start(f"trial-{index}", environ=_env(uri), before_create=barrier.wait)
            assert tracker.active
            tracker.log_metrics({"valid_accuracy": 0.5 + index / 10}, step=1)
            time.sleep(0.05 * index)  # they end in turn, not together
            tracker.end()
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    client = MlflowClient(uri)
    everything = _runs(client, view=ViewType.ALL)
    assert len(_parents(everything)) == jobs  # the race happened: every job created a candidate
    active = _runs(client)
    parents = _parents(active)
    assert len(parents) == 1
    children = [run for run in active if run.data.tags.get(tracking.TAG_ROLE) == "trial"]
    assert len(children) == jobs
    assert {run.data.tags[tracking.TAG_PARENT] for run in children} == {parents[0].info.run_id}


@pytest.mark.slow
def test_a_job_that_joined_a_losing_candidate_is_moved_under_the_winner(tmp_path: Path) -> None:
    """The interleaving the barrier cannot force: A creates and elects itself before B's candidate exists, B (which
    looked before A created) creates one later. Whichever wins, once both ended there is one parent with both."""
    uri = fresh_store(tmp_path / "mlflow.db")
    tracking.prepare(uri, "Exp")
    b_looked = threading.Event()
    a_done = threading.Event()
    result: dict[str, tracking.Tracker] = {}

    def job_b() -> None:
        def after_looking() -> None:  # B saw no candidate; A now creates and joins its own
            b_looked.set()
            assert a_done.wait(60)

        result["b"] = tracking.Tracker.start("b", environ=_env(uri), before_create=after_looking)

    thread = threading.Thread(target=job_b)
    thread.start()
    assert b_looked.wait(60)
    result["a"] = tracking.Tracker.start("a", environ=_env(uri))
    a_done.set()
    thread.join(60)
    a, b = result["a"], result["b"]
    assert a.active and b.active
    assert a.parent_id == a.election.created  # A saw only its own candidate
    a.end()
    b.end()
    client = MlflowClient(uri)
    parents = _parents(_runs(client))
    assert len(parents) == 1
    for run_id in (a.election.created, b.election.created):
        assert client.get_run(run_id).info.run_id  # both candidates were made
    children = [run for run in _runs(client) if run.data.tags.get(tracking.TAG_ROLE) == "trial"]
    assert {run.data.tags[tracking.TAG_PARENT] for run in children} == {parents[0].info.run_id}


@pytest.mark.slow
def test_another_execution_gets_its_own_parent(tmp_path: Path) -> None:
    uri = fresh_store(tmp_path / "mlflow.db")
    first = tracking.Tracker.start("t1", environ=_env(uri, execution="exec-1"))
    second = tracking.Tracker.start("t2", environ=_env(uri, execution="exec-2"))
    again = tracking.Tracker.start("t3", environ=_env(uri, execution="exec-1", step="Train"))
    assert first.parent_id == again.parent_id != second.parent_id
    for tracker in (first, second, again):
        tracker.end()
    assert len(_parents(_runs(MlflowClient(uri)))) == 2


# --- the runner's helper process (pipelines/local/tracking_store.py) -----------------------------------------------


@pytest.mark.slow
def test_the_runners_helper_makes_the_store_only_when_asked_and_tags_the_version(tmp_path: Path) -> None:
    """The helper imports MLflow and migrates a template while the runner builds, yet writes nothing where the
    store goes until ``prepare``; then the store holds the experiment, and ``tag`` tags the version's run."""
    database = tmp_path / "runs" / "mlflow.db"
    uri = f"sqlite:///{database}"
    helper = TrackingStore(uri)
    try:
        time.sleep(1)  # the helper is at work meanwhile
        assert not database.parent.exists()  # a run refused now leaves nothing behind
        database.parent.mkdir()
        experiment_id = helper.prepare("Exp")
        client = MlflowClient(uri)
        assert client.get_experiment_by_name("Exp").experiment_id == experiment_id
        assert helper.prepare("Exp") == experiment_id  # an existing store and experiment are kept
        tracker = tracking.Tracker.start("train", environ=_env(uri, step="Train"))
        run_id = tracker.run_id
        tracker.end()
        package = {
            "ModelPackageArn": "arn:aws:sagemaker:us-east-1:000000000000:model-package/models/3",
            "ModelPackageVersion": 3,
            "ModelApprovalStatus": "Approved",
            "CustomerMetadataProperties": {tracking.PACKAGE_RUN_ID: run_id},
        }
        assert helper.tag_registered_version(package) == run_id
        tags = client.get_run(run_id).data.tags
        assert (tags["model_package.version"], tags["model_package.status"]) == ("3", "Approved")
    finally:
        helper.close()
    assert helper.process is None and helper.prepare("Exp") is None  # closed: asks nothing, breaks nothing


# A job's whole tracking without MLflow: what Tracker.start, log_* and end do in train.py and Evaluate.
_REST_JOB = """
import sys
from pathlib import Path
from entrypoints import tracking
tracker = tracking.Tracker.start("train-job", tags={"job_name": "train-job"})
assert tracker.active and "mlflow" not in sys.modules, "not tracking, or MLflow imported"
tracker.log_params({"lr": 0.1})
tracker.log_metrics({"valid_accuracy": 0.5}, step=1)
tracker.log_artifact(Path(sys.argv[1]))
tracker.log_dict({"epochs": 2}, "hyperparameters.json")
tracker.end("FINISHED", end_parent=True)
print(tracker.parent_id)
"""


@pytest.mark.slow
def test_the_helper_serves_the_store_and_a_job_tracks_into_it_without_mlflow(tmp_path: Path) -> None:
    """The local default: the runner's helper serves the workdir's SQLite store, the jobs whose definition tracks
    into that store are pointed at the server, and a job then tracks (params, metrics, artifacts, its parent)
    with no MLflow at all: its artifacts land beside the store, where ``mlflow ui`` on the store finds them."""
    database = tmp_path / "runs" / "mlflow.db"
    database.parent.mkdir()
    uri = f"sqlite:///{database}"
    helper = TrackingStore(uri)
    try:
        helper.prepare("Exp")
        served = helper.serve()
        assert served is not None and served.startswith("http://127.0.0.1:")
        environment = helper.job_environment(served)
        assert environment({tracking.ENV_TRACKING_URI: uri, "A": "1"}) == {tracking.ENV_TRACKING_URI: served, "A": "1"}
        other = {tracking.ENV_TRACKING_URI: "http://elsewhere:5000"}
        assert environment(other) == other and environment({"A": "1"}) == {"A": "1"}  # not this store's: kept
        picture = tmp_path / "training_curves.png"
        picture.write_bytes(b"\x89PNG not really")
        job = subprocess.run(
            [sys.executable, "-c", _REST_JOB, str(picture)],
            env=subprocess_env(PYTHONPATH=str(_mlflow_blocker(tmp_path)), **_env(served, step="Train")),
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert job.returncode == 0, job.stdout + job.stderr
    finally:
        helper.close()
    client = MlflowClient(uri)
    (run,) = [run for run in _runs(client) if run.info.run_name == "train-job"]
    assert run.data.params == {"lr": "0.1"} and run.data.metrics == {"valid_accuracy": 0.5}
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_ROLE] == "train"
    (parent,) = _parents(_runs(client))
    assert run.data.tags[tracking.TAG_PARENT] == parent.info.run_id == job.stdout.split()[-1]
    assert parent.info.status == "FINISHED"
    folder = database.parent / "mlartifacts" / run.info.run_id / "artifacts"
    assert (folder / "training_curves.png").read_bytes() == picture.read_bytes()
    assert json.loads((folder / "hyperparameters.json").read_text()) == {"epochs": 2}
    assert sorted(item.path for item in client.list_artifacts(run.info.run_id)) == [
        "hyperparameters.json",
        "training_curves.png",
    ]


@pytest.mark.parametrize(
    ("uri", "environ", "rest"),
    [
        ("http://127.0.0.1:5000", {}, True),
        ("https://mlflow.example.com/", {"MLFLOW_TRACKING_TOKEN": "t"}, True),
        ("https://mlflow.example.com", {"MLFLOW_TRACKING_INSECURE_TLS": "true"}, False),
        ("https://mlflow.example.com", {"MLFLOW_TRACKING_CLIENT_CERT_PATH": "/c.pem"}, False),
        ("sqlite:///m.db", {}, False),
        (ARN, {}, False),
    ],
)
def test_a_job_speaks_rest_to_a_server_unless_it_needs_mlflows_client(uri: str, environ: dict, rest: bool) -> None:
    """A SQLite store, a SageMaker MLflow ARN (the sagemaker-mlflow plugin signs) and the TLS options the standard
    library client does not speak go through MLflow's own client."""
    assert tracking.speaks_rest(uri, environ) is rest


def test_the_rest_client_authenticates_as_mlflow_does_and_keeps_artifacts_in_their_folder() -> None:
    bearer = tracking.RestClient("http://h:1/", {"MLFLOW_TRACKING_TOKEN": "tok"})
    assert bearer.url == "http://h:1" and bearer.headers == {"Authorization": "Bearer tok"}
    basic = tracking.RestClient("http://h:1", {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"})
    assert basic.headers == {"Authorization": "Basic dTpw"}  # base64 of u:p
    bearer.artifact_uris["r"] = "file:///tmp/never"
    with pytest.raises(ValueError, match="leaves the run's artifact folder"):
        bearer.log_artifact("r", "/etc/hostname", "../..")


@pytest.mark.slow  # waits a second for the helper to be at work
def test_a_helper_never_asked_is_stopped_at_once_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run refused after the helper started (its values are checked once the definition is built) does not
    wait for MLflow's import, and the helper's template goes with it."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    helper = TrackingStore(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    time.sleep(1)  # importing MLflow, or migrating the template
    started = time.monotonic()
    helper.close()
    assert time.monotonic() - started < 5
    assert list(scratch.iterdir()) == [] and not (tmp_path / "runs").exists()


def test_a_helper_that_died_costs_one_line_and_the_run_goes_on(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    helper = TrackingStore(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert helper.process is not None
    helper.process.kill()
    helper.process.wait()
    assert helper.prepare("Exp") is None
    assert "the runner's tracking helper failed" in capfd.readouterr().err
    assert helper.process is None and not (tmp_path / "mlflow.db").exists()


# --- tracking never breaks a job -------------------------------------------------------------------------------


def test_an_unreachable_server_costs_one_line_and_no_retry_stall(capsys: pytest.CaptureFixture) -> None:
    started = time.monotonic()
    tracker = tracking.Tracker.start("t", environ=_env(f"http://127.0.0.1:{free_port()}"))
    elapsed = time.monotonic() - started
    assert not tracker.active
    tracker.log_metrics({"x": 1.0}, step=1)  # a no-op, no second line
    tracker.end()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(NOT_TRACKING)]
    assert len(lines) == 1 and "cannot reach" in lines[0]
    assert elapsed < 15, f"{elapsed:.1f} s: MLflow's HTTP retries were not bounded"


def test_no_tracking_uri_means_no_tracking(tmp_path: Path) -> None:
    tracker = tracking.Tracker.start("t", environ={tracking.ENV_EXECUTION_ID: "e"})
    assert not tracker.active
    assert tracking.disabled_line({}) is not None and tracking.disabled_line(_env("x")) is None


@pytest.fixture(scope="module")
def channels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("channels")
    return write_split(root / "train", 6, seed=1), write_split(root / "valid", 4, seed=2, blend=0.6)


def _train(channels: tuple[Path, Path], out: Path, env: dict[str, str], *extra: str, **popen) -> subprocess.Popen:
    """train.py as a script (it finds its siblings itself), 3 epochs of a tiny resnet18, no loader workers."""
    argv = train_argv(channels, out, "--epochs", "3", "--checkpoint-dir", "none", *extra)
    return subprocess.Popen(
        [sys.executable, str(TRAIN_SCRIPT), *argv],
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def _mlflow_blocker(tmp_path: Path) -> Path:
    """A folder whose sitecustomize.py, on PYTHONPATH, makes ``import mlflow`` fail as in an image without it."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoMlflow:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mlflow' or name.startswith('mlflow.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'mlflow'\", name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _NoMlflow())\n"
    )
    return blocker


def _weights_digest(out: Path) -> str:
    return hashlib.sha256((out / "model" / "model.pt").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def untracked(channels: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The reference: the same training with no tracking URI."""
    out = tmp_path_factory.mktemp("untracked")
    return out, _finish(_train(channels, out, {}))


@pytest.mark.slow
def test_train_without_mlflow_installed_runs_and_says_so_once(
    channels: tuple[Path, Path], untracked: tuple[Path, str], tmp_path: Path
) -> None:
    """A sitecustomize on PYTHONPATH makes ``import mlflow`` fail, as in a container without it."""
    blocker = _mlflow_blocker(tmp_path)
    out = tmp_path / "out"
    output = _finish(_train(channels, out, {"PYTHONPATH": str(blocker), **_env(f"sqlite:///{tmp_path}/m.db")}))
    lines = [line for line in output.splitlines() if line.startswith(NOT_TRACKING)]
    assert len(lines) == 1 and "not installed" in lines[0], output[-2000:]
    assert METRIC_LINE.findall(output) == METRIC_LINE.findall(untracked[1])
    assert _weights_digest(out) == _weights_digest(untracked[0])
    assert not (tmp_path / "m.db").exists()


# --- against a real mlflow server --------------------------------------------------------------------------------


@pytest.mark.slow
def test_server_stopping_during_train_changes_nothing_but_tracking(
    channels: tuple[Path, Path], untracked: tuple[Path, str], tmp_path: Path
) -> None:
    """The server is killed after the first epoch's metric line: the job finishes with the same metric lines and
    the same weights as without tracking, and says once that it stopped tracking."""
    server = MlflowServer(tmp_path / "server").start()
    try:
        out = tmp_path / "out"
        process = _train(channels, out, _env(server.url, step="Train"), bufsize=1)
        lines = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("epoch=1 "):
                server.stop()
                break
        output = "\n".join(lines) + "\n" + _finish(process)
    finally:
        server.stop()
    assert any(line.startswith("MLflow tracking: run ") for line in output.splitlines()), output[-2000:]
    off = [line for line in output.splitlines() if line.startswith(NOT_TRACKING)]
    assert len(off) == 1, output[-2000:]
    assert METRIC_LINE.findall(output) == METRIC_LINE.findall(untracked[1])
    assert _weights_digest(out) == _weights_digest(untracked[0])


@pytest.mark.slow
def test_two_parallel_trials_on_a_server_make_one_parent(channels: tuple[Path, Path], tmp_path: Path) -> None:
    """Two real train.py processes of one execution, started together against a real server."""
    server = MlflowServer(tmp_path / "server").start()
    try:
        env = _env(server.url, execution="exec-parallel")
        processes = [_train(channels, tmp_path / f"t{i}", env, "--epochs", "1") for i in range(2)]
        outputs = [_finish(process) for process in processes]
        client = MlflowClient(server.url)
        active = _runs(client)
        parents = _parents(active)
        trials = [run for run in active if run.data.tags.get(tracking.TAG_ROLE) == "trial"]
    finally:
        server.stop()
    assert len(parents) == 1, outputs
    assert len(trials) == 2
    assert {run.data.tags[tracking.TAG_PARENT] for run in trials} == {parents[0].info.run_id}


# --- the definition and the role policy -------------------------------------------------------------------------


def _definition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str) -> dict:
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    output = tmp_path / f"definition-{len(flags)}.json"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["definition", "--role", ROLE, "--bucket", "b-1", "--preset", "demo", *flags, "-o", str(output)])
    assert code in (0, None)
    return json.loads(output.read_text())


def _environments(definition: dict) -> dict[str, dict]:
    found = {}
    for step in definition["Steps"] + [s for c in definition["Steps"] for s in c["Arguments"].get("IfSteps", [])]:
        arguments = step.get("Arguments", {})
        environment = arguments.get("Environment", arguments.get("TrainingJobDefinition", {}).get("Environment"))
        if environment is not None:
            found[step["Name"]] = environment
    return found


@pytest.mark.slow
def test_the_arn_reaches_exactly_tune_train_and_evaluate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = _definition(tmp_path, monkeypatch)
    tracked = _definition(tmp_path, monkeypatch, "--mlflow-tracking-arn", ARN)
    assert "MLFLOW" not in json.dumps(plain) and tracking.ENV_EXECUTION_ID not in json.dumps(plain)
    with_uri = {name for name, env in _environments(tracked).items() if env.get(tracking.ENV_TRACKING_URI) == ARN}
    assert with_uri == {"Tune", "Train", "Evaluate"}
    assert json.dumps(tracked).count(tracking.ENV_TRACKING_URI) == 3
    for name, env in _environments(tracked).items():
        if name in with_uri:
            assert env[tracking.ENV_EXECUTION_ID] == {"Get": "Execution.PipelineExecutionId"}
            assert env[tracking.ENV_EXPERIMENT] == "ImageClassificationPipeline"
            assert env[tracking.ENV_STEP] == name
    register = next(
        s for c in tracked["Steps"] for s in c["Arguments"].get("IfSteps", []) if s["Type"] == "RegisterModel"
    )
    metadata = register["Arguments"]["CustomerMetadataProperties"]
    assert metadata["mlflow-run-id"]["Std:JsonGet"]["Path"] == "tracking.mlflow_run_id"
    evaluate = next(s for s in tracked["Steps"] if s["Name"] == "Evaluate")
    inputs = {item["InputName"]: item["S3Input"]["S3Uri"] for item in evaluate["Arguments"]["ProcessingInputs"]}
    assert inputs["tracking"].endswith("/tracking.py")
    # Without the option, the same definition as before this feature (save the tracked steps' additions).
    plain_evaluate = next(s for s in plain["Steps"] if s["Name"] == "Evaluate")
    assert "tracking" not in {item["InputName"] for item in plain_evaluate["Arguments"]["ProcessingInputs"]}


def test_a_tracked_definition_ships_the_client_in_the_training_requirements() -> None:
    from pipelines.packaging import code_artifacts

    def requirements(artifact) -> str:
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(artifact.body), mode="r:gz") as archive:
            return archive.extractfile("requirements.txt").read().decode()

    plain, tracked = code_artifacts("b", "P"), code_artifacts("b", "P", tracking=True)
    assert plain.tracking is None and len(plain.all()) == 4
    assert tracked.tracking is not None and tracked.tracking.body == Path(tracking.__file__).read_bytes()
    for requirement in tracking.JOB_REQUIREMENTS:
        assert requirement in requirements(tracked.training).splitlines()
        assert requirement not in requirements(plain.training)


@pytest.mark.slow
def test_the_role_policy_allows_sagemaker_mlflow_on_that_arn_alone(tmp_path: Path) -> None:
    from pipelines.aws import iam

    def statements(**extra) -> list[dict]:
        return iam.render_pipeline_role_policy(region="us-east-1", account_id="123456789012", bucket="b-1", **extra)[
            "Statement"
        ]

    def mlflow_statements(policy: list[dict]) -> list[dict]:
        return [s for s in policy if any(a.startswith("sagemaker-mlflow:") for a in s["Action"])]

    assert mlflow_statements(statements()) == []
    tracked = mlflow_statements(statements(mlflow_tracking_arn=ARN))
    assert tracked == [{"Sid": iam.MLFLOW_SID, "Effect": "Allow", "Action": ["sagemaker-mlflow:*"], "Resource": [ARN]}]
    assert statements(mlflow_tracking_arn=ARN)[:-1] == statements()  # nothing else changes
    with pytest.raises(ValueError, match="not a SageMaker MLflow"):
        statements(mlflow_tracking_arn="arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/*")
    # `iam pipeline-policy` renders the same
    output = tmp_path / "policy.json"
    with contextlib.redirect_stdout(io.StringIO()):
        main(
            [
                "iam",
                "pipeline-policy",
                "--bucket",
                "b-1",
                "--region",
                "us-east-1",
                "--account-id",
                "123456789012",
                "--mlflow-tracking-arn",
                ARN,
                "--output",
                str(output),
            ]
        )
    assert mlflow_statements(json.loads(output.read_text())["Statement"]) == tracked


def test_a_bad_arn_is_refused_before_anything_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        code = main(["definition", "--role", ROLE, "--bucket", "b-1", "--mlflow-tracking-arn", "http://x:5000"])
    assert code != 0 and "not a SageMaker MLflow" in errors.getvalue()


def test_network_isolation_and_tracking_are_refused_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        flags = ["--preset", "demo", "--network-isolation", "--mlflow-tracking-arn", ARN]
        code = main(["definition", "--role", ROLE, "--bucket", "b-1", *flags])
    assert code != 0 and "network isolation" in errors.getvalue()


@pytest.mark.slow
def test_a_refused_request_turns_tracking_off_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """MLflow refuses to change a logged parameter: the job's tracker says so once and sends nothing more."""
    uri = fresh_store(tmp_path / "mlflow.db")
    tracker = tracking.Tracker.start("t", environ=_env(uri))
    run_id = tracker.run_id
    tracker.log_params({"lr": 0.1})
    tracker.log_params({"lr": 0.2})  # refused by the store
    tracker.log_metrics({"after": 1.0}, step=1)
    tracker.end()
    assert not tracker.active
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(NOT_TRACKING)]
    assert len(lines) == 1, lines
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == {"lr": "0.1"} and "after" not in run.data.metrics


@pytest.mark.slow
def test_many_metrics_go_in_several_batches(tmp_path: Path) -> None:
    """A 1000-class evaluation logs over a thousand per-class scores: more than one log_batch may carry."""
    uri = fresh_store(tmp_path / "mlflow.db")
    tracker = tracking.Tracker.start("t", environ=_env(uri, step="Evaluate"))
    tracker.log_metrics({f"f1_{i:04d}": i / 2500 for i in range(2500)}, step=0)
    tracker.set_tags({f"tag{i}": i for i in range(250)})
    run_id = tracker.run_id
    tracker.end()
    run = MlflowClient(uri).get_run(run_id)
    assert len(run.data.metrics) == 2500 and run.data.metrics["f1_2499"] == pytest.approx(2499 / 2500)
    assert sum(1 for key in run.data.tags if key.startswith("tag")) == 250
