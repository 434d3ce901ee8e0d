"""Plots of a run's metrics: learning curves of one run, several runs side by side, and groups of
runs (one recipe over several seeds) as mean curves with a band of ± one standard deviation.

Figures are drawn with matplotlib's object API on the Agg canvas (``Figure`` +
``FigureCanvasAgg``), never through pyplot: no GUI backend, no global figure registry to leak
into, nothing to close, safe in threads and headless CI. PNG bytes are rendered in memory and
written with :func:`eprun.runs.atomic_write_bytes` (temp file + ``os.replace``).

Metric records (from the runner)::

    {"event": "train", "epoch": 0.25, "step": 12, "loss": ..., "accuracy": ..., ...}
    {"event": "eval",  "epoch": 1.0,  "step": 48, "split": "val" | "test", "loss": ..., ...}

Other events and keys are ignored; missing or non-numeric values are skipped.
"""

from __future__ import annotations

import io
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from eprun.runs import atomic_write_bytes

Series = tuple[list[float], list[float]]

_SPLIT_STYLE = {
    "train": dict(color="C0", linestyle="-", linewidth=1.0, alpha=0.8),
    "val": dict(color="C1", linestyle="-", marker="o", markersize=4),
    "test": dict(color="C2", linestyle="none", marker="s", markersize=5),
}


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, bool, non-numeric, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _split_of(record: dict[str, Any]) -> str | None:
    """"train" for train events, the split ("val"/"test"/…) for eval events, else None."""
    event = record.get("event")
    if event == "train":
        return "train"
    if event == "eval":
        split = record.get("split")
        return split if isinstance(split, str) and split else None
    return None


def series(metrics: Iterable[dict[str, Any]], split: str, metric: str) -> Series:
    """(epochs, values) of ``metric`` for ``split``, in epoch order, skipping unusable records."""
    points = []
    for record in metrics:
        if not isinstance(record, dict) or _split_of(record) != split:
            continue
        x, y = _number(record.get("epoch")), _number(record.get(metric))
        if x is not None and y is not None:
            points.append((x, y))
    points.sort(key=lambda p: p[0])
    return [p[0] for p in points], [p[1] for p in points]


def _save(fig: Figure, out: Path) -> Path:
    """Render ``fig`` to PNG and write it atomically to ``out``; return ``out``."""
    out = Path(out)
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(out, buffer.getvalue())
    return out


def _no_data(ax: Any) -> None:
    """Mark an axis that has nothing to show."""
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")


def _panel(ax: Any, metrics: list[dict[str, Any]], metric: str, splits: tuple[str, ...]) -> bool:
    """Draw ``metric`` against epoch for each split on ``ax``; return whether anything was drawn."""
    drawn = False
    for split in splits:
        xs, ys = series(metrics, split, metric)
        if xs:
            ax.plot(xs, ys, label=split, **_SPLIT_STYLE.get(split, {}))
            drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend()
    else:
        _no_data(ax)
    return drawn


def _eval_splits(metrics: list[dict[str, Any]]) -> tuple[str, ...]:
    """Eval splits present in ``metrics``: val and test first, then any others."""
    found = {s for r in metrics if isinstance(r, dict) and (s := _split_of(r)) and s != "train"}
    known = [s for s in ("val", "test") if s in found]
    return tuple(known + sorted(found - set(known)))


def plot_curves(metrics: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Learning curves: loss and accuracy against epoch, train as a line, eval splits marked.

    Two panels (loss, accuracy). With no usable data a panel says "no data"; the figure is
    always written. Returns ``out``.
    """
    metrics = list(metrics or [])
    splits = ("train", *_eval_splits(metrics))
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    _panel(loss_ax, metrics, "loss", splits)
    _panel(acc_ax, metrics, "accuracy", splits)
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def _compare_legend(ax: Any, names: list[tuple[str, str]], metric: str) -> None:
    """Legend: one coloured entry per run, plus grey entries for the line styles."""
    handles = [Line2D([], [], color=color, label=name) for name, color in names]
    handles += [
        Line2D([], [], color="0.4", linestyle="-", marker="o", markersize=3, label=f"val {metric}"),
        Line2D([], [], color="0.4", linestyle="--", label=f"train {metric}"),
    ]
    ax.legend(handles=handles, fontsize="small")


def plot_compare(runs: list[tuple[str, list[dict[str, Any]]]], out: Path,
                 metric: str = "accuracy") -> Path:
    """Overlay several runs: val ``metric`` (solid, markers) and train ``metric`` (dashed).

    One colour per run, legend with the run names. Runs without usable data are listed
    in the legend but draw nothing; with no data at all the figure says "no data".
    """
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    names, drawn = [], False
    for i, (name, metrics) in enumerate(runs or []):
        color = f"C{i % 10}"
        names.append((str(name), color))
        val_x, val_y = series(metrics or [], "val", metric)
        train_x, train_y = series(metrics or [], "train", metric)
        if val_x:
            ax.plot(val_x, val_y, color=color, linestyle="-", marker="o", markersize=3)
        if train_x:
            ax.plot(train_x, train_y, color=color, linestyle="--", linewidth=1.0, alpha=0.7)
        drawn = drawn or bool(val_x or train_x)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if names:
        _compare_legend(ax, names, metric)
    if not drawn:
        _no_data(ax)
    return _save(fig, out)


def mean_curve(runs: list[list[dict[str, Any]]], split: str,
               metric: str) -> tuple[list[float], list[float], list[float]]:
    """(epochs, mean, std) of ``metric`` for ``split`` over several runs, at every epoch any run
    logged: the mean of the runs' values there and their sample std (0 where one run has a value)."""
    values_at: dict[float, list[float]] = {}
    for metrics in runs:
        for x, y in zip(*series(metrics or [], split, metric)):
            values_at.setdefault(x, []).append(y)
    xs = sorted(values_at)
    means = [statistics.fmean(values_at[x]) for x in xs]
    stds = [statistics.stdev(values_at[x]) if len(values_at[x]) > 1 else 0.0 for x in xs]
    return xs, means, stds


def plot_groups(groups: list[tuple[str, list[list[dict[str, Any]]]]], out: Path,
                metric: str = "accuracy") -> Path:
    """Each group of runs (label, the runs' metrics) as its mean curve with a band of ± one std:
    val ``metric`` solid with markers, train ``metric`` dashed, one colour per group. With no
    data at all the figure says "no data"."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    names, drawn = [], False
    for i, (label, runs) in enumerate(groups or []):
        color = f"C{i % 10}"
        names.append((f"{label} (n={len(runs)})", color))
        for split, style, band in (("val", dict(linestyle="-", marker="o", markersize=3), 0.25),
                                   ("train", dict(linestyle="--", linewidth=1.0, alpha=0.7), 0.1)):
            xs, means, stds = mean_curve(runs, split, metric)
            if not xs:
                continue
            if split == "val":  # error bars too: a band needs two epochs to show
                ax.errorbar(xs, means, yerr=stds, color=color, capsize=3, **style)
            else:
                ax.plot(xs, means, color=color, **style)
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=color, alpha=band, linewidth=0)
            drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    if names:
        _compare_legend(ax, names, metric)
    if not drawn:
        _no_data(ax)
    return _save(fig, out)


def plot_gdu_traces(ep: dict, bptt: dict, out: Path, units: int = 3, title: str = "") -> Path:
    """Like the GDU figures of Ernoult et al. 2019: for a few units of each tensor, EP's update
    (dashed) and BPTT's negated gradient (solid) against the second-phase step t.

    ``ep`` / ``bptt``: name → (K, *shape) tensors (first example for neurons)."""
    names = list(bptt)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        e, b = ep[name].reshape(ep[name].shape[0], -1), bptt[name].reshape(bptt[name].shape[0], -1)
        strongest = b.abs().sum(0).argsort(descending=True)[:units]
        steps = list(range(e.shape[0]))
        for j, unit in enumerate(strongest.tolist()):
            color = f"C{j}"
            ax.plot(steps, b[:, unit].tolist(), color=color, linestyle="-", linewidth=1.5)
            ax.plot(steps, e[:, unit].tolist(), color=color, linestyle="--", linewidth=1.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("t (second-phase step)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.legend([Line2D([], [], color="k", linestyle="-"), Line2D([], [], color="k", linestyle="--")],
               ["BPTT  −∂L/∂· (T−t)", "EP  Δ(t)"], loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.92, 0.95))
    return _save(fig, out)


def plot_gdu_rmse(metrics_by_estimator: dict[str, dict[str, dict]], out: Path, title: str = "") -> Path:
    """Bar chart of the relative RMSE between EP and BPTT per tensor, one bar group per estimator."""
    estimators = list(metrics_by_estimator)
    names = list(next(iter(metrics_by_estimator.values())))
    fig = Figure(figsize=(max(5.0, 0.8 * len(names) + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(estimators), 1)
    for j, estimator in enumerate(estimators):
        values = [metrics_by_estimator[estimator][n]["relative_rmse"] for n in names]
        ax.bar([i + j * width for i in range(len(names))], values, width=width, label=estimator, color=f"C{j}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("relative RMSE (EP vs BPTT)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_alignment(metrics: list[dict[str, Any]], out: Path, title: str = "") -> Path | None:
    """Target propagation's alignment with BP over training (``alignment`` events): per layer,
    the angle between the update and BP's gradient, and between G_l's Jacobian and F_l's
    transpose. None (nothing written) when the run logged no alignment."""
    records = [r for r in metrics if isinstance(r, dict) and r.get("event") == "alignment"]
    if not records:
        return None
    fig = Figure(figsize=(10, 4))
    panels = (("update_angle_deg/layer", "update ∠ BP gradient (°)"),
              ("jacobian_angle_deg/layer", "feedback Jacobian ∠ forward Jacobianᵀ (°)"))
    for k, (prefix, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        layers = sorted({key[len(prefix):] for r in records for key in r if key.startswith(prefix)}, key=int)
        for layer in layers:
            points = [(_number(r.get("epoch")), _number(r.get(prefix + layer))) for r in records]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=f"layer {layer}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if layers:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)
