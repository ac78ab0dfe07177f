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
import importlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

DEFAULT_MODEL = "/opt/ml/processing/model"
DEFAULT_TEST_DIR = "/opt/ml/processing/test"
DEFAULT_OUTPUT_DIR = "/opt/ml/processing/evaluation"
DETAILS_FILE = "evaluation_details.json"
# Modules of the artifact's code/ folder; imported fresh from each artifact and put back afterwards.
SERVING_MODULES = ("inference", "modeling", "transforms", "contract")
TOP_K = 5
STD_MIN_SAMPLES = 200  # Model Monitor reports standard deviations only from 200 samples on
STD_DRAWS = 5
STD_FRACTION = 0.8
NAN = "NaN"


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


def scan_test_split(test_dir: Path, class_names: Sequence[str], labels_file: str) -> tuple[list, list[dict]]:
    """``[(path, class index)]`` for every file in a class folder, and the entries that are not test images."""
    if not test_dir.is_dir():
        raise EvaluationError(f"--test-dir {test_dir} does not exist or is not a folder")
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
    serving: Any, dataset: TestImages, batch_size: int, workers: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Run every readable image through the model: positions, labels, top-k indices, and the failures."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    k = min(TOP_K, len(serving.config.class_names))
    positions, labels, top = [], [], []
    failures: list[tuple[int, str]] = []
    total, done, next_report = len(dataset), 0, 0.0
    for images, batch_labels, batch_positions, errors in loader:
        readable = np.array([not error for error in errors], dtype=bool)
        failures += [(int(p), e) for p, e in zip(batch_positions.tolist(), errors, strict=True) if e]
        if readable.any():
            logits = serving.logits(images.numpy()[readable])
            order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            top.append(order)
            labels.append(batch_labels.numpy()[readable])
            positions.append(batch_positions.numpy()[readable])
        done += len(errors)
        if done / total >= next_report or done == total:
            print(f"evaluated {done}/{total} images ({100 * done / total:.0f}%)", flush=True)
            next_report += 0.1
    if not top:
        return np.empty(0, int), np.empty(0, int), np.empty((0, k), int), failures
    return np.concatenate(positions), np.concatenate(labels), np.concatenate(top), failures


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


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    require_matplotlib()
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    with tempfile.TemporaryDirectory(prefix="evaluate-") as scratch:
        model_dir = resolve_model_dir(Path(args.model), Path(scratch))
        with serving_code(model_dir) as inference:
            contract = inference.contract
            class_names = list(inference.modeling.read_model_config(model_dir).class_names)
            samples, skipped = scan_test_split(Path(args.test_dir), class_names, contract.LABELS_FILE)
            print(f"test split: {len(samples)} files in {len({label for _, label in samples})} class folders")
            serving = inference.load_serving_model(model_dir)
            print(f"model: {serving.config.architecture}, {len(class_names)} classes, runtime {serving.runtime}")
            dataset = TestImages(samples, serving.preprocess, inference.InferenceError)
            positions, actual, top, failures = predict_test_split(serving, dataset, args.batch_size, args.workers)
        unreadable = [{"path": samples[p][0], "reason": reason} for p, reason in failures]
        for entry in skipped + unreadable:
            print(f"skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
        if len(actual) == 0:
            raise EvaluationError(f"none of the {len(samples)} test images could be read; see the reasons above")
        predicted = top[:, 0]
        top_hit = (top == actual[:, None]).any(axis=1)
        report = model_quality_report(actual, predicted, top_hit, class_names, args.seed)
        accuracy = report["multiclass_classification_metrics"]["accuracy"]["value"]
        set_by_path(report, contract.ACCURACY_JSON_PATH, accuracy)  # the path the ConditionStep reads
        matrix = confusion_matrix(actual, predicted, len(class_names))
        support = matrix.sum(axis=1)
        details = {
            "model": {
                "architecture": serving.config.architecture,
                "num_classes": len(class_names),
                "runtime": serving.runtime,
                "source": str(args.model),
            },
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
            title = f"Confusion matrix: accuracy {accuracy:.3f} on {len(actual)} images, {len(class_names)} classes"
            plot_confusion_matrix(matrix, class_names, title, staging / contract.CONFUSION_MATRIX_IMAGE)
            _write_json(staging / contract.EVALUATION_FILE, report)
            _write_json(staging / DETAILS_FILE, details)
            for name in (contract.CONFUSION_MATRIX_IMAGE, DETAILS_FILE, contract.EVALUATION_FILE):
                os.replace(staging / name, output_dir / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    metrics = report["multiclass_classification_metrics"]
    print(
        f"accuracy={accuracy:.4f} top_5_accuracy={metrics['top_5_accuracy']['value']:.4f} "
        f"weighted_f1={metrics['weighted_f1']['value']:.4f} on {len(actual)} images "
        f"({details['images_skipped']} skipped); wrote {output_dir / contract.EVALUATION_FILE}"
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
