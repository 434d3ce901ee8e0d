"""One process writes a run at a time.

The lock is the file ``.lock`` in the run directory, created with O_EXCL and holding the
writer's pid. A lock whose pid is no longer alive (a killed run) is stale and taken over.
"""

from __future__ import annotations

import os
from pathlib import Path

from eprun.errors import RunDirError
from eprun.runs.layout import LOCK_FILE


class RunLock:
    """``with RunLock(run_dir):`` holds the run's lock; a second writer gets a RunDirError.

    ``what`` names the folder in that error ("run", or "sweep" for a sweep directory)."""

    def __init__(self, run_dir: Path, what: str = "run"):
        self.path = Path(run_dir) / LOCK_FILE
        self.what = what

    def __enter__(self) -> "RunLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if _pid_alive(owner):
                    raise RunDirError(f"{self.path.parent}: another process (pid {owner}) is writing this {self.what}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise RunDirError(f"{self.path}: cannot take the {self.what}'s lock")

    def _owner(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def writer_alive(run_dir: Path) -> bool:
    """True when a live process holds the run's lock (the run is being written now)."""
    lock = RunLock(run_dir)
    return lock.path.exists() and _pid_alive(lock._owner())


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
