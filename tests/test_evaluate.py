"""The evaluation step: known answers from a model whose predictions are set by hand, and the report format."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from _evaluation import CLASSES, LOGITS, SPLIT, known_model, model_config, png
from PIL import Image
from sklearn import metrics as skm

from entrypoints import contract, modeling
from steps import evaluate

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = 5 / 7
TOP_5_ACCURACY = 6 / 7
CONFUSION = {"cat": {"cat": 2, "dog": 1}, "dog": {"dog": 1, "fox": 1}, "fox": {"fox": 2}}
SCALARS = (
    "accuracy",
    "top_5_accuracy",
    "weighted_recall",
    "weighted_precision",
    "weighted_f0_5",
    "weighted_f1",
    "weighted_f2",
    "accuracy_best_constant_classifier",
    "weighted_recall_best_constant_classifier",
    "weighted_precision_best_constant_classifier",
    "weighted_f0_5_best_constant_classifier",
    "weighted_f1_best_constant_classifier",
    "weighted_f2_best_constant_classifier",
)


@pytest.fixture(scope="module")
def model_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    artifact = modeling.save_artifact(known_model(), folder / "artifact", model_config())
    archive = folder / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(artifact.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(artifact)), recursive=False)
    return archive


@pytest.fixture()
def test_split(tmp_path: Path) -> Path:
    split = tmp_path / "test"
    for folder, colours in SPLIT.items():
        (split / folder).mkdir(parents=True)
        for i, colour in enumerate(colours):
            (split / folder / f"{colour}_{i}.png").write_bytes(png(colour))
    (split / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (split / contract.LABELS_FILE).write_text(json.dumps(CLASSES))
    return split


@pytest.fixture()
def eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager runtime loads fastest; the subprocess test runs the default (fastest available) one."""
    monkeypatch.setenv(contract.ENV_INFERENCE_RUNTIME, "eager")


def _follow(document: dict, dotted_path: str):
    for key in dotted_path.split("."):
        document = document[key]
    return document


@pytest.mark.slow
def test_known_answers_and_the_model_quality_format(
    model_archive: Path, test_split: Path, tmp_path: Path, eager: None
) -> None:
    output = tmp_path / "evaluation"
    assert (
        evaluate.main(
            [
                "--model",
                str(model_archive),
                "--test-dir",
                str(test_split),
                "--output-dir",
                str(output),
                "--workers",
                "0",
            ]
        )
        == 0
    )

    report = json.loads((output / contract.EVALUATION_FILE).read_text())
    assert list(report) == ["multiclass_classification_metrics", evaluate.SERVING_SECTION]
    serving = report[evaluate.SERVING_SECTION]  # no validation split here: fp32 only, and the reason
    assert serving["precision"] == "fp32" and "--valid-dir" in serving["reason"]
    assert serving["fp32_accuracy"] == pytest.approx(ACCURACY) and serving["int8_accuracy"] is None
    metrics = report["multiclass_classification_metrics"]
    assert _follow(report, contract.ACCURACY_JSON_PATH) == pytest.approx(ACCURACY)  # what the ConditionStep reads
    assert metrics["top_5_accuracy"]["value"] == pytest.approx(TOP_5_ACCURACY)
    for name in SCALARS:
        assert metrics[name]["standard_deviation"] == "NaN"  # fewer than 200 images
        assert isinstance(metrics[name]["value"], float)
    expected_matrix = {a: {p: CONFUSION.get(a, {}).get(p, 0) for p in CLASSES} for a in CLASSES}
    assert metrics["confusion_matrix"] == expected_matrix

    actual = [CLASSES.index(f) for f, colours in SPLIT.items() for _ in colours]
    predicted = [int(np.argmax(LOGITS[c])) for colours in SPLIT.values() for c in colours]
    labels = list(range(len(CLASSES)))
    for name, beta in (("weighted_f0_5", 0.5), ("weighted_f1", 1.0), ("weighted_f2", 2.0)):
        expected = skm.fbeta_score(actual, predicted, beta=beta, labels=labels, average="weighted", zero_division=0)
        assert metrics[name]["value"] == pytest.approx(expected)
    assert metrics["weighted_precision"]["value"] == pytest.approx(
        skm.precision_score(actual, predicted, labels=labels, average="weighted", zero_division=0)
    )
    assert metrics["weighted_recall"]["value"] == pytest.approx(ACCURACY)
    assert metrics["accuracy_best_constant_classifier"]["value"] == pytest.approx(3 / 7)  # always "cat"
    per_class_recall = skm.recall_score(actual, predicted, labels=labels, average=None, zero_division=0)
    assert {k: v["value"] for k, v in metrics["recall_per_class"].items()} == pytest.approx(
        dict(zip(CLASSES, per_class_recall, strict=True))
    )
    assert metrics["precision_per_class"]["fox"]["value"] == pytest.approx(2 / 3)
    assert metrics["f1_per_class"]["cat"]["value"] == pytest.approx(0.8)

    details = json.loads((output / evaluate.DETAILS_FILE).read_text())
    assert details["images_evaluated"] == 7 and details["images_skipped"] == 1
    assert details["skipped"][0]["path"].endswith("broken.jpg")
    assert "is truncated" in details["skipped"][0]["reason"]  # JPEG magic, then nothing
    assert details["classes_without_test_images"] == ["owl", "elk", "yak", "emu"]
    assert sorted(m["path"].rsplit("/", 1)[-1] for m in details["misclassified"]) == ["blue_1.png", "green_2.png"]
    with Image.open(output / contract.CONFUSION_MATRIX_IMAGE) as picture:
        assert picture.format == "PNG" and min(picture.size) > 500
    assert sorted(p.name for p in output.iterdir()) == sorted(
        [contract.EVALUATION_FILE, contract.CONFUSION_MATRIX_IMAGE, evaluate.DETAILS_FILE, "model.tar.gz"]
    )
    with tarfile.open(output / evaluate.SERVED_MODEL_ARCHIVE) as served:  # the artifact Register registers
        names = set(served.getnames())
        assert {contract.WEIGHTS_FILE, "code/inference.py", contract.SERVING_DECISION_FILE} <= names
        assert json.load(served.extractfile(contract.SERVING_DECISION_FILE)) == serving


@pytest.mark.slow
def test_runs_with_nothing_but_its_own_file_and_the_artifact(
    model_archive: Path, test_split: Path, tmp_path: Path
) -> None:
    """As in the processing container: only steps/evaluate.py is shipped; the model's code/ does the rest."""
    alone = tmp_path / "container"
    alone.mkdir()
    shutil.copy(ROOT / "steps" / "evaluate.py", alone / "evaluate.py")
    (tmp_path / "input").mkdir()
    shutil.copy(model_archive, tmp_path / "input" / "model.tar.gz")  # a folder holding model.tar.gz
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", contract.ENV_INFERENCE_RUNTIME)}
    probe = (
        "import sys, runpy\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n"
        "    print('entrypoints imported:', any(m.startswith('entrypoints') for m in sys.modules))\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            "evaluate.py",
            "--model",
            str(tmp_path / "input"),
            "--test-dir",
            str(test_split),
            "--output-dir",
            str(tmp_path / "out"),
            "--workers",
            "2",
            "--batch-size",
            "3",
        ],
        cwd=alone,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "entrypoints imported: False" in result.stdout
    assert "fp32 on onnxruntime" in result.stdout
    report = json.loads((tmp_path / "out" / contract.EVALUATION_FILE).read_text())
    assert _follow(report, contract.ACCURACY_JSON_PATH) == pytest.approx(ACCURACY)
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr


@pytest.mark.slow
def test_a_test_split_of_other_classes_is_refused_and_nothing_is_written(
    model_archive: Path, test_split: Path, tmp_path: Path, eager: None, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "evaluation"
    (test_split / contract.LABELS_FILE).write_text(json.dumps(["airplane", "car"]))
    argv = ["--model", str(model_archive), "--test-dir", str(test_split), "--output-dir", str(output), "--workers", "0"]
    assert evaluate.main(argv) == 1
    assert "differ from the model's 7" in capsys.readouterr().err
    (test_split / contract.LABELS_FILE).unlink()
    (test_split / "airplane").mkdir()
    assert evaluate.main(argv) == 1
    assert "class folders the model does not know: ['airplane']" in capsys.readouterr().err
    assert not output.exists() or not any(output.iterdir())


def test_standard_deviations_from_200_images_and_values_match_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    names = [f"c{i}" for i in range(6)]
    actual = rng.integers(0, 6, 400)
    predicted = np.where(rng.random(400) < 0.7, actual, rng.integers(0, 6, 400))
    top_hit = (predicted == actual) | (rng.random(400) < 0.5)
    metrics = evaluate.model_quality_report(actual, predicted, top_hit, names, seed=3)[
        "multiclass_classification_metrics"
    ]
    assert metrics["accuracy"]["value"] == pytest.approx(skm.accuracy_score(actual, predicted))
    assert metrics["weighted_f1"]["value"] == pytest.approx(skm.f1_score(actual, predicted, average="weighted"))
    assert metrics["top_5_accuracy"]["value"] == pytest.approx(top_hit.mean())
    for name in SCALARS:
        assert isinstance(metrics[name]["standard_deviation"], float)
    assert 0 < metrics["accuracy"]["standard_deviation"] < 0.05
    assert metrics["precision_per_class"]["c0"]["standard_deviation"] == "NaN"
    matrix = skm.confusion_matrix(actual, predicted)
    assert [[metrics["confusion_matrix"][a][p] for p in names] for a in names] == matrix.tolist()


def _tar_with(path: Path, name: str, *, symlink_to: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        member = tarfile.TarInfo(name)
        if symlink_to is None:
            payload = b"payload"
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
        else:
            member.type = tarfile.SYMTYPE
            member.linkname = symlink_to
            tar.addfile(member)
    return path


@pytest.mark.parametrize(
    ("name", "symlink_to", "message"),
    [
        ("../escaped.txt", None, "points outside the folder"),
        ("/tmp/absolute-escape.txt", None, "points outside the folder"),
        ("code/link", "/etc/passwd", "a link or special file"),
    ],
)
def test_archives_cannot_write_outside_their_folder(
    tmp_path: Path, name: str, symlink_to: str | None, message: str
) -> None:
    archive = _tar_with(tmp_path / "model.tar.gz", name, symlink_to=symlink_to)
    target = tmp_path / "deep" / "extract"
    with pytest.raises(evaluate.EvaluationError, match=message):
        evaluate.safe_extract(archive, target)
    assert not (tmp_path / "deep" / "escaped.txt").exists()
    assert not Path("/tmp/absolute-escape.txt").exists()
    assert not any(target.rglob("*"))


@pytest.mark.slow
def test_the_model_argument_takes_an_archive_a_folder_with_one_or_an_extracted_artifact(
    model_archive: Path, tmp_path: Path
) -> None:
    extracted = evaluate.resolve_model_dir(model_archive, tmp_path / "a")
    assert (extracted / contract.MODEL_CONFIG_FILE).is_file() and (extracted / "code" / "inference.py").is_file()
    assert evaluate.resolve_model_dir(extracted, tmp_path / "b") == extracted
    assert (evaluate.resolve_model_dir(model_archive.parent, tmp_path / "c") / contract.WEIGHTS_FILE).is_file()
    with pytest.raises(evaluate.EvaluationError, match="does not exist"):
        evaluate.resolve_model_dir(tmp_path / "nowhere", tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(evaluate.EvaluationError, match=r"neither model_config\.json nor exactly one"):
        evaluate.resolve_model_dir(tmp_path / "empty", tmp_path / "e")


@pytest.mark.slow
def test_the_picture_labels_every_one_of_133_classes(tmp_path: Path) -> None:
    names = [f"{i:03d}.Breed_name_{i}" for i in range(1, 134)]
    rng = np.random.default_rng(0)
    matrix = np.diag(rng.integers(3, 9, 133)) + (rng.random((133, 133)) < 0.02)
    path = tmp_path / "cm.png"
    evaluate.plot_confusion_matrix(matrix, names, "133 classes", path)
    with Image.open(path) as picture:
        width, height = picture.size
    assert width >= 133 * 20 and height >= 133 * 20  # at least 20 px per row and column


def test_a_missing_matplotlib_is_named_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert (
        evaluate.main(
            ["--model", str(tmp_path / "nowhere"), "--test-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")]
        )
        == 1
    )
    assert "matplotlib is needed to draw confusion_matrix.png" in capsys.readouterr().err


def test_tracking_starts_beside_the_evaluation_and_its_failure_reaches_whoever_waits() -> None:
    """evaluate.Background runs the tracker's start (MLflow's import, or its install) beside the evaluation."""
    gate = threading.Event()
    started = evaluate.Background(lambda value: gate.wait(5) and value + 1, 41)
    assert not started.done()  # the evaluation goes on meanwhile
    gate.set()
    assert started.result() == 42 and started.done()
    failed = evaluate.Background(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result()
