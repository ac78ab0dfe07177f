"""The pipeline's DAG on this machine: Preprocess -> Tune -> Train -> Evaluate -> CheckAccuracy -> Register.

Each step runs the project's own script under the SageMaker container contract (:mod:`.containers`) in
``<workdir>/run-NNNN/<step>/``, with the arguments and hyperparameters the SageMaker pipeline passes
(``pipelines/pipeline.py``), from the same config. Steps are cached like SageMaker's (:mod:`.cache`). A step
that fails stops the run with its name, its reason and its log's last lines; the run folder stays.

``run.json`` in the run folder records every step (status, time, cache hit, outputs) and the summary.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entrypoints import contract
from pipelines import config
from pipelines.config import (  # step names and container paths, shared with the SageMaker pipeline
    CHECKPOINT_LOCAL_PATH,
    EVALUATE_MODEL_DIR,
    EVALUATE_OUTPUT_DIR,
    EVALUATE_TEST_DIR,
    OUTPUT_EVALUATION,
    PREPROCESS_INPUT_DIR,
    PREPROCESS_OUTPUT_DIR,
    STEP_CHECK,
    STEP_EVALUATE,
    STEP_FAIL,
    STEP_PREPROCESS,
    STEP_REGISTER,
    STEP_TRAIN,
    STEP_TUNE,
    TENSORBOARD_LOCAL_PATH,
)
from pipelines.local import cache as cache_module
from pipelines.local import containers, endpoint, fsutil, tuning
from pipelines.local.console import Console, Progress
from pipelines.local.registry import LocalModelRegistry

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PREPROCESS_SCRIPT = PROJECT_ROOT / "steps" / "preprocess.py"
EVALUATE_SCRIPT = PROJECT_ROOT / "steps" / "evaluate.py"
TRAINING_SOURCE_DIR = PROJECT_ROOT / "entrypoints"
TRAINING_ENTRY_POINT = "train.py"

STEP_DEPLOY = "Deploy"
RUN_PATTERN = re.compile(r"^run-(\d{4,})$")
RUN_RECORD = "run.json"
PRESETS = ("demo", "pipeline")


class PipelineFailed(Exception):
    """The run stopped at a step: the message names the step and why."""

    def __init__(self, step: str, message: str, log_path: Path | None = None, tail: list[str] | None = None) -> None:
        super().__init__(f"step {step} failed: {message}")
        self.step = step
        self.reason = message
        self.log_path = log_path
        self.tail = tail or []


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class LocalRunOptions:
    """Everything a local run can change; ``None`` means "the preset's value" (see :func:`resolve_preset`)."""

    workdir: Path = Path(config.LOCAL_WORKDIR)
    data: Path | None = None  # None: the built-in demo archive, written into the run folder
    preset: str | None = None  # demo | pipeline; default: demo without --data, pipeline with it
    trials: int | None = None
    parallel: int | None = None
    tuning_epochs: int | None = None
    training_epochs: int | None = None
    image_size: int | None = None
    threshold: float | None = None
    hyperparameters: dict[str, str] = field(default_factory=dict)  # overrides of the static hyperparameters
    seed: int = config.LOCAL_TUNING_SEED
    cache: bool = True
    approve: bool = False
    endpoint_name: str = config.LOCAL_ENDPOINT_NAME
    port: int = config.LOCAL_ENDPOINT_PORT
    ray: bool = False  # serve the approved model on a local Ray Serve cluster (the container's sequence)
    model_package_group: str = config.MODEL_PACKAGE_GROUP
    cpus: int | None = None
    demo_per_class_limit: int | None = None  # tests shrink the demo archive with this


@dataclass
class ResolvedSettings:
    preset: str
    static_hyperparameters: dict[str, Any]
    ranges: dict[str, config.HyperparameterRange]
    trials: int
    parallel: int
    tuning_epochs: int
    training_epochs: int
    image_size: int
    threshold: float
    cpus: int


def resolve_preset(options: LocalRunOptions) -> ResolvedSettings:
    """The settings of a run: the preset's values with the options' overrides.

    ``demo`` (default without ``--data``): ``config.LOCAL_DEMO_*``, a small CNN trained from random weights on
    small images, seconds per epoch on a CPU. ``pipeline`` (default with ``--data``): the SageMaker pipeline's own
    defaults (``DEFAULT_HYPERPARAMETERS``, ``HYPERPARAMETER_RANGES``, ``FINAL_TRAINING_EPOCHS``, ``IMAGE_SIZE``,
    ``ACCURACY_THRESHOLD``).
    """
    preset = options.preset or ("demo" if options.data is None else "pipeline")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose {' or '.join(PRESETS)}")
    if preset == "demo":
        base = dict(config.LOCAL_DEMO_HYPERPARAMETERS)
        ranges = dict(config.LOCAL_DEMO_HYPERPARAMETER_RANGES)
        trials, tuning_epochs = config.LOCAL_TUNING_TRIALS, int(base["epochs"])
        training_epochs, image_size = config.LOCAL_DEMO_TRAINING_EPOCHS, config.LOCAL_DEMO_IMAGE_SIZE
        threshold = config.LOCAL_ACCURACY_THRESHOLD
    else:
        base = dict(config.DEFAULT_HYPERPARAMETERS)
        ranges = dict(config.HYPERPARAMETER_RANGES)
        trials, tuning_epochs = config.LOCAL_TUNING_TRIALS, int(base["epochs"])
        training_epochs, image_size = config.FINAL_TRAINING_EPOCHS, config.IMAGE_SIZE
        threshold = config.ACCURACY_THRESHOLD
    image_size = options.image_size or image_size
    if preset == "demo":
        base["input-size"] = image_size  # the demo trains on the images at the size the processing step keeps
    base.update(options.hyperparameters)
    # A value given on the command line is fixed: it leaves the tuner's ranges.
    ranges = {name: spec for name, spec in ranges.items() if name not in options.hyperparameters}
    static = {key: value for key, value in base.items() if key not in ranges and key != "epochs"}
    trials = options.trials if options.trials is not None else trials
    cpus = options.cpus or available_cpus()
    parallel = options.parallel or min(trials, cpus)
    settings = ResolvedSettings(
        preset=preset,
        static_hyperparameters=static,
        ranges=ranges,
        trials=trials,
        parallel=max(1, min(parallel, trials)),
        tuning_epochs=options.tuning_epochs or tuning_epochs,
        training_epochs=options.training_epochs or training_epochs,
        image_size=image_size,
        threshold=options.threshold if options.threshold is not None else threshold,
        cpus=cpus,
    )
    if settings.trials < 1:
        raise ValueError(f"--trials must be at least 1, got {settings.trials}")
    if settings.tuning_epochs < 1 or settings.training_epochs < 1:
        raise ValueError("epochs must be at least 1")
    return settings


def encode_static(values: dict[str, Any]) -> dict[str, str]:
    """Static hyperparameters as the SDK's framework estimators write them: every value JSON-encoded."""
    return {key: json.dumps(value) for key, value in values.items()}


def new_run_folder(workdir: Path) -> tuple[str, Path]:
    """``run-0001``, ``run-0002``, ...: the next free number (created here, so two runs never share one)."""
    workdir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in workdir.iterdir() if (m := RUN_PATTERN.match(p.name))]
    number = max(numbers, default=0) + 1
    while True:
        run_id = f"run-{number:04d}"
        try:
            (workdir / run_id).mkdir()
        except FileExistsError:
            number += 1
            continue
        return run_id, workdir / run_id


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class StepRecord:
    name: str
    status: str = "NotStarted"  # Executing | Succeeded | Failed | Skipped
    started: str | None = None
    duration_s: float | None = None
    cached_from: str | None = None
    detail: str = ""
    failure_reason: str | None = None
    log: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


class LocalPipeline:
    """One run of the DAG. ``run()`` returns the run record; raises :class:`PipelineFailed` when a step fails."""

    def __init__(self, options: LocalRunOptions, console: Console | None = None) -> None:
        self.options = options
        self.settings = resolve_preset(options)
        self.console = console or Console()
        self.workdir = options.workdir.resolve()
        self.cache = cache_module.StepCache(self.workdir, enabled=options.cache)
        self.registry = LocalModelRegistry(self.workdir)
        self.steps: dict[str, StepRecord] = {}
        self.run_id = ""
        self.run_dir = Path()
        self.started = 0.0
        self.summary: dict[str, Any] = {}
        self._record_lock = threading.Lock()
        self._step_started: dict[str, float] = {}
        self._split_hashes: dict[str, str] = {}
        self._model_sha256 = ""
        self._started_at = ""

    # --- bookkeeping --------------------------------------------------------------------------------------------
    def _relative(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.run_dir.resolve()).as_posix()
        except ValueError:
            return str(path)

    def _write_record(self, status: str) -> dict[str, Any]:
        record = {
            "RunId": self.run_id,
            "Status": status,
            "Workdir": str(self.workdir),
            "RunFolder": str(self.run_dir),
            "Started": self._started_at,
            "ElapsedSeconds": round(time.perf_counter() - self.started, 2),
            "Settings": {
                **dataclasses.asdict(self.settings),
                "data": str(self.options.data) if self.options.data else "built-in demo (scikit-learn digits)",
                "cache": self.options.cache,
                "seed": self.options.seed,
            },
            "Steps": [dataclasses.asdict(step) for step in self.steps.values()],
            "Summary": self.summary,
        }
        with self._record_lock:
            fsutil.write_json_atomic(self.run_dir / RUN_RECORD, record)
        return record

    def _begin(self, name: str) -> StepRecord:
        record = StepRecord(name=name, status="Executing", started=_now())
        self.steps[name] = record
        self._step_started[name] = time.perf_counter()
        self._write_record("Executing")
        return record

    def _finish(self, record: StepRecord, status: str, detail: str = "") -> None:
        seconds = time.perf_counter() - self._step_started[record.name]
        record.status, record.duration_s, record.detail = status, round(seconds, 2), detail
        label = "cached" if record.cached_from else status
        cached = f" (cached from {record.cached_from})" if record.cached_from else ""
        self.console.step(record.name, label, seconds, detail + cached)
        self._write_record("Executing")

    def _fail(self, record: StepRecord, error: containers.JobError | str) -> PipelineFailed:
        if isinstance(error, containers.JobError):
            reason, log_path, tail = str(error), error.log_path, error.tail
        else:
            reason, log_path, tail = error, None, []
        record.failure_reason = reason
        self._finish(record, "Failed", reason)
        if tail:
            self.console.details(tail)
        if log_path:
            self.console.details([f"log: {log_path}"])
        return PipelineFailed(record.name, reason, log_path, tail)

    # --- caching ----------------------------------------------------------------------------------------------
    def _cached(
        self,
        record: StepRecord,
        key_parts: dict[str, Any],
        execute: Callable[[], tuple[dict[str, Path], dict[str, Any]]],
    ) -> tuple[dict[str, Path], dict[str, Any]]:
        """Run ``execute`` unless an earlier run in this workdir has the step's result for the same key.

        A hit links the earlier outputs into this run's step folder (same relative paths) and returns them.
        """
        key = self.cache.key(record.name, key_parts)
        entry = self.cache.lookup(key)
        if entry is not None:
            old_run = self.workdir / entry.run_id
            outputs = {}
            for name, old_path in entry.output_paths(self.workdir).items():
                new_path = self.run_dir / old_path.relative_to(old_run)
                fsutil.link_tree(old_path, new_path)
                outputs[name] = new_path
            record.cached_from = entry.run_id
            result = entry.result
        else:
            outputs, result = execute()
            self.cache.store(key, record.name, self.run_id, outputs, result)
        record.outputs = {name: self._relative(path) for name, path in outputs.items()}
        record.log = record.outputs.get("log")
        record.result = result
        return outputs, result

    # --- the steps ------------------------------------------------------------------------------------------
    def _data_input(self) -> Path:
        if self.options.data is not None:
            data = self.options.data.expanduser().resolve()
            if not data.exists():
                raise FileNotFoundError(f"--data {self.options.data} does not exist")
            return data
        from pipelines import demo_data

        started = time.perf_counter()
        archive = demo_data.write_digits_archive(
            self.run_dir / "input" / "digits.zip",
            image_size=self.settings.image_size,
            per_class_limit=self.options.demo_per_class_limit,
        )
        seconds = time.perf_counter() - started
        self.summary["demo_archive"] = {"path": str(archive), "seconds": round(seconds, 2)}
        self.console.write(f"  demo archive {self._relative(archive)} written in {seconds:.1f} s")
        return archive

    def preprocess(self, data: Path) -> dict[str, Path]:
        record = self._begin(STEP_PREPROCESS)
        job = containers.ProcessingJob(
            job_name=f"{config.BASE_JOB_PREFIX}-preprocess-{self.run_id}",
            root=self.run_dir / "preprocess",
            script=PREPROCESS_SCRIPT,
            inputs=[containers.ProcessingInput(data, PREPROCESS_INPUT_DIR, "data")],
            outputs=[containers.ProcessingOutput(f"{PREPROCESS_OUTPUT_DIR}/{split}", split) for split in config.SPLITS],
            arguments=[
                "--input",
                PREPROCESS_INPUT_DIR,
                "--output-dir",
                PREPROCESS_OUTPUT_DIR,
                "--image-size",
                str(self.settings.image_size),
                "--valid-fraction",
                str(config.VALID_FRACTION),
                "--test-fraction",
                str(config.TEST_FRACTION),
                "--seed",
                str(config.SPLIT_SEED),
            ],
            cpus=self.settings.cpus,
        )
        key_parts = {
            "code": containers.code_hash(job.code_files(), job.script.parent),
            "inputs": {"data": fsutil.content_hash(data)},
            "arguments": job.arguments,
        }

        def execute() -> tuple[dict[str, Path], dict[str, Any]]:
            result = job.run()
            manifest = json.loads((result.outputs["train"] / config.MANIFEST_FILE).read_text())
            hashes = {name: fsutil.content_hash(path) for name, path in result.outputs.items()}
            outputs = {**result.outputs, "log": result.log_path}
            return outputs, {"totals": manifest.get("totals", {}), "classes": _class_count(manifest), "hashes": hashes}

        try:
            outputs, result = self._cached(record, key_parts, execute)
        except containers.JobError as error:
            raise self._fail(record, error) from error
        totals = result["totals"]
        detail = " / ".join(f"{split} {totals.get(split, '?')}" for split in config.SPLITS)
        self._finish(record, "Succeeded", f"{detail} images, {result['classes']} classes")
        self._split_hashes = result["hashes"]
        return {split: outputs[split] for split in config.SPLITS}

    def _training_job(
        self,
        name: str,
        root: Path,
        hyperparameters: dict[str, str],
        channels: dict[str, Path],
        cpus: int,
        tensorboard: bool,
    ) -> containers.TrainingJob:
        return containers.TrainingJob(
            job_name=name,
            root=root,
            source_dir=TRAINING_SOURCE_DIR,
            entry_point=TRAINING_ENTRY_POINT,
            hyperparameters={
                **hyperparameters,
                "sagemaker_program": json.dumps(TRAINING_ENTRY_POINT),
                "sagemaker_submit_directory": json.dumps(TRAINING_SOURCE_DIR.as_uri()),
                "sagemaker_container_log_level": "20",
                "sagemaker_job_name": json.dumps(name),
                "sagemaker_region": json.dumps("local"),
            },
            channels=channels,
            cpus=cpus,
            # The script's defaults are the container's absolute paths; here they live under the job root.
            extra_arguments=[
                "--checkpoint-dir",
                CHECKPOINT_LOCAL_PATH,
                "--tensorboard-dir",
                TENSORBOARD_LOCAL_PATH if tensorboard else "none",
                *config.LOCAL_TRAINING_EXTRA_ARGUMENTS,
            ],
            env={"TORCH_HOME": str(self.workdir / "torch-cache"), "MPLCONFIGDIR": str(root / "mplconfig")},
        )

    def _training_key(self, job: containers.TrainingJob, channels: dict[str, str]) -> dict[str, Any]:
        # Job names and the code's location differ per run and per checkout; the code itself is hashed.
        volatile = ("sagemaker_job_name", "sagemaker_submit_directory")
        hyperparameters = {k: v for k, v in job.hyperparameters.items() if k not in volatile}
        return {
            "code": containers.code_hash(job.code_files(), job.source_dir),
            "inputs": channels,
            "hyperparameters": hyperparameters,
            "arguments": [a for a in job.extra_arguments],
        }

    def _watch(self, progress: Progress, who: str, epochs: int) -> Callable[[str], None]:
        def on_line(line: str) -> None:
            rows = contract.parse_metrics(line)
            if rows:
                row = rows[-1]
                progress.epoch(who, int(row["epoch"]), epochs, {k: v for k, v in row.items() if k != "epoch"})

        return on_line

    def tune(self, splits: dict[str, Path]) -> dict[str, str]:
        record = self._begin(STEP_TUNE)
        settings = self.settings
        static = encode_static({**settings.static_hyperparameters, "epochs": settings.tuning_epochs})
        samples = tuning.sample_trials(settings.ranges, settings.trials, self.options.seed)
        channels = {"train": splits["train"], "valid": splits["valid"]}
        channel_hashes = {name: self._split_hashes[name] for name in channels}
        threads = max(1, settings.cpus // settings.parallel)
        step_dir = self.run_dir / "tune"
        jobs = []
        for index, tuned in enumerate(samples, start=1):
            trial = f"trial-{index:02d}"
            hyperparameters = {
                **static,
                **tuned,
                containers.TUNING_METRIC_PARAMETER: json.dumps(config.OBJECTIVE_METRIC),
            }
            job = self._training_job(
                f"{config.BASE_JOB_PREFIX}-tune-{self.run_id}-{index:03d}",
                step_dir / trial,
                hyperparameters,
                channels,
                threads,
                tensorboard=False,
            )
            jobs.append((trial, tuned, job))
        key_parts = {
            "trials": [self._training_key(job, channel_hashes) for _, _, job in jobs],
            "objective": {
                "metric": config.OBJECTIVE_METRIC,
                "type": "Maximize",
                "definitions": config.METRIC_DEFINITIONS,
            },
        }

        def execute() -> tuple[dict[str, Path], dict[str, Any]]:
            progress = self.console.progress(STEP_TUNE, settings.trials * settings.tuning_epochs)
            failed_tails: dict[str, list[str]] = {}

            def run_trial(item: tuple[str, dict[str, str], containers.TrainingJob]) -> tuning.TrialOutcome:
                trial, tuned, job = item
                started = time.perf_counter()
                try:
                    result = job.run(self._watch(progress, trial, settings.tuning_epochs))
                except containers.JobError as error:
                    last = next((line for line in reversed(error.tail) if line.strip()), "")
                    reason = f"{error}: {last.strip()}" if last else str(error)
                    failed_tails[trial] = error.tail
                    return tuning.TrialOutcome(trial, tuned, None, "Failed", reason, time.perf_counter() - started)
                objective = tuning.final_objective(
                    result.log_path.read_text(errors="replace"), config.METRIC_DEFINITIONS, config.OBJECTIVE_METRIC
                )
                if objective is None:
                    reason = f"no {config.OBJECTIVE_METRIC} in the log (the metric regex found nothing)"
                    return tuning.TrialOutcome(trial, tuned, None, "Failed", reason, result.duration_s)
                return tuning.TrialOutcome(trial, tuned, objective, "Completed", None, result.duration_s)

            try:
                with ThreadPoolExecutor(max_workers=settings.parallel) as pool:
                    outcomes = list(pool.map(run_trial, jobs))
            finally:
                progress.close()
            best = tuning.best_trial(outcomes)
            trials_file = step_dir / "trials.json"
            fsutil.write_json_atomic(trials_file, [dataclasses.asdict(outcome) for outcome in outcomes])
            outputs: dict[str, Path] = {"trials": trials_file}
            for trial, _, job in jobs:
                outputs[f"{trial}-log"] = job.root / "log.txt"
            if best is None:
                first = outcomes[0]
                raise containers.JobError(
                    STEP_TUNE,
                    f"every trial failed; {first.name}: {first.failure_reason}",
                    jobs[0][2].root / "log.txt",
                    failed_tails.get(first.name, []),
                )
            best_file = step_dir / "best_hyperparameters.json"
            fsutil.write_json_atomic(best_file, best.tuned)
            outputs["best"] = best_file
            result = {
                "best_trial": best.name,
                "best_objective": best.objective,
                "tuned_hyperparameters": best.tuned,
                "trials": [dataclasses.asdict(outcome) for outcome in outcomes],
            }
            return outputs, result

        try:
            _, result = self._cached(record, key_parts, execute)
        except containers.JobError as error:
            raise self._fail(record, error) from error
        failed = [t for t in result["trials"] if t["status"] != "Completed"]
        detail = (
            f"{settings.trials} trials, {settings.parallel} at a time; best {result['best_trial']} "
            f"{config.OBJECTIVE_METRIC}={result['best_objective']:.4f}"
        )
        if failed:
            detail += f"; {len(failed)} failed ({failed[0]['name']}: {failed[0]['failure_reason']})"
        self._finish(record, "Succeeded", detail)
        self.summary["best_trial"] = result["best_trial"]
        self.summary["tuned_hyperparameters"] = result["tuned_hyperparameters"]
        return result["tuned_hyperparameters"]

    def train(self, splits: dict[str, Path], tuned: dict[str, str]) -> Path:
        record = self._begin(STEP_TRAIN)
        settings = self.settings
        # What the TrainingStep receives: static values, the best job's TunedHyperParameters (strings as the
        # tuner wrote them), and the TrainingEpochs parameter.
        hyperparameters = {
            **encode_static(settings.static_hyperparameters),
            **tuned,
            "epochs": str(settings.training_epochs),
        }
        channels = {"train": splits["train"], "valid": splits["valid"]}
        job = self._training_job(
            f"{config.BASE_JOB_PREFIX}-train-{self.run_id}",
            self.run_dir / "train",
            hyperparameters,
            channels,
            settings.cpus,
            tensorboard=True,
        )
        key_parts = self._training_key(job, {name: self._split_hashes[name] for name in channels})
        self.summary["training_hyperparameters"] = hyperparameters

        def execute() -> tuple[dict[str, Path], dict[str, Any]]:
            progress = self.console.progress(STEP_TRAIN, settings.training_epochs)
            try:
                result = job.run(self._watch(progress, "final", settings.training_epochs))
            finally:
                progress.close()
            rows = contract.parse_metrics(result.log_path.read_text(errors="replace"))
            outputs = {**result.outputs, "log": result.log_path}
            tensorboard = job.root / TENSORBOARD_LOCAL_PATH.lstrip("/")
            if tensorboard.is_dir() and any(tensorboard.iterdir()):
                outputs["tensorboard"] = tensorboard
            return outputs, {
                "last_epoch": rows[-1] if rows else {},
                "model_sha256": fsutil.file_sha256(job.model_tarball),
            }

        try:
            outputs, result = self._cached(record, key_parts, execute)
        except containers.JobError as error:
            raise self._fail(record, error) from error
        last = result["last_epoch"]
        detail = f"{settings.training_epochs} epochs"
        if last:
            detail += f"; {config.OBJECTIVE_METRIC}={last.get(config.OBJECTIVE_METRIC, float('nan')):.4f}"
        self._finish(record, "Succeeded", detail)
        self._model_sha256 = result["model_sha256"]
        return outputs["model"]

    def evaluate(self, model: Path, test_split: Path) -> Path:
        record = self._begin(STEP_EVALUATE)
        job = containers.ProcessingJob(
            job_name=f"{config.BASE_JOB_PREFIX}-evaluate-{self.run_id}",
            root=self.run_dir / "evaluate",
            script=EVALUATE_SCRIPT,
            inputs=[
                containers.ProcessingInput(model, EVALUATE_MODEL_DIR, "model"),
                containers.ProcessingInput(test_split, EVALUATE_TEST_DIR, "test"),
            ],
            outputs=[containers.ProcessingOutput(EVALUATE_OUTPUT_DIR, OUTPUT_EVALUATION)],
            arguments=[
                "--model",
                EVALUATE_MODEL_DIR,
                "--test-dir",
                EVALUATE_TEST_DIR,
                "--output-dir",
                EVALUATE_OUTPUT_DIR,
            ],
            cpus=self.settings.cpus,
            env={"MPLCONFIGDIR": str(self.run_dir / "evaluate" / "mplconfig")},
        )
        key_parts = {
            "code": containers.code_hash(job.code_files(), job.script.parent),
            "inputs": {"model": self._model_sha256, "test": self._split_hashes["test"]},
            "arguments": job.arguments,
        }

        def execute() -> tuple[dict[str, Path], dict[str, Any]]:
            result = job.run()
            folder = result.outputs[OUTPUT_EVALUATION]
            report = folder / config.EVALUATION_FILE
            if not report.is_file():
                raise containers.JobError(job.job_name, f"it wrote no {config.EVALUATION_FILE}", result.log_path)
            return {OUTPUT_EVALUATION: folder, "log": result.log_path}, {}

        try:
            outputs, _ = self._cached(record, key_parts, execute)
        except containers.JobError as error:
            raise self._fail(record, error) from error
        report_path = outputs[OUTPUT_EVALUATION] / config.EVALUATION_FILE
        report = json.loads(report_path.read_text())
        accuracy = json_get(report, config.ACCURACY_JSON_PATH)
        top5 = _maybe(report, "multiclass_classification_metrics.top_5_accuracy.value")
        detail = f"test accuracy {accuracy:.4f}" + (f" (top-5 {top5:.4f})" if top5 is not None else "")
        self._finish(record, "Succeeded", detail)
        self.summary["test_accuracy"] = accuracy
        self.summary["evaluation"] = str(report_path)
        picture = outputs[OUTPUT_EVALUATION] / contract.CONFUSION_MATRIX_IMAGE
        self.summary["confusion_matrix"] = str(picture) if picture.is_file() else None
        return report_path

    def check(self, report_path: Path) -> None:
        record = self._begin(STEP_CHECK)
        report = json.loads(report_path.read_text())
        try:
            accuracy = float(json_get(report, config.ACCURACY_JSON_PATH))
        except (KeyError, TypeError, ValueError) as error:
            raise self._fail(record, f"{report_path} has no number at {config.ACCURACY_JSON_PATH}") from error
        threshold = self.settings.threshold
        passed = accuracy >= threshold
        record.result = {"accuracy": accuracy, "threshold": threshold, "outcome": passed}
        outcome = f"{'>=' if passed else '<'} threshold {threshold:g}: {STEP_REGISTER if passed else STEP_FAIL}"
        self._finish(record, "Succeeded", f"{accuracy:.4f} {outcome}")
        if not passed:
            fail = self._begin(STEP_FAIL)
            message = f"{STEP_CHECK}: test accuracy {accuracy:.4f} is below the AccuracyThreshold {threshold:g}"
            raise self._fail(fail, message)

    def register(self, model: Path, report_path: Path) -> dict[str, Any]:
        record = self._begin(STEP_REGISTER)
        accuracy = json_get(json.loads(report_path.read_text()), config.ACCURACY_JSON_PATH)
        package, created = self.registry.register(
            self.options.model_package_group,
            model,
            report_path,
            approval_status=config.APPROVAL_STATUS,
            description="Fine-tuned torchvision image classifier registered by the local pipeline.",
            metadata={"accuracy": f"{accuracy:.6f}", "run": self.run_id, "workdir": str(self.workdir)},
            environment={
                "SAGEMAKER_PROGRAM": "inference.py",
                "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
                "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
            },
        )
        version = package["ModelPackageVersion"]
        record.result = {"ModelPackageArn": package["ModelPackageArn"], "created": created}
        status = package["ModelApprovalStatus"]
        detail = f"{package['ModelPackageGroupName']} version {version} ({status})"
        if not created:
            detail += f"; the same model as registered by {package['CustomerMetadataProperties'].get('run', '?')}"
        self._finish(record, "Succeeded", detail)
        self.summary["model_package"] = {
            "ModelPackageArn": package["ModelPackageArn"],
            "ModelPackageVersion": version,
            "ModelApprovalStatus": status,
        }
        return package

    def deploy(self, package: dict[str, Any]) -> dict[str, Any] | None:
        group, version = package["ModelPackageGroupName"], package["ModelPackageVersion"]
        record = self._begin(STEP_DEPLOY)
        if not self.options.approve:
            record.status = "Skipped"
            self.console.step(STEP_DEPLOY, "Skipped", None, f"version {version} awaits approval (--approve)")
            return None
        if package["ModelApprovalStatus"] != "Approved":
            package = self.registry.update_approval(
                group, version, "Approved", f"approved by --approve in {self.run_id}"
            )
        self.summary["model_package"]["ModelApprovalStatus"] = package["ModelApprovalStatus"]
        try:
            endpoint_record = endpoint.deploy(
                self.workdir, self.options.endpoint_name, package, port=self.options.port, ray=self.options.ray
            )
        except endpoint.EndpointError as error:
            raise self._fail(record, str(error)) from error
        note = "already serving it" if endpoint_record.get("unchanged") else "started"
        detail = f"approved version {version}; endpoint {self.options.endpoint_name} {note} at {endpoint_record['url']}"
        self._finish(record, "Succeeded", detail)
        self.summary["endpoint"] = {"name": self.options.endpoint_name, "url": endpoint_record["url"]}
        return endpoint_record

    def _mark_unfinished(self, status: str) -> None:
        for step in self.steps.values():
            if step.status == "Executing":
                step.status = status

    # --- the DAG ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.started = time.perf_counter()
        self._started_at = _now()
        self.run_id, self.run_dir = new_run_folder(self.workdir)
        settings = self.settings
        source = str(self.options.data) if self.options.data else "built-in demo (scikit-learn digits)"
        self.console.write(f"Local pipeline {self.run_id} in {self.run_dir}")
        cache = "on" if self.options.cache else "off"
        self.console.write(
            f"  data: {source}; preset {settings.preset}; {settings.trials} trials x {settings.tuning_epochs} epochs, "
            f"final {settings.training_epochs} epochs; {settings.image_size} px; cache {cache}"
        )
        try:
            data = self._data_input()
            splits = self.preprocess(data)
            tuned = self.tune(splits)
            model = self.train(splits, tuned)
            report = self.evaluate(model, splits["test"])
            self.check(report)
            package = self.register(model, report)
            self.deploy(package)
        except PipelineFailed as failure:
            self.summary["failure"] = {"step": failure.step, "reason": failure.reason}
            self._write_record("Failed")
            raise
        except KeyboardInterrupt:
            self._mark_unfinished("Stopped")
            self._write_record("Stopped")
            raise
        except Exception as error:  # recorded, then raised as it is: run.json never says Executing after exit
            current = next((step.name for step in self.steps.values() if step.status == "Executing"), None)
            self._mark_unfinished("Failed")
            self.summary["failure"] = {"step": current, "reason": f"{type(error).__name__}: {error}"}
            self._write_record("Failed")
            raise
        return self._write_record("Succeeded")


def _class_count(manifest: dict[str, Any]) -> int:
    labels = manifest.get("classes") or manifest.get("class_names") or []
    return len(labels) if isinstance(labels, list | dict) else int(labels or 0)


def json_get(document: dict[str, Any], path: str) -> Any:
    """``JsonGet``: walk a dotted path (the ConditionStep's ``json_path``)."""
    value: Any = document
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"{path} not found (missing {part!r})")
        value = value[part]
    return value


def _maybe(document: dict[str, Any], path: str) -> Any:
    try:
        return json_get(document, path)
    except KeyError:
        return None
