"""The guarded torchvision download: tried once where data files are missing, never fatal.

Skipped when ``$EPRUN_OFFLINE`` or ``$CI`` is set. Otherwise sockets get a timeout (an
unreachable network cannot hang a run), torchvision's chatter is hidden, any failure is
swallowed (the caller then names the missing files), and the folders a failed attempt created
are removed again if empty.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 30.0


def download_disabled() -> bool:
    """True when downloads must not be attempted ($EPRUN_OFFLINE=1 or $CI set)."""
    offline = os.environ.get("EPRUN_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return offline or ci


def try_torchvision_download(name: str, torchvision_class: str, root: Path, creates: Path) -> bool:
    """``torchvision.datasets.<torchvision_class>(root, download=True)``; True if it succeeded.

    ``creates``: the deepest folder the download would make (removed again, with its new
    parents, when the attempt fails and leaves it empty)."""
    if download_disabled():
        return False
    created = _missing_parents(creates)
    log.info("%s: files not found; trying torchvision download into %s", name, root)
    previous_timeout = socket.getdefaulttimeout()
    try:
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, torchvision_class)
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            dataset_class(str(root), train=True, download=True)
        return True
    except Exception as err:  # noqa: BLE001 - any failure means "not downloaded"
        log.info("%s: download failed: %s", name, err)
        _remove_if_empty(created)
        return False
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _missing_parents(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove each folder (deepest first) if it exists and is empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
