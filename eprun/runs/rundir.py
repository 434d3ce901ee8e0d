"""Run directories: create one (never reusing a name), find one from a path inside it, open it.

Layout::

    runs/<recipe-name>-<YYYYmmdd-HHMMSS>[-n]/
      recipe.yaml  env.json  metrics.jsonl  summary.json  checkpoints/  plots/
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eprun.errors import RunDirError
from eprun.runs.atomic import atomic_write_json
from eprun.runs.layout import METRICS_FILE, RECIPE_FILE, SUBDIRS, SUMMARY_FILE
from eprun.runs.lock import writer_alive
from eprun.runs.metrics import read_metrics

_MAX_SUFFIX = 10_000


def sanitize_name(name: str) -> str:
    """``name`` reduced to ``[A-Za-z0-9._-]`` (other runs of characters become '_').

    Leading dots and separators are dropped so the result is never hidden nor '..';
    an empty result becomes ``"run"``.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).lstrip("._-")
    return cleaned or "run"


def create_stamped_dir(parent: Path, name: str, now: _dt.datetime | None = None) -> Path:
    """Create and return a fresh, empty ``parent/<name>-<YYYYmmdd-HHMMSS>[-n]``.

    The directory is made with :func:`os.mkdir`, which fails if it exists, so two directories
    of one name made in the same second are distinct (``-1``, ``-2`` …) and an existing
    directory is never reused. ``parent`` is created if needed; ``OSError`` passes through.
    """
    parent = Path(parent)
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    return _mkdir_unique(parent, f"{sanitize_name(name)}-{stamp}")


def create_run_dir(parent: Path, name: str, now: _dt.datetime | None = None) -> Path:
    """Create and return a fresh ``parent/<name>-<YYYYmmdd-HHMMSS>[-n]`` with its subfolders
    (see :func:`create_stamped_dir`): concurrent runs of one recipe in the same second get
    distinct directories, and an existing directory is never reused.
    """
    parent = Path(parent)
    try:
        run_dir = create_stamped_dir(parent, name, now)
        for sub in SUBDIRS:
            (run_dir / sub).mkdir()
    except OSError as e:
        raise RunDirError(
            f"cannot create a run directory in {parent} ({e.strerror or e})"
        ) from e
    return run_dir


def _mkdir_unique(parent: Path, base: str) -> Path:
    """``os.mkdir`` ``parent/base``, else ``base-1``, ``base-2`` …; return the one created."""
    for n in range(_MAX_SUFFIX):
        candidate = parent / (base if n == 0 else f"{base}-{n}")
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise RunDirError(f"{parent}: more than {_MAX_SUFFIX} runs named {base}")


def run_dir_of(path: Path) -> Path:
    """The run directory holding ``path`` (resolved).

    ``path`` may be the run directory, a file in it (``metrics.jsonl``), one of its
    subfolders or a file in one (``checkpoints/last.pt``, ``plots/curves.png``).
    Raises :class:`RunDirError` if no such directory holds a recipe.yaml.
    """
    given = Path(path)
    if not given.exists():
        raise RunDirError(f"{given} does not exist")
    start = given.resolve()
    if not start.is_dir():
        start = start.parent
    candidates = [start]
    if start.name in SUBDIRS:
        candidates.append(start.parent)
    for candidate in candidates:
        if (candidate / RECIPE_FILE).is_file():
            return candidate
    raise RunDirError(f"{given} is not an eprun run directory (no {RECIPE_FILE})")


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write ``run_dir/summary.json`` atomically."""
    atomic_write_json(Path(run_dir) / SUMMARY_FILE, summary)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/summary.json``; :class:`RunDirError` if missing or not a JSON object."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RunDirError(f"{path}: cannot read summary ({e.strerror or e})") from e
    except ValueError as e:
        raise RunDirError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_recipe(run_dir: Path) -> dict[str, Any]:
    """The resolved recipe of a run (``yaml.safe_load`` of recipe.yaml) as a dict."""
    path = Path(run_dir) / RECIPE_FILE
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RunDirError(f"{path}: cannot read recipe ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or "cannot parse"
        raise RunDirError(f"{where}: invalid YAML ({problem})") from e
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise RunDirError(f"{path}: expected a mapping, got {type(obj).__name__}")
    return obj


@dataclass
class RunInfo:
    """What :func:`open_run` reads from a run directory."""

    path: Path
    name: str
    recipe: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``summary["status"]`` (running / finished / failed)."""
        return str(self.summary.get("status", "running"))


def _summary_or_status(run_dir: Path, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json; where it is missing or unreadable, the status the run's other files show:
    ``running`` while a live process holds its lock, ``finished`` when its metrics hold the final
    test score, else ``unknown`` (``summary_missing`` is then set)."""
    try:
        summary = read_summary(run_dir)
    except RunDirError:
        if writer_alive(run_dir):
            return {"status": "running"}
        tested = any(m.get("event") == "eval" and m.get("split") == "test" for m in metrics)
        return {"status": "finished" if tested else "unknown", "summary_missing": True}
    summary.setdefault("status", "running")
    return summary


def open_run(path: Path) -> RunInfo:
    """Read a run: its recipe, summary and metrics. ``path`` may be anywhere inside the run.

    A run still being written is fine: a missing or partial summary.json gives the status its
    lock and metrics show (:func:`_summary_or_status`), and a missing metrics.jsonl an empty list.
    """
    run_dir = run_dir_of(path)
    metrics_path = run_dir / METRICS_FILE
    metrics = read_metrics(metrics_path) if metrics_path.exists() else []
    return RunInfo(
        path=run_dir,
        name=run_dir.name,
        recipe=read_recipe(run_dir),
        summary=_summary_or_status(run_dir, metrics),
        metrics=metrics,
    )
