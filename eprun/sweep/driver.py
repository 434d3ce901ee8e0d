"""The sweep's loop: keep the backend's slots filled with pending points, watch the workers, and
write sweep.json at every change (a point started, its run found, a point ended).

A failed point is recorded (status, exit code, the last line of its stderr) and the loop goes
on with the others. SIGINT or SIGTERM stops the sweep cleanly: no new point starts, each running
worker is asked once to stop (its run checkpoints at the next batch boundary and ends
``interrupted``), and the loop waits for them, so sweep.json ends consistent: every point
``finished``, ``interrupted``, ``failed`` … or still ``pending``. A second signal is forwarded
too (a local worker then stops at once, from its last checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from eprun.runs import SUMMARY_FILE
from eprun.sweep import worker
from eprun.sweep.backend import Attempt, Backend
from eprun.sweep.record import (FAILED, FINISHED, INTERRUPTED, RUNNING, SUBMITTED, Point, Sweep, now_iso)

POLL_S = 0.25


@dataclass
class Stops:
    """SIGINT / SIGTERM received while the sweep runs (handlers installed in the main thread only)."""

    signals: list[int] = field(default_factory=list)
    _previous: dict = field(default_factory=dict)

    def __enter__(self) -> "Stops":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, lambda signum, frame: self.signals.append(signum))
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Ending:
    """How the loop ended: the signal that stopped it (None: every point ran)."""

    signum: int | None


def drive(sweep: Sweep, backend: Backend, todo: list[Point], log: Callable[[str], None]) -> Ending:
    """Run ``todo`` (in order) on ``backend``; sweep.json is kept current throughout."""
    queue: deque[Point] = deque(todo)
    live: list[tuple[Point, Attempt]] = []
    sweep.status = RUNNING
    sweep.backend = backend.describe()
    sweep.save()
    with Stops() as stops:
        forwarded = 0
        try:
            while queue or live:
                if len(stops.signals) > forwarded:
                    for signum in stops.signals[forwarded:]:
                        log(f"{signal.Signals(signum).name}: stopping {len(live)} running point(s); "
                            f"no new point starts")
                        for _, attempt in live:
                            attempt.stop(signum)
                    forwarded = len(stops.signals)
                    queue.clear()
                if queue:
                    _start(sweep, backend, queue, live, log)
                if _watch(sweep, live, log):
                    sweep.save()
                if queue or live:
                    time.sleep(POLL_S)
        except BaseException:  # the loop itself failed: leave no worker behind, record what became of each
            for _, attempt in live:
                attempt.stop(signal.SIGTERM)
            while live:
                for signum in stops.signals[forwarded:]:  # a signal now: stop them at once
                    for _, attempt in live:
                        attempt.stop(signum)
                forwarded = len(stops.signals)
                _watch(sweep, live, log)
                time.sleep(POLL_S)
            sweep.status = FAILED
            sweep.save()
            raise
    signum = stops.signals[0] if stops.signals else None
    sweep.status = INTERRUPTED if signum else FINISHED if all(p.status == FINISHED for p in sweep.points) else FAILED
    sweep.save()
    return Ending(signum)


def _start(sweep: Sweep, backend: Backend, queue: deque, live: list, log) -> None:
    count = min(backend.slots - len(live), len(queue))
    if count <= 0:
        return
    points = [queue.popleft() for _ in range(count)]
    tasks = [worker.build_task(sweep, point, backend.threads()) for point in points]
    for point in points:
        sweep.point_dir(point).mkdir(parents=True, exist_ok=True)
    attempts = backend.launch(tasks)
    for point, task, attempt in zip(points, tasks, attempts):
        point.status = SUBMITTED if backend.queues else RUNNING
        point.job, point.exit_code, point.error, point.ended_at = attempt.handle, None, None, None
        point.attempts += 1
        point.started_at = now_iso()
        live.append((point, attempt))
        how = "resumed" if "--resume" in task.args else "started"
        log(f"{point.id} {point.label}: {how if not backend.queues else 'submitted'} ({attempt.handle})")
    sweep.save()


def _watch(sweep: Sweep, live: list, log) -> bool:
    """Poll every live worker; record runs found, starts and ends. True when something changed."""
    changed = False
    for entry in list(live):
        point, attempt = entry
        run = worker.find_run(sweep.point_dir(point))
        relative = None if run is None else os.path.relpath(run, sweep.path)
        if relative != point.run and relative is not None:
            point.run, changed = relative, True
        if point.status == SUBMITTED and attempt.started():
            point.status, changed = RUNNING, True
            log(f"{point.id} {point.label}: running ({attempt.handle})")
        outcome = attempt.poll()
        if outcome is None:
            continue
        live.remove(entry)
        run = worker.find_run(sweep.point_dir(point))
        point.run = None if run is None else os.path.relpath(run, sweep.path)
        point.status = worker.settle(outcome.exit_code, run)
        point.exit_code = outcome.exit_code
        point.error = None if point.status == FINISHED else outcome.error
        point.ended_at = now_iso()
        changed = True
        log(f"{point.id} {point.label}: {point.status}" + _detail(point, run))
    return changed


def _detail(point: Point, run) -> str:
    if point.status == FINISHED and run is not None:
        try:
            summary = json.loads((run / SUMMARY_FILE).read_text())
            return f" (test accuracy {summary['test_accuracy']:.4f})"
        except (OSError, ValueError, KeyError, TypeError):
            return ""
    code = "" if point.exit_code is None else f"exit code {point.exit_code}"
    parts = [p for p in (code, point.error) if p]
    return f" ({'; '.join(parts)})" if parts else ""
