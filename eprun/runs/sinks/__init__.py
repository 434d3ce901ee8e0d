"""Metric sinks (``train.log_to``): the records of metrics.jsonl, written also to TensorBoard
or MLflow as the run goes.

Submodules, one job each: ``base`` (the :class:`Sink` interface, metric names, the set of a
run's sinks, which outlives their failures), ``tensorboard_sink``, ``mlflow_sink``. Neither
tensorboard nor mlflow is imported until a sink of that kind is opened: a run without sinks
never loads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from eprun.runs.sinks.base import REQUIRED_MODULES, MetricSinks, Sink, metric_values, missing_modules, reason
from eprun.runs.sinks.mlflow_sink import MLflowSink
from eprun.runs.sinks.tensorboard_sink import TensorBoardSink

#: ``train.log_to`` names → the sink each opens
SINK_TYPES: dict[str, Callable[[Path, dict[str, Any]], Sink]] = {
    "tensorboard": TensorBoardSink,
    "mlflow": MLflowSink,
}


def open_sinks(log_to: Iterable[str], run_dir: Path, recipe: dict[str, Any],
               warn: Callable[[str], None]) -> MetricSinks:
    """Open the sinks ``log_to`` names for the run in ``run_dir`` (``recipe``: the resolved
    recipe as plain data). One that cannot be opened is reported through ``warn`` and left out."""
    opened = []
    for name in log_to:
        try:
            opened.append(SINK_TYPES[name](Path(run_dir), recipe))
        except Exception as exc:  # noqa: BLE001 (a copy that cannot be made must not stop the run)
            warn(f"metric sink {name} could not be opened ({reason(exc)}); the run goes on without it")
    return MetricSinks(opened, warn)


__all__ = [
    "REQUIRED_MODULES",
    "SINK_TYPES",
    "MLflowSink",
    "MetricSinks",
    "Sink",
    "TensorBoardSink",
    "metric_values",
    "missing_modules",
    "open_sinks",
]
