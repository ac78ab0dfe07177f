"""Data-parallel training across the processes that ``torchrun`` starts (SageMaker's ``torch_distributed``).

SageMaker's launcher (``sagemaker_training.torch_distributed``) runs, on every instance,
``torchrun --nnodes <hosts> --nproc_per_node <GPUs> [--master_addr algo-1 --master_port 7777 --node_rank i]
train.py <hyperparameters>``; torchrun gives each process ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``, and the toolkit adds the ``SM_*`` variables
(``SM_CURRENT_HOST``, ``SM_HOSTS``, ``SM_NUM_GPUS``, the channels). A plain ``python train.py`` has none of
them and runs without a process group.

This module owns the process group and what the ranks say to each other: sums of metrics, one decision taken
by rank 0, agreement on a value, and the post-mortem when a collective fails (which rank died, which one is
stuck). Shipped in the training ``source_dir``: imports only torch and the standard library.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("auto", "nccl", "gloo")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
PEER_EXIT_GRACE_S = 2.0  # how long a rank whose collective failed looks for a peer that ended
# Text of the errors gloo and NCCL raise as plain RuntimeErrors when a peer is gone or too slow.
_COLLECTIVE_ERROR_MARKERS = (
    "gloo",
    "nccl",
    "connection closed",
    "connection reset",
    "timed out",
    "timeout",
    "pair closure",
)


class LaunchError(ValueError):
    """The launcher's environment is incomplete or contradicts itself; the message says what to fix."""


class Stopped(BaseException):
    """SIGTERM reached this rank: torchrun stops every rank when one fails, SageMaker when the job is stopped.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way up swallows it.
    """


@dataclass(frozen=True)
class World:
    """Where this process stands among the ranks; ``launched`` is true under torchrun (even with one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    host: str = field(default_factory=socket.gethostname)
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world_size} (host {self.host}, pid {os.getpid()})"


def from_environment(environ: dict[str, str] | None = None) -> World:
    """The world torchrun describes in the environment, or a world of one for a plain command."""
    env = os.environ if environ is None else environ
    host = env.get("SM_CURRENT_HOST") or socket.gethostname()
    present = [name for name in LAUNCHER_VARIABLES if env.get(name)]
    if not present:
        return World(host=host)
    missing = [name for name in LAUNCHER_VARIABLES if not env.get(name)]
    if missing:
        raise LaunchError(
            f"{', '.join(present)} set but {', '.join(missing)} missing: start the script through torchrun "
            "(python -m torch.distributed.run), or unset these variables to train in one process"
        )
    try:
        rank, world_size, local_rank, local_world_size = (int(env[name]) for name in LAUNCHER_VARIABLES)
    except ValueError:
        values = {name: env[name] for name in LAUNCHER_VARIABLES}
        raise LaunchError(f"torchrun's variables must be whole numbers, got {values}") from None
    if not (0 <= rank < world_size and 0 <= local_rank < local_world_size <= world_size):
        raise LaunchError(
            f"inconsistent launcher variables RANK={rank} WORLD_SIZE={world_size} LOCAL_RANK={local_rank} "
            f"LOCAL_WORLD_SIZE={local_world_size}"
        )
    return World(rank, world_size, local_rank, local_world_size, host, launched=True)


def backend_for(requested: str, device: torch.device) -> str:
    """``auto``: NCCL for GPUs, gloo for CPUs."""
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


# --- the process group ---------------------------------------------------------------------------------------


@dataclass
class Session:
    """The live process group: every rank's host and pid (for the post-mortem), the backend and the timeout."""

    world: World
    backend: str
    timeout_s: float
    peers: list[tuple[str, int]] = field(default_factory=list)  # (host, pid) by rank
    phase: str = "start-up"  # what the ranks were doing together, for error messages
    previous_sigterm: Any = None  # the handler to put back after a failure has been reported

    @property
    def active(self) -> bool:
        return self.world.launched


def _raise_stopped(signum: int, _frame: Any) -> None:
    raise Stopped(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def joined(state: Session, device: torch.device) -> Iterator[Session]:
    """Join the process group (under torchrun) and learn every rank's host and pid; leave it after success.

    Under torchrun SIGTERM becomes :class:`Stopped`, so a rank that torchrun stops can still say which of its
    peers ended first. After a failure the group is not torn down (that can wait on a dead peer): the process
    exits. A plain command gets no process group and keeps Python's default signal handling.
    """
    if not state.active:
        yield state
        return
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    state.previous_sigterm = previous
    try:
        options: dict[str, Any] = {"timeout": datetime.timedelta(seconds=state.timeout_s)}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            options["device_id"] = device
        dist.init_process_group(state.backend, rank=state.world.rank, world_size=state.world.world_size, **options)
        state.peers = gather((state.world.host, os.getpid()))
        yield state
    except BaseException:
        # The failure is reported next; torchrun's SIGTERM (it stops every rank once one ends) must not cut that
        # short. The reporter puts ``previous_sigterm`` back when it is done.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    dist.destroy_process_group()
    signal.signal(signal.SIGTERM, previous)


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` without a process group)."""
    if not initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank: one decision, taken once."""
    if not initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_problem(problem: str | None) -> str | None:
    """Every rank passes its own problem (or None) and gets the first one back, naming its rank when there are
    several ranks: all of them then fail together, so none is left waiting for the others."""
    problems = gather(problem)
    for rank, text in enumerate(problems):
        if text is not None:
            return text if len(problems) == 1 else f"rank {rank}: {text}"
    return None


def sum_across(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks, in float64 (counts stay exact up to 2**53)."""
    if not initialized():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank: each rank then evaluates rank 0's network.

    DDP sends rank 0's buffers at the start of each forward pass, so after the last step every rank holds its
    own last update; the artifact is rank 0's.
    """
    if not initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


# --- failures ------------------------------------------------------------------------------------------------


def is_collective_failure(error: BaseException) -> bool:
    """An error raised because another rank went away or did not answer in time."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in _COLLECTIVE_ERROR_MARKERS)


def _is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


@dataclass(frozen=True)
class Peer:
    rank: int
    pid: int
    state: str  # 'running', 'ended' (a zombie torchrun has not reaped yet: its exit status is known) or 'gone'
    exit_code: int | None = None  # waitpid status of an ended peer

    def ended(self, host: str, phase: str) -> str:
        who = f"rank {self.rank} (pid {self.pid}) on host {host}"
        if self.exit_code is not None and self.exit_code & 0x7F:
            name = signal.Signals(self.exit_code & 0x7F).name
            return f"{who} was killed by {name} during {phase} (out of memory? stopped from outside?)"
        if self.exit_code is not None:
            return f"{who} exited with status {self.exit_code >> 8} during {phase}; its error is in its log"
        return (
            f"{who} ended during {phase}; if it reported no error in its log, it was killed (out of memory? a signal?)"
        )


def _peer(rank: int, pid: int) -> Peer:
    """A peer's state from /proc (field 3 the state, field 52 the exit code of a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return Peer(rank, pid, "gone")
    except OSError:  # no /proc (macOS): ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return Peer(rank, pid, "gone")
        except PermissionError:
            pass
        return Peer(rank, pid, "running")
    if fields and fields[0] in ("Z", "X"):
        exit_code = int(fields[49]) if len(fields) > 49 and fields[49].isdigit() else None
        return Peer(rank, pid, "ended", exit_code)
    return Peer(rank, pid, "running")


def peers_on_this_host(state: Session) -> list[Peer]:
    """The other ranks on this host, as /proc sees them now."""
    return [
        _peer(rank, pid)
        for rank, (host, pid) in enumerate(state.peers)
        if rank != state.world.rank and host == state.world.host
    ]


def explain_collective_failure(state: Session, error: BaseException | None) -> str | None:
    """What a rank can tell about a failed collective (``error``) or torchrun's SIGTERM (``None``).

    A peer on this host that ended is named, with its signal or exit status when the kernel still holds them;
    after a timeout, the peers still running are named as the stuck ones. None when this rank knows nothing
    better than "stopped" (SageMaker stopping the job, a peer on another host): the rank that failed, or the
    launcher, reports the cause then.
    """
    detail = " ".join(str(error).split())[:300] if error is not None else ""
    timed_out = error is not None and _is_timeout(error)
    peers = peers_on_this_host(state)
    deadline = time.monotonic() + (PEER_EXIT_GRACE_S if error is not None and not timed_out else 0)
    while all(p.state == "running" for p in peers) and time.monotonic() < deadline:
        time.sleep(0.05)  # a killed peer's sockets close before the kernel marks it ended
        peers = peers_on_this_host(state)
    ended = [p.ended(state.world.host, state.phase) for p in peers if p.state != "running"]
    if ended and error is not None:
        return "; ".join(ended) + f"; this rank then saw: {detail}"
    if ended:  # torchrun stops the other ranks once one has ended; that one may have reported its own error
        return "stopped by torchrun after " + "; ".join(ended)
    if error is None:
        return None
    if timed_out:
        stuck = ", ".join(f"rank {p.rank} (pid {p.pid})" for p in peers)
        return (
            f"no answer from the other ranks within the collective timeout of {state.timeout_s:g} s "
            f"(--dist-timeout) during {state.phase}: a rank is stuck, for example on a hung file read"
            + (f"; still running on this host: {stuck}" if stuck else "")
            + f"; {detail}"
        )
    return (
        f"lost the other ranks during {state.phase} ({detail}): another rank failed; its error is in its log "
        "and, on its host, in /opt/ml/output/failure"
    )
