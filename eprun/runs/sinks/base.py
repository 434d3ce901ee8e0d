"""What a metric sink is, what it is sent, and the set of a run's sinks that outlives their failures.

Names: each numeric value of a metrics.jsonl record is one metric, ``<event>/<key>``, or
``<event>/<split>/<key>`` for a record with a split (evaluations), at the record's ``step``:
``train/loss``, ``eval/val/accuracy``, ``gdu/angle_deg/weights.0``. ``epoch`` is a metric like
any other value; ``step`` is where every value of the record goes. Booleans, None and strings
are not metrics. The names are unambiguous: ``event`` and ``split`` never contain a slash,
and a record holds each key once.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Iterable, Protocol

#: The modules each sink needs; the extra of the same name in setup.cfg installs them.
REQUIRED_MODULES = {
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
}

#: The keys that place a record (``step``) or name its metrics (``event``, ``split``).
POINT_KEYS = ("event", "split", "step")


def missing_modules(sink: str) -> list[str]:
    """The modules ``sink`` needs that cannot be imported here (looked up without importing them)."""
    return [module for module in REQUIRED_MODULES[sink] if importlib.util.find_spec(module) is None]


def metric_values(record: dict[str, Any]) -> dict[str, float]:
    """The metrics of one metrics.jsonl record: ``{name: value}`` for each numeric value."""
    prefix = str(record.get("event", "record"))
    if isinstance(record.get("split"), str):
        prefix = f"{prefix}/{record['split']}"
    return {f"{prefix}/{key}": float(value) for key, value in record.items()
            if key not in POINT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Sink(Protocol):
    """Somewhere the records of one run are copied to as they are written to metrics.jsonl."""

    name: str

    def log(self, record: dict[str, Any]) -> None:
        """Write every metric of ``record`` (:func:`metric_values`) at the record's step."""

    def close(self, status: str) -> None:
        """End the run there; ``status`` is summary.json's: finished, failed, interrupted or diverged."""


class MetricSinks:
    """The open sinks of one run. A sink that raises is reported through ``warn`` in one line,
    closed as failed where it still can be, and left out from then on: metrics.jsonl is the
    run's record, a sink only a copy of it for a viewer."""

    def __init__(self, sinks: Iterable[Sink], warn: Callable[[str], None]) -> None:
        self._sinks = list(sinks)
        self._warn = warn

    def log(self, record: dict[str, Any]) -> None:
        for sink in list(self._sinks):
            try:
                sink.log(record)
            except Exception as exc:  # noqa: BLE001 (a copy's failure must not stop the run)
                self._sinks.remove(sink)
                self._warn(f"metric sink {sink.name} failed ({reason(exc)}); the run goes on without it, "
                           f"metrics.jsonl holds every record")
                try:
                    sink.close("failed")
                except Exception:  # noqa: BLE001 (reported just above)
                    pass

    def close(self, status: str) -> None:
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            try:
                sink.close(status)
            except Exception as exc:  # noqa: BLE001
                self._warn(f"metric sink {sink.name} could not be closed ({reason(exc)})")


def reason(exc: BaseException) -> str:
    """An exception in a few words: its type and the first line of its message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
