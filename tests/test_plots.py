"""Tests for eprun.plots: PNG files for normal, empty and mixed metrics, and comparisons."""

from __future__ import annotations

import math
from pathlib import Path

from pytest import approx

from eprun.plots import mean_curve, plot_compare, plot_curves, plot_groups, series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_metrics(epochs: int = 3, batches: int = 4, acc0: float = 0.5) -> list[dict]:
    """Records shaped like the runner's: train per batch, val and test per epoch."""
    records = []
    for e in range(epochs):
        for b in range(1, batches + 1):
            progress = e + b / batches
            records.append({"event": "train", "epoch": progress, "step": e * batches + b,
                            "loss": 1.0 / progress, "accuracy": acc0 + 0.1 * progress,
                            "samples_per_s": 1000.0})
        for split, shift in (("val", 0.0), ("test", -0.01)):
            records.append({"event": "eval", "epoch": e + 1.0, "step": (e + 1) * batches,
                            "split": split, "loss": 1.1 / (e + 1),
                            "accuracy": acc0 + 0.1 * (e + 1) + shift})
    return records


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_plot_curves_normal_overwrites_atomically(tmp_path):
    out = tmp_path / "curves.png"
    out.write_bytes(b"old")
    assert plot_curves(fake_metrics(), out, title="demo") == out
    assert_png(out)


def test_plot_curves_no_data(tmp_path):
    assert_png(plot_curves([], tmp_path / "empty.png"))
    assert_png(plot_curves([{}, {"event": "train"}, {"event": "eval"}], tmp_path / "bare.png"))


def test_plot_curves_mixed_events_and_bad_values(tmp_path):
    metrics = fake_metrics(2) + [
        {"event": "gdu", "layer": 1, "rmse": [0.1, 0.2], "sign_agreement": 0.9},
        {"event": "diagnostics", "epoch": 1.0, "note": "hello"},
        {"event": "train", "epoch": 2.5, "loss": float("nan"), "accuracy": None},
        {"event": "train", "epoch": "x", "loss": 1.0},
        {"event": "eval", "epoch": 2.0, "loss": 0.3},  # no split
        {"event": "eval", "epoch": 2.0, "split": "val", "accuracy": True},
        {"event": "train", "step": 3, "loss": 0.2},  # no epoch
        "not a dict",
    ]
    assert_png(plot_curves(metrics, tmp_path / "mixed.png"))


def test_plot_curves_only_eval_accuracy(tmp_path):
    metrics = [{"event": "eval", "epoch": 1.0, "split": "val", "accuracy": 0.9}]
    assert_png(plot_curves(metrics, tmp_path / "val_only.png"))


def test_series_filters_and_sorts():
    metrics = [
        {"event": "train", "epoch": 0.5, "loss": 2.0},
        {"event": "train", "epoch": 0.25, "loss": 3.0},
        {"event": "train", "epoch": 0.75, "loss": math.inf},
        {"event": "eval", "epoch": 1.0, "split": "val", "loss": 1.0},
    ]
    assert series(metrics, "train", "loss") == ([0.25, 0.5], [3.0, 2.0])
    assert series(metrics, "val", "loss") == ([1.0], [1.0])
    assert series(metrics, "test", "loss") == ([], [])


def test_plot_compare(tmp_path):
    runs = [("run-a", fake_metrics(3, acc0=0.5)), ("run-b", fake_metrics(2, acc0=0.6)),
            ("empty", [])]
    assert_png(plot_compare(runs, tmp_path / "compare.png"))
    assert_png(plot_compare(runs, tmp_path / "compare_loss.png", metric="loss"))


def test_plot_compare_no_data(tmp_path):
    assert_png(plot_compare([], tmp_path / "none.png"))
    assert_png(plot_compare([("a", [{"event": "gdu"}])], tmp_path / "gdu_only.png"))



def test_mean_curve_averages_the_runs_at_each_epoch():
    runs = [fake_metrics(2, acc0=0.5), fake_metrics(2, acc0=0.6), fake_metrics(1, acc0=0.7)]
    xs, means, stds = mean_curve(runs, "val", "accuracy")
    assert xs == [1.0, 2.0]
    assert means[0] == approx((0.6 + 0.7 + 0.8) / 3) and stds[0] == approx(0.1)
    assert means[1] == approx((0.7 + 0.8) / 2) and stds[1] == approx(0.1 / math.sqrt(2))
    assert mean_curve([fake_metrics(1)], "val", "accuracy")[2] == [0.0]  # one run: no spread
    assert mean_curve([], "val", "accuracy") == ([], [], [])


def test_plot_groups(tmp_path):
    groups = [("rule.beta=0.1", [fake_metrics(3, acc0=0.5), fake_metrics(3, acc0=0.55)]),
              ("rule.beta=0.2", [fake_metrics(3, acc0=0.6)]), ("empty", [[]])]
    assert_png(plot_groups(groups, tmp_path / "groups.png"))
    assert_png(plot_groups(groups, tmp_path / "groups_loss.png", metric="loss"))
    assert_png(plot_groups([], tmp_path / "none.png"))
