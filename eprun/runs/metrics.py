"""metrics.jsonl: one JSON object per line, appended and flushed line by line.

A run killed mid-write leaves at most one torn line, the last one. :func:`read_metrics`
skips it; :class:`MetricsWriter` cuts it off before appending (on resume), so it never ends
up in the middle of the file. A bad line anywhere else is real corruption and is reported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from eprun.errors import RunDirError
from eprun.runs.atomic import to_json


def _drop_torn_tail(path: Path) -> None:
    """Truncate ``path`` after its last newline, removing an incomplete last line if any."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
    os.truncate(path, data.rfind(b"\n") + 1)


class MetricsWriter:
    """Appends metric records to a JSON-lines file, one flushed line per :meth:`log`.

    ``fsync=True`` also fsyncs after every line (durable against power loss, slower).
    Usable as a context manager.
    """

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        _drop_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8", newline="\n")

    def log(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one JSON line and flush it."""
        if not isinstance(record, dict):
            raise TypeError(f"metrics record must be a dict, got {type(record).__name__}")
        line = to_json(record, indent=None) + "\n"
        self._file.write(line)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Flush and close the file; closing twice is harmless."""
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._file.closed

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoMetrics:
    """A :class:`MetricsWriter` that writes nothing: the ranks of a data-parallel run other than
    rank 0, which alone writes the run directory."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NoMetrics":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _parse_line(raw: bytes) -> dict[str, Any]:
    """One metrics line as a dict; ``ValueError`` if it is not a JSON object."""
    obj = json.loads(raw.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file, in order.

    Blank lines are ignored. An invalid *last* line (a write torn by a crash, or one still in
    progress) is skipped; an invalid line before it raises :class:`RunDirError` naming the
    file and the line number.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunDirError(f"{path}: cannot read metrics ({e.strerror or e})") from None
    lines = data.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            records.append(_parse_line(raw))
        except (ValueError, UnicodeDecodeError) as e:
            if i == last:
                break
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RunDirError(f"{path}:{i + 1}: invalid metrics line ({reason})") from None
    return records


def truncate_metrics(path: Path, n_records: int) -> None:
    """Keep only the first ``n_records`` lines of ``path`` (atomically), e.g. on resume, so the
    records written after the checkpoint being resumed from are not duplicated."""
    from eprun.runs.atomic import atomic_write_bytes

    path = Path(path)
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    complete = [line for line in lines[:-1]] if lines and lines[-1] == b"" else lines[:-1]
    kept = [line for line in complete if line.strip()][:n_records]
    atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
