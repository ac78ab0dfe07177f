"""Evaluation step: score the trained model on the test split, in the format the model registry shows.

Runs as the pipeline's ProcessingStep (inputs ``/opt/ml/processing/model/model.tar.gz`` and the ``test``
channel; output ``/opt/ml/processing/evaluation``) and as a local command::

    python steps/evaluate.py --model runs/model.tar.gz --test-dir data/test --output-dir runs/evaluation

What is evaluated is what is deployed: the artifact is extracted (refusing any member that would land outside
the target folder, and any link) and its *own* ``code/inference.py`` loads the network and preprocesses each
test image, exactly as the endpoint will. Nothing from this repository's ``entrypoints/`` is imported, so the
processing container needs only this file.

Writes, all or nothing:

- ``evaluation.json``: SageMaker's multiclass model-quality format (what Model Monitor computes and the
  registry's ``ModelMetrics`` renders)::

    {"multiclass_classification_metrics": {
        "accuracy": {"value": 0.91, "standard_deviation": 0.004},
        "top_5_accuracy": {...}, "weighted_precision": {...}, "weighted_recall": {...},
        "weighted_f0_5": {...}, "weighted_f1": {...}, "weighted_f2": {...},
        "accuracy_best_constant_classifier": {...}, "weighted_*_best_constant_classifier": {...},
        "precision_per_class": {"<class>": {"value": 0.9, "standard_deviation": "NaN"}, ...},
        "recall_per_class": {...}, "f1_per_class": {...},
        "confusion_matrix": {"<actual class>": {"<predicted class>": 12, ...}, ...}}}

  Standard deviations follow Model Monitor's method (five random 80% subsamples) when there are at least 200
  images, else ``"NaN"``. Weighted metrics weight each class by its number of test images. A class with no
  predictions (or no images) has precision (or recall) 0, as scikit-learn's ``zero_division=0`` gives.
- ``confusion_matrix.png``: the matrix as a picture, rows normalised per actual class, every class labelled.
- ``evaluation_details.json``: counts, the images that could not be read (each with its reason), classes with
  no test images, the runtime used, parameters and timing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

DEFAULT_MODEL = "/opt/ml/processing/model"
DEFAULT_TEST_DIR = "/opt/ml/processing/test"
DEFAULT_VALID_DIR = "/opt/ml/processing/valid"
DEFAULT_OUTPUT_DIR = "/opt/ml/processing/evaluation"
DETAILS_FILE = "evaluation_details.json"
# The artifact the step writes beside its reports, for the Register step: the one it evaluated (SageMaker's name).
SERVED_MODEL_ARCHIVE = "model.tar.gz"
# evaluation.json's section on the served precision (outside the model-quality section, which keeps its format).
SERVING_SECTION = "serving"
# Folders of a serving wheelhouse (``python -m pipelines.run wheelhouse``): wheels this step installs for itself
# when the container lacks onnx/onnxruntime, and wheels (with their requirements.txt) for the serving image.
WHEELS_FOR_EVALUATION = "evaluation"
WHEELS_FOR_SERVING = "serving"
WHEELS_FOR_TRACKING = "tracking"  # the MLflow client and what it needs, with its requirements.txt
# How long installing the MLflow client may take (pip's own per-request timeout and retries are bounded too): past
# it the job goes on untracked, as with any other tracking failure.
TRACKING_INSTALL_SECONDS = 180
TRACKING_CLIENT = "mlflow"  # the module whose absence makes the step install the client
# --calibration-method -> onnxruntime.quantization.CalibrationMethod
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# Modules of the artifact's code/ folder; imported fresh from each artifact and put back afterwards.
SERVING_MODULES = ("inference", "modeling", "transforms", "contract")
TOP_K = 5
STD_MIN_SAMPLES = 200  # Model Monitor reports standard deviations only from 200 samples on
STD_DRAWS = 5
STD_FRACTION = 0.8
NAN = "NaN"
# Experiment tracking (entrypoints/tracking.py), on when MLFLOW_TRACKING_URI is set. The module ships as the
# Evaluate step's "tracking" input beside the code input (/opt/ml/processing/input/{code,tracking}); in a
# checkout it is entrypoints/tracking.py. evaluation.json then gets a section naming the run, which the Register
# step copies into the model package's CustomerMetadataProperties.
TRACKING_SECTION = "tracking"
TRACKING_RUN_ID = "mlflow_run_id"
NOT_TRACKED = "not-tracked"


class EvaluationError(RuntimeError):
    """Inputs the step cannot evaluate; the message says what is wrong and what to do."""


# --- arguments --------------------------------------------------------------------------------------------------------


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return min(4, cpus) if cpus > 1 else 0


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _points(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 100:
        raise argparse.ArgumentTypeError(f"must be a number of accuracy points from 0 to 100, got {value}")
    return number


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a model artifact on the test split; write evaluation.json and confusion_matrix.png."
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a model.tar.gz, a folder holding one, or an extracted artifact folder (default: %(default)s)",
    )
    parser.add_argument(
        "--test-dir",
        default=DEFAULT_TEST_DIR,
        help="the test split: <class>/<image> folders and labels.json (default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir", default=DEFAULT_OUTPUT_DIR, help="where the reports are written (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument(
        "--workers",
        type=_non_negative_int,
        default=_default_workers(),
        help="image-decoding worker processes, 0 decodes in the main process (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsamples behind standard deviations")
    group = parser.add_argument_group("int8 serving: built here, served only when the test split says it is good")
    group.add_argument(
        "--int8",
        choices=("on", "off"),
        default="on",
        help="quantise the network to int8 (ONNX Runtime, static, calibrated on --valid-dir), score it beside fp32 "
        "on the test split, and serve it when it passes the gate (default: %(default)s)",
    )
    group.add_argument(
        "--serving-device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="what the endpoint runs on: int8 is off on GPU instances (default: %(default)s)",
    )
    group.add_argument(
        "--valid-dir",
        default=DEFAULT_VALID_DIR,
        help="the validation split, whose images calibrate int8 (default: %(default)s)",
    )
    group.add_argument(
        "--calibration-images",
        type=_positive_int,
        default=200,
        help="validation images that calibrate int8, taken from each class in turn (default: %(default)s)",
    )
    group.add_argument(
        "--calibration-method",
        choices=tuple(CALIBRATION_METHODS),
        default="minmax",
        help="how activation ranges are set from the calibration images (default: %(default)s)",
    )
    group.add_argument(
        "--int8-max-drop",
        type=_points,
        default=1.0,
        help="int8 is served only when its test accuracy is at most this many points below fp32's "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--wheels",
        default=None,
        help="a serving wheelhouse: its evaluation/ wheels are installed here when onnx or onnxruntime is missing, "
        "its tracking/ wheels when MLflow is (and a tracking URI is set), its serving/ wheels ship in the served "
        "artifact (default: none)",
    )
    return parser


# --- the artifact -----------------------------------------------------------------------------------------------------


def safe_extract(archive: Path, destination: Path) -> None:
    """Extract a tar archive, refusing members that would land outside ``destination`` and any links."""
    destination = destination.resolve()
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                target = (destination / member.name).resolve()
                if target != destination and destination not in target.parents:
                    raise EvaluationError(f"{archive} holds {member.name!r}, which points outside the folder: refused")
                if not (member.isfile() or member.isdir()):
                    raise EvaluationError(f"{archive} holds {member.name!r}, a link or special file: refused")
            for member in members:
                target = (destination / member.name).resolve()
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - isfile() members always have data
                    raise EvaluationError(f"{archive}: cannot read {member.name!r}")
                with source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
    except (tarfile.TarError, EOFError) as error:
        raise EvaluationError(f"{archive} is not a readable tar archive ({error}): pass the model.tar.gz") from error


def resolve_model_dir(model: Path, scratch: Path) -> Path:
    """The extracted artifact folder for ``--model`` (an archive, a folder holding one, or an artifact)."""
    if model.is_file():
        safe_extract(model, scratch / "model")
        return scratch / "model"
    if not model.is_dir():
        raise EvaluationError(f"--model {model} does not exist")
    if (model / "model_config.json").is_file():
        return model
    archives = sorted(model.glob("*.tar.gz")) + sorted(model.glob("*.tgz"))
    if len(archives) != 1:
        raise EvaluationError(
            f"--model {model} holds neither model_config.json nor exactly one .tar.gz archive "
            f"(found {[a.name for a in archives]}): pass the training job's model.tar.gz"
        )
    safe_extract(archives[0], scratch / "model")
    return scratch / "model"


@contextlib.contextmanager
def serving_code(model_dir: Path) -> Iterator[ModuleType]:
    """Import the artifact's own ``code/inference.py`` (and its siblings); undo the import afterwards."""
    code_dir = model_dir / "code"
    if not (code_dir / "inference.py").is_file():
        raise EvaluationError(
            f"{model_dir} has no code/inference.py: the artifact was not saved by modeling.save_artifact, "
            "so there are no serving handlers to evaluate"
        )
    saved = {name: sys.modules.pop(name) for name in SERVING_MODULES if name in sys.modules}
    sys.path.insert(0, str(code_dir))
    try:
        yield importlib.import_module("inference")
    finally:
        sys.path.remove(str(code_dir))
        for name in SERVING_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


# --- the test split ---------------------------------------------------------------------------------------------------


def scan_test_split(
    test_dir: Path, class_names: Sequence[str], labels_file: str, flag: str = "--test-dir"
) -> tuple[list, list[dict]]:
    """``[(path, class index)]`` for every file in a class folder, and the entries that are not images of it."""
    if not test_dir.is_dir():
        raise EvaluationError(f"{flag} {test_dir} does not exist or is not a folder")
    labels_path = test_dir / labels_file
    if labels_path.is_file():
        try:
            labels = json.loads(labels_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise EvaluationError(f"{labels_path} is not valid JSON: {error}") from error
        if labels != list(class_names):
            raise EvaluationError(
                f"{labels_path} lists {len(labels) if isinstance(labels, list) else '?'} classes that differ from "
                f"the model's {len(class_names)} (first model classes: {list(class_names)[:3]}): evaluate the model "
                "on the test split of the data it was trained on"
            )
    index = {name: i for i, name in enumerate(class_names)}
    samples: list[tuple[str, int]] = []
    skipped: list[dict] = []
    unknown = []
    for entry in sorted(test_dir.iterdir()):
        if entry.is_dir():
            if entry.name not in index:
                unknown.append(entry.name)
                continue
            for path in sorted(p for p in entry.rglob("*") if p.is_file()):
                samples.append((str(path), index[entry.name]))
        elif entry.name not in (labels_file, "manifest.json"):
            skipped.append({"path": str(entry), "reason": "a file outside any class folder"})
    if unknown:
        raise EvaluationError(
            f"{test_dir} has class folders the model does not know: {unknown[:10]}: "
            "evaluate the model on the test split of the data it was trained on"
        )
    if not samples:
        raise EvaluationError(f"{test_dir} holds no images in <class>/<image> folders")
    return samples, skipped


class TestImages:
    """Dataset of test images preprocessed by the artifact's serving code; unreadable ones carry their reason."""

    def __init__(self, samples: Sequence[tuple[str, int]], preprocess: Any, error_type: type) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess
        self.error_type = error_type
        size = preprocess.config.input_size
        self.blank = np.zeros((3, size, size), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int) -> tuple[np.ndarray, int, int, str]:
        path, label = self.samples[position]
        try:
            data = Path(path).read_bytes()
            return self.preprocess(data, path), label, position, ""
        except self.error_type as error:
            return self.blank, label, position, str(error)
        except OSError as error:
            return self.blank, label, position, f"cannot read the file: {error}"


def predict_test_split(
    servings: Mapping[str, Any], dataset: TestImages, batch_size: int, workers: int
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], list[tuple[int, str]]]:
    """Run every readable image through each model (decoded once): positions, labels, top-k per model, failures."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    k = min(TOP_K, len(dataset.preprocess.config.class_names))
    positions, labels = [], []
    top: dict[str, list[np.ndarray]] = {name: [] for name in servings}
    failures: list[tuple[int, str]] = []
    total, done, next_report = len(dataset), 0, 0.0
    for images, batch_labels, batch_positions, errors in loader:
        readable = np.array([not error for error in errors], dtype=bool)
        failures += [(int(p), e) for p, e in zip(batch_positions.tolist(), errors, strict=True) if e]
        if readable.any():
            for name, serving in servings.items():
                logits = serving.logits(images.numpy()[readable])
                top[name].append(np.argsort(-logits, axis=1, kind="stable")[:, :k])
            labels.append(batch_labels.numpy()[readable])
            positions.append(batch_positions.numpy()[readable])
        done += len(errors)
        if done / total >= next_report or done == total:
            print(f"evaluated {done}/{total} images ({100 * done / total:.0f}%)", flush=True)
            next_report += 0.1
    if not labels:
        return np.empty(0, int), np.empty(0, int), {name: np.empty((0, k), int) for name in servings}, failures
    tops = {name: np.concatenate(parts) for name, parts in top.items()}
    return np.concatenate(positions), np.concatenate(labels), tops, failures


# --- metrics ----------------------------------------------------------------------------------------------------------


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``matrix[a, p]`` = images of class ``a`` predicted as ``p``."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (actual, predicted), 1)
    return matrix


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _f_beta(precision: np.ndarray, recall: np.ndarray, beta: float) -> np.ndarray:
    b2 = beta * beta
    return _ratio((1 + b2) * precision * recall, b2 * precision + recall)


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall and F-scores (0 where undefined) and support, from a confusion matrix."""
    true_positive = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    precision = _ratio(true_positive, matrix.sum(axis=0))
    recall = _ratio(true_positive, support)
    return {
        "precision": precision,
        "recall": recall,
        "f0_5": _f_beta(precision, recall, 0.5),
        "f1": _f_beta(precision, recall, 1.0),
        "f2": _f_beta(precision, recall, 2.0),
        "support": support,
    }


def scalar_metrics(actual: np.ndarray, predicted: np.ndarray, top_hit: np.ndarray, num_classes: int) -> dict:
    """The model-quality scalars for one set of images (the whole test split or one subsample)."""
    matrix = confusion_matrix(actual, predicted, num_classes)
    scores = per_class_scores(matrix)
    weights = scores["support"] / max(1, len(actual))
    metrics = {
        "accuracy": float(np.trace(matrix) / max(1, len(actual))),
        "top_5_accuracy": float(top_hit.mean()) if len(top_hit) else 0.0,
        "weighted_recall": float(weights @ scores["recall"]),
        "weighted_precision": float(weights @ scores["precision"]),
        "weighted_f0_5": float(weights @ scores["f0_5"]),
        "weighted_f1": float(weights @ scores["f1"]),
        "weighted_f2": float(weights @ scores["f2"]),
    }
    # The best constant classifier always answers the most frequent class (Model Monitor's baseline).
    constant = np.full_like(actual, int(np.argmax(scores["support"])))
    constant_scores = per_class_scores(confusion_matrix(actual, constant, num_classes))
    metrics["accuracy_best_constant_classifier"] = float(np.mean(constant == actual)) if len(actual) else 0.0
    for name in ("recall", "precision", "f0_5", "f1", "f2"):
        metrics[f"weighted_{name}_best_constant_classifier"] = float(weights @ constant_scores[name])
    return metrics


def model_quality_report(
    actual: np.ndarray, predicted: np.ndarray, top_hit: np.ndarray, class_names: Sequence[str], seed: int = 0
) -> dict[str, Any]:
    """``{"multiclass_classification_metrics": {...}}`` in SageMaker's model-quality format."""
    num_classes = len(class_names)
    values = scalar_metrics(actual, predicted, top_hit, num_classes)
    deviations: dict[str, Any] = dict.fromkeys(values, NAN)
    if len(actual) >= STD_MIN_SAMPLES:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(STD_DRAWS):
            chosen = rng.choice(len(actual), size=int(STD_FRACTION * len(actual)), replace=False)
            draws.append(scalar_metrics(actual[chosen], predicted[chosen], top_hit[chosen], num_classes))
        deviations = {name: float(np.std([draw[name] for draw in draws])) for name in values}
    section: dict[str, Any] = {name: {"value": values[name], "standard_deviation": deviations[name]} for name in values}
    scores = per_class_scores(confusion_matrix(actual, predicted, num_classes))
    for name in ("precision", "recall", "f1"):
        section[f"{name}_per_class"] = {
            class_name: {"value": float(scores[name][i]), "standard_deviation": NAN}
            for i, class_name in enumerate(class_names)
        }
    matrix = confusion_matrix(actual, predicted, num_classes)
    section["confusion_matrix"] = {
        class_names[a]: {class_names[p]: int(matrix[a, p]) for p in range(num_classes)} for a in range(num_classes)
    }
    return {"multiclass_classification_metrics": section}


def set_by_path(document: dict, dotted_path: str, value: Any) -> None:
    """Set ``document["a"]["b"]["c"] = value`` for ``"a.b.c"`` (the JsonPath the ConditionStep reads)."""
    *parents, last = dotted_path.split(".")
    for key in parents:
        document = document.setdefault(key, {})
    document[last] = value


# --- int8: built from the artifact, calibrated on the validation split, served only if the test split agrees -----


@dataclasses.dataclass
class Int8Plan:
    """The quantised network (``path``), or why there is none (``reason``), and how it was made."""

    path: Path | None = None
    reason: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def pip_install(arguments: Sequence[str], target: Path, timeout: float | None = None) -> str | None:
    """``pip install --target`` into a scratch folder (the image's site-packages stay as they are): None when it
    worked, else why not (the end of pip's error, or the timeout)."""
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    try:
        result = subprocess.run(
            [*command, "--target", str(target), *arguments], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"pip did not finish within {timeout:.0f} s"
    if result.returncode != 0:
        return result.stderr.strip()[-500:] or f"pip exited with status {result.returncode}"
    return None


def quantization_tools(wheels: Path | None, scratch: Path) -> ModuleType:
    """``onnxruntime.quantization``, installed from the wheelhouse's evaluation wheels when the image lacks it.

    The SageMaker training image this step runs in has neither onnx nor onnxruntime, and the job may have no
    network: the wheels come with the job (``--wheels``), installed with no index into a scratch folder.
    """
    try:
        import onnx
        import onnxruntime.quantization

        return onnxruntime.quantization
    except ImportError as error:
        missing = error
    folder = wheels / WHEELS_FOR_EVALUATION if wheels else None
    found = sorted(folder.glob("*.whl")) if folder and folder.is_dir() else []
    if not found:
        raise EvaluationError(
            f"onnx and onnxruntime are not installed here ({missing}) and no wheelhouse gives them: pass --wheels "
            "(python -m pipelines.run wheelhouse builds one), or install them"
        )
    target = scratch / "site-packages"
    failure = pip_install(["--no-index", "--no-deps", *map(str, found)], target)
    if failure:
        raise EvaluationError(f"the wheels in {folder} do not install here: {failure}")
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization
    except ImportError as error:
        raise EvaluationError(f"the wheels in {folder} installed but do not import here: {error}") from error
    print(f"int8: onnx and onnxruntime installed from {len(found)} wheels in {folder}")
    return onnxruntime.quantization


def calibration_samples(samples: Sequence[tuple[str, int]], count: int) -> list[tuple[str, int]]:
    """Up to ``count`` samples, taken from each class in turn (sorted paths: the same choice every run)."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    queues = [sorted(group) for _, group in sorted(by_class.items())]
    chosen: list[tuple[str, int]] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def build_int8(
    args: argparse.Namespace, inference: ModuleType, model_dir: Path, preprocess: Any, scratch: Path
) -> Int8Plan:
    """Quantise the artifact's network to int8 (static, QDQ, per-channel weights), or say why not."""
    if args.int8 == "off":
        return Int8Plan(reason="int8 is turned off (--int8 off)")
    if args.serving_device == "gpu":
        return Int8Plan(reason="int8 is off on GPU instances: the endpoint runs the fp32 network on its GPU")
    if not all(hasattr(inference, name) for name in ("export_onnx", "choose_precision")):
        return Int8Plan(reason="the artifact's serving code predates int8 serving: train the model again")
    started = time.perf_counter()
    try:
        tools = quantization_tools(Path(args.wheels) if args.wheels else None, scratch)
        class_names = list(preprocess.config.class_names)
        samples, _ = scan_test_split(Path(args.valid_dir), class_names, inference.contract.LABELS_FILE, "--valid-dir")
    except EvaluationError as error:
        return Int8Plan(reason=f"int8 was not built: {error}")
    calibration = TestImages(
        calibration_samples(samples, args.calibration_images), preprocess, inference.InferenceError
    )
    images = [image for image, _, _, error in (calibration[i] for i in range(len(calibration))) if not error]
    if not images:
        return Int8Plan(reason=f"int8 was not built: none of the calibration images in {args.valid_dir} is readable")
    network, config = inference.modeling.load_model(model_dir)
    fp32_path, prepared_path = scratch / "int8" / "fp32.onnx", scratch / "int8" / "prepared.onnx"
    fp32_path.parent.mkdir(parents=True, exist_ok=True)
    fp32_path.write_bytes(inference.export_onnx(network, config.input_size))
    tools.quant_pre_process(str(fp32_path), str(prepared_path), skip_symbolic_shape=True)

    class Calibration(tools.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": np.stack(images[i : i + 16])} for i in range(0, len(images), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    path = scratch / "int8" / inference.contract.INT8_MODEL_FILE
    tools.quantize_static(
        str(prepared_path),
        str(path),
        Calibration(),
        quant_format=tools.QuantFormat.QDQ,
        activation_type=tools.QuantType.QUInt8,
        weight_type=tools.QuantType.QInt8,
        per_channel=True,
        calibrate_method=getattr(tools.CalibrationMethod, CALIBRATION_METHODS[args.calibration_method]),
    )
    details = {
        "calibration_images": len(images),
        "calibration_method": args.calibration_method,
        "calibration_split": str(args.valid_dir),
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
    }
    print(f"int8: quantised on {len(images)} validation images ({args.calibration_method}) in {details['seconds']} s")
    return Int8Plan(path=path, details=details)


def int8_gate(fp32_accuracy: float, int8_accuracy: float, max_drop_points: float) -> tuple[bool, str]:
    """Serve int8 only when its test accuracy is at most ``max_drop_points`` below fp32's; the reason either way."""
    drop = 100 * (fp32_accuracy - int8_accuracy)
    verdict = f"int8 test accuracy {int8_accuracy:.4f} vs fp32 {fp32_accuracy:.4f}: {drop:+.2f} points of drop"
    if drop <= max_drop_points + 1e-9:  # accuracies are ratios of counts: 0.90 - 0.89 is not exactly 0.01
        return True, f"{verdict}, within the {max_drop_points:g}-point gate: int8 is served"
    return False, f"{verdict}, over the {max_drop_points:g}-point gate: fp32 is served"


def serving_wheels(wheels: str | None) -> tuple[list[Path], str]:
    """The wheelhouse's serving wheels and the requirements lines that install them (none without a wheelhouse)."""
    folder = Path(wheels) / WHEELS_FOR_SERVING if wheels else None
    if folder is None or not (folder / "requirements.txt").is_file():
        return [], ""
    return sorted(folder.glob("*.whl")), (folder / "requirements.txt").read_text(encoding="utf-8")


def write_served_artifact(
    model_dir: Path, destination: Path, contract: ModuleType, decision: dict[str, Any], plan: Int8Plan, wheels: Any
) -> None:
    """The evaluated artifact plus the decision (``serving.json``) and, for int8, the network and its runtime."""
    with tempfile.TemporaryDirectory(prefix="served-", dir=destination.parent) as scratch:
        served = Path(scratch) / "model"
        shutil.copytree(model_dir, served)
        if decision["precision"] == "int8" and plan.path is not None:
            shutil.copy2(plan.path, served / contract.INT8_MODEL_FILE)
            wheel_files, requirements = wheels
            if wheel_files:
                (served / contract.CODE_DIR / contract.WHEELS_DIR).mkdir(exist_ok=True)
                for wheel in wheel_files:
                    shutil.copy2(wheel, served / contract.CODE_DIR / contract.WHEELS_DIR / wheel.name)
                with open(served / contract.CODE_DIR / "requirements.txt", "a", encoding="utf-8") as file:
                    file.write("\n" + requirements)
        if hasattr(contract, "SERVING_DECISION_FILE"):  # serving code that reads it (older code serves fp32 anyway)
            _write_json(served / contract.SERVING_DECISION_FILE, decision)
        # Fixed times and owners, no name in the gzip header: the same evaluation gives the same bytes.
        with (
            open(destination, "wb") as raw,
            gzip.GzipFile("", "wb", 6, raw, mtime=0) as packed,
            tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as archive,
        ):
            for path in sorted(served.rglob("*")):
                info = archive.gettarinfo(str(path), path.relative_to(served).as_posix())
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if path.is_file():
                    with open(path, "rb") as source:
                        archive.addfile(info, source)
                else:
                    archive.addfile(info)


# --- the picture ------------------------------------------------------------------------------------------------------


def require_matplotlib() -> None:
    """Fail before any work when the picture cannot be drawn (the SageMaker PyTorch training image has it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise EvaluationError(
            "matplotlib is needed to draw confusion_matrix.png and is not installed: run this step in the "
            "SageMaker PyTorch training image (it ships matplotlib) or `pip install matplotlib`"
        ) from error


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], title: str, path: Path) -> None:
    """Rows normalised per actual class (a square power scale makes rare confusions visible), all labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    count = len(class_names)
    rows = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    side = max(6.0, 0.17 * count + 3.0)
    font = 10 if count <= 20 else 8 if count <= 60 else 6
    figure, axes = plt.subplots(figsize=(side + 1.5, side))
    image = axes.imshow(fractions, cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    axes.set_xticks(range(count))
    axes.set_yticks(range(count))
    axes.set_xticklabels(class_names, rotation=90, fontsize=font)
    axes.set_yticklabels(class_names, fontsize=font)
    axes.set_xlabel("predicted class", fontsize=12)
    axes.set_ylabel("actual class", fontsize=12)
    axes.set_title(title, fontsize=14)
    if count <= 25:  # counts fit in the cells
        for a in range(count):
            for p in range(count):
                if matrix[a, p]:
                    color = "white" if fractions[a, p] > 0.5 else "black"
                    axes.text(p, a, str(matrix[a, p]), ha="center", va="center", fontsize=font, color=color)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.02, label="fraction of the actual class")
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")
    plt.close(figure)


# --- main -------------------------------------------------------------------------------------------------------------


def _write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")


def load_models(
    args: argparse.Namespace, inference: ModuleType, model_dir: Path, scratch: Path
) -> tuple[dict[str, Any], Int8Plan]:
    """The fp32 model as the endpoint loads it, and the int8 one beside it when it could be built."""
    int8_capable = hasattr(inference, "choose_precision")
    fp32 = (
        inference.load_serving_model(model_dir, precision="fp32")
        if int8_capable
        else inference.load_serving_model(model_dir)
    )
    servings = {"fp32": fp32}
    plan = build_int8(args, inference, model_dir, fp32.preprocess, scratch)
    if plan.path is not None:
        candidate = scratch / "int8-candidate"  # the artifact with the int8 network beside it, as it will be served
        candidate.mkdir()
        for entry in model_dir.iterdir():
            (candidate / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        (candidate / inference.contract.INT8_MODEL_FILE).symlink_to(plan.path)
        servings["int8"] = inference.load_serving_model(candidate, precision="int8")
    else:
        print(f"int8: {plan.reason}")
    return servings, plan


def serving_decision(
    args: argparse.Namespace, contract: ModuleType, actual: np.ndarray, tops: Mapping[str, np.ndarray], plan: Int8Plan
) -> dict[str, Any]:
    """evaluation.json's ``serving`` section: both accuracies, the precision served, and why."""
    fp32_accuracy = float(np.mean(tops["fp32"][:, 0] == actual))
    decision: dict[str, Any] = {
        "precision": "fp32",
        "reason": plan.reason,
        "fp32_accuracy": fp32_accuracy,
        "int8_accuracy": None,
        "int8_top1_agreement": None,
        "max_accuracy_drop_points": args.int8_max_drop,
    }
    if "int8" in tops:
        int8_accuracy = float(np.mean(tops["int8"][:, 0] == actual))
        passed, reason = int8_gate(fp32_accuracy, int8_accuracy, args.int8_max_drop)
        decision.update(
            precision="int8" if passed else "fp32",
            reason=reason,
            int8_accuracy=int8_accuracy,
            int8_top1_agreement=float(np.mean(tops["int8"][:, 0] == tops["fp32"][:, 0])),
        )
    if decision["precision"] == "int8":
        wheels, _ = serving_wheels(args.wheels)
        decision["int8_model"] = contract.INT8_MODEL_FILE
        decision["runtime_wheels"] = [wheel.name for wheel in wheels]
        if not wheels:
            decision["note"] = (
                "no onnxruntime wheels ship with the artifact: it serves int8 where onnxruntime is installed (the "
                "local endpoint), and fp32 on an image without it (AWS's Ray Serve image), saying why; pass --wheels "
                "a wheelhouse (python -m pipelines.run wheelhouse) to ship them"
            )
    return decision


def tracking_module() -> ModuleType | None:
    """entrypoints/tracking.py: the step's tracking input, or the checkout's (None when neither is there)."""
    if __package__:
        from entrypoints import tracking

        return tracking
    root = Path(os.path.abspath(__file__)).parent.parent
    for folder in (root / "tracking", root / "entrypoints"):
        if (folder / "tracking.py").is_file():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return importlib.import_module("tracking")
    return None


def _processing_job_name() -> str:
    """The processing job's name (SageMaker writes it in processingjobconfig.json), else evaluate-<execution>."""
    fallback = "-".join(["evaluate", *filter(None, [os.environ.get("PIPELINE_EXECUTION_ID", "").strip()])])
    try:
        config = json.loads(Path("/opt/ml/config/processingjobconfig.json").read_text(encoding="utf-8"))
        return str(config.get("ProcessingJobName") or fallback)
    except (OSError, ValueError, AttributeError):
        return fallback


def install_tracking_client(wheels: str | None, requirements: Sequence[str], scratch: Path) -> bool:
    """Make MLflow importable when the image lacks it (the SageMaker training image does): from the
    wheelhouse's tracking/ wheels with no index, else ``requirements`` from the package index, into a scratch
    folder put last on sys.path (the image's own packages come first), within TRACKING_INSTALL_SECONDS. False, and
    one line, when that fails: the job then goes on untracked."""
    try:
        importlib.import_module(TRACKING_CLIENT)
        return True
    except ImportError:
        pass
    folder = Path(wheels) / WHEELS_FOR_TRACKING if wheels else None
    if folder is not None and (folder / "requirements.txt").is_file():
        source = f"the wheels in {folder}"
        arguments = ["--no-index", "--find-links", str(folder), "-r", str(folder / "requirements.txt")]
    else:  # no wheelhouse: pip's per-request timeout and retries bounded, the whole install by the timeout
        source = "the package index"
        arguments = ["--timeout", "15", "--retries", "1", *requirements]
    target = scratch / "tracking-site-packages"
    failure = pip_install(arguments, target, timeout=TRACKING_INSTALL_SECONDS)
    if failure is None:
        sys.path.append(str(target))
        importlib.invalidate_caches()
        try:
            importlib.import_module(TRACKING_CLIENT)
            print(f"MLflow tracking: the client is not in this image; installed it from {source}")
            return True
        except ImportError as error:
            failure = f"installed, but does not import here: {error}"
    reason = " ".join(failure.split())[-300:]
    print(
        f"MLflow tracking: off: the client is not in this image and did not install from {source} ({reason}); "
        "the job goes on untracked"
    )
    return False


def start_tracking(wheels: str | None, scratch: Path) -> Any:
    """This job's MLflow run (an inactive tracker without MLflow or a server); None when no tracking URI is set."""
    if not os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        return None
    module = tracking_module()
    if module is None:
        print("MLflow tracking: off (tracking.py is not beside this script: no tracking input); the job goes on")
        return None
    speaks_rest = module.speaks_rest(os.environ["MLFLOW_TRACKING_URI"].strip())  # a server: no MLflow needed
    if not speaks_rest and not install_tracking_client(wheels, module.JOB_REQUIREMENTS, scratch):
        return module.Tracker()  # inactive: evaluation.json still gets its tracking section (not-tracked)
    job_name = _processing_job_name()
    return module.Tracker.start(job_name, tags={"job_name": job_name})


def _metric_name(text: str) -> str:
    """MLflow's metric names allow letters, digits, _ - . / and spaces; anything else becomes _."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)


def track_evaluation(tracker: Any, report: dict[str, Any], output_dir: Path) -> None:
    """Test accuracy, top-5, macro and weighted F1, per-class F1 and the int8 gate; the reports as artifacts."""
    metrics = report["multiclass_classification_metrics"]
    f1_per_class = {name: entry["value"] for name, entry in metrics["f1_per_class"].items()}
    decision = report[SERVING_SECTION]
    values = {
        "test_accuracy": metrics["accuracy"]["value"],
        "top_5_accuracy": metrics["top_5_accuracy"]["value"],
        "macro_f1": float(np.mean(list(f1_per_class.values()))) if f1_per_class else 0.0,
        "weighted_f1": metrics["weighted_f1"]["value"],
        "fp32_accuracy": decision["fp32_accuracy"],
        "int8_accuracy": decision["int8_accuracy"],
        **{_metric_name(f"f1_{name}"): value for name, value in f1_per_class.items()},
    }
    tracker.log_metrics(values, step=0)
    int8_built = decision["int8_accuracy"] is not None
    tracker.set_tags(
        {
            "serving.precision": decision["precision"],
            "int8.gate": ("passed" if decision["precision"] == "int8" else "failed") if int8_built else "not-built",
            "int8.reason": decision["reason"][:5000],
        }
    )
    if tracker.parent_id:  # the execution's headline figures, so executions compare side by side
        tracker.log_metrics({"test_accuracy": values["test_accuracy"]}, step=0, run_id=tracker.parent_id)
        tracker.set_tags({"serving.precision": decision["precision"]}, run_id=tracker.parent_id)
    for name in ("evaluation.json", "confusion_matrix.png"):
        tracker.log_artifact(output_dir / name)
    tracker.log_dict(decision, "serving.json")


class Background:
    """``function(*args)`` in a daemon thread; ``result()`` waits for it and returns (or raises) what it did."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self._outcome: tuple[bool, Any] = (False, None)
        self._thread = threading.Thread(target=self._run, args=(function, *args), daemon=True, name="tracking")
        self._thread.start()

    def _run(self, function: Callable[..., Any], *args: Any) -> None:
        try:
            self._outcome = (True, function(*args))
        except BaseException as error:  # handed to whoever waits for the result
            self._outcome = (False, error)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join()
        succeeded, value = self._outcome
        if not succeeded:
            raise value
        return value


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    require_matplotlib()
    with tempfile.TemporaryDirectory(prefix="tracking-") as scratch:  # the MLflow client, when installed here
        # Importing MLflow (and installing it, on an image without it) runs beside the evaluation, whose native
        # work (decoding, inference, quantisation, compression) leaves the interpreter to it: the run's ID is
        # needed only when evaluation.json is written.
        started = Background(start_tracking, args.wheels, Path(scratch))
        try:
            report = _evaluate(args, started.result)
        except BaseException:
            tracker = started.result() if started.done() else None  # a stopped job does not wait for an install
            if tracker is not None:
                tracker.end("FAILED")
            raise
        tracker = started.result()
        if tracker is not None:
            track_evaluation(tracker, report, Path(args.output_dir))
            tracker.end("FINISHED", end_parent=True)  # the execution's last tracked job
    return report


def _evaluate(args: argparse.Namespace, tracker_started: Callable[[], Any]) -> dict[str, Any]:
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    with tempfile.TemporaryDirectory(prefix="evaluate-") as scratch_name:
        scratch = Path(scratch_name)
        model_dir = resolve_model_dir(Path(args.model), scratch)
        with serving_code(model_dir) as inference:
            contract = inference.contract
            class_names = list(inference.modeling.read_model_config(model_dir).class_names)
            samples, skipped = scan_test_split(Path(args.test_dir), class_names, contract.LABELS_FILE)
            print(f"test split: {len(samples)} files in {len({label for _, label in samples})} class folders")
            servings, plan = load_models(args, inference, model_dir, scratch)
            runtimes = ", ".join(f"{name} on {serving.runtime}" for name, serving in servings.items())
            print(f"model: {servings['fp32'].config.architecture}, {len(class_names)} classes, {runtimes}")
            dataset = TestImages(samples, servings["fp32"].preprocess, inference.InferenceError)
            positions, actual, tops, failures = predict_test_split(servings, dataset, args.batch_size, args.workers)
        unreadable = [{"path": samples[p][0], "reason": reason} for p, reason in failures]
        for entry in skipped + unreadable:
            print(f"skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
        if len(actual) == 0:
            raise EvaluationError(f"none of the {len(samples)} test images could be read; see the reasons above")
        decision = serving_decision(args, contract, actual, tops, plan)
        print(f"serving precision: {decision['precision']}: {decision['reason']}")
        if "note" in decision:
            print(f"note: {decision['note']}")
        chosen = decision["precision"]
        predicted = tops[chosen][:, 0]
        top_hit = (tops[chosen] == actual[:, None]).any(axis=1)
        report = model_quality_report(actual, predicted, top_hit, class_names, args.seed)
        accuracy = report["multiclass_classification_metrics"]["accuracy"]["value"]
        set_by_path(report, contract.ACCURACY_JSON_PATH, accuracy)  # the path the ConditionStep reads
        report[SERVING_SECTION] = decision
        tracker = tracker_started()
        if tracker is not None:  # tracking is configured: the Register step reads this path
            report[TRACKING_SECTION] = {
                TRACKING_RUN_ID: tracker.run_id or NOT_TRACKED,
                "mlflow_parent_run_id": tracker.parent_id or NOT_TRACKED,
                "mlflow_experiment_id": tracker.experiment_id or NOT_TRACKED,
            }
        matrix = confusion_matrix(actual, predicted, len(class_names))
        support = matrix.sum(axis=1)
        details = {
            "model": {
                "architecture": servings["fp32"].config.architecture,
                "num_classes": len(class_names),
                "runtime": servings[chosen].runtime,
                "precision": chosen,
                "source": str(args.model),
            },
            "int8": {"built": plan.path is not None, "reason": plan.reason, **plan.details},
            "test_dir": str(args.test_dir),
            "images_evaluated": len(actual),
            "images_skipped": len(unreadable),
            "skipped": unreadable + skipped,
            "misclassified": [
                {"path": samples[int(p)][0], "actual": class_names[int(a)], "predicted": class_names[int(q)]}
                for p, a, q in zip(positions, actual, predicted, strict=True)
                if a != q
            ],
            "classes_without_test_images": [name for name, n in zip(class_names, support, strict=True) if n == 0],
            "parameters": {"batch_size": args.batch_size, "workers": args.workers, "seed": args.seed},
            "seconds": round(time.perf_counter() - started, 3),
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".evaluation-", dir=output_dir))
        try:
            title = (
                f"Confusion matrix ({chosen}): accuracy {accuracy:.3f} on {len(actual)} images, "
                f"{len(class_names)} classes"
            )
            plot_confusion_matrix(matrix, class_names, title, staging / contract.CONFUSION_MATRIX_IMAGE)
            _write_json(staging / contract.EVALUATION_FILE, report)
            _write_json(staging / DETAILS_FILE, details)
            wheels = serving_wheels(args.wheels)
            write_served_artifact(model_dir, staging / SERVED_MODEL_ARCHIVE, contract, decision, plan, wheels)
            names = (SERVED_MODEL_ARCHIVE, contract.CONFUSION_MATRIX_IMAGE, DETAILS_FILE, contract.EVALUATION_FILE)
            for name in names:  # evaluation.json last: whoever sees it finds the rest in place
                os.replace(staging / name, output_dir / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    metrics = report["multiclass_classification_metrics"]
    print(
        f"accuracy={accuracy:.4f} top_5_accuracy={metrics['top_5_accuracy']['value']:.4f} "
        f"weighted_f1={metrics['weighted_f1']['value']:.4f} on {len(actual)} images "
        f"({details['images_skipped']} skipped, {chosen}); wrote {output_dir / contract.EVALUATION_FILE} and "
        f"{output_dir / SERVED_MODEL_ARCHIVE}"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        evaluate(args)
    except EvaluationError as error:
        print(f"evaluate: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
