"""Ending a phase early at a tolerance (``rule.tol``), shared by the nets whose ``relax`` takes
a schedule: the change of a step, and the per-example stop of ``tol_scope: example``."""

from __future__ import annotations

import torch


def check_tol_scope(scope: str) -> str:
    if scope not in ("batch", "example"):
        raise ValueError(f"tol_scope must be 'batch' or 'example', got {scope!r}")
    return scope


def row_change(new: list[torch.Tensor], old: list[torch.Tensor]) -> torch.Tensor:
    """[batch]: each example's max |s_{t+1} − s_t| over its layers (no host synchronisation)."""
    return torch.stack([(n - o).abs().flatten(1).amax(1) for n, o in zip(new, old)]).amax(0)


def largest_change(new: list[torch.Tensor], old: list[torch.Tensor]) -> float:
    """max |s_{t+1} − s_t| over every layer and example (one host synchronisation)."""
    return float(row_change(new, old).max())


def relax_each_example(net, drive: torch.Tensor, state: list[torch.Tensor], steps: int, beta: float,
                       target: torch.Tensor | None, order: str, tol: float, check_every: int) -> list[torch.Tensor]:
    """``tol_scope`` "example" on the torch path: every example stops at its own first check (a step
    t, multiple of ``check_every``, in which none of its states moved by ``tol`` or more; a NaN
    counts as moving), in place on ``state``.

    The examples still relaxing are gathered into a smaller batch after each check, so a stopped
    example costs nothing more: ``net.relax`` runs ``check_every`` − 1 steps on them, then the
    checked step. ``net.last_relax_steps`` is the mean of the steps the examples took."""
    batch = state[0].shape[0]
    rows = torch.arange(batch, device=drive.device)  # the original index of each example still relaxing
    row_steps = torch.full((batch,), float(steps), device=drive.device)
    live, live_drive, live_target = state, drive, target
    taken = 0
    while taken < steps:
        chunk = min(check_every, steps - taken)
        if chunk == check_every:  # this chunk ends at a check (taken is a multiple of check_every)
            if chunk > 1:
                live = net.relax(live_drive, live, chunk - 1, beta, live_target, order=order)
            before = [s.clone() for s in live]
            live = net.relax(live_drive, live, 1, beta, live_target, order=order)
            taken += chunk
            stopped = row_change(live, before) < tol
            if bool(stopped.any()):
                done = rows[stopped]
                row_steps[done] = float(taken)
                for out, s in zip(state, live):
                    out[done] = s[stopped]
                going = ~stopped
                rows, live = rows[going], [s[going] for s in live]
                live_drive = live_drive[going]
                live_target = live_target[going] if live_target is not None else None
                if rows.numel() == 0:
                    break
        else:
            live = net.relax(live_drive, live, chunk, beta, live_target, order=order)
            taken += chunk
    if rows.numel() and live is not state:
        for out, s in zip(state, live):
            out[rows] = s
    net.note_relax(float(row_steps.mean()), "torch")
    return state
