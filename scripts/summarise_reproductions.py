"""Summarise full-length reproduction runs into docs/reproductions/: per row, a JSON file with each
seed's scores and learning curve, a plot of the curves (mean ± one std over seeds), and the
table of docs/reproductions/README.md between its ``<!-- rows -->`` markers.

    python scripts/summarise_reproductions.py RUNS_ROOT

RUNS_ROOT holds one folder per (row, seed), named ``<recipe with / as _>-seed<S>`` (or the row's
own ``folder`` where it runs the recipe with other settings), each with the run directory inside
(what ``eprun train RECIPE -s seed=S --out RUNS_ROOT/<folder>`` writes).

The JSON files are the lasting record (runs/ is not kept with the repository and a machine may
lose it): a seed recorded there whose run folder is not under RUNS_ROOT stays as recorded, marked
``lost`` if it had not finished (its curve still shows how far it got; it cannot resume, so its
projection is a fresh run's), and a run folder replaces
its seed's record. The plot is drawn from the records (per epoch the validation error and the
epoch's running training error: its training records' accuracy, weighted by their samples) when
some seed of the row has a run folder; otherwise the recorded plot stays. A seed still training
or stopped early is reported with the epoch it reached and, at its measured speed (the median of
its last log windows' speeds where the run logged them, else its mean), the time the remaining
epochs would take, unless the row or that seed was stopped for good (the row's ``ended`` or
``ended_seeds`` says why; the seed's record keeps it as ``ended``).

Errors are percentages of the test set: ``100 · (1 − test_accuracy)``; the mean and the sample
standard deviation (n − 1) are over the seeds that finished. For target propagation runs (those
that log ``alignment`` events, ``train.alignment_every``) each seed also gets, per epoch, the mean
over that epoch's records of the angle between the DTP update and BP's gradient (layers 1 … N−1
averaged, and each layer) and of the angle between each feedback Jacobian and the forward one's
transpose; the table shows the last epoch's.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

from eprun import plots
from eprun.runs import open_run

OUT = Path(__file__).resolve().parent.parent / "docs" / "reproductions"


class Row(NamedTuple):
    """A reproduction row: the paper's row, the recipe and the published length in epochs; the
    settings its runs add to the recipe (``-s KEY=VALUE``…) and their folder prefix under
    RUNS_ROOT where they differ from the recipe's own; why its runs were stopped for good, if so,
    and why single seeds were (seed → reason)."""

    paper_row: str
    recipe: str
    epochs: int
    settings: str = ""
    folder: str = ""
    ended: str = ""
    ended_seeds: tuple[tuple[int, str], ...] = ()

    def folder_prefix(self) -> str:
        return self.folder or self.recipe.replace("/", "_")

    def command(self) -> str:
        return f"{self.recipe} {self.settings}".strip()


#: row id → its Row
ROWS = {
    "p-1h": Row("Ernoult et al. 2019, Table 1, P-1h", "ernoult2019/proto-mlp-1h", 30),
    # the authors' nudge after σ (EPdisc.stepper, VFdisc.stepper; model.nudge, eprun/nets/mlp.py), each
    # beside its row
    "p-1h-nudge-after-sigma": Row("Ernoult et al. 2019, Table 1, P-1h, nudged after σ", "ernoult2019/proto-mlp-1h", 30,
                                  settings="-s model.nudge=post_activation",
                                  folder="ernoult2019_proto-mlp-1h-post_activation"),
    "ep-1h": Row("Ernoult et al. 2020, Fig. 4 table, EP-1h", "ernoult2020/ep-1h", 30),
    "ep-1h-nudge-after-sigma": Row("Ernoult et al. 2020, Fig. 4 table, EP-1h, nudged after σ", "ernoult2020/ep-1h", 30,
                                   settings="-s model.nudge=post_activation",
                                   folder="ernoult2020_ep-1h-post_activation"),
    "vf-1h": Row("Ernoult et al. 2020, VF 1 hidden layer (commands.txt)", "ernoult2020/vf-1h", 30),
    "vf-1h-nudge-after-sigma": Row("Ernoult et al. 2020, VF 1 hidden layer, nudged after σ", "ernoult2020/vf-1h", 30,
                                   settings="-s model.nudge=post_activation",
                                   folder="ernoult2020_vf-1h-post_activation"),
    "eb-1h": Row("Ernoult et al. 2019, Table 1, EB-1h", "ernoult2019/eb-mlp-1h", 30),
    "p-2h": Row("Ernoult et al. 2019, Table 1, P-2h (= 2020, EP-2h)", "ernoult2019/proto-mlp-2h", 50),
    "p-3h": Row("Ernoult et al. 2019, Table 1, P-3h", "ernoult2019/proto-mlp-3h", 100),
    "vf-2h": Row("Ernoult et al. 2020, VF-2h", "ernoult2020/vf-2h", 50),
    "cep-1h": Row("Ernoult et al. 2020, Fig. 4 table, C-EP-1h", "ernoult2020/cep-1h", 100),
    "cep-1h-nudge-after-sigma": Row("Ernoult et al. 2020, Fig. 4 table, C-EP-1h, nudged after σ", "ernoult2020/cep-1h",
                                    100, settings="-s model.nudge=post_activation",
                                    folder="ernoult2020_cep-1h-post_activation"),
    "cvf-1h": Row("Ernoult et al. 2020, Fig. 4 table, C-VF-1h", "ernoult2020/cvf-1h", 100),
    "cvf-1h-nudge-after-sigma": Row("Ernoult et al. 2020, Fig. 4 table, C-VF-1h, nudged after σ", "ernoult2020/cvf-1h",
                                    100, settings="-s model.nudge=post_activation",
                                    folder="ernoult2020_cvf-1h-post_activation",
                                    ended_seeds=((0, "stopped for good at epoch 55: at chance since epoch 36 "
                                                     "(validation error 4.30% at 35, 90.74% at 36; recipes/README.md)"),
                                                 (1, "stopped for good at epoch 33: at chance since epoch 30 "
                                                     "(validation error 4.00% at 29, 90.00% at 30; recipes/README.md)"),
                                                 (2, "stopped for good at epoch 40: at chance since epoch 37 "
                                                     "(validation error 4.20% at 35, 77.00% at 36, 90.20% at 37; "
                                                     "recipes/README.md)"))),
    # the same with β always positive: whether the random sign's β < 0 phases are what runs away
    "cvf-1h-nudge-after-sigma-one-sided": Row(
        "Ernoult et al. 2020, C-VF-1h, nudged after σ, β > 0 only", "ernoult2020/cvf-1h", 100,
        settings="-s model.nudge=post_activation -s rule.estimator=one-sided",
        folder="ernoult2020_cvf-1h-post_activation-one-sided",
        ended_seeds=tuple((seed, f"stopped for good at epoch 12: at chance since epoch 10 (validation error {before}% "
                                 f"at 9, {after}% at 10; recipes/README.md)")
                          for seed, before, after in ((0, "9.24", "90.74"), (1, "5.82", "90.00")))),
    # the random sign, nudged after σ, at half the recipe's rates: whether smaller steps keep it stable
    "cvf-1h-nudge-after-sigma-half-rates": Row(
        "Ernoult et al. 2020, C-VF-1h, nudged after σ, half the rates", "ernoult2020/cvf-1h", 100,
        settings="-s model.nudge=post_activation -s optim.lr=[0.0025,0.0019]",
        folder="ernoult2020_cvf-1h-post_activation-half-rates",
        ended_seeds=((0, "stopped for good at epoch 59: at chance since epoch 49–50 (validation error 4.98% at 48, "
                         "87.26% at 49, 90.74% at 50; recipes/README.md)"),)),
    # and β > 0 only with the nudge inside σ: whether the nudge's placement is what makes C-VF-1h fall
    "cvf-1h-one-sided": Row("Ernoult et al. 2020, C-VF-1h, β > 0 only", "ernoult2020/cvf-1h", 100,
                            settings="-s rule.estimator=one-sided", folder="ernoult2020_cvf-1h-one-sided",
                            ended_seeds=((0, "stopped for good at epoch 26: at chance since epoch 19–20 (validation "
                                             "error 5.56% at 18, 46.60% at 19, 81.16% at 20; recipes/README.md)"),
                                         (1, "stopped for good at epoch 26: at chance since epoch 20–21 (validation "
                                             "error 6.38% at 19, 36.38% at 20, 89.66% at 21; recipes/README.md)"))),
    "p-conv": Row("Ernoult et al. 2019, Table 1, P-conv", "ernoult2019/proto-conv", 40),
    # the recipe as it was before it took the authors' nudge after σ (model.nudge, eprun/nets/conv.py)
    "p-conv-nudge-before-sigma": Row("Ernoult et al. 2019, Table 1, P-conv, nudged before σ", "ernoult2019/proto-conv",
                                     40, settings="-s model.nudge=pre_activation",
                                     folder="ernoult2019_proto-conv-pre_activation",
                                     ended="stopped for good: collapsed in epoch 2, every output unit out of the "
                                           "nudge's reach (recipes/README.md)"),
    "eb-2h": Row("Ernoult et al. 2019, Table 1, EB-2h", "ernoult2019/eb-mlp-2h", 50),
    "cep-2h": Row("Ernoult et al. 2020, Fig. 4 table, C-EP-2h", "ernoult2020/cep-2h", 150),
    "cvf-2h": Row("Ernoult et al. 2020, Fig. 4 table, C-VF-2h", "ernoult2020/cvf-2h", 150),
    # the MNIST target propagation rows at the authors' code's length (max_epochs: 90); a smaller
    # LeNet-style net than the paper's, whose MNIST net cannot be read from the code (recipes/README.md)
    "ldrl-mnist": Row("Ernoult et al. 2022, L-DRL on MNIST (our conv 16-32 net)", "ernoult2022/mnist-lenet-ldrl", 90),
    "vanilla-dtp-mnist": Row("Ernoult et al. 2022, vanilla DTP on MNIST (our conv 16-32 net)",
                             "ernoult2022/mnist-lenet-vanilla-dtp", 90),
    "bp-mnist": Row("Ernoult et al. 2022, BP baseline on MNIST (our conv 16-32 net)", "ernoult2022/mnist-lenet-bp", 90),
}


def angles_per_epoch(metrics: list[dict]) -> dict[str, list[list[float]]]:
    """Per angle key of the ``alignment`` events (``update_angle_deg/mean``, ``…/layer{l}``,
    ``jacobian_angle_deg/layer{l}``): [[epoch, mean of that epoch's records], …], epochs counted
    from 1 (a record at fractional epoch e belongs to epoch ⌈e⌉)."""
    sums: dict[str, dict[int, list[float]]] = {}
    for m in metrics:
        if m.get("event") != "alignment":
            continue
        epoch = max(1, -int(-m["epoch"] // 1))
        for key, value in m.items():
            if "angle_deg/" in key:
                sums.setdefault(key, {}).setdefault(epoch, []).append(value)
    return {key: [[e, round(statistics.fmean(v), 2)] for e, v in sorted(by_epoch.items())]
            for key, by_epoch in sorted(sums.items())}


def seed_record(run_dir: Path) -> dict:
    info = open_run(run_dir)
    summary, metrics = info.summary, info.metrics
    val = [(m["epoch"], m["accuracy"]) for m in metrics if m.get("event") == "eval" and m.get("split") == "val"]
    test = summary.get("test_accuracy")
    return {
        "seed": info.recipe.get("seed"),
        "run": info.name,
        "status": summary.get("status"),
        "epochs_completed": summary.get("epochs_completed", len(val)),
        "test_error_pct": None if test is None else round(100 * (1 - test), 2),
        "best_val_error_pct": (None if summary.get("best_val_accuracy") is None
                               else round(100 * (1 - summary["best_val_accuracy"]), 2)),
        "last_epoch_train_error_pct": (None if summary.get("train_accuracy") is None
                                       else round(100 * (1 - summary["train_accuracy"]), 2)),
        "wall_time_s": summary.get("wall_time_s"),
        "samples_per_s": summary.get("samples_per_s"),
        "recent_samples_per_s": recent_speed(metrics),
        "val_error_pct_per_epoch": [[e, round(100 * (1 - a), 2)] for e, a in val],
        "train_error_pct_per_epoch": train_error_per_epoch(metrics),
        "angles_deg_per_epoch": angles_per_epoch(metrics),
    }


#: log windows the recent speed is the median of
RECENT_WINDOWS = 20


def recent_speed(metrics: list[dict]) -> float | None:
    """The median speed of the last ``RECENT_WINDOWS`` log windows (``window_samples_per_s`` of the
    ``train`` records), None for a run that logged none. Unlike the run's mean speed it follows
    the code the run is on now (a run resumed on faster code) and is not pulled down by time the
    process was held stopped, which counts only in the one window it fell in."""
    speeds = [m["window_samples_per_s"] for m in metrics
              if m.get("event") == "train" and m.get("window_samples_per_s")]
    return statistics.median(speeds[-RECENT_WINDOWS:]) if speeds else None


def train_error_per_epoch(metrics: list[dict]) -> list[list[float]]:
    """[[epoch, running training error %], …]: per epoch the mean accuracy of its ``train`` records
    weighted by their ``samples`` (a record at fractional epoch e belongs to epoch ⌈e⌉)."""
    sums: dict[int, list[float]] = {}
    for m in metrics:
        if m.get("event") != "train" or m.get("accuracy") is None:
            continue
        epoch, weight = max(1, -int(-m["epoch"] // 1)), m.get("samples") or 1
        total = sums.setdefault(epoch, [0.0, 0.0])
        total[0] += weight * m["accuracy"]
        total[1] += weight
    return [[e, round(100 * (1 - a / n), 2)] for e, (a, n) in sorted(sums.items())]


def curve_records(seed: dict) -> list[dict]:
    """A seed's per-epoch curves as metrics records (``eval``/val and ``train`` events), for the plot."""
    return ([{"event": "eval", "split": "val", "epoch": e, "accuracy": 1 - err / 100}
             for e, err in seed.get("val_error_pct_per_epoch", [])]
            + [{"event": "train", "epoch": e, "accuracy": 1 - err / 100}
               for e, err in seed.get("train_error_pct_per_epoch", [])])


def merge_seeds(recorded: list[dict], from_runs: list[dict]) -> list[dict]:
    """The row's seeds in seed order: each run's record, and the recorded seeds without a run
    (those that had not finished marked ``lost``)."""
    by_seed = {s["seed"]: s if s["status"] == "finished" else {**s, "status": "lost"} for s in recorded}
    by_seed.update({s["seed"]: s for s in from_runs})
    return [by_seed[k] for k in sorted(by_seed)]


#: training examples an epoch: every row trains on MNIST's 60,000 less its 5,000 validation examples
TRAIN_SIZE = 55_000


def speed_of(seed: dict) -> tuple[float | None, str]:
    """The speed a projection uses and its name: the recent one (``recent_speed``) where the run
    logged window speeds, else the run's mean over its training time."""
    if seed.get("recent_samples_per_s"):
        return seed["recent_samples_per_s"], "recent"
    return seed.get("samples_per_s"), "mean"


def hours_left(seed: dict, published_epochs: int) -> float | None:
    """Hours of training the epochs left to the published length would take at the seed's
    measured speed (``speed_of``; None for a finished seed or one without a speed). A ``lost``
    seed cannot resume: it has all the published epochs left, a fresh run."""
    speed, _ = speed_of(seed)
    if seed["status"] == "finished" or not speed:
        return None
    left = published_epochs if seed["status"] == "lost" else max(0, published_epochs - seed["epochs_completed"])
    return left * TRAIN_SIZE / speed / 3600


def summarise(root: Path) -> list[dict]:
    rows = []
    for row_id, spec in ROWS.items():
        prefix, epochs = spec.folder_prefix(), spec.epochs
        folders = sorted(p for p in root.glob(f"{prefix}-seed*") if p.is_dir()
                         and re.fullmatch(rf"{re.escape(prefix)}-seed\d+", p.name))
        from_runs = []
        for folder in folders:
            runs = sorted(d for d in folder.iterdir() if (d / "recipe.yaml").is_file())
            if runs:
                from_runs.append(seed_record(runs[-1]))
        recorded_file = OUT / f"{row_id}.json"
        recorded = json.loads(recorded_file.read_text())["seeds"] if recorded_file.is_file() else []
        seeds = merge_seeds(recorded, from_runs)
        for seed in seeds:
            reason = dict(spec.ended_seeds).get(seed["seed"])
            if reason and seed["status"] != "finished":
                seed["ended"] = reason
        if not seeds:
            continue
        done = [s["test_error_pct"] for s in seeds
                if s["status"] == "finished" and s["epochs_completed"] == epochs and s["test_error_pct"] is not None]
        row = {"row": row_id, "paper_row": spec.paper_row, "recipe": spec.command(), "published_epochs": epochs,
               **({"ended": spec.ended} if spec.ended else {}),
               "n_full_length": len(done),
               "test_error_pct_mean": round(statistics.fmean(done), 2) if done else None,
               "test_error_pct_std": round(statistics.stdev(done), 2) if len(done) > 1 else None,
               "seeds": seeds}
        rows.append(row)
        OUT.mkdir(parents=True, exist_ok=True)
        recorded_file.write_text(json.dumps(row, indent=2) + "\n")
        if from_runs:
            plots.plot_groups([(f"{row_id} ({spec.command()})", [curve_records(s) for s in seeds])],
                              OUT / f"{row_id}.png")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| row | recipe | epochs | seeds at full length | test error % (mean ± std) | per seed (test error %, epochs) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mean = "—" if r["test_error_pct_mean"] is None else (
            f"{r['test_error_pct_mean']:.2f}" + ("" if r["test_error_pct_std"] is None else f" ± {r['test_error_pct_std']:.2f}"))
        per_seed = ", ".join(
            f"seed {s['seed']}: {'—' if s['test_error_pct'] is None else format(s['test_error_pct'], '.2f')}"
            f" ({s['epochs_completed']} ep{'' if s['status'] == 'finished' else ', ' + str(s['status'])}"
            f"{last_angles(s)}{projection(s, r['published_epochs'], r.get('ended', '') or s.get('ended', ''))})"
            for s in r["seeds"])
        lines.append(f"| [{r['row']}]({r['row']}.png) | `{r['recipe']}` | {r['published_epochs']} | "
                     f"{r['n_full_length']} | {mean} | {per_seed} |")
    return "\n".join(lines)


def projection(seed: dict, published_epochs: int, ended: str = "") -> str:
    """"; H h of training to epoch E at S samples/s (recent|mean)" (``hours_left`` at the seed's
    measured speed S, ``speed_of``) for a seed short of the published length E, else ""; for a
    ``lost`` seed "; a fresh run: H h of training for E epochs at …"; for a row stopped for good,
    "; ENDED" in place of the projection."""
    hours = hours_left(seed, published_epochs)
    if hours is None:
        return ""
    if ended:
        return f"; {ended}"
    speed, kind = speed_of(seed)
    if seed["status"] == "lost":
        return f"; a fresh run: {hours:.1f} h of training for {published_epochs} epochs at {speed:,.0f} samples/s ({kind})"
    return f"; {hours:.1f} h of training to epoch {published_epochs} at {speed:,.0f} samples/s ({kind})"


def last_angles(seed: dict) -> str:
    """"; update ∠ to BP 20.4° (23.1° / 17.7°), Jacobian ∠ 25.5° / 20.2° at epoch 90", or "" without angles."""
    angles = seed.get("angles_deg_per_epoch") or {}
    if "update_angle_deg/mean" not in angles:
        return ""
    epoch, mean = angles["update_angle_deg/mean"][-1]

    def at_epoch(prefix: str) -> list[str]:
        keys = sorted((k for k in angles if k.startswith(prefix)), key=lambda k: int(k.rsplit("layer", 1)[1]))
        return [f"{v:.1f}°" for k in keys for e, v in angles[k] if e == epoch]

    layers = at_epoch("update_angle_deg/layer")[:-1]  # the output layer's update is BP's
    jacobians = at_epoch("jacobian_angle_deg/layer")
    return (f"; update ∠ to BP {mean:.1f}° ({' / '.join(layers)}), Jacobian ∠ {' / '.join(jacobians)}"
            f" at epoch {epoch}")


def main(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    root = Path(argv[0])
    if not root.is_dir():  # else every recorded seed would be marked lost
        print(f"RUNS_ROOT {root}: not a folder; give the folder that holds the reproduction runs",
              file=sys.stderr)
        return 2
    rows = summarise(root)
    readme = OUT / "README.md"
    text = readme.read_text()
    start, end = text.index("<!-- rows -->"), text.index("<!-- /rows -->")
    readme.write_text(text[:start] + "<!-- rows -->\n" + table(rows) + "\n" + text[end:])
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
