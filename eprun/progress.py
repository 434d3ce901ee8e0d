"""Progress display: a Rich progress bar with live metrics, or plain log lines (``--quiet``).

Everything goes to stderr so that stdout carries only the command's result (the run path).
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """``quiet``: log lines instead of the bar; ``silent``: nothing (the ranks of a data-parallel
    run other than rank 0)."""

    def __init__(self, total_batches: int, quiet: bool, console: Console | None = None, silent: bool = False):
        self.console = console or Console(stderr=True, quiet=silent)
        quiet = quiet or silent
        self.quiet = quiet
        self._progress = None
        if not quiet:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total_batches, metrics="")

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def show(self, epoch: float, loss: float, accuracy: float, samples_per_s: float) -> None:
        text = f"epoch {epoch:.2f}  loss {loss:.4f}  acc {accuracy:.4f}  {samples_per_s:,.0f} samples/s"
        if self._progress is not None:
            self._progress.update(self._task, description=f"epoch {math.ceil(epoch)}", metrics=text)
        else:
            self.console.print(text, highlight=False, soft_wrap=True)

    def log(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)
