"""Process trees and how they are stopped (the one way: :func:`terminate`), and what names a process in a record
(PID, host, start time) so that a later command can tell it has gone.

A local job and an endpoint server each run as a session leader (``start_new_session``), so the session ID is the
leader's PID and every process it starts (a launcher's workers, Ray's daemons, which ``ray start`` detaches from
their parent) keeps that session or lies below the leader. Stopping signals exactly those PIDs, read from
``/proc``, never processes found by name.
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


def group_alive(pgid: int) -> bool:
    """True while the process group ``pgid`` has a member (a leader's group may outlive the leader)."""
    try:
        os.killpg(pgid, 0)
    except OSError:
        return False
    return True


def tree(pid: int) -> list[int]:
    """``pid`` first, then its session's live processes (while it or its group lives) and every one below it."""
    members = session_members(pid) if is_alive(pid) or group_alive(pid) else []
    return [pid, *sorted({*members, *descendants(pid)} - {pid})]


def terminate(pids: Iterable[int], grace_seconds: float, *, group: int | None = None, reap: bool = True) -> list[int]:
    """SIGTERM each live PID (and the process group ``group``: what its leader forked), SIGKILL what is left after
    ``grace_seconds`` (with what ``group``'s leader started meanwhile); returns the PIDs signalled. ``reap``
    collects the exit status of those that are this process's children: not where a ``Popen`` waits for its own."""
    pids = [pid for pid in pids if is_alive(pid)]
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        if signal_number == signal.SIGKILL and group is not None:
            pids = sorted({*pids, *descendants(group)})
        stragglers = bool(pids) and group is not None and group_alive(group)  # forked after the PIDs were read
        if not stragglers and not any(is_alive(pid) for pid in pids):
            break
        if group is not None:
            with contextlib.suppress(OSError):
                os.killpg(group, signal_number)
        for pid in pids:
            if is_alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal_number)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and any(is_alive(pid) for pid in pids):
            for pid in pids if reap else ():  # this process's children that have ended: their exit status
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
    return pids


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
