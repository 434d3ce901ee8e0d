"""env.json: what a run ran on (versions, device, git sha, command line, host, start time)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from eprun.runs.atomic import atomic_write_json
from eprun.runs.layout import ENV_FILE


def _package_version(name: str) -> str | None:
    """Installed version of a distribution, without importing it; None if absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(args: list[str], cwd: Path, timeout: float = 5.0) -> str | None:
    """Output of ``git <args>`` in ``cwd``, stripped; None on any failure (no git, no repo…)."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info(cwd: Path | None = None) -> dict[str, Any]:
    """``{"git_sha": ..., "git_dirty": ...}`` for the repository holding ``cwd`` (None if none)."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    sha = _git(["rev-parse", "HEAD"], cwd)
    if not sha:
        return {"git_sha": None, "git_dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


def _torch_info(device: str) -> dict[str, Any]:
    """torch version, thread count and, for a CUDA device, its name and the CUDA/cuDNN versions."""
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device_name": None,
    }
    from eprun import lean_optimizers

    info["optimizer_short_path"] = lean_optimizers.status()
    if str(device).startswith("cpu"):
        from eprun import native
        from eprun.nets.products import onednn_status

        info["native_relaxation"] = native.status()
        info["input_drive_product"] = onednn_status()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        try:
            info["cuda_device_name"] = torch.cuda.get_device_name(torch.device(device))
        except (RuntimeError, AssertionError, ValueError):
            pass
        info["cuda_version"] = torch.version.cuda
        info["cudnn_version"] = torch.backends.cudnn.version()
    from eprun import precision

    info["precision"] = precision.record()  # train.precision as applied: TF32 switches, relaxation products
    return info


def collect_env(*, device: str, argv: list[str], extra: dict | None = None) -> dict[str, Any]:
    """The env.json record (see :func:`write_env`), without writing it."""
    import eprun

    env: dict[str, Any] = {
        "eprun": eprun.__version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torchvision": _package_version("torchvision"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    env.update(_torch_info(device))
    env.update(git_info())
    env["argv"] = [str(a) for a in argv]
    env["command"] = shlex.join(env["argv"])
    env["cwd"] = os.getcwd()
    env["hostname"] = socket.gethostname()
    env["start_time"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    if extra:
        env.update(extra)
    return env


def write_env(
    run_dir: Path, *, device: str, argv: list[str], extra: dict | None = None
) -> dict[str, Any]:
    """Write ``run_dir/env.json`` atomically and return its content.

    Records python, torch, torchvision and eprun versions, platform, CPU count, torch threads,
    device (and CUDA device name), the git sha of the current directory's repository if any,
    the command line, host name and start time (ISO 8601, local time with offset). ``extra``
    keys are added last and may override.
    """
    env = collect_env(device=device, argv=argv, extra=extra)
    atomic_write_json(Path(run_dir) / ENV_FILE, env)
    return env
