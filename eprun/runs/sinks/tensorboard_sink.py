"""The TensorBoard sink: event files in ``<run>/tensorboard/``, one scalar per metric.

Resume: the resumed run cuts metrics.jsonl back to its checkpoint and writes what follows
again. The resumed session's event file starts with a purge step P, the last step kept in
metrics.jsonl; TensorBoard discards what earlier sessions wrote at steps ≥ P, and the kept
records of step P are written again. So the folder holds exactly metrics.jsonl, each value
once, however many times the run was stopped and resumed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from eprun.runs.layout import METRICS_FILE, TENSORBOARD_DIR
from eprun.runs.metrics import read_metrics
from eprun.runs.sinks.base import metric_values

EVENT_FILE_PREFIX = "events.out.tfevents."


class TensorBoardSink:
    """Scalars ``<event>/<key>`` at each record's step, flushed record by record: what
    metrics.jsonl holds, the event files hold too, even after a kill."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, recipe: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run_dir / TENSORBOARD_DIR
        metrics = run_dir / METRICS_FILE
        kept = read_metrics(metrics) if metrics.exists() else []  # resumed: cut back to the checkpoint
        earlier = sorted(log_dir.glob(EVENT_FILE_PREFIX + "*")) if log_dir.is_dir() else []
        if earlier:
            purge_step = max((record["step"] for record in kept), default=0)
            _wait_past_creation_second(earlier)
            self._writer = SummaryWriter(str(log_dir), purge_step=purge_step)
            replay = [record for record in kept if record["step"] >= purge_step]
        else:  # a new run, or a resumed one that did not log here before: everything kept
            self._writer = SummaryWriter(str(log_dir))
            replay = kept
        for record in replay:
            self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in metric_values(record).items():
            self._writer.add_scalar(tag, value, global_step=record["step"])
        self._writer.flush()

    def close(self, status: str) -> None:
        self._writer.close()


def _wait_past_creation_second(event_files: list[Path]) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the second
    its file was created in: a resumed session's file must be named after the earlier ones',
    else its purge step would be read before the events it discards."""
    seconds = [int(part) for part in (p.name[len(EVENT_FILE_PREFIX):].split(".")[0] for p in event_files)
               if part.isdigit()]
    delay = max(seconds, default=0) + 1 - time.time()
    if delay > 0:
        time.sleep(delay)
