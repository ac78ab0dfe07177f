"""Unit tests of the local runner's parts: the tuner's sampling, the training-container contract, hashing,
deterministic tarballs, the step cache key and the registry (the endpoint server: tests/test_local_endpoint.py)."""

from __future__ import annotations

import importlib.metadata
import io
import json
import math
import platform
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest

from entrypoints import contract
from pipelines import config
from pipelines.cli.backend import local_report_reader
from pipelines.config import HyperparameterRange
from pipelines.local import cache, containers, jobs, objectstore, registry, tuning
from pipelines.local.sagemaker import arn

# --- tuning -------------------------------------------------------------------------------------------------------
from pipelines.util import fsutil

# ParameterRanges as the SDK writes them into a tuning step (categorical values JSON-encoded for framework estimators)
PARAMETER_RANGES = {
    "ContinuousParameterRanges": [
        {"Name": "lr", "MinValue": "1e-05", "MaxValue": "0.01", "ScalingType": "Logarithmic"},
        {"Name": "dropout", "MinValue": "0.0", "MaxValue": "0.5", "ScalingType": "Linear"},
    ],
    "CategoricalParameterRanges": [
        {"Name": "batch-size", "Values": ['"32"', '"64"', '"128"']},
        {"Name": "trainable-blocks", "Values": ['"0"', '"1"', '"2"', '"all"']},
    ],
    "IntegerParameterRanges": [{"Name": "units", "MinValue": "1", "MaxValue": "4", "ScalingType": "Auto"}],
}


def test_sampled_trials_stay_in_the_steps_ranges_and_are_written_like_the_tuner() -> None:
    ranges = tuning.ranges_from_definition(PARAMETER_RANGES)
    assert ranges["lr"] == HyperparameterRange("continuous", 1e-5, 1e-2, scaling="Logarithmic")
    assert ranges["units"] == HyperparameterRange("integer", 1, 4, scaling="Auto")
    trials = tuning.sample_trials(ranges, 16, seed=3)
    assert len(trials) == 16
    for trial in trials:
        assert set(trial) == {"lr", "dropout", "batch-size", "trainable-blocks", "units"}
        assert 1e-5 <= float(trial["lr"]) <= 1e-2
        assert 0.0 <= float(trial["dropout"]) <= 0.5
        # a categorical value is one of the range's strings, as it stands (the toolkit decodes it)
        assert trial["batch-size"] in ('"32"', '"64"', '"128"')
        assert json.loads(trial["trainable-blocks"]) in ("0", "1", "2", "all")


def test_sampling_is_seeded_and_latin_hypercube_on_the_log_scale() -> None:
    ranges = {"lr": HyperparameterRange("continuous", 1e-5, 1e-1, scaling="Logarithmic")}
    first = tuning.sample_trials(ranges, 4, seed=7)
    assert first == tuning.sample_trials(ranges, 4, seed=7)
    assert first != tuning.sample_trials(ranges, 4, seed=8)
    # one value per quarter of the log range: 1e-5..1e-4, 1e-4..1e-3, 1e-3..1e-2, 1e-2..1e-1
    decades = sorted(math.floor(math.log10(float(t["lr"]))) for t in first)
    assert decades == [-5, -4, -3, -2]


def test_integer_and_linear_ranges() -> None:
    ranges = {
        "units": HyperparameterRange("integer", 1, 4),
        "p": HyperparameterRange("continuous", 0.0, 1.0, scaling="Linear"),
    }
    trials = tuning.sample_trials(ranges, 8, seed=0)
    units = [int(t["units"]) for t in trials]
    assert set(units) == {1, 2, 3, 4}  # both ends as likely as the middle: 8 strata cover all four values
    assert sorted(int(float(t["p"]) * 8) for t in trials) == list(range(8))


def test_objective_is_the_last_value_found_with_the_metric_regex() -> None:
    log = "\n".join(
        [
            "some output valid_accuracy is not a metric line",
            contract.format_metrics_line(1, 1.0, 1.0, 0.9),
            contract.format_metrics_line(2, 0.5, 0.6, 0.8),
        ]
    )
    final = jobs.final_metrics  # the FinalMetricDataList the tuner ranks trials by
    assert final(log, config.METRIC_DEFINITIONS).get(config.OBJECTIVE_METRIC) == pytest.approx(0.8)
    assert final("no metrics", config.METRIC_DEFINITIONS).get(config.OBJECTIVE_METRIC) is None
    outcomes = [
        tuning.TrialOutcome("a", {}, 0.8, "Completed"),
        tuning.TrialOutcome("b", {}, 0.9, "Completed"),
        tuning.TrialOutcome("c", {}, None, "Failed", "boom"),
        tuning.TrialOutcome("d", {}, 0.9, "Completed"),
    ]
    assert tuning.best_trial(outcomes).name == "b"  # ties go to the earlier trial
    assert tuning.best_trial([outcomes[2]]) is None
    # TrainingJobSummaries' order: completed trials, best first (get_top_model_s3_uri's top_k indexes it)
    assert [o.name for o in tuning.ranked_trials(outcomes)] == ["b", "d", "a"]
    assert [o.name for o in tuning.ranked_trials(outcomes, "Minimize")] == ["a", "b", "d"]


# --- the training container contract ------------------------------------------------------------------------------


def test_training_job_environment_follows_the_toolkit(tmp_path: Path) -> None:
    channels = {"train": tmp_path / "train", "valid": tmp_path / "valid"}
    job = containers.TrainingJob(
        job_name="job-1",
        root=tmp_path / "job",
        source_tarball=tmp_path / "sourcedir.tar.gz",
        entry_point="train.py",
        hyperparameters={
            "lr": "0.001",
            "batch-size": '"64"',
            "architecture": '"resnet18"',
            "epochs": "3",
            "_tuning_objective_metric": '"valid_accuracy"',
            "sagemaker_program": '"train.py"',
            "sagemaker_region": '"local"',
        },
        channels=channels,
        cpus=3,
    )
    env, arguments = job.environment()
    # sorted keys, JSON-decoded values, toolkit parameters left out
    assert arguments == ["--architecture", "resnet18", "--batch-size", "64", "--epochs", "3", "--lr", "0.001"]
    assert json.loads(env["SM_HPS"]) == {"architecture": "resnet18", "batch-size": "64", "epochs": 3, "lr": 0.001}
    assert json.loads(env["SM_CHANNELS"]) == ["train", "valid"]
    opt = tmp_path / "job" / "opt" / "ml"
    assert env["SM_CHANNEL_TRAIN"] == str(opt / "input/data/train")
    assert env["SM_MODEL_DIR"] == str(opt / "model")
    assert env["SM_OUTPUT_DATA_DIR"] == str(opt / "output/data")
    assert env["SM_NUM_GPUS"] == "0" and env["SM_NUM_CPUS"] == "3"
    assert env["SM_HP_LR"] == "0.001"
    training_env = json.loads(env["SM_TRAINING_ENV"])
    assert training_env["hyperparameters"] == json.loads(env["SM_HPS"])
    assert training_env["user_entry_point"] == "train.py"
    assert json.loads(env["SM_USER_ARGS"]) == arguments


def test_container_paths_in_arguments_are_mapped_to_the_job_root(tmp_path: Path) -> None:
    assert containers.map_container_argument(tmp_path, "/opt/ml/processing/input") == str(
        tmp_path / "opt/ml/processing/input"
    )
    assert containers.map_container_argument(tmp_path, "--x=/opt/ml/model") == f"--x={tmp_path / 'opt/ml/model'}"
    assert containers.map_container_argument(tmp_path, "0.1") == "0.1"


def test_a_failing_script_reports_its_log_tail(tmp_path: Path) -> None:
    script = tmp_path / "code" / "fail.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint('working')\nprint('bad input: no images', file=sys.stderr)\nsys.exit(3)\n")
    code = containers.ProcessingInput(script.parent, "/opt/ml/processing/input/code", "code")
    entrypoint = ["python3", "/opt/ml/processing/input/code/fail.py"]
    job = containers.ProcessingJob("job", tmp_path / "job", entrypoint, [code], [], [])
    assert job.command()[:2] == [sys.executable, str(tmp_path / "job/opt/ml/processing/input/code/fail.py")]
    with pytest.raises(containers.JobError) as caught:
        job.run()
    assert "exit status 3" in str(caught.value)
    assert caught.value.tail[-1] == "bad input: no images"
    assert "working" in caught.value.log_path.read_text()


# --- hashing, tarballs, cache keys ------------------------------------------------------------------------------


def _zip(path: Path, entries: dict[str, bytes], date_time: tuple[int, ...]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=date_time), data)
    return path


def _forge_crc32(prefix: bytes, target: int) -> bytes:
    """``prefix`` + 4 bytes whose CRC-32 is ``target``: CRC-32 is affine in the last 4 bytes, so solve over GF(2)."""
    base = zlib.crc32(prefix + bytes(4))
    columns = [zlib.crc32(prefix + (1 << bit).to_bytes(4, "little")) ^ base for bit in range(32)]
    rows = [(column, 1 << bit) for bit, column in enumerate(columns)]  # (crc effect, the bits of the 4 bytes)
    basis: dict[int, tuple[int, int]] = {}
    for effect, bits in rows:  # Gaussian elimination on the effects
        for pivot in sorted(basis, reverse=True):
            if effect >> pivot & 1:
                effect, bits = effect ^ basis[pivot][0], bits ^ basis[pivot][1]
        if effect:
            basis[effect.bit_length() - 1] = (effect, bits)
    wanted, chosen = target ^ base, 0
    for pivot in sorted(basis, reverse=True):
        if wanted >> pivot & 1:
            wanted, chosen = wanted ^ basis[pivot][0], chosen ^ basis[pivot][1]
    assert wanted == 0
    return prefix + chosen.to_bytes(4, "little")


def test_archives_with_the_same_names_sizes_and_crcs_but_other_bytes_get_other_cache_keys(tmp_path: Path) -> None:
    image = bytes(range(256)) * 4
    forged = _forge_crc32(b"other image bytes".ljust(len(image) - 4, b"x"), zlib.crc32(image))
    assert len(forged) == len(image) and zlib.crc32(forged) == zlib.crc32(image) and forged != image
    date = (2020, 1, 1, 0, 0, 0)
    for prefix in ("a", "b"):
        (tmp_path / "s3" / "bucket" / prefix).mkdir(parents=True)
    one = _zip(tmp_path / "s3" / "bucket" / "a" / "data.zip", {"x/1.jpg": image}, date)
    two = _zip(tmp_path / "s3" / "bucket" / "b" / "data.zip", {"x/1.jpg": forged}, date)
    info_one, info_two = (zipfile.ZipFile(path).infolist()[0] for path in (one, two))
    assert (info_one.filename, info_one.file_size, info_one.CRC) == (
        info_two.filename,
        info_two.file_size,
        info_two.CRC,
    )
    store = objectstore.ObjectStore(tmp_path)
    hashes = [store.content_hash(f"s3://bucket/{prefix}/data.zip") for prefix in ("a", "b")]
    assert hashes[0] != hashes[1]
    step_cache = cache.StepCache(tmp_path)
    keys = [step_cache.key("Preprocess", {"input": digest}) for digest in hashes]
    assert keys[0] != keys[1]  # the second archive's Preprocess is not served from the first's
    assert fsutil.content_hash(one) == fsutil.content_hash(_zip(tmp_path / "c.zip", {"x/1.jpg": image}, date))


def test_tarball_is_byte_identical_for_identical_content(tmp_path: Path) -> None:
    for name in ("a", "b"):
        folder = tmp_path / name
        (folder / "code").mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"weights")
        (folder / "code" / "inference.py").write_text("x = 1\n")
        (folder / "code" / "__pycache__").mkdir()
        (folder / "code" / "__pycache__" / "inference.cpython-311.pyc").write_bytes(name.encode())
    first = fsutil.make_tarball(tmp_path / "a", tmp_path / "a.tar.gz").read_bytes()
    second = fsutil.make_tarball(tmp_path / "b", tmp_path / "b.tar.gz").read_bytes()
    assert first == second
    with tarfile.open(tmp_path / "a.tar.gz") as archive:
        assert sorted(archive.getnames()) == ["code", "code/inference.py", "model.pt"]


def test_extraction_refuses_entries_outside_the_folder(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as archive:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ValueError, match="outside"):
        fsutil.safe_extract_tarball(bad, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_cache_key_depends_on_every_part(tmp_path: Path) -> None:
    base = {"code": "c1", "inputs": {"train": "h1"}, "hyperparameters": {"lr": "0.1"}}
    step_cache = cache.StepCache(tmp_path, runtime_packages=("numpy",))
    key = step_cache.key("Train", base)
    assert key == step_cache.key("Train", json.loads(json.dumps(base)))
    assert key != step_cache.key("Tune", base)
    assert key != step_cache.key("Train", {**base, "code": "c2"})
    assert key != step_cache.key("Train", {**base, "inputs": {"train": "h2"}})
    assert key != step_cache.key("Train", {**base, "hyperparameters": {"lr": "0.2"}})
    assert step_cache.runtime == {"python": platform.python_version(), "numpy": importlib.metadata.version("numpy")}
    every = cache.StepCache(tmp_path).runtime  # nobody named the jobs' packages: every installed one counts
    assert every["numpy"] == step_cache.runtime["numpy"] and every["pytest"] == importlib.metadata.version("pytest")
    assert cache.StepCache(tmp_path).key("Train", base) != key


# --- registry -----------------------------------------------------------------------------------------------------


def _register_request(model_uri: str, report_uri: str, status: str = "PendingManualApproval") -> dict:
    """A RegisterModel step's arguments, resolved."""
    return {
        "ModelPackageGroupName": "Group",
        "ModelApprovalStatus": status,
        "InferenceSpecification": {
            "Containers": [{"Image": "image", "ModelDataUrl": model_uri, "Environment": {"A": "1"}}],
            "SupportedContentTypes": list(config.REQUEST_CONTENT_TYPES),
        },
        "ModelMetrics": {"ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": report_uri}}},
    }


def test_registry_versions_fields_and_approval(tmp_path: Path) -> None:
    model = tmp_path / "model.tar.gz"
    model.write_bytes(b"model-1")
    report = tmp_path / "evaluation.json"
    report.write_text('{"multiclass_classification_metrics": {"accuracy": {"value": 0.97}}}')
    files = {"s3://b/model.tar.gz": model, "s3://b/evaluation.json": report}
    request = _register_request(*files)
    local = registry.LocalModelRegistry(tmp_path / "work", arn)
    package = local.register(request, files, metadata={"run": "run-0001"})
    assert package["ModelPackageVersion"] == 1
    assert package["ModelApprovalStatus"] == "PendingManualApproval"
    assert package["ModelPackageArn"] == "arn:aws:sagemaker:us-east-1:000000000000:model-package/group/1"
    assert local.by_arn(package["ModelPackageArn"]) == package
    stored = registry.model_data_path(package)
    assert stored.read_bytes() == b"model-1" and stored.is_relative_to(tmp_path / "work")
    # every URI of the request now names the registry's own copy
    metrics_uri = package["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]
    assert metrics_uri.startswith("file://") and metrics_uri.endswith("evaluation.json")
    assert local_report_reader(tmp_path)(metrics_uri)["multiclass_classification_metrics"]["accuracy"]["value"] == 0.97
    assert package["InferenceSpecification"]["Containers"][0]["Environment"] == {"A": "1"}
    assert package["CustomerMetadataProperties"]["run"] == "run-0001"

    again = local.register(_register_request(*files, status="Approved"), files)
    assert again["ModelPackageVersion"] == 2  # the same model bytes: a version of its own, as on SageMaker
    assert local.describe("Group", 1)["ModelApprovalStatus"] == "PendingManualApproval"  # version 1 untouched
    approved = local.update_approval("Group", 1, "Approved", "ok")
    assert approved["ModelApprovalStatus"] == "Approved"
    assert local.latest_approved("Group")["ModelPackageVersion"] == 2
    on_disk = json.loads((tmp_path / "work" / registry.REGISTRY_FILE).read_text())
    assert [p["ModelApprovalStatus"] for p in on_disk["ModelPackageGroups"]["Group"]["ModelPackages"]] == [
        "Approved",
        "Approved",
    ]
    with pytest.raises(registry.RegistryError, match="no version 9"):
        local.update_approval("Group", 9, "Approved")
    with pytest.raises(registry.RegistryError, match="is not a SageMaker EntityName"):
        local.register({**request, "ModelPackageGroupName": "../escape"}, files)
    with pytest.raises(registry.RegistryError, match="no model package"):
        local.by_arn("arn:aws:sagemaker:local:000000000000:model-package/group/7")


# --- predict against a SageMaker endpoint name ---------------------------------------------------------------------


def test_predict_with_endpoint_name_calls_invoke_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    from pipelines.run import main

    image = tmp_path / "digit.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    answer = {"predictions": [{"class": "007.seven", "index": 7, "probability": 0.9, "top_k": [
        {"class": "007.seven", "index": 7, "probability": 0.9},
        {"class": "001.one", "index": 1, "probability": 0.05},
    ]}]}  # fmt: skip
    body = json.dumps(answer).encode()
    client = boto3.client("sagemaker-runtime", region_name="eu-west-1")
    stubber = Stubber(client)
    stubber.add_response(
        "invoke_endpoint",
        {"Body": StreamingBody(io.BytesIO(body), len(body)), "ContentType": "application/json"},
        {
            "EndpointName": "imgclf-prod",
            "ContentType": "image/png",
            "Accept": "application/json",
            "Body": image.read_bytes(),
        },
    )
    monkeypatch.setattr(boto3, "client", lambda *args, **kwargs: client)
    with stubber:
        assert main(["predict", str(image), "--endpoint-name", "imgclf-prod", "--region", "eu-west-1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{image}:"
    assert printed[1].split() == ["1.", "007.seven", "0.9000"]
    assert printed[2].split() == ["2.", "001.one", "0.0500"]


# --- the training flag the demo relies on (digits must not be mirrored) -------------------------------------------


def test_horizontal_flip_can_be_turned_off(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from entrypoints import data, train

    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :4] = 255  # bright on the left only: a flip moves it to the right
    path = tmp_path / "left.png"
    Image.fromarray(pixels).save(path)
    samples = [(str(path), 0)] * 32
    flipping = data.ImageDataset(samples, 16, 16, train=True, seed=1)
    upright = data.ImageDataset(samples, 16, 16, train=True, seed=1, horizontal_flip=False)
    mirrored = 0
    for index in range(len(samples)):
        with_flips, without = flipping[(index, 0)][0], upright[(index, 0)][0]
        assert without[:, :, 0].float().mean() >= without[:, :, -1].float().mean()  # never mirrored
        if not bool((with_flips == without).all()):
            assert bool((with_flips == without.flip(-1)).all())  # the same crop, mirrored
            mirrored += 1
    assert 0 < mirrored < len(samples)

    parser = train.get_args_parser()
    assert parser.parse_args(["--horizontal-flip", "False"]).horizontal_flip is False
    assert parser.parse_args([]).horizontal_flip is None  # default: on


# --- one reading of a definition, one way to stop a process tree --------------------------------------------------


def test_what_a_scope_can_read_before_the_run_is_evaluated_and_the_rest_left_as_it_is() -> None:
    from pipelines.definition.expressions import Scope

    later = {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}
    value = {
        "epochs": {"Get": "Parameters.Epochs"},
        "uri": {"Std:Join": {"On": "/", "Values": ["s3://b", {"Get": "Parameters.Epochs"}]}},
        "model": later,
        "mixed": {"Std:Join": {"On": "/", "Values": [{"Get": "Parameters.Epochs"}, later]}},
        "other": [{"Get": "Parameters.Other"}, {"Get": "Execution.PipelineExecutionId"}],
    }
    resolved = Scope({"Epochs": 3}, {}).resolve_known(value)
    assert resolved == {**value, "epochs": 3, "uri": "s3://b/3"}  # a step property, an unknown name: left
    assert Scope({"Epochs": 3}, {"PipelineExecutionId": "run-1"}).resolve_known(value)["other"][1] == "run-1"


def test_validation_parses_the_flags_the_training_job_gets(tmp_path: Path) -> None:
    from pipelines import validation
    from pipelines.definition.hyperparameters import hyperparameter_flags

    hyperparameters = {
        "epochs": {"Get": "Parameters.Epochs"},
        "lr": '"0.01"',
        "_internal": "1",  # not the toolkit's: the script gets it as a flag
        "_tuning_objective_metric": '"valid_accuracy"',
        "sagemaker_program": '"train.py"',
        "sagemaker_submit_directory": '"s3://b/code.tar.gz"',
    }
    script, known, origins = validation._training_arguments(hyperparameters, {"Epochs": 2}, {"lr": 0.01})
    job = containers.TrainingJob(
        "job-1", tmp_path, tmp_path / "code.tar.gz", "train.py", {**hyperparameters, "epochs": "2"}, {}
    )
    assert script == "train.py" and hyperparameter_flags(known) == job.environment()[1]
    assert origins == {"--epochs": "--param Epochs", "--lr": "--hp lr", "--_internal": "the preset"}


@pytest.mark.slow
def test_stopping_a_tree_ends_what_ignores_sigterm_and_leaves_the_leaders_status_to_its_popen() -> None:
    import signal
    import subprocess

    from pipelines.util import processes

    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    )
    leader = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {stubborn!r}]); time.sleep(60)"
    process = subprocess.Popen(
        [sys.executable, "-c", leader], start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline() == "up\n"
    (child,) = processes.descendants(process.pid)
    stopped = processes.terminate(processes.tree(process.pid), 1.0, group=process.pid, reap=False)
    assert child in stopped and not processes.is_alive(child)
    assert process.wait(timeout=5) == -signal.SIGTERM  # not reaped behind the Popen's back (it would read 0)
    process.stdout.close()
