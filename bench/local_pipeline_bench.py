"""Wall time of ``python -m pipelines.run local`` (the demo, default settings) and of the same run again, cached.

Each run builds the demo definition offline (the one ``definition --preset demo`` writes) and executes it, every
step including the Deploy LambdaStep. The bench runs the command twice in a fresh workdir, as a user would (a new
process each time), prints each run's step breakdown from its ``run.json`` (the definition build is the time
before the first step), and the targets:

* the demo run completes in at most 120 s on a 2-core CPU and reaches at least 0.95 test accuracy;
* the second run, with nothing changed and caching on, takes at most 10 % of the first.

The baseline of the caching figure is the first (uncached) run of this same invocation; the last line reads
``cached rerun wall s: <second> vs baseline <first> ratio=<first / second>`` (at least 10 meets the target).

    python bench/local_pipeline_bench.py               # about two minutes on 2 cores
    python bench/local_pipeline_bench.py --keep runs-bench --approve
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUDGET_S = 120.0
ACCURACY_TARGET = 0.95
CACHE_RATIO_TARGET = 10.0


def run_local(workdir: Path, extra: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "local", "--workdir", str(workdir), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(f"the local run failed with exit status {completed.returncode}")
    newest = max(workdir.glob("run-*"), key=lambda p: p.name)
    return elapsed, json.loads((newest / "run.json").read_text())


def breakdown(label: str, elapsed: float, record: dict) -> None:
    steps = record["PipelineExecutionSteps"]
    inside = record["ElapsedSeconds"]
    print(f"{label}: {elapsed:.1f} s wall ({record['RunId']}, {inside:.1f} s executing the definition)")
    print(f"  {'(start, definition build, inputs)':<34}{elapsed - inside:6.1f} s")
    for step in steps:
        local = step.get("Local", {})
        cached = f" (cached from {local['CachedFromRun']})" if local.get("CachedFromRun") else ""
        seconds = f"{local['DurationSeconds']:6.1f} s" if local.get("DurationSeconds") is not None else "       -"
        print(f"  {step['StepName']:<24}{step['StepStatus']:<10}{seconds}{cached}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="workdir to use and keep (default: a temporary one)")
    parser.add_argument("--approve", action="store_true", help="also deploy the endpoint (stopped at the end)")
    args = parser.parse_args(argv)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="local-bench-"))
    extra = ["--approve"] if args.approve else []
    try:
        first, first_record = run_local(workdir, extra)
        breakdown("first run", first, first_record)
        second, second_record = run_local(workdir, extra)
        breakdown("second run", second, second_record)
    finally:
        if args.approve:
            subprocess.run(
                [sys.executable, "-m", "pipelines.run", "endpoint", "stop", "--workdir", str(workdir)],
                cwd=ROOT,
                check=False,
                capture_output=True,
            )
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    accuracy = first_record["Summary"]["test_accuracy"]
    time_verdict = "met" if first <= DEMO_BUDGET_S else "MISSED"
    accuracy_verdict = "met" if accuracy >= ACCURACY_TARGET else "MISSED"
    print(
        f"demo: {first:.1f} s (target <= {DEMO_BUDGET_S:.0f} s: {time_verdict}), "
        f"test accuracy {accuracy:.4f} (target >= {ACCURACY_TARGET}: {accuracy_verdict})"
    )
    ratio = first / second
    print(f"cached rerun wall s: {second:.2f} vs baseline {first:.2f} ratio={ratio:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
