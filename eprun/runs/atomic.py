"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every write goes to a temporary file in the target's directory, is flushed and fsynced, and
is then renamed over the target with :func:`os.replace` (atomic on POSIX and Windows). The
directory is fsynced afterwards where the platform allows, so the rename survives a crash.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from pathlib import Path
from typing import Any


def _temp_path(path: Path) -> Path:
    """A fresh, hidden temporary name next to ``path`` (same directory, so same filesystem)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename inside it is durable; silently skipped where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + flush + fsync + os.replace).

    On any failure the temporary file is removed and ``path`` keeps its previous content.
    The file is created with mode 0o666 filtered by the umask, like a plain ``open``.
    """
    path = Path(path)
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_default(obj: Any) -> Any:
    """Turn the non-JSON values a runner tends to log into JSON ones.

    Tensors and numpy values become numbers or nested lists (``.tolist()``), paths
    strings, datetimes ISO strings. Anything else raises ``TypeError`` as ``json`` would.
    """
    if callable(getattr(obj, "tolist", None)):  # torch.Tensor, numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def to_json(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as JSON text (key order kept); see :func:`json_default` for extra types."""
    return json.dumps(obj, indent=indent, sort_keys=False, default=json_default)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (indent=2, key order kept, trailing newline) atomically."""
    atomic_write_text(path, to_json(obj) + "\n")
