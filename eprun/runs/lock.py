"""One process writes a run at a time.

The lock is the file ``.lock`` in the run directory, holding the writer's pid. A lock whose
pid is no longer alive (a killed run) is stale and taken over.

Invariants, each closing a race between two writers started together:

* the lock never exists without its pid: it is written to a private temporary file first and
  then hard-linked to ``.lock``, which fails if ``.lock`` exists (one winner, and a reader
  never sees an empty lock that would look stale);
* the check-and-take of a stale lock, and the release, happen under an exclusive ``flock`` of
  the run directory itself (held for microseconds, released by the kernel if the holder dies),
  so two processes that both find the same stale lock cannot both take it over. Where the
  filesystem refuses ``flock`` on a directory the link alone still gives one winner for a
  fresh lock.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from eprun.errors import RunDirError
from eprun.runs.layout import LOCK_FILE

try:
    import fcntl
except ImportError:  # not POSIX: the link alone decides
    fcntl = None


class RunLock:
    """``with RunLock(run_dir):`` holds the run's lock; a second writer gets a RunDirError.

    ``what`` names the folder in that error ("run", or "sweep" for a sweep directory)."""

    def __init__(self, run_dir: Path, what: str = "run"):
        self.path = Path(run_dir) / LOCK_FILE
        self.what = what

    def __enter__(self) -> "RunLock":
        pid = os.getpid()
        with _directory_guard(self.path.parent):
            for _ in range(3):
                if _link_with_content(self.path, str(pid)):
                    return self
                owner = self._owner()
                if _pid_alive(owner):
                    raise RunDirError(f"{self.path.parent}: another process (pid {owner}) is writing this {self.what}")
                self.path.unlink(missing_ok=True)  # stale: its writer is gone
        raise RunDirError(f"{self.path}: cannot take the {self.what}'s lock")

    def _owner(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def __exit__(self, *exc) -> None:
        with _directory_guard(self.path.parent):
            if self._owner() == os.getpid():  # never remove a lock another process has since taken
                self.path.unlink(missing_ok=True)


def writer_alive(run_dir: Path) -> bool:
    """True when a live process holds the run's lock (the run is being written now)."""
    lock = RunLock(run_dir)
    return lock.path.exists() and _pid_alive(lock._owner())


def _link_with_content(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` in one step; False when ``path`` already exists."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create, then the pid
        return _create_exclusive(path, text)
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


@contextlib.contextmanager
def _directory_guard(directory: Path):
    """An exclusive ``flock`` on ``directory`` for the duration of the block, where supported."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(directory, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


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
