"""Asking a long computation to stop between two of its steps.

The runner turns SIGINT and SIGTERM into a request here; the loops that can run for long —
every torch relaxation, BPTT's unrolling, target propagation's feedback training, C-EP's
nudged phase — call :func:`check` once a step, which raises :class:`StopRequested` once a
request is pending. Reading a Python flag costs nothing next to a step, and involves no host
synchronisation on a GPU. The runner stops at the next batch boundary when the batch ends first,
or, when a check raises inside a batch, drops that batch and keeps the last checkpoint, from which
a resumed run recomputes it exactly. A compiled relaxation is one call and is not checked inside;
a phase has at most ``eprun.limits.MAX_STEPS`` steps.
"""

from __future__ import annotations


class StopRequested(Exception):
    """A stop was requested (by the signal ``signum``) while a computation was running."""

    def __init__(self, signum: int):
        super().__init__(f"stop requested (signal {signum})")
        self.signum = signum


_pending: int | None = None


def request(signum: int) -> None:
    global _pending
    _pending = signum


def clear() -> None:
    global _pending
    _pending = None


def pending() -> int | None:
    """The signal of a pending request, or None."""
    return _pending


def check() -> None:
    """Raise :class:`StopRequested` if a stop was requested."""
    if _pending is not None:
        raise StopRequested(_pending)
