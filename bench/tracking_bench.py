"""What MLflow tracking costs a demo run: ``python -m pipelines.run local`` with tracking on (the default, into
``<workdir>/mlflow.db``) and with ``--no-tracking``, side by side in one invocation, each in a fresh workdir.

The runs alternate (untracked, tracked, untracked, tracked, ... for ``--rounds``), so a change in the machine's
load hits both alike; each figure is the median of its runs. The bench then reads the tracked runs' store and
checks what one demo run must leave there: one parent run, one child per trial with the tuning epochs of metrics,
one Train child with the training epochs, and one Evaluate child whose test accuracy equals evaluation.json's.

Target: tracking costs at most 5 % of the wall time. The last line reads
``demo wall s with tracking: <tracked> vs baseline <untracked> ratio=<untracked / tracked>``: above 1 is faster
than the baseline, and at least 0.952 (1 / 1.05) meets the target.

    python bench/tracking_bench.py              # about three minutes on 2 quiet cores
    python bench/tracking_bench.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from local_pipeline_bench import run_local  # noqa: E402  (one way to time a local run, for both benches)

TARGET_RATIO = 1 / 1.05


def check_store(workdir: Path, record: dict) -> list[str]:
    """What one demo run must leave in the store; returns the problems (none: the target is met)."""
    from mlflow.tracking import MlflowClient

    from entrypoints import tracking

    client = MlflowClient(f"sqlite:///{(workdir / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("ImageClassificationPipeline")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    roles: dict[str, list] = {}
    for run in runs:
        roles.setdefault(run.data.tags.get(tracking.TAG_ROLE, "?"), []).append(run)
    parameters = {item["Name"]: item["Value"] for item in record["PipelineParameters"]}
    definition = json.loads((Path(record["RunFolder"]) / "definition.json").read_text())
    defaults = {item["Name"]: item.get("DefaultValue") for item in definition["Parameters"]}
    trials = int(parameters.get("MaxTuningJobs", defaults["MaxTuningJobs"]))
    tuning_epochs = int(parameters.get("TuningEpochs", defaults["TuningEpochs"]))
    training_epochs = int(parameters.get("TrainingEpochs", defaults["TrainingEpochs"]))
    problems = []
    counts = {role: len(found) for role, found in roles.items()}
    if counts != {"execution": 1, "trial": trials, "train": 1, "evaluate": 1}:
        problems.append(f"runs by role {counts}, expected 1 execution, {trials} trials, 1 train, 1 evaluate")
    for role, epochs in (("trial", tuning_epochs), ("train", training_epochs)):
        for run in roles.get(role, []):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "valid_accuracy"))
            if steps != list(range(1, epochs + 1)):
                problems.append(f"{role} {run.info.run_name}: valid_accuracy at epochs {steps}, expected 1..{epochs}")
    report = json.loads(Path(record["Summary"]["evaluation"]).read_text())
    accuracy = report["multiclass_classification_metrics"]["accuracy"]["value"]
    for run in roles.get("evaluate", []):
        if run.data.metrics.get("test_accuracy") != accuracy:
            problems.append(f"Evaluate's test_accuracy {run.data.metrics.get('test_accuracy')} != {accuracy}")
    summary = f"{counts}; {trials} trials x {tuning_epochs} epochs, Train {training_epochs} epochs"
    print(f"store: {summary}; test accuracy {accuracy:.4f}: {'as expected' if not problems else 'PROBLEMS'}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs (default: %(default)s)")
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the workdirs in (default: temporary)")
    parser.add_argument("local_args", nargs="*", help="more flags for every run (after --), e.g. -- --trials 2")
    args = parser.parse_args(argv)
    base = args.keep or Path(tempfile.mkdtemp(prefix="tracking-bench-"))
    times: dict[str, list[float]] = {"untracked": [], "tracked": []}
    tracked_dirs: list[tuple[Path, dict]] = []
    try:
        for index in range(args.rounds):
            for label, extra in (("untracked", ["--no-tracking"]), ("tracked", [])):
                workdir = base / f"{label}-{index}"
                elapsed, record = run_local(workdir, [*extra, *args.local_args])
                times[label].append(elapsed)
                steps = ", ".join(
                    f"{step['StepName']} {step['Local'].get('DurationSeconds') or 0:.1f}"
                    for step in record["PipelineExecutionSteps"]
                )
                executing = record["ElapsedSeconds"]
                print(f"{label} run {index + 1}: {elapsed:.1f} s wall ({executing:.1f} s executing: {steps})")
                if label == "tracked":
                    tracked_dirs.append((workdir, record))
        problems = check_store(*tracked_dirs[0])
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    for problem in problems:
        print(f"problem: {problem}")
    tracked, untracked = statistics.median(times["tracked"]), statistics.median(times["untracked"])
    ratio = untracked / tracked
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(f"tracking costs {100 * (tracked / untracked - 1):+.1f} % wall time (target <= +5 %: {verdict})")
    print(f"demo wall s with tracking: {tracked:.1f} vs baseline {untracked:.1f} ratio={ratio:.3f}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
