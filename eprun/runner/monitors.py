"""What a run measures beside training, on the batches ``train.*_every`` names: the update's
angle to the BPTT gradient, the relaxation's convergence, target propagation's alignment with BP."""

from __future__ import annotations

from eprun.runner.experiment import Experiment
from eprun.runner.state import Position


def monitor(exp: Experiment, x, y, pos: Position, n_batches: int, log, progress) -> None:
    """``train.gdu_every`` / ``train.diagnostics_every`` / ``train.alignment_every``: log the
    update's angle to the BPTT gradient, the relaxation's convergence, or target propagation's
    alignment with BP, on this batch (before the optimiser step)."""
    from eprun import diagnostics

    cfg = exp.recipe.train
    relaxation = exp.recipe.rule.relaxation()
    step = pos.step + 1
    due = monitors_due(exp, step)
    record = {"epoch": pos.epoch + (pos.batch + 1) / n_batches, "step": step}
    if "alignment" in due:
        log({"event": "alignment", **record, **exp.rule.alignment(x, y, seed=step)})
    if "gdu" in due:
        log({"event": "gdu", **record, **diagnostics.update_angles(exp.net, x, y, relaxation.T)})
    if "diagnostics" in due:
        found = diagnostics.relaxation(exp.net, x, y, relaxation.T, relaxation.K or 1, relaxation.beta or 0.0)
        log({"event": "diagnostics", **record, **found})
        if found["free_residual"] > cfg.convergence_tol:
            warning = (f"free phase not converged at step {step}: residual {found['free_residual']:.2e} > "
                       f"train.convergence_tol {cfg.convergence_tol:.0e} (raise rule.T?)")
            add_warning(pos.summary, warning)
            progress.log(f"warning: {warning}")


def monitors_due(exp: Experiment, step: int) -> set[str]:
    """The monitors of :func:`monitor` that log at training step ``step`` (1-based)."""
    cfg, due = exp.recipe.train, set()
    if cfg.alignment_every and step % cfg.alignment_every == 0 and exp.rule.measures_alignment:
        due.add("alignment")
    if exp.recipe.rule.relaxation() is not None:
        if cfg.gdu_every and step % cfg.gdu_every == 0:
            due.add("gdu")
        if cfg.diagnostics_every and step % cfg.diagnostics_every == 0:
            due.add("diagnostics")
    return due


def add_warning(summary: dict, warning: str) -> None:
    """Keep ``warning`` in the summary (the first 20 of a run)."""
    summary.setdefault("warnings", [])
    if len(summary["warnings"]) < 20:
        summary["warnings"].append(warning)
