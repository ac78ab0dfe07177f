"""The local executor's parts, with no job run: the object store, expressions, the checks that stop a definition
before its first step, step caching's expiry, and the deploy function against the local registry."""

from __future__ import annotations

import copy
import datetime as dt
import io
import json
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from pipelines import config
from pipelines.definition.expressions import ExpressionError, Scope
from pipelines.local import cache, objectstore, registry
from pipelines.local.sagemaker import ACCOUNT_ID, REGION, LocalSageMaker, arn


@pytest.fixture(scope="module")
def demo_build() -> tuple[dict[str, Any], Any, Any]:
    """The demo definition as `local` builds it (once: the SDK builds it in about a second)."""
    from pipelines.local.runner import LocalRunOptions, build_definition

    return build_definition(LocalRunOptions(preset="demo"))


# --- object store -----------------------------------------------------------------------------------------------


def test_object_store_maps_uris_inside_its_folder_only(tmp_path: Path) -> None:
    store = objectstore.ObjectStore(tmp_path)
    assert store.path("s3://my-bucket/a/b.txt") == tmp_path / "s3" / "my-bucket" / "a" / "b.txt"
    for bad in ("s3://my-bucket/a/../../../etc", "s3://Bad_Bucket/x", "file:///etc/passwd", "s3://b/x"):
        with pytest.raises(objectstore.ObjectStoreError):
            store.path(bad)

    folder = tmp_path / "outputs"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "1.jpg").write_bytes(b"jpeg")
    store.put("s3://my-bucket/run-1/train", folder)
    downloaded = store.get("s3://my-bucket/run-1/train", tmp_path / "job" / "train")  # a prefix: its objects
    assert (downloaded / "cat" / "1.jpg").read_bytes() == b"jpeg"
    store.put_bytes("s3://my-bucket/code/abc/script.py", b"print(1)")
    single = store.get("s3://my-bucket/code/abc/script.py", tmp_path / "job" / "code")  # one object: by its name
    assert single == tmp_path / "job" / "code" / "script.py" and single.read_bytes() == b"print(1)"
    assert store.content_hash("s3://my-bucket/run-1/train") == store.content_hash("s3://my-bucket/run-1/train")
    with pytest.raises(objectstore.ObjectStoreError, match="holds no object"):
        store.get("s3://my-bucket/missing", tmp_path / "job" / "x")


# --- expressions -------------------------------------------------------------------------------------------------


def _scope() -> Scope:
    properties = {
        "Preprocess": {
            "ProcessingOutputConfig": {
                "Outputs": [
                    {"OutputName": "train", "S3Output": {"S3Uri": "s3://b/run-1/train"}},
                    {"OutputName": "test", "S3Output": {"S3Uri": "s3://b/run-1/test"}},
                ]
            }
        },
        "Tune": {"BestTrainingJob": {"TunedHyperParameters": {"lr": "0.01"}}},
        "Deploy": {"OutputParameters": {"action": "created"}},
    }
    reports = {("Evaluate", "Report"): {"metrics": {"accuracy": {"value": 0.93}}, "classes": ["a", "b"]}}
    return Scope(
        parameters={"ImageSize": 48, "Threshold": 0.9, "Name": "x"},
        execution={"PipelineExecutionId": "run-0007"},
        properties=properties,
        read_property_file=lambda step, name: reports[(step, name)],
    )


def test_expressions_resolve_as_the_service_resolves_them() -> None:
    scope = _scope()
    arguments = {
        "size": {"Std:Join": {"On": "", "Values": [{"Get": "Parameters.ImageSize"}]}},
        "uri": {"Get": "Steps.Preprocess.ProcessingOutputConfig.Outputs['test'].S3Output.S3Uri"},
        "lr": {"Std:Join": {"On": "", "Values": [{"Get": "Steps.Tune.BestTrainingJob.TunedHyperParameters['lr']"}]}},
        "where": {"Std:Join": {"On": "/", "Values": ["s3:/", "b", {"Get": "Execution.PipelineExecutionId"}]}},
        "action": {"Get": "Steps.Deploy.OutputParameters['action']"},
        "list": [{"Get": "Parameters.Name"}, 1],
    }
    assert scope.resolve(arguments) == {
        "size": "48",
        "uri": "s3://b/run-1/test",
        "lr": "0.01",
        "where": "s3://b/run-0007",
        "action": "created",
        "list": ["x", 1],
    }
    accuracy = {
        "Std:JsonGet": {
            "PropertyFile": {"Get": "Steps.Evaluate.PropertyFiles.Report"},
            "Path": "metrics.accuracy.value",
        }
    }
    assert scope.resolve(accuracy) == 0.93
    second = {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.Evaluate.PropertyFiles.Report"}, "Path": "classes[1]"}}
    assert scope.resolve(second) == "b"
    for reference, message in (
        ("Parameters.Nope", "no such parameter"),
        ("Steps.Train.ModelArtifacts.S3ModelArtifacts", "step Train has not run"),
        ("Steps.Preprocess.ProcessingOutputConfig.Outputs['valid'].S3Output.S3Uri", "no item named 'valid'"),
    ):
        with pytest.raises(ExpressionError, match=message) as caught:
            scope.resolve({"Get": reference})
        assert reference in str(caught.value)


@pytest.mark.parametrize(
    ("condition", "outcome", "reading"),
    [
        ({"Type": "GreaterThanOrEqualTo", "LeftValue": 0.93, "RightValue": {"Get": "Parameters.Threshold"}},
         True, ">="),
        ({"Type": "LessThan", "LeftValue": "0.93", "RightValue": 0.9}, False, "<"),
        ({"Type": "Equals", "LeftValue": {"Get": "Parameters.Name"}, "RightValue": "x"}, True, "=="),
        ({"Type": "In", "QueryValue": {"Get": "Parameters.ImageSize"}, "Values": [32, 48]}, True, "in"),
        ({"Type": "Not", "Condition": {"Type": "Equals", "LeftValue": 1, "RightValue": 1}}, False, "not"),
        (
            {"Type": "Or", "Conditions": [{"Type": "Equals", "LeftValue": 1, "RightValue": 2},
                                          {"Type": "GreaterThan", "LeftValue": 3, "RightValue": 2}]},
            True,
            "or",
        ),
    ],
)  # fmt: skip
def test_conditions(condition: dict[str, Any], outcome: bool, reading: str) -> None:
    result, text = _scope().condition(condition)
    assert result is outcome and reading in text


# --- a definition that cannot run fails before its first step ---------------------------------------------------


def _steps(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from pipelines.definition.check import iter_steps

    return {step["Name"]: step for step in iter_steps(definition)}


def _rename_preprocess_output(definition: dict[str, Any]) -> None:
    outputs = _steps(definition)["Preprocess"]["Arguments"]["ProcessingOutputConfig"]["Outputs"]
    next(o for o in outputs if o["OutputName"] == "train")["OutputName"] = "training"


def _json_get_of_a_missing_property_file(definition: dict[str, Any]) -> None:
    condition = _steps(definition)["CheckAccuracy"]["Arguments"]["Conditions"][0]
    condition["LeftValue"]["Std:JsonGet"]["PropertyFile"] = {"Get": "Steps.Evaluate.PropertyFiles.Missing"}


def _unknown_step_type(definition: dict[str, Any]) -> None:
    _steps(definition)["Evaluate"]["Type"] = "EMR"


def _property_the_local_executor_does_not_fill(definition: dict[str, Any]) -> None:
    _steps(definition)["Deploy"]["Arguments"]["status"] = {"Get": "Steps.Train.SecondaryStatus"}


def _another_function(definition: dict[str, Any]) -> None:
    step = _steps(definition)["Deploy"]
    step["FunctionArn"] = step["FunctionArn"].replace(config.DEPLOY_FUNCTION_NAME, "someone-elses-function")


BROKEN: list[tuple[Callable[[dict[str, Any]], None], list[str]]] = [
    (
        _rename_preprocess_output,  # Tune and Train read it
        ["Train.Arguments", "reference Steps.Preprocess.ProcessingOutputConfig.Outputs['train'].S3Output.S3Uri",
         "Preprocess has no output 'train'"],
    ),
    (
        _json_get_of_a_missing_property_file,
        ["CheckAccuracy", "reference Steps.Evaluate.PropertyFiles.Missing", "names no property file of Evaluate"],
    ),
    (_unknown_step_type, ["Evaluate: step type 'EMR' has no local executor"]),
    (
        _property_the_local_executor_does_not_fill,
        ["Deploy: reference Steps.Train.SecondaryStatus: the local Training executor does not fill SecondaryStatus"],
    ),
    (_another_function, ["Deploy: FunctionArn", "someone-elses-function", "cannot run"]),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("mutate", "expected"), BROKEN, ids=[mutate.__name__.strip("_") for mutate, _ in BROKEN])
def test_a_definition_that_cannot_run_fails_before_any_step(
    demo_build: tuple[dict[str, Any], Any, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mutate: Callable[[dict[str, Any]], None],
    expected: list[str],
) -> None:
    from pipelines.local import runner
    from pipelines.run import main

    definition, artifacts, options = demo_build
    broken = copy.deepcopy(definition)
    mutate(broken)
    monkeypatch.setattr(runner, "build_definition", lambda _options: (broken, artifacts, options))
    workdir = tmp_path / "runs"
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        data = str(_tiny_archive(tmp_path))
        code = main(["local", "--workdir", str(workdir), "--data", data, "--quiet", "--no-tracking"])  # not tracking's

    assert code == 1
    problems = [line for line in err.getvalue().splitlines() if line.startswith("definition problem:")]
    assert any(all(part in line for part in expected) for line in problems), problems
    assert "no step ran" in err.getvalue()
    (run_dir,) = workdir.glob("run-*")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["PipelineExecutionStatus"] == "Failed" and record["PipelineExecutionSteps"] == []
    assert expected[-1] in record["FailureReason"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["definition.json", "run.json"]  # no step folder


@pytest.mark.slow
def test_refused_options_and_parameters_leave_no_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.run import main

    workdir = tmp_path / "runs"
    data = str(_tiny_archive(tmp_path))
    for argv, message in (
        (["--hp", "epochs=x"], "pipeline parameter TuningEpochs must be an integer, got 'x'"),
        (["--param", "ImageSize=big"], "ImageSize takes an integer"),
        (["--param", "ModelApprovalStatus=Yes"], "takes one of PendingManualApproval, Approved, Rejected"),
        (["--param", "Nope=1"], "no such pipeline parameter"),
        (["--epochs", "2", "--param", "TrainingEpochs=3"], "TrainingEpochs is given twice"),
        # SageMaker's forms of numbers: Python's int() would read these as 10, 1 and 3
        (["--param", "MaxTuningJobs=1_0"], "MaxTuningJobs takes an integer in plain ASCII digits"),
        (["--param", "TuningEpochs=\u0661"], "TuningEpochs takes an integer in plain ASCII digits"),
        (["--param", "TrainingEpochs= 3"], "TrainingEpochs takes an integer in plain ASCII digits"),
        (["--param", "AccuracyThreshold=0.5_0"], "AccuracyThreshold takes a number in plain ASCII digits"),
        (["--hp", "epochs=\u0661"], "the default of pipeline parameter TuningEpochs must be an integer, got '\u0661'"),
    ):
        # The first run tracks (its MLflow helper has started when the values are refused); the rest do not,
        # which spares each a helper's start
        tracking = [] if argv[0:2] == ["--hp", "epochs=x"] else ["--no-tracking"]
        assert main(["local", "--workdir", str(workdir), "--data", data, *tracking, *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not workdir.exists() or not list(workdir.glob("run-*"))
    assert not (workdir / "mlflow.db").exists()  # no store either: the helper makes it only when a run asks


def test_numbers_are_read_in_sagemakers_forms_only() -> None:
    from pipelines.definition.names import parse_number
    from pipelines.validation import parameter_argument

    for text, value in (("10", 10), ("-3", -3), ("+2", 2), ("007", 7)):
        assert parse_number(int, text) == value
    for text, value in (("0.5", 0.5), (".5", 0.5), ("1e-3", 0.001), ("2", 2.0), ("3.", 3.0)):
        assert parse_number(float, text) == value
    for kind, text in ((int, "1_0"), (int, "\u0661"), (int, " 3"), (int, "1.0"), (int, ""), (float, "nan"),
                       (float, "inf"), (float, "1_0.5"), (float, "\u0661.\u0665"), (float, "0x1p3")):  # fmt: skip
        with pytest.raises(ValueError, match="is not a plain ASCII decimal"):
            parse_number(kind, text)
    with pytest.raises(Exception, match="expected a whole number in ASCII digits, got '1_6'"):
        parameter_argument("ImageSize", int)("1_6")
    from pipelines.cli.local import _positive_int  # local --epochs, --trials: each becomes an Integer parameter

    with pytest.raises(Exception, match="expected a whole number, got '1_0'"):
        _positive_int("1_0")


def _tiny_archive(folder: Path) -> Path:
    path = folder / "data.zip"
    path.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: never read, nothing runs
    return path


def _execution(definition: dict[str, Any], workdir: Path) -> Any:
    from pipelines.local.cache import StepCache
    from pipelines.local.console import Console
    from pipelines.local.executor import LocalExecution
    from pipelines.local.runner import LocalRunOptions, step_executors
    from pipelines.validation import parameter_values

    return LocalExecution(
        definition,
        executors=step_executors(LocalRunOptions(), workdir, LocalSageMaker(workdir)),
        parameters=parameter_values(definition, []),
        run_dir=workdir / "run-0001",
        store=objectstore.ObjectStore(workdir),
        cache=StepCache(workdir),
        console=Console(io.StringIO()),
        execution_variables={"PipelineExecutionId": "run-0001"},
        region=REGION,
        account_id=ACCOUNT_ID,
        cpus=1,
    )


def test_the_demo_definition_passes_every_check_once_its_objects_are_in_the_store(
    demo_build: tuple[dict[str, Any], Any, Any], tmp_path: Path
) -> None:
    definition, artifacts, _ = demo_build
    execution = _execution(definition, tmp_path)
    problems = execution.problems()  # nothing uploaded yet: the code objects and the input data are missing
    assert any("Preprocess: input 'code'" in p and "holds no object" in p for p in problems), problems
    assert any("Preprocess: input 'data'" in p for p in problems), problems
    assert any("Tune: the training code (sagemaker_submit_directory)" in p for p in problems), problems

    for artifact in artifacts.all():  # what upsert uploads, and the runner puts in the local store
        execution.store.put_bytes(artifact.s3_uri, artifact.body)
    execution.store.put_bytes(execution.scope.parameters["InputDataUri"] + "digits.zip", b"zip")
    assert execution.problems() == []
    order = execution.order()
    for name, upstream in execution.graph.items():
        assert all(order.index(step) < order.index(name) for step in upstream), name


# --- caching ------------------------------------------------------------------------------------------------------


def test_cache_entries_expire_after_the_steps_expire_after(tmp_path: Path) -> None:
    assert cache.parse_duration("P30D") == dt.timedelta(days=30)
    assert cache.parse_duration("PT12H") == dt.timedelta(hours=12)
    assert cache.parse_duration("P1Y2M3DT4H") == dt.timedelta(days=365 + 60 + 3, hours=4)
    with pytest.raises(ValueError, match="ISO 8601"):
        cache.parse_duration("30 days")
    output = tmp_path / "run-0001" / "out.txt"
    output.parent.mkdir()
    output.write_text("x")
    step_cache = cache.StepCache(tmp_path)
    entry = step_cache.store("key", "Preprocess", "run-0001", {"out": output}, {})
    assert step_cache.lookup("key", "P30D") is not None
    old = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=31)).isoformat(timespec="seconds")
    (step_cache.folder / "key.json").write_text(json.dumps({**entry.__dict__, "created": old}))
    assert step_cache.lookup("key", "P30D") is None  # expired
    assert step_cache.lookup("key", None) is not None  # no ExpireAfter: kept


class _SplitWriter:
    """A cacheable step that writes a two-image split to its run folder and to the store; counts its runs."""

    step_type = "Processing"
    provides = frozenset({"ProcessingOutputConfig"})

    def __init__(self) -> None:
        self.runs = 0

    def check(self, step: dict[str, Any], execution: Any) -> list[str]:
        return []

    def cache_key(self, context: Any) -> dict[str, Any]:
        return {"inputs": "the same every run"}

    def run(self, context: Any) -> Any:
        from pipelines.local.executor import StepResult

        self.runs += 1
        split = context.folder / "train"
        split.mkdir(parents=True)
        for name in ("a.jpg", "b.jpg"):
            (split / name).write_bytes(name.encode() * 100)
        stored = context.execution.store.put(f"s3://bucket/{context.execution.run_id}/train", split)
        return StepResult(outputs={"train": split, "s3:train": stored})


def _split_run(workdir: Path, run_id: str, writer: _SplitWriter, lines: list[str]) -> dict[str, Any]:
    from pipelines.local.console import Console
    from pipelines.local.executor import LocalExecution

    arguments = {
        "ProcessingResources": {
            "ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.large", "VolumeSizeInGB": 30}
        },
        "AppSpecification": {"ImageUri": "image"},
        "RoleArn": "arn:aws:iam::111122223333:role/r",
    }
    definition = {
        "Version": "2020-12-01",
        "Parameters": [],
        "Steps": [{"Name": "Split", "Type": "Processing", "Arguments": arguments, "CacheConfig": {"Enabled": True}}],
    }
    execution = LocalExecution(
        definition,
        executors={"Processing": writer},
        parameters={},
        run_dir=workdir / run_id,
        store=objectstore.ObjectStore(workdir),
        cache=cache.StepCache(workdir, report=lines.append),
        console=Console(io.StringIO()),
        execution_variables={"PipelineExecutionId": run_id},
        region=REGION,
        account_id=ACCOUNT_ID,
        cpus=1,
    )
    execution.run()
    return execution.record["PipelineExecutionSteps"][0]


@pytest.mark.slow
def test_a_cache_hit_counts_only_while_its_outputs_hold_the_recorded_files(tmp_path: Path) -> None:
    writer, lines = _SplitWriter(), []
    _split_run(tmp_path, "run-0001", writer, lines)
    assert _split_run(tmp_path, "run-0002", writer, lines)["Local"]["CachedFromRun"] == "run-0001"
    assert writer.runs == 1 and lines == []
    assert sorted(p.name for p in (tmp_path / "run-0002" / "split" / "train").iterdir()) == ["a.jpg", "b.jpg"]

    (tmp_path / "s3" / "bucket" / "run-0001" / "train" / "b.jpg").unlink()  # an image deleted from the cached split
    step = _split_run(tmp_path, "run-0003", writer, lines)
    assert step["Local"]["CachedFromRun"] is None and step["StepStatus"] == "Succeeded" and writer.runs == 2
    assert lines == [
        "cache: Split's outputs from run-0001 changed (s3/bucket/run-0001/train: b.jpg is missing); the step runs again"
    ]
    assert sorted(p.name for p in (tmp_path / "s3" / "bucket" / "run-0003" / "train").iterdir()) == ["a.jpg", "b.jpg"]

    # the entry now points at run-0003's outputs; an image rewritten in place (same size) is caught too
    (tmp_path / "run-0003" / "split" / "train" / "a.jpg").unlink()
    (tmp_path / "run-0003" / "split" / "train" / "a.jpg").write_bytes(b"x" * 500)
    step = _split_run(tmp_path, "run-0004", writer, lines)
    assert step["Local"]["CachedFromRun"] is None and writer.runs == 3
    assert lines[-1].endswith("(run-0003/split/train: a.jpg has other bytes than were recorded (same size)); "
                              "the step runs again")  # fmt: skip

    # an entry an older version wrote, with no file lists, proves nothing: the step runs again
    (entry_file,) = (tmp_path / cache.CACHE_DIR).glob("*.json")
    entry = json.loads(entry_file.read_text())
    del entry["files"]
    entry_file.write_text(json.dumps(entry))
    step = _split_run(tmp_path, "run-0005", writer, lines)
    assert step["Local"]["CachedFromRun"] is None and writer.runs == 4
    assert lines[-1] == (
        "cache: Split's outputs from run-0004 cannot be proven (an older version wrote the entry, with no file "
        "lists); the step runs again"
    )


# --- the deploy function against the local registry ----------------------------------------------------------------


def test_local_deploy_function_answers_a_pending_package_with_awaiting_approval(tmp_path: Path) -> None:
    from pipelines.local.deploy_function import deploy_function
    from pipelines.local.sagemaker import STATE_FILE

    model, report = tmp_path / "model.tar.gz", tmp_path / "evaluation.json"
    model.write_bytes(b"model")
    report.write_text("{}")
    request = {
        "ModelPackageGroupName": config.MODEL_PACKAGE_GROUP,
        "ModelApprovalStatus": "PendingManualApproval",
        "InferenceSpecification": {"Containers": [{"Image": "image", "ModelDataUrl": "s3://b/model.tar.gz"}]},
    }
    workdir = tmp_path / "work"
    local = registry.LocalModelRegistry(workdir, arn)
    package = local.register(request, {"s3://b/model.tar.gz": model})
    function = deploy_function(
        workdir, model_package_group=config.MODEL_PACKAGE_GROUP, endpoint_name="imgclf-test", port=0
    )
    log = tmp_path / "deploy" / "log.txt"
    answer = function({"model_package_arn": package["ModelPackageArn"]}, log)

    assert answer["action"] == "awaiting-approval"
    assert answer["endpoint_name"] == "imgclf-test" and answer["model_package_arn"] == package["ModelPackageArn"]
    assert not (workdir / STATE_FILE).exists()  # no model, endpoint config or endpoint was made
    assert "PendingManualApproval" in log.read_text()  # the handler's log lines, in the step's log
    with pytest.raises(Exception, match="Could not find model package"):
        function({"model_package_arn": package["ModelPackageArn"].replace("/1", "/9")}, log)


def test_the_runner_has_the_last_word_on_a_jobs_environment(tmp_path: Path) -> None:
    """``job_environment`` sees each job's environment as the definition and the extras make it and returns the
    one the job gets (the local runner points jobs that track into its SQLite store at its server of it)."""
    import sys

    from pipelines.local.console import Console
    from pipelines.local.executor import LocalExecution
    from pipelines.local.jobs import ProcessingExecutor

    arguments = {
        "ProcessingResources": {
            "ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.large", "VolumeSizeInGB": 30}
        },
        "AppSpecification": {
            "ImageUri": "image",
            "ContainerEntrypoint": [sys.executable, "-c", "import os; print('uri=' + os.environ['URI'])"],
        },
        "Environment": {"URI": "sqlite:///store.db", "OTHER": "kept"},
        "RoleArn": "arn:aws:iam::111122223333:role/r",
    }
    definition = {
        "Version": "2020-12-01",
        "Parameters": [],
        "Steps": [{"Name": "Report", "Type": "Processing", "Arguments": arguments}],
    }
    seen: list[dict[str, str]] = []

    def environment(env: dict[str, str]) -> dict[str, str]:
        seen.append(dict(env))
        return {**env, "URI": "http://127.0.0.1:1"}

    execution = LocalExecution(
        definition,
        executors={"Processing": ProcessingExecutor()},
        parameters={},
        run_dir=tmp_path / "run-0001",
        store=objectstore.ObjectStore(tmp_path),
        cache=cache.StepCache(tmp_path, enabled=False),
        console=Console(io.StringIO()),
        execution_variables={"PipelineExecutionId": "run-0001"},
        region=REGION,
        account_id=ACCOUNT_ID,
        cpus=1,
        job_environment=environment,
    )
    execution.run()
    assert [(env["URI"], env["OTHER"]) for env in seen] == [("sqlite:///store.db", "kept")]
    assert "uri=http://127.0.0.1:1" in (tmp_path / "run-0001" / "report" / "log.txt").read_text()
