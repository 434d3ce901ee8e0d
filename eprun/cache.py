"""Where eprun keeps what it can rebuild: compiled kernels, internal-error traces.

Light on purpose (no torch): the CLI writes a trace here even when torch itself failed to load."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$EPRUN_CACHE`` if set, else ``~/.cache/eprun``."""
    root = os.environ.get("EPRUN_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "eprun"
