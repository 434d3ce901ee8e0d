"""The largest values a recipe may set, and the check that names a value outside its range.

Each bound is far above what any published recipe uses and keeps every value representable
where it goes (relaxation steps reach the compiled kernels as 32-bit integers) and every run
finite: a phase of ``MAX_STEPS`` steps still ends, a layer of ``MAX_UNITS`` units still fits a
machine's memory check (``eprun.memory_check``) rather than overflowing a size.
"""

from __future__ import annotations

from typing import Iterator

MAX_STEPS = 100_000  # T, K, feedback iterations, check_every: steps of one phase
MAX_UNITS = 1_000_000  # units of a dense layer
MAX_CHANNELS = 65_536  # channels of a conv layer
MAX_KERNEL = 64  # kernel, stride, padding, pooling window, crop padding, in pixels
MAX_BATCH = 1_000_000  # examples in a batch
MAX_EXAMPLES = 1_000_000_000  # examples in a split or subset
MAX_COUNT = 1_000_000_000  # epochs, batches between logs or checkpoints, and the like
MAX_SEED = (1 << 63) - 1
MAX_MAGNITUDE = 1_000.0  # learning rates, decays, β, noise, weight scales, tolerances, in absolute value


def within(key: str, value, low, high) -> Iterator[tuple[str, str]]:
    """(key, message) when ``value`` is not in [low, high]."""
    if not low <= value <= high:
        yield key, f"must be between {low:,} and {high:,}, got {value:,}"


def magnitude(key: str, values) -> Iterator[tuple[str, str]]:
    """(key, message) for a value (or each of a list) whose magnitude exceeds :data:`MAX_MAGNITUDE`."""
    for value in values if isinstance(values, list) else [values]:
        if abs(value) > MAX_MAGNITUDE:
            yield key, f"must be at most {MAX_MAGNITUDE:,.0f} in magnitude, got {value:g}"


def each_within(key: str, values, low, high) -> Iterator[tuple[str, str]]:
    """:func:`within` for a value or a list of values."""
    for value in values if isinstance(values, list) else [values]:
        yield from within(key, value, low, high)
