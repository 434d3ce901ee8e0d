"""One run's life around the loop: its summary's status, the sinks of ``train.log_to``, and
whatever the outcome — finished, interrupted, diverged, failed, out of disk — the final summary
and the plots."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from rich.console import Console

from eprun import plots, runs, schema, stopping
from eprun.errors import StorageError
from eprun.recipe import Recipe
from eprun.runner.experiment import Experiment
from eprun.runner.loop import run_loop
from eprun.runner.monitors import add_warning
from eprun.runner.state import Position, Window
from eprun.runner.stop_signals import Interrupted


def open_sinks(exp: Experiment, run_dir: Path, summary: dict) -> runs.MetricSinks:
    """``train.log_to``'s sinks; a sink's failure is one warning line on stderr (printed through
    the progress display while it runs) and one in the summary, and the run goes on."""
    console = Console(stderr=True)

    def warn(text: str) -> None:
        add_warning(summary, text)
        console.print(f"warning: {text}", markup=False, highlight=False, soft_wrap=True)

    wanted = exp.recipe.train.log_to if exp.world.main else []  # rank 0 alone writes
    return runs.open_sinks(wanted, run_dir, schema.to_plain(exp.recipe), warn)


def _finish(run_dir: Path, recipe: Recipe, summary: dict, wall_start: float, wall_before: float) -> None:
    """Write the final summary and the plots (learning curves; alignment with BP where logged),
    whatever the outcome."""
    summary["wall_time_s"] = wall_before + time.perf_counter() - wall_start
    summary.setdefault("best_val_accuracy", None)
    try:
        runs.write_summary(run_dir, summary)
        metrics = runs.read_metrics(run_dir / runs.METRICS_FILE)
        plots.plot_curves(metrics, run_dir / runs.PLOTS_DIR / "curves.png", title=recipe.name)
        plots.plot_alignment(metrics, run_dir / runs.PLOTS_DIR / "alignment.png", title=recipe.name)
    except OSError as exc:
        if summary.get("status") == "finished":  # the run went well: this failure is the one to report
            error = storage_failure(run_dir, summary, exc)
            write_summary_if_possible(run_dir, summary)
            raise error from None
        write_summary_if_possible(run_dir, summary)  # another error is on its way out


def write_summary_if_possible(run_dir: Path, summary: dict) -> None:
    try:
        runs.write_summary(run_dir, summary)
    except OSError:
        pass


def drive(exp: Experiment, run_dir: Path, pos: Position, window: Window, epoch_window: Window,
           quiet: bool, wall_before: float) -> Path:
    """Run the loop with the run's lock held by the caller; whatever the outcome, write the
    final summary and the plots."""
    wall_start = time.perf_counter()
    sinks = open_sinks(exp, run_dir, pos.summary)
    pos.summary["status"] = "running"
    if exp.world.main:
        runs.write_summary(run_dir, pos.summary)
    try:
        run_loop(exp, run_dir, pos, window, epoch_window, quiet, sinks)
    except stopping.StopRequested as exc:  # inside a batch or an evaluation: that work is dropped
        name = signal.Signals(exc.signum).name
        pos.summary.update(status="interrupted", interrupted_by=name)
        if pos.val_pending:
            where = f"the validation of epoch {pos.epoch} (its training is kept; the resumed run validates it first)"
        elif pos.epoch >= exp.recipe.train.epochs:
            where = "the test scoring (every epoch is kept; the resumed run scores the test set)"
        else:
            where = (f"epoch {pos.epoch + 1}, batch {pos.batch + 1} (that batch is dropped; the run resumes "
                     f"from its last checkpoint)")
        raise Interrupted(f"{name}: stopped during {where}; resume with: eprun train --resume {run_dir}",
                          exc.signum) from None
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.exit_code - 128 if isinstance(exc, Interrupted) else signal.SIGINT
        pos.summary.update(status="interrupted", interrupted_by=signal.Signals(signum).name)
        raise
    except OSError as exc:
        raise storage_failure(run_dir, pos.summary, exc) from None
    except BaseException as exc:
        if pos.summary.get("status") == "running":
            pos.summary.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        try:
            pos.summary["cuda_graphs"] = exp.graph_plan.record()  # a capture that failed under auto says so here
            if exp.world.main:
                _finish(run_dir, exp.recipe, pos.summary, wall_start, wall_before)
        finally:
            sinks.close(pos.summary["status"])  # after _finish, which may still turn "finished" to "failed"
    return run_dir


def storage_failure(run_dir: Path, summary: dict, exc: OSError) -> StorageError:
    """A write into the run failed (disk full, file-size limit…): status ``failed`` with the reason;
    the checkpoint written before is whole (atomic writes), and the run resumes once space is back."""
    reason = f"could not write {exc.filename or run_dir}: {exc.strerror or exc}"
    summary.update(status="failed", error=reason)
    last = run_dir / runs.LAST_CHECKPOINT
    after = (f"the last good checkpoint is {last}; free space and resume with: eprun train --resume {run_dir}"
             if last.exists() else "no checkpoint was written; free space and start the run again")
    return StorageError(f"{reason}; the run stopped (status failed); {after}")
