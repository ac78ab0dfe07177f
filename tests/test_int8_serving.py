"""int8 serving behind the evaluation's accuracy gate: the Evaluate step builds the network (ONNX Runtime static
quantisation, calibrated on the validation split), scores it beside fp32 on the test split, and writes the
artifact to register with the precision it chose; the handlers serve what the artifact says, with the switches
that turn int8 off; the serving wheelhouse ships ONNX Runtime into the artifact with no package index needed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _evaluation import GREYS, LOGITS, known_model, model_config, png, write_split
from _wheels import make_wheel
from PIL import Image

from entrypoints import contract, deployment, inference, modeling
from pipelines.cli import wheelhouse
from steps import evaluate

SPLIT = {"cat": ["light", "light"], "dog": ["white", "white"], "fox": ["dark"]}  # all right in fp32
ACCURACY = 1.0
IMAGENET_MEAN_RGB = tuple(round(255 * m) for m in contract.IMAGENET_MEAN)  # normalises to zero: a blank input


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test split, a validation split like it, and a bad calibration set: blank images at the normalisation
    mean, so the input's int8 range is all but empty, light and white clip to the same input, and one of them is
    then always wrong."""
    root = tmp_path_factory.mktemp("splits")
    blank = root / "blank-valid"
    for name in SPLIT:
        (blank / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 36), IMAGENET_MEAN_RGB).save(blank / name / f"blank_{i}.png")
    return {
        "test": write_split(root / "test", SPLIT),
        "valid": write_split(root / "valid", {name: list(GREYS) for name in SPLIT}),
        "blank": blank,
        "model": modeling.save_artifact(known_model(tuple(GREYS)), root / "model", model_config()),
    }


def _evaluate(splits: dict[str, Path], out: Path, *extra: str) -> tuple[dict, dict, Path]:
    """Run the step; (evaluation.json, evaluation_details.json, the served artifact extracted)."""
    argv = ["--model", str(splits["model"]), "--test-dir", str(splits["test"]), "--output-dir", str(out)]
    assert evaluate.main([*argv, "--workers", "0", "--valid-dir", str(splits["valid"]), *extra]) == 0
    served = out.parent / f"{out.name}-served"
    evaluate.safe_extract(out / evaluate.SERVED_MODEL_ARCHIVE, served)
    details = json.loads((out / evaluate.DETAILS_FILE).read_text())
    return json.loads((out / contract.EVALUATION_FILE).read_text()), details, served


@pytest.fixture(scope="module")
def int8_served(splits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    return _evaluate(splits, tmp_path_factory.mktemp("good") / "evaluation")


def _answers(serving: inference.ServingModel) -> dict[str, int]:
    images = np.stack([serving.preprocess(png(colour)) for colour in GREYS])
    return dict(zip(GREYS, serving.probabilities(images).argmax(axis=1).tolist(), strict=True))


@pytest.fixture()
def auto_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(contract.ENV_INFERENCE_PRECISION, raising=False)
    monkeypatch.delenv(contract.ENV_INFERENCE_RUNTIME, raising=False)
    monkeypatch.setenv(contract.ENV_INFERENCE_THREADS, "1")


# --- the gate ---------------------------------------------------------------------------------------------------


@pytest.mark.slow  # the module's evaluation with its int8 build: about 11 s on 2 cores
def test_int8_is_served_when_its_test_accuracy_is_within_a_point_of_fp32(int8_served, auto_precision) -> None:
    report, details, served = int8_served
    serving = report[evaluate.SERVING_SECTION]
    assert serving["precision"] == "int8" and "within the 1-point gate" in serving["reason"]
    assert serving["fp32_accuracy"] == pytest.approx(ACCURACY) and serving["int8_accuracy"] == pytest.approx(ACCURACY)
    assert serving["int8_top1_agreement"] == 1.0 and serving["max_accuracy_drop_points"] == 1.0
    assert report["multiclass_classification_metrics"]["accuracy"]["value"] == pytest.approx(ACCURACY)
    assert details["int8"]["built"] and details["int8"]["calibration_images"] == len(GREYS) * len(SPLIT)
    assert details["model"]["precision"] == "int8" and details["model"]["runtime"] == "onnxruntime-int8"
    assert (served / contract.INT8_MODEL_FILE).is_file()
    assert inference.read_serving_decision(served) == serving  # the decision travels with the bytes

    loaded = inference.load_serving_model(served)  # what the endpoint does with the registered artifact
    assert (loaded.precision, loaded.runtime) == ("int8", "onnxruntime-int8")
    assert _answers(loaded) == {colour: int(np.argmax(LOGITS[colour])) for colour in GREYS}
    health = json.loads(deployment.ImageClassifier(str(served), threads=1).health().body)
    assert (health["precision"], health["runtime"]) == ("int8", "onnxruntime-int8")


@pytest.mark.slow
def test_a_bad_calibration_set_fails_the_gate_and_the_served_artifact_runs_fp32(
    splits, tmp_path: Path, auto_precision, capsys: pytest.CaptureFixture
) -> None:
    report, details, served = _evaluate(splits, tmp_path / "evaluation", "--valid-dir", str(splits["blank"]))
    serving = report[evaluate.SERVING_SECTION]
    assert details["int8"]["built"]  # built and scored, then refused
    assert serving["precision"] == "fp32" and "over the 1-point gate: fp32 is served" in serving["reason"]
    assert serving["int8_accuracy"] < serving["fp32_accuracy"] - 0.01
    assert f"serving precision: fp32: {serving['reason']}" in capsys.readouterr().out  # and the log says why
    assert report["multiclass_classification_metrics"]["accuracy"]["value"] == pytest.approx(ACCURACY)  # fp32's
    assert not (served / contract.INT8_MODEL_FILE).exists()
    loaded = inference.load_serving_model(served)
    assert loaded.precision == "fp32" and not loaded.runtime.endswith("int8")
    assert _answers(loaded) == {colour: int(np.argmax(LOGITS[colour])) for colour in GREYS}


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (("--int8", "off"), "int8 is turned off (--int8 off)"),
        (("--serving-device", "gpu"), "int8 is off on GPU instances"),
    ],
)
@pytest.mark.slow
def test_the_switch_and_gpu_serving_register_fp32_without_building_int8(
    splits, tmp_path: Path, flags: tuple[str, ...], reason: str
) -> None:
    report, details, served = _evaluate(splits, tmp_path / "evaluation", *flags)
    assert report[evaluate.SERVING_SECTION]["precision"] == "fp32"
    assert report[evaluate.SERVING_SECTION]["reason"].startswith(reason)
    assert not details["int8"]["built"] and not (served / contract.INT8_MODEL_FILE).exists()


def test_the_gate_allows_exactly_the_configured_drop() -> None:
    assert evaluate.int8_gate(0.90, 0.89, 1.0)[0]  # 1.0 point
    assert not evaluate.int8_gate(0.90, 0.8899, 1.0)[0]
    assert evaluate.int8_gate(0.90, 0.92, 1.0)[0]  # int8 better: served
    passed, reason = evaluate.int8_gate(0.90, 0.85, 2.0)
    assert not passed and "+5.00 points of drop, over the 2-point gate" in reason


# --- at load time ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_inference_precision_fp32_turns_int8_off_and_int8_insists(
    int8_served, auto_precision, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = int8_served[2]
    monkeypatch.setenv(contract.ENV_INFERENCE_PRECISION, "fp32")
    assert inference.load_serving_model(served).precision == "fp32"
    monkeypatch.setenv(contract.ENV_INFERENCE_PRECISION, "int4")
    with pytest.raises(ValueError, match="INFERENCE_PRECISION='int4': choose auto or one of fp32, int8"):
        inference.load_serving_model(served)
    fp32_only = modeling.save_artifact(known_model(tuple(GREYS)), served.parent / "fp32-only", model_config())
    monkeypatch.setenv(contract.ENV_INFERENCE_PRECISION, "int8")
    with pytest.raises(RuntimeError, match=r"int8 was asked for but cannot run: .* holds no int8 network"):
        inference.load_serving_model(fp32_only)


@pytest.mark.slow  # the module's evaluation with its int8 build: about 11 s on 2 cores
def test_without_onnxruntime_an_int8_artifact_serves_fp32_and_says_why(
    int8_served, auto_precision, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What AWS's Ray Serve image does when the artifact ships no onnxruntime wheels."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with caplog.at_level(logging.WARNING, logger=inference.logger.name):
        loaded = inference.load_serving_model(int8_served[2])
    assert loaded.precision == "fp32" and loaded.runtime in ("torchscript", "eager")
    assert "the evaluation chose int8, but it cannot run here: onnxruntime is not installed" in caplog.text
    assert "serving fp32" in caplog.text and "cannot run here" in loaded.precision_reason
    monkeypatch.setenv(contract.ENV_INFERENCE_PRECISION, "int8")
    with pytest.raises(RuntimeError, match="int8 was asked for but cannot run"):
        inference.load_serving_model(int8_served[2])


@pytest.mark.slow  # the module's evaluation with its int8 build: about 11 s on 2 cores
def test_int8_is_off_on_a_gpu(int8_served, auto_precision, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    choice = inference.choose_precision(int8_served[2])
    assert choice.precision == "fp32" and "off on GPU instances" in choice.reason


# --- ONNX Runtime without a package index ------------------------------------------------------------------------


def _pip_install_offline(requirements: Path, target: Path) -> subprocess.CompletedProcess:
    """What the serving container does at every start, here with no package index or pip configuration."""
    environment = {**os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--target", str(target)]
    return subprocess.run([*command, "-r", str(requirements)], env=environment, capture_output=True, text=True)


@pytest.mark.slow
def test_the_wheelhouse_ships_in_an_int8_artifact_and_installs_with_no_index(
    splits, tmp_path: Path, auto_precision
) -> None:
    """The serving wheels, built for this Python (the real ones are for the Ray image's 3.13), go into code/wheels
    with requirements that name only them; the same file for another Python installs nothing and fails nothing."""
    source = tmp_path / "index"
    make_wheel(source, "runtime_probe", "1.0", "py3-none-any", {"runtime_probe/__init__.py": "READY = True\n"})
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = wheelhouse.WheelTarget("serving", here, ("any",), ("runtime_probe==1.0",), writes_requirements=True)
    house = tmp_path / "wheelhouse"
    wheels = wheelhouse.build(house, (target,), find_links=source)
    assert [wheel.name for wheel in wheels] == ["runtime_probe-1.0-py3-none-any.whl"]

    report, _, served = _evaluate(splits, tmp_path / "evaluation", "--wheels", str(house))
    assert report[evaluate.SERVING_SECTION]["runtime_wheels"] == ["runtime_probe-1.0-py3-none-any.whl"]
    assert "note" not in report[evaluate.SERVING_SECTION]
    requirements = served / contract.CODE_DIR / "requirements.txt"
    assert (served / contract.CODE_DIR / contract.WHEELS_DIR / wheels[0].name).is_file()
    assert "--no-index" in requirements.read_text() and "--find-links wheels" in requirements.read_text()
    result = _pip_install_offline(requirements, tmp_path / "installed")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "installed" / "runtime_probe" / "__init__.py").is_file()

    # The shipped file's markers are the Ray image's (Python 3.13, x86_64): another Python skips every line.
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text(wheelhouse.SERVING.requirements_text())
    assert '; python_version == "3.13" and platform_machine == "x86_64"' in elsewhere.read_text()
    if here != wheelhouse.SERVING.python_version:
        result = _pip_install_offline(elsewhere, tmp_path / "skipped")
        assert result.returncode == 0, result.stderr
        assert not (tmp_path / "skipped").exists() or not any((tmp_path / "skipped").iterdir())


@pytest.mark.slow
def test_the_wheelhouse_command_fetches_each_images_wheels_for_its_python_and_platform(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Against a local index of wheels named as PyPI names them: only the ones for each image's Python are taken."""
    index = tmp_path / "index"
    for target in wheelhouse.TARGETS:
        python = "cp" + target.python_version.replace(".", "")
        for requirement in target.downloads():
            name, _, version = requirement.partition("==")
            name = name.replace("-", "_")
            tag = f"{python}-{python}-manylinux_2_28_x86_64"
            make_wheel(index, name, version or "1.0", tag, {f"{name}/__init__.py": ""})
    make_wheel(index, "onnxruntime", "1.32.0", "cp311-cp311-manylinux_2_28_x86_64", {"onnxruntime/__init__.py": ""})
    from pipelines.run import main

    assert main(["wheelhouse", "--output", str(tmp_path / "house"), "--find-links", str(index)]) == 0
    assert f"wrote {7 + len(wheelhouse.TRACKING.downloads())} wheels" in capsys.readouterr().out
    serving = sorted(path.name for path in (tmp_path / "house" / "serving").iterdir())
    assert serving == [
        "flatbuffers-25.12.19-cp313-cp313-manylinux_2_28_x86_64.whl",
        "onnxruntime-1.32.0-cp313-cp313-manylinux_2_28_x86_64.whl",
        "requirements.txt",
    ]
    assert len(list((tmp_path / "house" / evaluate.WHEELS_FOR_EVALUATION).glob("*-cp312-*.whl"))) == 5
    assert main(["wheelhouse", "--output", str(tmp_path / "none"), "--find-links", str(tmp_path / "empty")]) == 2
    assert "pip could not download the evaluation wheels" in capsys.readouterr().err


@pytest.mark.slow
def test_without_onnx_the_step_installs_the_wheelhouse_or_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # as in the SageMaker training image
    monkeypatch.setattr(sys, "path", list(sys.path))  # the step puts its scratch install first; undone afterwards
    with pytest.raises(evaluate.EvaluationError, match="no wheelhouse gives them: pass --wheels"):
        evaluate.quantization_tools(None, tmp_path)
    house = tmp_path / "wheelhouse"
    make_wheel(house / evaluate.WHEELS_FOR_EVALUATION, "onnx_probe", "1.0", "py3-none-any", {"onnx_probe.py": ""})
    # pip installs the wheels with no index; onnx (still hidden here) then does not import, and the step says so
    with pytest.raises(evaluate.EvaluationError, match="installed but do not import here"):
        evaluate.quantization_tools(house, tmp_path)
    assert (tmp_path / "site-packages" / "onnx_probe.py").is_file() and sys.path[0] == str(tmp_path / "site-packages")


@pytest.mark.slow
def test_the_served_archive_is_the_same_bytes_for_the_same_evaluation(splits, tmp_path: Path) -> None:
    """So that registering the same evaluated model again finds the version it already is."""
    for name in ("first", "second"):
        assert _evaluate(splits, tmp_path / name)[0][evaluate.SERVING_SECTION]["precision"] == "int8"
    first, second = ((tmp_path / n / evaluate.SERVED_MODEL_ARCHIVE).read_bytes() for n in ("first", "second"))
    assert first == second
    with tarfile.open(tmp_path / "first" / evaluate.SERVED_MODEL_ARCHIVE) as archive:
        assert all(member.mtime == 0 for member in archive.getmembers())


@pytest.mark.slow
def test_local_no_int8_builds_the_definition_whose_evaluate_builds_no_int8(tmp_path: Path) -> None:
    from pipelines.local import runner
    from pipelines.run import build_parser

    args = build_parser().parse_args(["local", "--no-int8", "--workdir", str(tmp_path)])
    definition, _, _ = runner.build_definition(runner.LocalRunOptions(int8_serving=args.int8_serving))
    (evaluate_step,) = [step for step in definition["Steps"] if step["Name"] == "Evaluate"]
    flags = evaluate_step["Arguments"]["AppSpecification"]["ContainerArguments"]
    assert flags[flags.index("--int8") + 1] == "off"
