"""The local runs of a workdir as ``local-status`` shows them, read from each run folder's ``run.json``.

A run records the process that runs it (PID, host, start time). A run whose record still says ``Executing`` while
that process has gone (killed with SIGKILL, out of memory, a restarted machine) can never finish: it shows as
``Stopped (process gone)``, and so do its steps that were executing. The record itself is left as it is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipelines.util import fsutil, processes

RUN_RECORD = "run.json"  # in each run folder: the run and its steps, shaped like DescribePipelineExecution
RUN_ID = re.compile(r"run-(\d{4,})")  # run-0001, run-0002, ...
PROCESS_GONE = "Stopped (process gone)"


class RunNotFound(Exception):
    """No such run in the workdir (or no run at all); the message says which runs there are."""


def run_folders(workdir: Path) -> list[Path]:
    if not workdir.is_dir():
        return []
    found = [path for path in workdir.iterdir() if RUN_ID.fullmatch(path.name) and path.is_dir()]
    return sorted(found, key=run_number)  # by number: run-9999 before run-10000


def run_number(folder: Path) -> int:
    match = RUN_ID.fullmatch(folder.name)
    return int(match.group(1)) if match else -1


_TEXT_FIELDS = ("PipelineExecutionStatus", "StartTime", "FailureReason", "StoppedBy")
_STEP_TEXT_FIELDS = ("StepName", "StepStatus", "FailureReason")


def record_problem(data: Any) -> str | None:
    """What keeps ``data`` from being a run record that ``local-status`` can show, or None."""
    if not isinstance(data, dict):
        return "it is not a JSON object"
    wrong = [key for key in _TEXT_FIELDS if data.get(key) is not None and not isinstance(data[key], str)]
    if data.get("Process") is not None and not isinstance(data["Process"], dict):
        wrong.append("Process")
    steps = data.get("PipelineExecutionSteps")
    if steps is not None and not (isinstance(steps, list) and all(isinstance(step, dict) for step in steps)):
        return "its PipelineExecutionSteps is not a list of objects"
    for step in steps or []:
        wrong += [
            f"step {key}" for key in _STEP_TEXT_FIELDS if step.get(key) is not None and not isinstance(step[key], str)
        ]
        metadata = step.get("Metadata", {})
        if not isinstance(metadata, dict) or not all(isinstance(value, dict) for value in metadata.values()):
            wrong.append("step Metadata")
    wrong = sorted(set(wrong))
    if not wrong:
        return None
    return f"its {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not of the recorded type"


def read_run(folder: Path) -> dict[str, Any]:
    """The run's record; a placeholder record whose status says what is wrong when it cannot be read."""
    try:
        record = fsutil.read_state(folder / RUN_RECORD, record_problem)
    except fsutil.StateFileError as error:
        return {"RunId": folder.name, "PipelineExecutionStatus": "Unknown", "FailureReason": str(error)}
    if record is None:
        return {"RunId": folder.name, "PipelineExecutionStatus": "Unknown", "FailureReason": "no run.json yet"}
    return record


def shown_status(record: dict[str, Any]) -> str:
    """The run's status as it stands: Executing only while the process that runs it is still there."""
    status = str(record.get("PipelineExecutionStatus", "Unknown"))
    process = record.get("Process")
    if status != "Executing" or not isinstance(process, dict):
        return status
    running = processes.is_running(process)
    if running is None:
        return f"Executing (on {process.get('Host')}, pid {process.get('Pid')}: cannot tell from here)"
    return status if running else PROCESS_GONE


def shown_steps(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's steps as they stand: one left Executing by a process that has gone shows as stopped too."""
    steps = list(record.get("PipelineExecutionSteps") or [])
    if shown_status(record) != PROCESS_GONE:
        return steps
    return [{**step, "StepStatus": PROCESS_GONE} if step.get("StepStatus") == "Executing" else step for step in steps]


def summary_lines(workdir: Path) -> list[str]:
    """One line per run: ID, status, start, the last step reached."""
    lines = []
    for folder in run_folders(workdir):
        record = read_run(folder)
        steps = record.get("PipelineExecutionSteps") or [{}]
        last = f"{steps[-1].get('StepName', '-')} {steps[-1].get('StepStatus', '')}".strip()
        lines.append(f"{folder.name}  {shown_status(record):<24} {record.get('StartTime', '?'):<26} {last}")
    return lines


def step_detail(step: dict[str, Any]) -> str:
    """The useful part of a step's metadata: its job ARN, the condition outcome, or the fail message."""
    metadata = step.get("Metadata", {})
    for key in ("TrainingJob", "ProcessingJob", "TuningJob", "RegisterModel", "Model"):
        if "Arn" in metadata.get(key, {}):
            return metadata[key]["Arn"]
    if "Condition" in metadata:
        return f"outcome {metadata['Condition'].get('Outcome')}"
    if "Fail" in metadata:
        return metadata["Fail"].get("ErrorMessage", "")
    return ""


def format_step(step: dict[str, Any]) -> str:
    line = f"{step.get('StepName', '?'):<24} {step.get('StepStatus', '?'):<10}"
    if step.get("CacheHitResult"):
        line += " (cached)"
    detail = step_detail(step)
    if detail:
        line += f" {detail}"
    if step.get("FailureReason"):
        line += f"\n    reason: {step['FailureReason']}"
    return line


def detail_lines(workdir: Path, run_id: str | None) -> list[str]:
    """What ``status`` prints for a SageMaker execution, for one local run (the newest without ``run_id``)."""
    folders = {folder.name: folder for folder in run_folders(workdir)}
    if not folders:
        raise RunNotFound(f"no runs in {workdir}: start one with 'python -m pipelines.run local'")
    if run_id is not None and (not RUN_ID.fullmatch(run_id) or run_id not in folders):
        raise RunNotFound(f"no run {run_id!r} in {workdir}; the runs are {', '.join(folders)}")
    folder = folders[run_id] if run_id else run_folders(workdir)[-1]  # the newest: the highest number
    record = read_run(folder)
    status = shown_status(record)
    lines = [f"run       {folder.name} ({folder})", f"status    {status}"]
    if record.get("StartTime"):
        lines.append(f"started   {record['StartTime']}")
    for key in ("FailureReason", "StoppedBy"):
        if record.get(key):
            lines.append(f"{'reason' if key == 'FailureReason' else 'stopped':<9} {record[key]}")
    steps = shown_steps(record)
    lines.append("steps:" if steps else "steps:    none started")
    lines.extend(f"  {format_step(step)}" for step in steps)
    return lines
