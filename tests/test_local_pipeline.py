"""End to end: ``python -m pipelines.run local`` executes the demo definition on a shrunk demo (a few digits per
class, 16 px, one trial of one epoch), through the real scripts, the local registry, the Deploy step's function and
the local endpoint; then the cache, the awaiting-approval path, approval through the deploy function, and the
Fail branch.

The runs share one workdir (module-scoped fixtures, in order): the first run (ModelApprovalStatus=Approved:
deployed), then `reject 1 --local` and the same run again with ModelApprovalStatus=Approved (every job step cached,
yet a version 2 of its own, deployed; version 1 stays Rejected), a run with a changed parameter and the Train step under
torchrun with two processes (Train and Evaluate re-run, Preprocess and Tune cached; the new version awaits approval)
and a run whose accuracy threshold cannot be met; last, a fork of the template with one more step (tests/_fork.py)
in the same workdir, which reuses every job step and runs its own.

Every run tracks into one real ``mlflow server`` (a module fixture): the first run's parent, trial, Train and
Evaluate runs are checked through MLflow's REST client, and the registered versions and their runs name each other.
(The default, a SQLite store in the workdir, is tracked by the stopped runs of test_local_signals.py.)
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _fork import REPORT_CODE, REPORT_SCRIPT, with_data_report
from _http import post_invocation
from _mlflow import MlflowServer
from PIL import Image

from entrypoints import contract, tracking
from pipelines import config, demo_data
from pipelines import pipeline as builder
from pipelines.cli.backend import local_report_reader
from pipelines.cli.sagemaker import package_summaries
from pipelines.definition.hyperparameters import decode_hyperparameter
from pipelines.local import registry
from pipelines.local.objectstore import ObjectStore
from pipelines.local.sagemaker import ACCOUNT_ID, REGION, LocalSageMaker, arn
from pipelines.run import main
from pipelines.serving import endpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # whole runs, on a 2-core machine that may be busy

SMALL = ["--preset", "demo", "--trials", "1", "--tuning-epochs", "1", "--epochs", "1", "--port", "0"]
# Set as pipeline parameters by the first run (and checked where the definition says they go).
PARAMETERS = {"ImageSize": "16", "Architecture": "mobilenet_v3_small"}
JOB_STEPS = ("Preprocess", "Tune", "Train", "Evaluate")
REGISTER = "Register-RegisterModel"


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    folder: Path

    @property
    def record(self) -> dict:
        return json.loads((self.folder / "run.json").read_text())

    @property
    def definition(self) -> dict:
        return json.loads((self.folder / "definition.json").read_text())

    def step(self, name: str) -> dict:
        return next(step for step in self.record["PipelineExecutionSteps"] if step["StepName"] == name)

    def statuses(self) -> dict[str, str]:
        return {step["StepName"]: step["StepStatus"] for step in self.record["PipelineExecutionSteps"]}

    def cached_from(self, name: str) -> str | None:
        return self.step(name)["Local"]["CachedFromRun"]

    def output(self, name: str, key: str) -> str:
        return dict((o["Name"], o["Value"]) for o in self.step(name)["Metadata"]["Lambda"]["OutputParameters"])[key]


def _local(workdir: Path, data: Path, server: MlflowServer, *extra: str) -> Run:
    """A run in the module's workdir, tracked into the module's MLflow server (one URI for all: it is part of
    each tracked job's environment, and so of its cache key)."""
    before = {p.name for p in workdir.iterdir()} if workdir.is_dir() else set()
    out, err = io.StringIO(), io.StringIO()
    tracked = ["--tracking-uri", server.url]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["local", "--data", str(data), "--workdir", str(workdir), *SMALL, *tracked, *extra])
    new = sorted(p for p in workdir.iterdir() if p.name.startswith("run-") and p.name not in before)
    assert len(new) == 1, (out.getvalue(), err.getvalue())
    return Run(code, out.getvalue(), err.getvalue(), new[0])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local") / "runs"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_data.write_digits_archive(
        tmp_path_factory.mktemp("data") / "digits.zip", image_size=16, per_class_limit=6
    )


@pytest.fixture(scope="module")
def first_run(workdir: Path, data: Path, server: MlflowServer):
    parameters = [argument for name, value in PARAMETERS.items() for argument in ("--param", f"{name}={value}")]
    run = _local(workdir, data, server, "--threshold", "0", *parameters, "--param", "ModelApprovalStatus=Approved")
    yield run
    endpoint.stop(workdir.resolve(), config.LOCAL_ENDPOINT_NAME)  # if a test failed before stopping it


def _same_as_first(*extra: str) -> list[str]:
    return ["--image-size", PARAMETERS["ImageSize"], "--param", f"Architecture={PARAMETERS['Architecture']}", *extra]


@pytest.fixture(scope="module")
def cached_run(first_run: Run, workdir: Path, data: Path, server: MlflowServer) -> Run:
    assert main(["reject", "1", "--local", "--workdir", str(workdir)]) == 0  # a person rejects version 1
    return _local(workdir, data, server, "--threshold", "0", *_same_as_first("--param", "ModelApprovalStatus=Approved"))


# The changed run's Train step: SageMaker's torch_distributed launcher on two (CPU) instances, here two processes.
TWO_PROCESSES = ("--torch-distributed", "--param", "TrainingInstanceCount=2")


@pytest.fixture(scope="module")
def changed_run(cached_run: Run, workdir: Path, data: Path, server: MlflowServer) -> Run:
    return _local(workdir, data, server, "--threshold", "0", *_same_as_first("--epochs", "2", *TWO_PROCESSES))


@pytest.fixture(scope="module")
def failed_run(changed_run: Run, workdir: Path, data: Path, server: MlflowServer) -> Run:
    return _local(workdir, data, server, "--threshold", "1", *_same_as_first("--epochs", "2", *TWO_PROCESSES))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix == ".jpg")


def test_first_run_executes_every_step_of_the_demo_definition(first_run: Run, server: MlflowServer) -> None:
    from pipelines.definition.check import iter_steps
    from pipelines.local.runner import LocalRunOptions, build_definition

    assert first_run.code == 0, first_run.stderr
    assert first_run.folder.name == "run-0001"
    record = first_run.record
    assert record["PipelineExecutionStatus"] == "Succeeded"
    # the very definition `definition --preset demo` builds (with the local account, role and bucket), tracked into
    # the MLflow server given by --tracking-uri
    definition = first_run.definition
    assert definition == build_definition(LocalRunOptions(preset="demo", tracking_uri=server.url))[0]
    # every step ran, the Deploy LambdaStep included; none was skipped (only the Fail branch was not taken)
    else_branch = {s["Name"] for s in definition["Steps"][-1]["Arguments"]["ElseSteps"]}
    expected = [step["Name"] for step in iter_steps(definition) if step["Name"] not in else_branch]
    assert sorted(first_run.statuses()) == sorted(expected)
    assert set(first_run.statuses().values()) == {"Succeeded"}
    assert first_run.output("Deploy", "action") == "created"
    for name in JOB_STEPS:
        assert f"  {name}" in first_run.stdout  # a line per step
    # step records shaped like ListPipelineExecutionSteps
    train = first_run.step("Train")
    assert {"StepName", "StepDisplayName", "StartTime", "EndTime", "StepStatus", "Metadata"} <= set(train)
    assert train["Metadata"]["TrainingJob"]["Arn"].endswith(":training-job/imgclf-train-run-0001")
    assert "not evaluated locally" in train["Local"]["Notes"][0]  # the Debugger rules of the definition
    assert first_run.step("CheckAccuracy")["Metadata"] == {"Condition": {"Outcome": "True"}}
    assert first_run.step(REGISTER)["Metadata"]["RegisterModel"]["Arn"].endswith("/imageclassificationmodels/1")
    # one region and account in every ARN the run recorded (jobs, registry, pipeline, the deploy function)
    assert set(re.findall(r"arn:aws:(?:sagemaker|lambda):([^:]*):(\d+):", json.dumps(record))) == {(REGION, ACCOUNT_ID)}
    # each job kept as SageMaker keeps it: the local SageMaker's Describe answers for it
    api = LocalSageMaker(first_run.folder.parent)
    described = api.describe_training_job(TrainingJobName=train["Metadata"]["TrainingJob"]["Arn"].rsplit("/", 1)[1])
    assert (
        described["TrainingJobStatus"] == "Completed"
        and described["TrainingJobArn"] == train["Metadata"]["TrainingJob"]["Arn"]
    )
    assert described["ModelArtifacts"] == train["Local"]["Properties"]["ModelArtifacts"]
    assert described["HyperParameters"]["epochs"] == "1" and described["FinalMetricDataList"]
    preprocess = first_run.step("Preprocess")["Metadata"]["ProcessingJob"]["Arn"].rsplit("/", 1)[1]
    assert api.describe_processing_job(ProcessingJobName=preprocess)["ProcessingJobStatus"] == "Completed"
    (tuning_job,) = api.list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"]
    assert tuning_job["HyperParameterTuningJobStatus"] == "Completed"
    assert len(api.list_training_jobs()["TrainingJobSummaries"]) == 2  # the trial and Train

    # Preprocess: three ImageFolder splits, labels.json and manifest.json in each, counts that match the files
    output = first_run.folder / "preprocess/opt/ml/processing/output"
    manifest = json.loads((output / "train" / contract.MANIFEST_FILE).read_text())
    for split in contract.SPLITS:
        assert json.loads((output / split / contract.LABELS_FILE).read_text()) == list(demo_data.CLASS_NAMES)
        assert len(_images(output / split)) == manifest["totals"][split] > 0

    # Tune: the trial ran under the training container contract; its objective is the log's last metric line
    trial = first_run.folder / "tune/trial-01"
    hyperparameters = json.loads((trial / "opt/ml/input/config/hyperparameters.json").read_text())
    assert json.loads(hyperparameters["_tuning_objective_metric"]) == config.OBJECTIVE_METRIC
    assert json.loads(hyperparameters["sagemaker_program"]) == "train.py"
    assert (trial / "opt/ml/input/config/inputdataconfig.json").is_file()
    log = (trial / "log.txt").read_text()
    assert f"--lr {json.loads(hyperparameters['lr'])}" in log  # tuned values reach the script as flags
    trials = json.loads((first_run.folder / "tune/trials.json").read_text())
    assert trials[0]["status"] == "Completed"
    tune = first_run.step("Tune")["Local"]["Properties"]  # DescribeHyperParameterTuningJob's shapes
    assert tune["TrainingJobSummaries"] == [tune["BestTrainingJob"]]  # the top jobs, best first: here the one trial
    assert tune["BestTrainingJob"]["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] == trials[0]["objective"]
    assert trials[0]["objective"] == contract.parse_metrics(log)[-1][config.OBJECTIVE_METRIC]

    # Train: the best trial's tuned strings, unchanged, plus the final epochs; a model.tar.gz of the contract
    best = json.loads((first_run.folder / "tune/best_hyperparameters.json").read_text())
    final = json.loads((first_run.folder / "train/opt/ml/input/config/hyperparameters.json").read_text())
    assert {key: final[key] for key in best} == best
    assert final["epochs"] == "1"
    assert any((first_run.folder / "train/opt/ml/checkpoints").iterdir())  # checkpoints stay in the run folder
    model = first_run.folder / "train/output/model.tar.gz"
    with tarfile.open(model) as archive:
        names = set(archive.getnames())
        model_config = json.loads(archive.extractfile(contract.MODEL_CONFIG_FILE).read())
    assert {contract.WEIGHTS_FILE, contract.MODEL_CONFIG_FILE, "code/inference.py", "code/requirements.txt"} <= names
    assert model_config["architecture"] == PARAMETERS["Architecture"]
    # ... also in the object store, where the Train step's ModelArtifacts property points
    artifact_uri = first_run.step("Train")["Local"]["Properties"]["ModelArtifacts"]["S3ModelArtifacts"]
    assert artifact_uri.startswith(f"s3://{config.LOCAL_BUCKET}/") and artifact_uri.endswith("/output/model.tar.gz")
    stored = first_run.folder.parent / "s3" / artifact_uri.removeprefix("s3://")
    assert stored.read_bytes() == model.read_bytes()

    # Evaluate: evaluation.json with the accuracy where the condition reads it, and the confusion matrix picture
    evaluation = first_run.folder / "evaluate/opt/ml/processing/evaluation"
    report = json.loads((evaluation / contract.EVALUATION_FILE).read_text())
    accuracy = report["multiclass_classification_metrics"]["accuracy"]["value"]
    assert 0.0 <= accuracy <= 1.0
    assert (evaluation / contract.CONFUSION_MATRIX_IMAGE).stat().st_size > 0
    assert record["Summary"]["test_accuracy"] == accuracy
    summary_line = next(line for line in first_run.stdout.splitlines() if line.strip().startswith("test accuracy"))
    assert f"{accuracy:.4f}" in summary_line

    # Register: a version with SageMaker's field names, Approved by the ModelApprovalStatus parameter
    workdir = first_run.folder.parent
    packages = registry.LocalModelRegistry(workdir, arn).list_model_packages(config.MODEL_PACKAGE_GROUP)
    assert len(packages) == 1
    package = packages[0]
    assert package["ModelPackageVersion"] == 1
    assert package["ModelApprovalStatus"] == "Approved"
    assert package["ModelPackageArn"].endswith(":model-package/imageclassificationmodels/1")
    # ... of the artifact Evaluate scored: the trained one with the serving precision it chose
    served = evaluation / "model.tar.gz"
    assert registry.model_data_path(package).read_bytes() == served.read_bytes()
    with tarfile.open(served) as archive:
        assert names | {contract.SERVING_DECISION_FILE} <= set(archive.getnames())
        decision = json.loads(archive.extractfile(contract.SERVING_DECISION_FILE).read())
    assert decision == report["serving"] and decision["precision"] in contract.PRECISIONS
    (row,) = package_summaries(LocalSageMaker(workdir), local_report_reader(workdir), config.MODEL_PACKAGE_GROUP, 5)
    assert row["accuracy"] == accuracy  # what `models --local` shows, read from the version's own report


def _tracked_runs(server: MlflowServer, execution: str) -> dict[str, list]:
    """The server's runs of one execution (run-0001, ...), by their role: execution (the parent), trial, train,
    evaluate."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name(config.PIPELINE_NAME).experiment_id
    by_role: dict[str, list] = {}
    for run in client.search_runs([experiment], filter_string=f"tags.`{tracking.TAG_EXECUTION}` = '{execution}'"):
        by_role.setdefault(run.data.tags.get(tracking.TAG_ROLE, "?"), []).append(run)
    return by_role


def test_the_first_run_is_tracked_on_a_real_server(first_run: Run, server: MlflowServer) -> None:
    """One parent for the execution; a child per trial and for Train, with a metric per epoch and their artifacts;
    Evaluate's child with the report's accuracy; the registered version and its run name each other."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.url)
    assert f"open {server.url}" in first_run.stdout  # the summary says where to look
    by_role = _tracked_runs(server, first_run.folder.name)
    counts = {role: len(runs) for role, runs in by_role.items()}
    assert counts == {"execution": 1, "trial": 1, "train": 1, "evaluate": 1}
    parent = by_role["execution"][0].info.run_id
    for role in ("trial", "train"):
        (run,) = by_role[role]
        assert run.data.tags[tracking.TAG_PARENT] == parent
        for metric in ("train_loss", "valid_loss", "valid_accuracy", "lr"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1], (role, metric)
        assert run.data.params["architecture"] == PARAMETERS["Architecture"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"training_curves.png", "training_history.json", "hyperparameters.json"} <= artifacts
    (evaluate,) = by_role["evaluate"]
    assert evaluate.data.tags[tracking.TAG_PARENT] == parent
    report = json.loads((first_run.folder / "evaluate/opt/ml/processing/evaluation/evaluation.json").read_text())
    accuracy = report["multiclass_classification_metrics"]["accuracy"]["value"]
    assert evaluate.data.metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert {"top_5_accuracy", "macro_f1", "weighted_f1"} <= set(evaluate.data.metrics)
    serving = report["serving"]  # int8 built and gated (this run does not pass --no-int8)
    assert serving["int8_accuracy"] is not None
    assert evaluate.data.tags["int8.gate"] == ("passed" if serving["precision"] == "int8" else "failed")
    assert evaluate.data.tags["serving.precision"] == serving["precision"]
    assert {"evaluation.json", "confusion_matrix.png", "serving.json"} <= {
        a.path for a in client.list_artifacts(evaluate.info.run_id)
    }
    # The registered version names its run, and the run (and its parent) its version.
    assert report["tracking"]["mlflow_run_id"] == evaluate.info.run_id
    package = LocalSageMaker(first_run.folder.parent).registry.describe(config.MODEL_PACKAGE_GROUP)
    assert package["CustomerMetadataProperties"]["mlflow-run-id"] == evaluate.info.run_id
    for run_id in (evaluate.info.run_id, parent):
        tags = client.get_run(run_id).data.tags
        assert tags["model_package.arn"] == package["ModelPackageArn"]
        assert tags["model_package.version"] == "1" and tags["model_package.status"] == "Approved"
    assert client.get_run(parent).info.status == "FINISHED"


def _references(value: Any, name: str, path: tuple = ()) -> list[tuple]:
    """Where a step's arguments read a parameter: the key paths of every {"Get": "Parameters.<name>"}."""
    if isinstance(value, dict):
        if value == {"Get": f"Parameters.{name}"}:
            return [path]
        return [found for key, item in value.items() for found in _references(item, name, (*path, key))]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in _references(item, name, (*path, index))]
    return []


def _places(definition: dict, parameter: str) -> set[tuple]:
    """(step name, first key of its arguments, the key after it) of each place a parameter reaches."""
    from pipelines.definition.check import iter_steps, own_arguments

    return {
        (step["Name"], *path[:3])
        for step in iter_steps(definition)
        for path in _references(own_arguments(step), parameter)
    }


def test_parameters_reach_the_same_places_locally_as_in_the_sagemaker_definition(first_run: Run) -> None:
    from test_pipeline import _build, offline_aws

    with offline_aws():
        sagemaker_definition = _build("demo")
    local = first_run.definition
    received_by = {
        "Preprocess": json.loads((first_run.folder / "preprocess/opt/ml/config/processingjobconfig.json").read_text()),
        "Tune": json.loads((first_run.folder / "tune/trial-01/opt/ml/input/config/hyperparameters.json").read_text()),
        "Train": json.loads((first_run.folder / "train/opt/ml/input/config/hyperparameters.json").read_text()),
    }
    for parameter, value in PARAMETERS.items():
        places = _places(local, parameter)
        assert places == _places(sagemaker_definition, parameter), parameter
        steps = {"ImageSize": {"Preprocess", "Tune", "Train"}, "Architecture": {"Tune", "Train"}}[parameter]
        assert {place[0] for place in places} == steps, places
        for step, *path in places:
            job_arguments = first_run.step(step)["Local"]
            if step == "Preprocess":  # ("AppSpecification", "ContainerArguments", index) in the job's own config
                received = received_by[step]["AppSpecification"]["ContainerArguments"][path[2]]
            else:  # ("HyperParameters", key) or ("TrainingJobDefinition", "StaticHyperParameters", key)
                key = path[1] if path[0] == "HyperParameters" else path[2]
                received = str(decode_hyperparameter(received_by[step][key]))
            assert received == value, (parameter, step, path, job_arguments)
    # ... and the scripts got them as flags
    assert f"--image-size {PARAMETERS['ImageSize']}" in (first_run.folder / "preprocess/log.txt").read_text()
    train_log = (first_run.folder / "train/log.txt").read_text()
    assert f"--input-size {PARAMETERS['ImageSize']}" in train_log
    assert f"--architecture {PARAMETERS['Architecture']}" in train_log


def test_local_endpoint_serves_the_registered_model(first_run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = first_run.folder.parent.resolve()
    state = endpoint.status(workdir, config.LOCAL_ENDPOINT_NAME)
    assert state is not None and state["EndpointStatus"] == "InService"
    assert state["ModelPackageVersion"] == 1
    url = state["url"]
    assert url in first_run.stdout  # the summary names the endpoint

    image = _images(first_run.folder / "preprocess/opt/ml/processing/output/test")[0]
    status, answer = post_invocation(url, image.read_bytes(), "image/jpeg")
    assert status == 200
    (prediction,) = answer["predictions"]
    top = prediction["top_k"]
    assert len(top) == contract.DEFAULT_TOP_K
    assert all(entry["class"] in demo_data.CLASS_NAMES for entry in top)
    probabilities = [entry["probability"] for entry in top]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0 + 1e-6

    batch = json.dumps({"instances": [{"b64": base64.b64encode(image.read_bytes()).decode()}] * 2, "top_k": 2})
    status, answer = post_invocation(url, batch.encode(), "application/json")
    assert status == 200 and [len(p["top_k"]) for p in answer["predictions"]] == [2, 2]

    status, answer = post_invocation(url, b"this is not an image", "image/jpeg")
    assert status == 400 and "image" in answer["error"]
    status, answer = post_invocation(url, b"{}", "text/plain")
    assert status == 415 and "error" in answer
    assert endpoint.ping(url)  # the server survived the bad requests

    assert main(["predict", str(image), "--endpoint", url, "--top-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{image}:") and printed.count("\n  ") == 3
    assert top[0]["class"] in printed


def test_second_run_reuses_every_job_step(cached_run: Run) -> None:
    assert cached_run.code == 0, cached_run.stderr
    for name in JOB_STEPS:
        assert cached_run.cached_from(name) == "run-0001"
        assert cached_run.step(name)["CacheHitResult"]["SourcePipelineExecutionArn"].endswith("/execution/run-0001")
    for name in ("CheckAccuracy", REGISTER, "Deploy"):  # steps with no CacheConfig run every time
        assert cached_run.cached_from(name) is None and cached_run.step(name)["StepStatus"] == "Succeeded"
    # the cached outputs are in the new run folder too
    assert (cached_run.folder / "train/output/model.tar.gz").is_file()
    assert (cached_run.folder / "evaluate/opt/ml/processing/evaluation/evaluation.json").is_file()
    assert not (cached_run.folder / "tune/trial-01/opt").exists()  # nothing ran
    assert "cached from run-0001" in cached_run.stdout


def test_a_cached_rerun_registers_a_version_of_its_own_and_a_rejected_one_stays_rejected(
    cached_run: Run, server: MlflowServer
) -> None:
    workdir = cached_run.folder.parent
    packages = registry.LocalModelRegistry(workdir, arn).list_model_packages(config.MODEL_PACKAGE_GROUP)
    assert [p["ModelPackageVersion"] for p in packages] == [1, 2]  # the same model bytes, a new version
    ours = registry.model_data_path(packages[1])
    assert (
        packages[0]["CustomerMetadataProperties"]["ModelSha256"]
        == packages[1]["CustomerMetadataProperties"]["ModelSha256"]
    )
    assert [p["ModelApprovalStatus"] for p in packages] == ["Rejected", "Approved"]  # reject --local holds
    # Both versions come from run-0001's (cached) Evaluate: its run names the newest, as on SageMaker's cache.
    (evaluated,) = _tracked_runs(server, "run-0001")["evaluate"]
    assert {key: evaluated.data.tags[f"model_package.{key}"] for key in ("version", "status")} == {
        "version": "2",
        "status": "Approved",
    }
    assert packages[1]["CustomerMetadataProperties"]["mlflow-run-id"] == evaluated.info.run_id
    assert ours != registry.model_data_path(packages[0]) and ours.stat().st_nlink == 1  # a copy of its own
    assert cached_run.output("Deploy", "action") == "updated"  # the new version is deployed ...
    assert cached_run.output("Deploy", "model_package_arn") == packages[1]["ModelPackageArn"]
    assert endpoint.status(workdir.resolve(), config.LOCAL_ENDPOINT_NAME)["ModelPackageVersion"] == 2


def test_changed_parameter_reruns_training_and_the_new_version_awaits_approval(changed_run: Run) -> None:
    assert changed_run.code == 0, changed_run.stderr
    assert changed_run.cached_from("Preprocess") == "run-0001"
    assert changed_run.cached_from("Tune") == "run-0001"
    assert changed_run.cached_from("Train") is None
    assert changed_run.cached_from("Evaluate") is None  # its input, the model, changed
    final = json.loads((changed_run.folder / "train/opt/ml/input/config/hyperparameters.json").read_text())
    assert final["epochs"] == "2"
    workdir = changed_run.folder.parent
    packages = registry.LocalModelRegistry(workdir, arn).list_model_packages(config.MODEL_PACKAGE_GROUP)
    assert [p["ModelPackageVersion"] for p in packages] == [1, 2, 3]
    assert [p["ModelApprovalStatus"] for p in packages] == ["Rejected", "Approved", "PendingManualApproval"]
    # the Deploy step ran and started nothing: the endpoint still serves version 1
    assert changed_run.step("Deploy")["StepStatus"] == "Succeeded"
    assert changed_run.output("Deploy", "action") == "awaiting-approval"
    assert changed_run.output("Deploy", "model_package_arn") == packages[2]["ModelPackageArn"]
    assert endpoint.status(workdir.resolve(), config.LOCAL_ENDPOINT_NAME)["ModelPackageVersion"] == 2
    assert "approve 3 --local" in changed_run.stdout


def test_two_training_processes_write_the_artifact_and_metric_lines_of_one(changed_run: Run, first_run: Run) -> None:
    """The changed run's Train step ran as SageMaker's torch_distributed launcher runs it, with two ranks: an
    artifact of the same files and metric lines of the same format as the first run's single process wrote (its
    Evaluate step loaded the artifact and predicted the test split; the approval test below serves it)."""
    import torch

    from entrypoints import data, modeling

    train = changed_run.folder / "train"
    log = (train / "log.txt").read_text()
    assert "-m torch.distributed.run --nnodes 1 --nproc_per_node 2 --standalone train.py --architecture" in log
    assert "processes 2 (gloo" in log and "Debugger: hook off with 2 processes" in log
    assert any("one torchrun of 2 processes" in note for note in changed_run.step("Train")["Local"]["Notes"])
    # The first run's epoch-1 checkpoint is restored (the same best trial, so the same checkpoint URI), but it is
    # another training's: --epochs 1, not 2. This run trains both epochs from the start and says why.
    first_log = (first_run.folder / "train/log.txt").read_text()
    rows = contract.parse_metrics(log)
    (fresh,) = [line for line in log.splitlines() if "starting fresh" in line]
    assert "is another run's checkpoint" in fresh and "epochs: 1 -> 2" in fresh, fresh
    assert "resumed from" not in log
    assert [row["epoch"] for row in rows] == [1, 2]
    for definition in config.METRIC_DEFINITIONS:  # rank 0 alone prints them, in the single process's format
        pattern = re.compile(definition["Regex"])
        assert len([line for line in log.splitlines() if pattern.search(line)]) == len(rows), definition["Name"]
    lines = [line for text in (log, first_log) for line in text.splitlines() if line.startswith("epoch=")]
    assert {re.sub(r"=\S+", "=N", line) for line in lines} == {"epoch=N train_loss=N valid_loss=N valid_accuracy=N"}

    def members(run: Run) -> set[str]:
        with tarfile.open(run.folder / "train/output/model.tar.gz") as archive:
            return set(archive.getnames())

    assert members(changed_run) == members(first_run)
    model_dir = train / "opt/ml/model"
    assert json.loads((model_dir / contract.HYPERPARAMETERS_FILE).read_text())["processes"] == 2
    model, model_config = modeling.load_model(model_dir)  # weights_only, as the serving handlers load it
    assert model_config.architecture == PARAMETERS["Architecture"]
    test_split = first_run.folder / "preprocess/opt/ml/processing/output/test"
    samples = data.scan_channel(test_split, model_config.class_names).samples
    image, _ = data.ImageDataset(samples, model_config.input_size, model_config.resize_size, train=False)[0]
    with torch.no_grad():
        logits = model.eval()(data.BatchNormalizer(model_config.mean, model_config.std)(image.unsqueeze(0)))
    assert logits.shape == (1, len(demo_data.CLASS_NAMES)) and torch.isfinite(logits).all()
    report = changed_run.folder / "evaluate/opt/ml/processing/evaluation" / contract.EVALUATION_FILE
    assert 0.0 <= json.loads(report.read_text())["multiclass_classification_metrics"]["accuracy"]["value"] <= 1.0


def test_approving_the_new_version_deploys_it_through_the_deploy_function(
    changed_run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = changed_run.folder.parent
    assert main(["approve", "3", "--local", "--workdir", str(workdir), "--port", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith(":model-package/imageclassificationmodels/3: Approved")  # what `approve` prints
    assert printed[1].startswith("imgclf-local: updated, version 3")  # UpdateEndpoint, from the approval event
    assert endpoint.status(workdir.resolve(), config.LOCAL_ENDPOINT_NAME)["ModelPackageVersion"] == 3
    # the older spelling still works, through the same code path
    assert main(["local-models", "--workdir", str(workdir), "--approve", "3", "--port", "0"]) == 0
    assert "imgclf-local: unchanged" in capsys.readouterr().out


def test_unmet_threshold_runs_the_fail_step_with_its_message(failed_run: Run, first_run: Run) -> None:
    from pipelines.definition.check import iter_steps

    assert failed_run.code == 1
    accuracy = json.loads((failed_run.folder / "evaluate/opt/ml/processing/evaluation/evaluation.json").read_text())
    accuracy = accuracy["multiclass_classification_metrics"]["accuracy"]["value"]
    message = failed_run.stderr
    # the Fail step's ErrorMessage, evaluated: the accuracy (JsonGet) and the AccuracyThreshold parameter
    assert f"step AccuracyBelowThreshold failed: Test accuracy {accuracy} is below the AccuracyThreshold 1.0" in message
    assert str(failed_run.folder) in message  # the run folder is kept and named
    assert failed_run.record["PipelineExecutionStatus"] == "Failed"
    assert failed_run.step("CheckAccuracy")["Metadata"] == {"Condition": {"Outcome": "False"}}
    assert failed_run.step("AccuracyBelowThreshold")["StepStatus"] == "Failed"
    assert not {REGISTER, "Deploy"} & set(failed_run.statuses())
    packages = LocalSageMaker(failed_run.folder.parent).registry.list_model_packages(config.MODEL_PACKAGE_GROUP)
    assert len(packages) == 3  # nothing registered
    # between them, the first run and this one executed every step of the definition
    everything = {step["Name"] for step in iter_steps(failed_run.definition)}
    assert set(first_run.statuses()) | set(failed_run.statuses()) == everything


def test_failing_script_names_the_step_and_shows_its_log(workdir: Path, tmp_path: Path, server: MlflowServer) -> None:
    one_class = tmp_path / "one_class.zip"
    with zipfile.ZipFile(one_class, "w") as archive:
        for name in ("cat/a.jpg", "cat/b.jpg"):
            image = io.BytesIO()
            Image.new("RGB", (16, 16), "white").save(image, "JPEG")
            archive.writestr(name, image.getvalue())
    run = _local(workdir, one_class, server)
    assert run.code == 1
    assert "step Preprocess failed: exit status 2" in run.stderr
    last_line = (run.folder / "preprocess/log.txt").read_text().strip().splitlines()[-1]
    assert last_line.startswith("error:") and "class" in last_line  # the script's own one-line refusal ...
    assert last_line in run.stdout  # ... shown from the log's last lines
    assert f"log: {run.folder / 'preprocess/log.txt'}" in run.stdout
    assert run.record["PipelineExecutionStatus"] == "Failed" and run.step("Preprocess")["StepStatus"] == "Failed"


def test_endpoint_stop(first_run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = first_run.folder.parent
    url = endpoint.read_record(workdir.resolve(), config.LOCAL_ENDPOINT_NAME)["url"]
    assert main(["endpoint", "stop", "--workdir", str(workdir)]) == 0
    assert "stopped" in capsys.readouterr().out
    assert not endpoint.ping(url, timeout=1)
    assert endpoint.status(workdir.resolve(), config.LOCAL_ENDPOINT_NAME) is None


@pytest.fixture(scope="module")
def fork_run(failed_run: Run, workdir: Path, data: Path, server: MlflowServer) -> Iterator[Run]:
    """The fork of docs/customizing.md (tests/_fork.py) in the same workdir, with the first run's values."""
    ObjectStore(workdir).put_bytes(REPORT_CODE, REPORT_SCRIPT.read_bytes())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builder, "get_pipeline", with_data_report(builder.get_pipeline))
        yield _local(workdir, data, server, "--threshold", "0", *_same_as_first())


def test_a_fork_with_a_data_report_step_runs_locally_end_to_end(fork_run: Run) -> None:
    """One more step, made through the builder alone: it runs on Preprocess's output, and the job steps it did not
    change are reused from the first run (adding a step moves no other step's cache key)."""
    assert fork_run.code == 0, fork_run.stderr
    assert fork_run.statuses() == {
        "Preprocess": "Succeeded",
        "DataReport": "Succeeded",
        "Tune": "Succeeded",
        "Train": "Succeeded",
        "Evaluate": "Succeeded",
        "CheckAccuracy": "Succeeded",
        REGISTER: "Succeeded",
        "Deploy": "Succeeded",
    }
    assert fork_run.cached_from("DataReport") is None
    assert {name: fork_run.cached_from(name) for name in JOB_STEPS} == dict.fromkeys(JOB_STEPS, "run-0001")
    workdir = fork_run.folder.parent
    report_folder = workdir / fork_run.step("DataReport")["Local"]["Outputs"]["report"]
    report = json.loads((report_folder / "report.json").read_text())
    train = workdir / fork_run.step("Preprocess")["Local"]["Outputs"]["train"]
    labels = json.loads((train / "labels.json").read_text())
    assert report["classes"] == len(labels) == 10
    assert report["per_class"] == {label: len(list((train / label).iterdir())) for label in labels}
    assert report["images"] == sum(report["per_class"].values()) > 0
    added = next(step for step in fork_run.definition["Steps"] if step["Name"] == "DataReport")
    assert added["Arguments"]["ProcessingInputs"][0]["S3Input"]["S3Uri"] == {
        "Get": "Steps.Preprocess.ProcessingOutputConfig.Outputs['train'].S3Output.S3Uri"
    }
    assert fork_run.output("Deploy", "action") == "awaiting-approval"  # version 4, not approved
