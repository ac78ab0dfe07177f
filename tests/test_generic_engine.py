"""The local engine runs any definition: one written by hand, with toy scripts of its own, through
``python -m pipelines.run local --definition FILE``. Nothing of this project's scripts, flags or metric names is
in it: the processing scripts take their own flags, the training script follows the container contract alone (a
project flag or variable handed to it would make it fail or show), and the metric is the definition's own."""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest

from pipelines import run
from pipelines.local import runner
from pipelines.local.objectstore import ObjectStore

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DEFINITION = FIXTURES / "hand_written_definition.json"
TOYS = FIXTURES / "generic"


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The --object flags: the two processing scripts and the training code packed as a sourcedir.tar.gz."""
    tarball = tmp_path_factory.mktemp("code") / "fit.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(TOYS / "fit.py", arcname="fit.py")
    pairs = {"count.py": TOYS / "count.py", "judge.py": TOYS / "judge.py", "fit.tar.gz": tarball}
    return [f"--object=s3://toy-bucket/code/{name}={path}" for name, path in pairs.items()]


def _local(workdir: Path, objects: list[str], *extra: str) -> int:
    flags = ["--definition", str(DEFINITION), "--pipeline-name", "toy", "--workdir", str(workdir)]
    return run.main(["local", *flags, *objects, *extra])


def _record(workdir: Path, run_id: str) -> dict[str, Any]:
    return json.loads((workdir / run_id / "run.json").read_text())


def _steps(record: dict[str, Any]) -> dict[str, str]:
    return {step["StepName"]: step["StepStatus"] for step in record["PipelineExecutionSteps"]}


@pytest.mark.slow
def test_a_hand_written_definition_runs_end_to_end(
    tmp_path: Path, objects: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _local(tmp_path, objects) == 0
    out = capsys.readouterr().out
    assert "runs no code of this project" in out
    record = _record(tmp_path, "run-0001")
    assert record["PipelineExecutionStatus"] == "Succeeded"
    assert _steps(record) == {
        "Numbers": "Succeeded",
        "Fit": "Succeeded",
        "Judge": "Succeeded",
        "Gate": "Succeeded",
        "Keep": "Succeeded",
    }  # the Fail step of the other branch is not listed, as on SageMaker
    fit = next(step for step in record["PipelineExecutionSteps"] if step["StepName"] == "Fit")
    # (1 + 2 + 3 + 4) / 4 * scale 2: the channel, the hyperparameter flag and the definition's own metric regex
    assert fit["Local"]["Properties"]["FinalMetricDataList"] == [{"MetricName": "toy:fitness", "Value": 5.0}]
    log = (tmp_path / fit["Local"]["Log"]).read_text()
    assert "arguments: --scale 2; TORCH_HOME=unset" in log  # no project flag, no project environment
    package = record["Summary"]["model_package"]
    assert package["ModelPackageVersion"] == 1 and package["ModelApprovalStatus"] == "PendingManualApproval"
    assert package["ModelPackageArn"].endswith("model-package/toy-models/1")
    from pipelines.local.sagemaker import LocalSageMaker

    described = LocalSageMaker(tmp_path).describe_model_package(ModelPackageName=package["ModelPackageArn"])
    metadata = described["CustomerMetadataProperties"]  # the definition's own, beside the run that registered it
    assert metadata["owner"] == "toy-team" and metadata["run"] == "run-0001"
    assert "test_accuracy" not in record["Summary"]  # the project's summary is not made of another's run
    assert record["PipelineArn"].endswith(":pipeline/toy")
    assert not (tmp_path / "mlflow.db").exists()  # no job tracks into the default store: no MLflow helper, no store


@pytest.mark.slow
def test_a_parameter_flips_the_condition_to_the_fail_step(
    tmp_path: Path, objects: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _local(tmp_path, objects, "--param", "MinGrade=0.9") == 1
    assert "toy grade 0.5 is below MinGrade 0.9" in capsys.readouterr().err
    record = _record(tmp_path, "run-0001")
    assert record["PipelineExecutionStatus"] == "Failed"
    assert _steps(record) == {
        "Numbers": "Succeeded",
        "Fit": "Succeeded",
        "Judge": "Succeeded",
        "Gate": "Succeeded",
        "TooLow": "Failed",
    }
    fail = record["PipelineExecutionSteps"][-1]
    assert fail["FailureReason"] == "toy grade 0.5 is below MinGrade 0.9"
    assert "model_package" not in record["Summary"]


@pytest.mark.slow
def test_a_model_step_creates_a_model_a_later_step_reads_by_name(tmp_path: Path, objects: list[str]) -> None:
    """The SDK's ModelStep over model.create() (AWS's abalone sample has one): CreateModel's arguments without a
    ModelName, which the service makes; its ModelName is a property."""
    definition = json.loads(DEFINITION.read_text())
    gate = next(step for step in definition["Steps"] if step["Name"] == "Gate")
    keep = gate["Arguments"]["IfSteps"][0]
    container = keep["Arguments"]["InferenceSpecification"]["Containers"][0]
    role = next(step for step in definition["Steps"] if step["Name"] == "Fit")["Arguments"]["RoleArn"]
    model = {
        "Name": "Toy-Model",
        "Type": "Model",
        "Arguments": {
            "ExecutionRoleArn": role,
            "PrimaryContainer": {"Image": container["Image"], "ModelDataUrl": container["ModelDataUrl"]},
        },
    }
    keep["Arguments"]["ModelPackageDescription"] = {"Get": "Steps.Toy-Model.ModelName"}
    gate["Arguments"]["IfSteps"].append(model)
    with_model = tmp_path / "with_model.json"
    with_model.write_text(json.dumps(definition))
    workdir = tmp_path / "runs"
    flags = ["--definition", str(with_model), "--pipeline-name", "toy", "--workdir", str(workdir)]
    assert run.main(["local", *flags, *objects]) == 0
    record = _record(workdir, "run-0001")
    steps = {step["StepName"]: step for step in record["PipelineExecutionSteps"]}
    assert steps["Toy-Model"]["StepStatus"] == steps["Keep"]["StepStatus"] == "Succeeded"
    name = steps["Toy-Model"]["Local"]["Properties"]["ModelName"]
    assert name == "pipelines-run-0001-Toy-Model"
    from pipelines.local.sagemaker import LocalSageMaker

    api = LocalSageMaker(workdir)
    described = api.describe_model(ModelName=name)
    fit = steps["Fit"]["Local"]["Properties"]["ModelArtifacts"]["S3ModelArtifacts"]
    assert described["PrimaryContainer"]["ModelDataUrl"] == fit and described["ExecutionRoleArn"] == role
    package = api.describe_model_package(ModelPackageName=record["Summary"]["model_package"]["ModelPackageArn"])
    assert package["ModelPackageDescription"] == name  # the RegisterModel step read the model's name


@pytest.mark.slow
def test_a_definition_whose_job_tracks_into_the_runs_store_gets_the_store(tmp_path: Path, objects: list[str]) -> None:
    workdir = tmp_path / "runs"
    store = f"sqlite:///{(workdir.resolve() / 'mlflow.db').as_posix()}"  # the CLI's default tracking URI
    definition = json.loads(DEFINITION.read_text())
    numbers = next(step for step in definition["Steps"] if step["Name"] == "Numbers")
    numbers["Arguments"]["Environment"] = {"MLFLOW_TRACKING_URI": store}
    definition["Steps"] = [numbers]  # MinGrade and Approval now unused: SageMaker runs such a definition, so does local
    tracked = tmp_path / "tracked.json"
    tracked.write_text(json.dumps(definition))
    flags = ["--definition", str(tracked), "--pipeline-name", "toy", "--workdir", str(workdir)]
    assert run.main(["local", *flags, *objects]) == 0
    assert (workdir / "mlflow.db").is_file()  # the helper made the store before the job started


def test_builder_flags_are_refused_with_a_definition_file(
    tmp_path: Path, objects: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _local(tmp_path, objects, "--hp", "lr=0.1", "--preset", "demo") == 2
    error = capsys.readouterr().err
    assert "--preset, --hp only shape the definition the builder makes" in error
    assert run.main(["local", "--workdir", str(tmp_path), objects[0]]) == 2
    assert "--object and --pipeline-name go with --definition FILE" in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written


def test_a_file_that_is_no_definition_leaves_nothing_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"Steps": ')
    workdir = tmp_path / "runs"
    assert run.main(["local", "--definition", str(broken), "--workdir", str(workdir)]) == 2
    assert "cannot be read as JSON" in capsys.readouterr().err
    broken.write_text('{"Parameters": []}')
    assert run.main(["local", "--definition", str(broken), "--workdir", str(workdir)]) == 2
    assert "it needs a 'Steps' list" in capsys.readouterr().err
    assert not any(path.name.startswith("run-") for path in workdir.glob("*"))


def test_objects_are_copied_into_the_store_not_linked(tmp_path: Path) -> None:
    source = tmp_path / "script.py"
    source.write_text("print(1)")
    folder = tmp_path / "data"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.txt").write_text("x")
    store = ObjectStore(tmp_path / "work")
    runner.put_objects(store, {"s3://toy-bucket/code/script.py": source, "s3://toy-bucket/data/": folder})
    source.write_text("print(2)")  # edited in place after the run began: the object keeps its content
    assert store.path("s3://toy-bucket/code/script.py").read_text() == "print(1)"
    assert store.path("s3://toy-bucket/data/a/x.txt").read_text() == "x"


def test_only_a_definition_running_this_projects_code_gets_its_extras(tmp_path: Path) -> None:
    from pipelines.packaging import code_artifacts

    training = code_artifacts("any-bucket", "any").training
    definition = {"Steps": [{"Arguments": {"HyperParameters": {"sagemaker_submit_directory": '"s3://b-1/c/t.tgz"'}}}]}
    store = ObjectStore(tmp_path)
    assert not runner.runs_project_code(definition, {}, store)  # names an object nobody put
    assert not runner.runs_project_code(definition, {"s3://b-1/c/t.tgz": b"other code"}, store)
    assert runner.runs_project_code(definition, {"s3://b-1/c/t.tgz": training.body}, store)
    store.put_bytes("s3://b-1/c/t.tgz", training.body)  # or put there by an earlier run
    assert runner.runs_project_code(definition, {}, store)


def test_a_job_deep_in_the_file_system_can_open_multiprocessing_sockets(tmp_path: Path) -> None:
    """A DataLoader's workers share tensors over AF_UNIX sockets under TMPDIR (107 bytes at most): a job folder
    deep in a workdir gets a short TMPDIR, removed afterwards, instead of failing or waiting forever."""
    from pipelines.local import containers

    script = tmp_path / "code" / "listen.py"
    script.parent.mkdir()
    script.write_text(
        "import os, tempfile\nfrom multiprocessing.connection import Listener\n"
        "Listener(family='AF_UNIX').close()\nprint('tmp', tempfile.gettempdir())\n"
    )
    short = Path(tempfile.mkdtemp(prefix="j-"))  # tmp_path itself may be long (pytest-xdist adds a folder)
    deep = tmp_path / ("deep-" * 12) / "run-0001" / "a-step-with-a-long-name"
    for root in (short / "job", deep):
        job = containers.ProcessingJob(
            job_name="listen",
            root=root,
            entrypoint=["python3", "/opt/ml/processing/input/code/listen.py"],
            inputs=[containers.ProcessingInput(script, "/opt/ml/processing/input/code", "code")],
            outputs=[],
            arguments=[],
        )
        log = job.run().log_path.read_text()
        used = Path(log.split("tmp ", 1)[1].split()[0])
        if root.name == "job":
            assert used == root / "tmp"
        else:  # the short one, removed when the job ended
            assert used.parent == Path(tempfile.gettempdir()) and not used.exists()
    shutil.rmtree(short)


def test_the_runner_hands_the_engine_the_projects_extras_only_for_its_code(tmp_path: Path) -> None:
    from pipelines.local.sagemaker import LocalSageMaker

    options = runner.LocalRunOptions(workdir=tmp_path)
    api = LocalSageMaker(tmp_path)
    ours = runner.step_executors(options, tmp_path, api, project=True)
    assert set(ours["Lambda"].functions) == {options.deploy_function_name}
    extras = ours["Training"].extras
    assert extras.environment == {"TORCH_HOME": str(tmp_path / "torch-cache")} and extras.epoch_metric == "epoch"
    assert "--checkpoint-dir" in extras.arguments({}) and ours["Tuning"].extras is extras
    other = runner.step_executors(options, tmp_path, api, project=False)
    assert other["Lambda"].functions == {}
    assert other["Training"].extras.arguments({}) == [] and other["Training"].extras.environment == {}
    assert other["Tuning"].extras.epoch_metric == "" and other["Tuning"].extras.epochs_hyperparameter == ""
