"""SIGINT and SIGTERM during a run: the first asks for a stop (:mod:`eprun.stopping`), a second
stops at once. Either way the run ends as :class:`Interrupted`, whose exit code is 128 + the
signal's number, with the command that resumes it."""

from __future__ import annotations

import signal
from pathlib import Path

from eprun import stopping
from eprun.distributed import SINGLE, World
from eprun.errors import EprunError


class Interrupted(EprunError):
    """SIGINT / SIGTERM: the run stopped at a batch boundary after writing a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """SIGINT / SIGTERM request a stop (:mod:`eprun.stopping`): the loop stops at the next batch
    boundary, or sooner where a long computation checks the request. A second signal stops at once."""

    def __init__(self, run_dir: Path, world: World = SINGLE):
        self.run_dir = run_dir
        self.world = world
        self.signum = None
        self._previous = {}

    def __enter__(self):
        stopping.clear()
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second signal: stop now
            raise Interrupted(f"{signal.Signals(signum).name} again: stopped at once; resume from the last "
                              f"checkpoint with: eprun train --resume {self.run_dir}", signum)
        self.signum = signum
        if not self.world.parallel:  # ranks stop together, at a batch boundary they agree on
            stopping.request(signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        stopping.clear()


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
