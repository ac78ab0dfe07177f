"""MLflow tracking for jobs with no package index: the wheelhouse's tracking/ folder, the Tune and Train jobs'
tracking channel that their requirements install from with no index, and the Evaluate step's own install (from the
wheelhouse, else the index within a bounded time), which costs one line and never the job when it fails."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _evaluation import known_model, model_config, write_split
from _wheels import make_wheel

from entrypoints import contract, modeling, tracking
from pipelines import packaging
from pipelines.cli import wheelhouse
from steps import evaluate

ROLE = "arn:aws:iam::123456789012:role/PipelineRole"
ARN = "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/team"
WHEELHOUSE = "s3://wheels-bucket/wheelhouse/"
CHANNEL_DIR = "/opt/ml/input/data/tracking"
HERE = f"{sys.version_info.major}.{sys.version_info.minor}"


# --- the wheelhouse command -------------------------------------------------------------------------------------


def test_the_wheelhouse_writes_the_mlflow_client_with_what_it_needs_for_the_training_image(tmp_path: Path) -> None:
    """Against a local index named as PyPI names wheels: the pins of tracking.JOB_REQUIREMENTS, a dependency that
    only their metadata names, the source directory's own requirements, and a requirements.txt of the pins with
    the training image's marker."""
    index = tmp_path / "index"
    tag = "cp312-cp312-manylinux_2_28_x86_64"
    client, plugin = (requirement.split("==") for requirement in tracking.JOB_REQUIREMENTS)
    make_wheel(index, client[0].replace("-", "_"), client[1], tag, {"client_probe.py": ""}, ("needed-only-by-client",))
    make_wheel(index, plugin[0].replace("-", "_"), plugin[1], tag, {"plugin_probe.py": ""})
    make_wheel(index, "needed_only_by_client", "2.0", "py3-none-any", {"needed_only_by_client.py": ""})
    make_wheel(index, "needed_only_by_client", "2.0", "cp311-cp311-manylinux_2_28_x86_64", {"other.py": ""})
    for name in packaging.training_requirements():
        make_wheel(index, name, "1.0", "py3-none-any", {f"{name}_probe.py": ""})

    wheels = wheelhouse.build(tmp_path / "house", (wheelhouse.TRACKING,), find_links=index)

    folder = tmp_path / "house" / packaging.TRACKING_WHEELS_FOLDER
    assert {wheel.parent for wheel in wheels} == {folder}
    assert sorted(wheel.name for wheel in wheels) == sorted(
        [
            f"{client[0].replace('-', '_')}-{client[1]}-{tag}.whl",
            f"{plugin[0].replace('-', '_')}-{plugin[1]}-{tag}.whl",
            "needed_only_by_client-2.0-py3-none-any.whl",  # resolved, not listed anywhere
            *(f"{name}-1.0-py3-none-any.whl" for name in packaging.training_requirements()),
        ]
    )
    lines = [line for line in (folder / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    marker = 'python_version == "3.12" and platform_machine == "x86_64"'
    assert lines == [f"{requirement} ; {marker}" for requirement in tracking.JOB_REQUIREMENTS]
    assert "tensorboard" in packaging.training_requirements()  # what requirements.txt installs besides MLflow


# --- the definition ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def definitions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The checked definitions ``definition --preset demo`` writes: with tracking and a wheelhouse, with tracking
    alone, with a wheelhouse alone."""
    from pipelines.run import main

    folder = tmp_path_factory.mktemp("definitions")
    variants = {
        "tracked+wheels": ["--mlflow-tracking-arn", ARN, "--serving-wheels-uri", WHEELHOUSE],
        "tracked": ["--mlflow-tracking-arn", ARN],
        "wheels": ["--serving-wheels-uri", WHEELHOUSE, "--no-debugger"],
    }
    built = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_REGION", "us-east-1")
        for name, flags in variants.items():
            output = folder / f"{name}.json"
            argv = ["definition", "--role", ROLE, "--bucket", "b-1", "--preset", "demo", *flags, "-o", str(output)]
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(argv) in (0, None)
            built[name] = json.loads(output.read_text())
    return built


def _channels(definition: dict) -> dict[str, dict[str, str]]:
    """Step name -> {channel name: S3 URI} of every training job in the definition."""
    found = {}
    for step in definition["Steps"]:
        arguments = step["Arguments"]
        job = arguments.get("TrainingJobDefinition", arguments)
        if "InputDataConfig" in job:
            found[step["Name"]] = {
                channel["ChannelName"]: channel["DataSource"]["S3DataSource"]["S3Uri"]
                for channel in job["InputDataConfig"]
            }
    return found


def _requirements(artifact: packaging.CodeArtifact) -> str:
    with tarfile.open(fileobj=io.BytesIO(artifact.body), mode="r:gz") as archive:
        return archive.extractfile("requirements.txt").read().decode()


def test_with_a_wheelhouse_tune_and_train_install_the_client_from_their_tracking_channel(definitions) -> None:
    from pipelines.pipeline import pipeline_code, preset_options

    definition = definitions["tracked+wheels"]
    channels = _channels(definition)
    with_channel = {name for name, named in channels.items() if packaging.TRACKING_CHANNEL in named}
    assert with_channel == {"Tune", "Train"} and set(channels) == {"Tune", "Train"}
    assert {channels[name][packaging.TRACKING_CHANNEL] for name in with_channel} == {WHEELHOUSE + "tracking/"}

    # The source directory the definition names installs the pins from that channel, never from an index.
    options = preset_options("demo", mlflow_tracking_uri=ARN, serving_wheels_uri=WHEELHOUSE)
    training = pipeline_code("b-1", options).training
    assert training.s3_uri in json.dumps(definition)
    requirements = _requirements(training).splitlines()
    appended = requirements[requirements.index("--no-index") :]
    marker = packaging.requirement_marker(packaging.TRAINING_IMAGE_PYTHON, packaging.TRAINING_IMAGE_MACHINE)
    assert appended == ["--no-index", f"--find-links {CHANNEL_DIR}"] + [
        f"{requirement} ; {marker}" for requirement in tracking.JOB_REQUIREMENTS
    ]

    # Evaluate reads the whole wheelhouse (tracking/ beside evaluation/ and serving/), passed as --wheels.
    step = next(s for s in definition["Steps"] if s["Name"] == "Evaluate")
    inputs = {item["InputName"]: item["S3Input"] for item in step["Arguments"]["ProcessingInputs"]}
    assert inputs["wheels"]["S3Uri"] == WHEELHOUSE
    arguments = step["Arguments"]["AppSpecification"]["ContainerArguments"]
    assert arguments[arguments.index("--wheels") + 1] == inputs["wheels"]["LocalPath"]


def test_without_a_wheelhouse_or_without_tracking_no_channel_and_the_index_as_before(definitions) -> None:
    from pipelines.pipeline import pipeline_code, preset_options

    for definition in (definitions["tracked"], definitions["wheels"]):
        assert all(packaging.TRACKING_CHANNEL not in named for named in _channels(definition).values())
    requirements = _requirements(pipeline_code("b-1", preset_options("demo", mlflow_tracking_uri=ARN)).training)
    assert "--no-index" not in requirements and "--find-links" not in requirements
    for requirement in tracking.JOB_REQUIREMENTS:
        assert requirement in requirements.splitlines()
    plain = pipeline_code("b-1", preset_options("demo", serving_wheels_uri=WHEELHOUSE)).training
    assert "mlflow" not in _requirements(plain)


def test_network_isolation_with_tracking_is_refused_naming_what_works_instead() -> None:
    from pipelines.pipeline import PipelineOptions

    options = PipelineOptions(
        network_isolation=True, weights_uri="s3://b/w.pth", mlflow_tracking_uri=ARN, serving_wheels_uri=WHEELHOUSE
    )
    with pytest.raises(ValueError, match="network isolation") as refused:
        options.validate()
    message = str(refused.value)
    assert "\n" not in message
    assert "VPC endpoint for SageMaker MLflow" in message and "--serving-wheels-uri" in message


# --- the Evaluate step's install --------------------------------------------------------------------------------


@pytest.fixture()
def no_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The step looks for a client module this environment lacks, as the SageMaker training image lacks MLflow;
    sys.path and the imported modules are restored afterwards (the step appends its scratch install)."""
    monkeypatch.setattr(evaluate, "TRACKING_CLIENT", "tracking_client_probe")
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in ("tracking_client_probe", "probe_dep"):
        sys.modules.pop(name, None)


def _tracking_house(tmp_path: Path) -> Path:
    """A wheelhouse whose tracking/ holds a client that needs one more wheel, made by the wheelhouse command."""
    index = tmp_path / "index"
    make_wheel(index, "tracking_client_probe", "1.0", "py3-none-any", {"tracking_client_probe.py": ""}, ("probe-dep",))
    make_wheel(index, "probe_dep", "1.0", "py3-none-any", {"probe_dep.py": "READY = True\n"})
    target = wheelhouse.TrackingTarget(
        "tracking", HERE, ("any",), ("tracking_client_probe==1.0",), writes_requirements=True, with_dependencies=True
    )
    house = tmp_path / "house"
    wheelhouse.build(house, (target,), find_links=index)
    return house


@pytest.mark.slow
def test_evaluate_installs_the_client_from_the_wheelhouse_with_no_index(
    tmp_path: Path, no_client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    house = _tracking_house(tmp_path)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # an index would fail: none is asked

    assert evaluate.install_tracking_client(str(house), (), tmp_path / "scratch") is True

    installed = tmp_path / "scratch" / "tracking-site-packages"
    assert (installed / "tracking_client_probe.py").is_file() and (installed / "probe_dep.py").is_file()
    assert sys.path[-1] == str(installed)  # after the image's own packages
    assert __import__("probe_dep").READY is True
    out = capsys.readouterr().out.strip().splitlines()
    assert (
        out[-1] == f"MLflow tracking: the client is not in this image; installed it from the wheels in {house}/tracking"
    )


def test_without_a_wheelhouse_the_index_install_is_bounded_and_costs_one_line(
    tmp_path: Path, no_client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(evaluate, "TRACKING_INSTALL_SECONDS", 0.05)
    assert evaluate.install_tracking_client(None, ("tracking_client_probe==1.0",), tmp_path / "scratch") is False
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "did not install from the package index" in out[0]
    assert "pip did not finish within 0 s" in out[0] and "the job goes on untracked" in out[0]

    monkeypatch.setattr(evaluate, "TRACKING_INSTALL_SECONDS", 120)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip answers at once: nothing to install from
    assert evaluate.install_tracking_client(None, ("tracking_client_probe==1.0",), tmp_path / "again") is False
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "tracking_client_probe" in out[0] and str(sys.path[-1]) != str(tmp_path / "again")


@pytest.mark.slow  # a whole evaluation and a pip run
def test_a_failing_install_costs_one_line_and_the_evaluation_finishes_untracked(
    tmp_path: Path, no_client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The whole step, tracking configured, its wheelhouse's tracking/ naming a wheel that is not there."""
    house = tmp_path / "house"
    (house / "tracking").mkdir(parents=True)
    (house / "tracking" / "requirements.txt").write_text("tracking_client_probe==1.0\n")
    monkeypatch.setenv(tracking.ENV_TRACKING_URI, f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = modeling.save_artifact(known_model(), tmp_path / "model", model_config())
    test_dir = write_split(tmp_path / "test")
    out_dir = tmp_path / "evaluation"
    argv = ["--model", str(model), "--test-dir", str(test_dir), "--output-dir", str(out_dir), "--workers", "0"]

    assert evaluate.main([*argv, "--int8", "off", "--wheels", str(house)]) == 0

    lines = [line for line in capsys.readouterr().out.splitlines() if "MLflow" in line]
    assert len(lines) == 1 and "did not install from the wheels in" in lines[0], lines
    report = json.loads((out_dir / contract.EVALUATION_FILE).read_text())
    assert report[evaluate.TRACKING_SECTION][evaluate.TRACKING_RUN_ID] == evaluate.NOT_TRACKED
    assert not (tmp_path / "mlflow.db").exists()


def test_an_inactive_tracker_logs_nothing_and_needs_no_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Where the client could not be had, the step still calls the tracker's methods: none may import MLflow."""
    for name in [name for name in sys.modules if name == "mlflow" or name.startswith("mlflow.")] + ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)  # earlier tests may have imported its submodules
    store = tmp_path / "unused.db"
    tracker = tracking.Tracker.start("evaluate", environ={tracking.ENV_TRACKING_URI: f"sqlite:///{store}"})
    assert not tracker.active
    tracker.log_params({"a": 1})
    tracker.log_metrics({"accuracy": 1.0}, step=0)
    tracker.set_tags({"serving.precision": "fp32"})
    tracker.log_dict({}, "serving.json")
    tracker.end("FINISHED", end_parent=True)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "MLflow is not installed" in out[0] and not store.exists()


def test_evaluate_installs_nothing_to_track_into_a_server(
    tmp_path: Path, no_client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A server (http(s), as the local runner's) is spoken to with the standard library: an image without MLflow
    tracks as it is, with no install and no wait for one."""
    installs: list[object] = []
    monkeypatch.setattr(evaluate, "pip_install", lambda *args, **kwargs: installs.append(args))
    monkeypatch.setenv(tracking.ENV_TRACKING_URI, "http://127.0.0.1:9")  # the discard port: nothing answers
    tracker = evaluate.start_tracking(None, tmp_path / "scratch")
    assert installs == [] and tracker is not None and not tracker.active
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "cannot reach or use the tracking server at http://127.0.0.1:9" in out[0], out

    monkeypatch.setenv(tracking.ENV_TRACKING_URI, f"sqlite:///{tmp_path / 'mlflow.db'}")  # a store: MLflow's client
    monkeypatch.setattr(evaluate, "pip_install", lambda *args, **kwargs: installs.append(args) or "refused")
    evaluate.start_tracking(None, tmp_path / "scratch")
    assert len(installs) == 1
