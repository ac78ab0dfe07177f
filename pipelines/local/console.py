"""What people see while the local pipeline runs: a line per step, progress for long steps, a summary.

On a terminal, long steps show a tqdm bar (epochs done out of epochs planned, with the metrics of the latest
epoch line, whatever the definition's MetricDefinitions name them) that disappears when the step ends; elsewhere
(CI logs, pipes) each epoch gets a plain line.
"""

from __future__ import annotations

import sys
import threading
from typing import IO, Any

STEP_COLUMN = 24
STATUS_COLUMN = 10


def _seconds(value: float | None) -> str:
    return f"{value:7.1f} s" if value is not None else " " * 9


class Progress:
    """Epoch progress of one step: a tqdm bar on a terminal, one line per epoch otherwise."""

    def __init__(self, console: Console, label: str, total: int) -> None:
        self.console = console
        self.label = label
        self._lock = threading.Lock()
        self._bar: Any = None
        if console.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"  {label}", unit="epoch", leave=False, file=sys.stderr)

    def epoch(self, who: str, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        with self._lock:
            parts = " ".join(f"{name}={value:.4f}" for name, value in metrics.items())
            if self._bar is not None:
                self._bar.set_postfix_str(f"{who} {parts}".rstrip())
                self._bar.update(1)
            else:
                self.console.write(f"      {self.label} {who} epoch {epoch}/{epochs} {parts}".rstrip())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Console:
    def __init__(self, stream: IO[str] | None = None, interactive: bool | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.quiet = quiet
        self._lock = threading.Lock()

    def write(self, text: str = "") -> None:
        if self.quiet:
            return
        with self._lock:
            print(text, file=self.stream, flush=True)

    def step(self, name: str, status: str, seconds: float | None, detail: str = "") -> None:
        self.write(f"  {name:<{STEP_COLUMN}}{status:<{STATUS_COLUMN}}{_seconds(seconds)}  {detail}".rstrip())

    def details(self, lines: list[str], indent: int = 6) -> None:
        for line in lines:
            self.write(" " * indent + line)

    def progress(self, label: str, total: int) -> Progress:
        return Progress(self, label, total)
