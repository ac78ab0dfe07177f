"""Processes: those of a local endpoint (every one it starts shares the server's session, and is stopped by PID),
and what names a process in a record (PID, host, start time) so that a later command can tell it has gone.

The endpoint server runs as a session leader (``start_new_session``), so its session ID is its PID and every
process it starts (Ray's daemons included, which ``ray start`` detaches from their parent) keeps that session.
Stopping an endpoint signals exactly those PIDs, read from ``/proc``, never processes found by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

# SIGINT/SIGTERM/SIGHUP to a command, or a job's main process ending: what is left of each process tree gets SIGTERM,
# then SIGKILL after this grace.
STOP_GRACE_SECONDS = 5.0
PR_SET_CHILD_SUBREAPER = 36


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def session_members(session_id: int) -> list[int]:
    """Live processes of the session ``session_id``, except this one."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        fields = _stat_fields(int(entry.name))
        # stat after the command: state, ppid, pgrp, session, ...
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[3]) == session_id:
            members.append(int(entry.name))
    return sorted(members)


def descendants(pid: int) -> list[int]:
    """Live processes below ``pid`` in the process tree (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and fields[0] not in ("Z", "X"):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        below = children.get(frontier.pop(), [])
        found.extend(below)
        frontier.extend(below)
    return sorted(found)


def terminate(pids: Iterable[int], grace_seconds: float) -> list[int]:
    """SIGTERM each PID, SIGKILL those still alive after ``grace_seconds``; returns the PIDs signalled."""
    pids = [pid for pid in pids if is_alive(pid)]
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if is_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal_number)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and any(is_alive(pid) for pid in pids):
            _reap(pids)
            time.sleep(0.05)
    return pids


def _reap(pids: Iterable[int]) -> None:
    """Collect the exit status of those of ``pids`` that are this process's children and have ended."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def become_subreaper() -> None:
    """Adopt this process's orphaned descendants (Linux), so that they are reaped here rather than left as zombies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_children() -> None:
    """Collect the exit status of every finished child (adopted ones included): only where all are ours."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, /proc's field 22): with the PID, it names one process."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields is not None and fields[0] not in ("Z", "X") else None
    except (IndexError, ValueError):
        return None


def identity(pid: int | None = None) -> dict[str, object]:
    """What names this process (or ``pid``) in a record: its PID, host and start time."""
    import socket

    pid = os.getpid() if pid is None else pid
    return {"Pid": pid, "Host": socket.gethostname(), "StartTicks": start_ticks(pid)}


def is_running(identity: dict[str, object]) -> bool | None:
    """Whether the process an :func:`identity` names still runs; None when that cannot be told from this host."""
    import socket

    if identity.get("Host") != socket.gethostname() or not isinstance(identity.get("Pid"), int):
        return None
    pid = int(identity["Pid"])  # type: ignore[arg-type]
    return is_alive(pid) and start_ticks(pid) == identity.get("StartTicks")
