"""End to end: ``python -m pipelines.run local`` on a shrunk demo (a few digits per class, 16 px, one trial of one
epoch), through the real scripts, the local registry and the local endpoint; then the cache and the condition.

The runs share one workdir (module-scoped fixtures, in order): the first run (approved and deployed), the same
run again (every job step cached), a run with a changed hyperparameter (Train and Evaluate re-run, Preprocess
and Tune cached) and a run whose accuracy threshold cannot be met.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from _http import post_invocation
from PIL import Image

from entrypoints import contract
from pipelines import config, demo_data
from pipelines.local import endpoint, registry
from pipelines.run import main

pytestmark = pytest.mark.slow

SMALL = [
    "--preset",
    "demo",
    "--trials",
    "1",
    "--tuning-epochs",
    "1",
    "--epochs",
    "1",
    "--image-size",
    "16",
    "--port",
    "0",
]
JOB_STEPS = ("Preprocess", "Tune", "Train", "Evaluate")


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    folder: Path

    @property
    def record(self) -> dict:
        return json.loads((self.folder / "run.json").read_text())

    def step(self, name: str) -> dict:
        return next(step for step in self.record["Steps"] if step["name"] == name)


def _local(workdir: Path, data: Path, *extra: str) -> Run:
    before = {p.name for p in workdir.iterdir()} if workdir.is_dir() else set()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["local", "--data", str(data), "--workdir", str(workdir), *SMALL, *extra])
    new = sorted(p for p in workdir.iterdir() if p.name.startswith("run-") and p.name not in before)
    assert len(new) == 1, (out.getvalue(), err.getvalue())
    return Run(code, out.getvalue(), err.getvalue(), new[0])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local") / "runs"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_data.write_digits_archive(
        tmp_path_factory.mktemp("data") / "digits.zip", image_size=16, per_class_limit=6
    )


@pytest.fixture(scope="module")
def first_run(workdir: Path, data: Path):
    run = _local(workdir, data, "--threshold", "0", "--approve")
    yield run
    endpoint.stop(workdir.resolve(), config.LOCAL_ENDPOINT_NAME)  # if a test failed before stopping it


@pytest.fixture(scope="module")
def cached_run(first_run: Run, workdir: Path, data: Path) -> Run:
    return _local(workdir, data, "--threshold", "0")


@pytest.fixture(scope="module")
def changed_run(cached_run: Run, workdir: Path, data: Path) -> Run:
    return _local(workdir, data, "--threshold", "0", "--epochs", "2")


@pytest.fixture(scope="module")
def failed_run(changed_run: Run, workdir: Path, data: Path) -> Run:
    return _local(workdir, data, "--threshold", "1.01", "--epochs", "2")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix == ".jpg")


def test_first_run_succeeds_with_every_artifact_of_the_contract(first_run: Run) -> None:
    assert first_run.code == 0, first_run.stderr
    assert first_run.folder.name == "run-0001"
    record = first_run.record
    assert record["Status"] == "Succeeded"
    statuses = {step["name"]: step["status"] for step in record["Steps"]}
    assert statuses == {name: "Succeeded" for name in (*JOB_STEPS, "CheckAccuracy", "Register", "Deploy")}
    for name in JOB_STEPS:
        assert f"  {name}" in first_run.stdout  # a line per step

    # Preprocess: three ImageFolder splits, labels.json and manifest.json in each, counts that match the files
    output = first_run.folder / "preprocess/opt/ml/processing/output"
    manifest = json.loads((output / "train" / contract.MANIFEST_FILE).read_text())
    for split in contract.SPLITS:
        assert json.loads((output / split / contract.LABELS_FILE).read_text()) == list(demo_data.CLASS_NAMES)
        assert len(_images(output / split)) == manifest["totals"][split] > 0
    assert manifest["parameters"]["image_size"] == 16

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
    assert {contract.WEIGHTS_FILE, contract.MODEL_CONFIG_FILE, "code/inference.py", "code/requirements.txt"} <= names

    # Evaluate: evaluation.json with the accuracy where the condition reads it, and the confusion matrix picture
    evaluation = first_run.folder / "evaluate/opt/ml/processing/evaluation"
    report = json.loads((evaluation / contract.EVALUATION_FILE).read_text())
    accuracy = report["multiclass_classification_metrics"]["accuracy"]["value"]
    assert 0.0 <= accuracy <= 1.0
    assert (evaluation / contract.CONFUSION_MATRIX_IMAGE).stat().st_size > 0
    assert record["Summary"]["test_accuracy"] == accuracy
    summary_line = next(line for line in first_run.stdout.splitlines() if line.strip().startswith("test accuracy"))
    assert f"{accuracy:.4f}" in summary_line

    # Register: a version with SageMaker's field names, approved by --approve
    workdir = first_run.folder.parent
    packages = registry.LocalModelRegistry(workdir).list_model_packages(config.MODEL_PACKAGE_GROUP)
    assert len(packages) == 1
    package = packages[0]
    assert package["ModelPackageVersion"] == 1
    assert package["ModelApprovalStatus"] == "Approved"
    assert package["ModelPackageArn"].endswith(":model-package/imageclassificationmodels/1")
    assert registry.model_data_path(package).read_bytes() == model.read_bytes()
    assert float(package["CustomerMetadataProperties"]["accuracy"]) == pytest.approx(accuracy)
    assert package["ModelMetrics"]["ModelStatistics"]["S3Uri"].endswith(contract.EVALUATION_FILE)


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
        assert cached_run.step(name)["cached_from"] == "run-0001"
    # the cached outputs are in the new run folder too
    assert (cached_run.folder / "train/output/model.tar.gz").is_file()
    assert (cached_run.folder / "evaluate/opt/ml/processing/evaluation/evaluation.json").is_file()
    assert not (cached_run.folder / "tune/trial-01/opt").exists()  # nothing ran
    packages = registry.LocalModelRegistry(cached_run.folder.parent).list_model_packages(config.MODEL_PACKAGE_GROUP)
    assert len(packages) == 1  # the same model is not registered twice
    assert "cached from run-0001" in cached_run.stdout


def test_changed_hyperparameter_reruns_training_but_not_preprocessing(changed_run: Run) -> None:
    assert changed_run.code == 0, changed_run.stderr
    assert changed_run.step("Preprocess")["cached_from"] == "run-0001"
    assert changed_run.step("Tune")["cached_from"] == "run-0001"
    assert changed_run.step("Train")["cached_from"] is None
    assert changed_run.step("Evaluate")["cached_from"] is None  # its input, the model, changed
    final = json.loads((changed_run.folder / "train/opt/ml/input/config/hyperparameters.json").read_text())
    assert final["epochs"] == "2"
    packages = registry.LocalModelRegistry(changed_run.folder.parent).list_model_packages(config.MODEL_PACKAGE_GROUP)
    assert [p["ModelPackageVersion"] for p in packages] == [1, 2]
    assert packages[1]["ModelApprovalStatus"] == "PendingManualApproval"


def test_unmet_threshold_fails_the_run_naming_step_accuracy_and_threshold(failed_run: Run) -> None:
    assert failed_run.code == 1
    accuracy = failed_run.step("CheckAccuracy")["result"]["accuracy"]
    message = failed_run.stderr
    assert "AccuracyBelowThreshold" in message and "CheckAccuracy" in message
    assert f"{accuracy:.4f}" in message and "1.01" in message
    assert str(failed_run.folder) in message  # the run folder is kept and named
    assert failed_run.record["Status"] == "Failed"
    assert failed_run.step("AccuracyBelowThreshold")["status"] == "Failed"
    assert "Register" not in {step["name"] for step in failed_run.record["Steps"]}
    packages = registry.LocalModelRegistry(failed_run.folder.parent).list_model_packages(config.MODEL_PACKAGE_GROUP)
    assert len(packages) == 2  # nothing registered


def test_failing_script_names_the_step_and_shows_its_log(workdir: Path, tmp_path: Path) -> None:
    one_class = tmp_path / "one_class.zip"
    with zipfile.ZipFile(one_class, "w") as archive:
        for name in ("cat/a.jpg", "cat/b.jpg"):
            image = io.BytesIO()
            Image.new("RGB", (16, 16), "white").save(image, "JPEG")
            archive.writestr(name, image.getvalue())
    run = _local(workdir, one_class)
    assert run.code == 1
    assert "step Preprocess failed: exit status 2" in run.stderr
    last_line = (run.folder / "preprocess/log.txt").read_text().strip().splitlines()[-1]
    assert last_line.startswith("error:") and "class" in last_line  # the script's own one-line refusal ...
    assert last_line in run.stdout  # ... shown from the log's last lines
    assert f"log: {run.folder / 'preprocess/log.txt'}" in run.stdout
    assert run.record["Status"] == "Failed" and run.step("Preprocess")["status"] == "Failed"


def test_endpoint_stop(first_run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = first_run.folder.parent
    url = endpoint.read_record(workdir.resolve(), config.LOCAL_ENDPOINT_NAME)["url"]
    assert main(["endpoint", "stop", "--workdir", str(workdir)]) == 0
    assert "stopped" in capsys.readouterr().out
    assert not endpoint.ping(url, timeout=1)
    assert endpoint.status(workdir.resolve(), config.LOCAL_ENDPOINT_NAME) is None
