"""Slurm resources for a sweep: from flags (``--partition --time --gpus --cpus --mem``) and/or a
small YAML file (``--slurm-config FILE``); a flag wins over the file.

The file holds any of the keys of :class:`SlurmSettings`::

    partition: gpu
    time: "4:00:00"        # minutes (240), or Slurm's forms: MM:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS
    gpus: 1                # per job
    cpus: 8                # per job; also each worker's torch threads
    mem: 32G               # a number (GB) or a size with K, M, G or T
    account: my-lab        # optional: account, qos, constraint
    setup: ["module load cuda/12.1", "source ~/venvs/eprun/bin/activate"]  # shell lines run before each job

A time limit is required: submitit's default (a few minutes) would end most runs early.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from eprun import schema, yaml_reading
from eprun.errors import RecipeError, SweepError
from eprun.limits import MAX_COUNT

_TIME = re.compile(r"(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?")
_MEM = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?)B?", re.IGNORECASE)
_MEM_UNITS_GB = {"": 1.0, "K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}


def time_minutes(value: Union[int, str]) -> int:
    """A Slurm time limit in whole minutes (rounded up): an integer is minutes; a string takes
    Slurm's forms ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``. ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    else:
        match = _TIME.fullmatch(str(value).strip())
        if not match:
            raise ValueError(value)
        d, a, b, c = (int(g) if g is not None else None for g in match.group("d", "a", "b", "c"))
        if d is not None:  # D-H[:M[:S]]
            seconds = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
        elif c is not None:  # H:M:S
            seconds = a * 3600 + b * 60 + c
        elif b is not None:  # M:S
            seconds = a * 60 + b
        else:  # M
            seconds = a * 60
        minutes = math.ceil(seconds / 60)
    if minutes < 1:
        raise ValueError(value)
    return minutes


def mem_gb(value: Union[float, str]) -> float:
    """A memory size in GB: a number is GB; a string ``32G``, ``500M``, ``1T``… ValueError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        gb = float(value)
    else:
        match = _MEM.fullmatch(str(value).strip())
        if not match:
            raise ValueError(value)
        gb = float(match.group("n")) * _MEM_UNITS_GB[match.group("unit").upper()]
    if not 0 < gb < 1e6:
        raise ValueError(value)
    return gb


@dataclass
class SlurmSettings(schema.Section):
    partition: Optional[str] = None
    time: Optional[Union[int, str]] = None
    gpus: Optional[int] = None
    cpus: Optional[int] = None
    mem: Optional[Union[float, str]] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    setup: list[str] = field(default_factory=list)

    def check(self):
        if self.time is None:
            yield "time", ("Slurm jobs need a time limit: --time MINUTES or H:MM:SS (or time: in --slurm-config); "
                           "submitit's default of a few minutes would stop most runs early")
        else:
            try:
                time_minutes(self.time)
            except ValueError:
                yield "time", (f"expected minutes (e.g. 240) or M:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS, "
                               f"got {self.time!r}")
        if self.mem is not None:
            try:
                mem_gb(self.mem)
            except ValueError:
                yield "mem", f"expected GB (e.g. 32) or a size such as 32G, 500M, got {self.mem!r}"
        if self.gpus is not None and not 0 <= self.gpus <= 64:
            yield "gpus", f"must be between 0 and 64 (per job), got {self.gpus}"
        if self.cpus is not None and not 1 <= self.cpus <= MAX_COUNT:
            yield "cpus", f"must be between 1 and {MAX_COUNT:,}, got {self.cpus}"
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(self, key)
            if value is not None and not re.fullmatch(r"[A-Za-z0-9_.,:|&\-]+", value):
                yield key, f"expected a Slurm name (letters, digits, _ . , : | & -), got {value!r}"

    def executor_parameters(self, cluster: str) -> dict[str, Any]:
        """The settings as submitit ``AutoExecutor.update_parameters`` keywords (``cluster``:
        ``slurm`` or ``local``; Slurm-only keys are prefixed so the local executor skips them)."""
        params: dict[str, Any] = {"timeout_min": time_minutes(self.time)}
        if self.gpus is not None:
            params["gpus_per_node"] = self.gpus
        if self.cpus is not None:
            params["cpus_per_task"] = self.cpus
        if self.mem is not None:
            params["mem_gb"] = mem_gb(self.mem)
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key) is not None:
                params[f"slurm_{key}"] = getattr(self, key)
        if self.setup:
            params[f"{cluster}_setup"] = list(self.setup)
        return params


FLAG_KEYS = ("partition", "time", "gpus", "cpus", "mem")


def read_settings(config: Path | None, flags: dict[str, Any], base: dict[str, Any] | None = None) -> SlurmSettings:
    """Settings from ``base`` (a resumed sweep's record), then the ``--slurm-config`` file, then the
    flags that were given (None: not given). Errors name the file and line, or the flag."""
    data: dict[str, Any] = dict(base or {})
    source = schema.Source(str(config) if config else "Slurm settings")
    if config is not None:
        try:
            text = Path(config).read_text()
        except OSError as exc:
            raise SweepError(f"--slurm-config {config}: cannot read it ({exc.strerror or exc})") from None
        try:
            loaded, lines = yaml_reading.load(text, str(config))
        except RecipeError as exc:
            raise SweepError(str(exc)) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise SweepError(f"{config}: expected a mapping of Slurm settings "
                             f"({', '.join(f.name for f in _fields())}), got {type(loaded).__name__}")
        data.update(loaded or {})
        source.lines.update(lines or {})
    for key, value in flags.items():
        if value is not None:
            data[key] = value
            source.overrides[(key,)] = f"--{key} {value}"
    return schema.build(SlurmSettings, data, source)


def _fields():
    import dataclasses

    return dataclasses.fields(SlurmSettings)
