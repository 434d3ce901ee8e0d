"""scripts/summarise_reproductions.py keeps the recorded seeds whose runs are gone: the JSON files
in docs/reproductions/ are the lasting record of runs that took hours."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "summarise_reproductions.py"


@pytest.fixture
def summary(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("summarise_reproductions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path / "out")
    return module


def seed(number, status="finished", epochs=30, test=2.5):
    return {"seed": number, "status": status, "epochs_completed": epochs,
            "test_error_pct": test if status == "finished" else None,
            "val_error_pct_per_epoch": [[e, 3.0] for e in range(1, epochs + 1)]}


def test_a_run_replaces_its_seed_and_records_without_runs_stay(summary):
    recorded = [seed(0), seed(1, test=3.0), seed(2, status="interrupted", epochs=4, test=None)]
    from_runs = [seed(1, status="running", epochs=7, test=None)]
    merged = summary.merge_seeds(recorded, from_runs)
    assert [(s["seed"], s["status"], s["epochs_completed"]) for s in merged] == [
        (0, "finished", 30), (1, "running", 7), (2, "lost", 4)]


def test_an_unfinished_seed_is_projected_at_its_measured_speed(summary):
    running = {**seed(0, status="running", epochs=10, test=None), "samples_per_s": 550}
    assert summary.hours_left(running, 50) == 40 * 55_000 / 550 / 3600
    assert "1.1 h of training to epoch 50 at 550 samples/s" in summary.projection(running, 50)
    assert summary.projection({**seed(1), "samples_per_s": 550}, 30) == ""


def test_a_lost_seed_is_projected_as_a_fresh_run(summary):
    """A seed whose run directory is gone cannot resume: its projection is the whole published
    length at its measured speed, not the epochs it had left."""
    speed = 550  # a made-up speed
    lost = {**seed(0, status="lost", epochs=10, test=None), "samples_per_s": speed}
    assert summary.hours_left(lost, 50) == 50 * 55_000 / speed / 3600
    assert summary.projection(lost, 50).startswith(f"; a fresh run: {50 * 55_000 / speed / 3600:.1f} h of training "
                                                   f"for 50 epochs at {speed} samples/s")
    assert summary.projection(lost, 50, ended="stopped for good") == "; stopped for good"


def test_the_projection_follows_the_recent_windows_not_the_run_mean(summary):
    # a run resumed on faster code, one window holding an hour the process was stopped
    metrics = ([{"event": "train", "epoch": e / 10, "samples": 4000, "window_samples_per_s": 300.0}
                for e in range(1, 30)]
               + [{"event": "train", "epoch": 3 + e / 10, "samples": 4000, "window_samples_per_s": 600.0}
                  for e in range(1, 20)]
               + [{"event": "train", "epoch": 5.0, "samples": 4000, "window_samples_per_s": 1.1},
                  {"event": "train", "epoch": 5.1, "samples": 4000}])
    assert summary.recent_speed(metrics) == 600.0
    assert summary.recent_speed([{"event": "train", "epoch": 1.0, "samples": 10}]) is None
    mean, recent = 150, 600.0  # made-up speeds: a run mean pulled down, the recent windows' median
    running = {**seed(0, status="running", epochs=10, test=None), "samples_per_s": mean,
               "recent_samples_per_s": recent}
    assert summary.hours_left(running, 50) == 40 * 55_000 / recent / 3600
    assert summary.projection(running, 50).endswith(f"at {recent:.0f} samples/s (recent)")
    assert summary.projection({**running, "recent_samples_per_s": None}, 50).endswith(f"at {mean} samples/s (mean)")


def test_the_running_training_error_weights_records_by_samples(summary):
    metrics = [{"event": "train", "epoch": 0.5, "accuracy": 0.8, "samples": 300},
               {"event": "train", "epoch": 1.0, "accuracy": 0.9, "samples": 100},
               {"event": "eval", "split": "val", "epoch": 1, "accuracy": 0.95},
               {"event": "train", "epoch": 1.5, "accuracy": 0.96, "samples": 50}]
    assert summary.train_error_per_epoch(metrics) == [[1, 17.5], [2, 4.0]]


def test_rows_without_runs_keep_their_seeds_and_their_plots(summary, tmp_path):
    out = summary.OUT
    out.mkdir()
    finished = {"row": "p-1h", "seeds": [seed(0), seed(1, test=3.5)]}
    (out / "p-1h.json").write_text(json.dumps(finished))
    (out / "p-1h.png").write_bytes(b"recorded plot")
    partly = {"row": "cvf-1h", "seeds": [seed(0, epochs=100), seed(1, status="running", epochs=3, test=None)]}
    (out / "cvf-1h.json").write_text(json.dumps(partly))
    (out / "cvf-1h.png").write_bytes(b"recorded curves")

    rows = summary.summarise(tmp_path / "no-runs-here")

    assert [r["row"] for r in rows] == ["p-1h", "cvf-1h"]
    p1h = json.loads((out / "p-1h.json").read_text())
    assert p1h["seeds"] == finished["seeds"]
    assert (p1h["n_full_length"], p1h["test_error_pct_mean"], p1h["test_error_pct_std"]) == (2, 3.0, 0.71)
    cvf = json.loads((out / "cvf-1h.json").read_text())
    assert [(s["seed"], s["status"], s["epochs_completed"]) for s in cvf["seeds"]] == [(0, "finished", 100),
                                                                                      (1, "lost", 3)]
    assert cvf["n_full_length"] == 1 and cvf["test_error_pct_mean"] == 2.5
    assert (out / "p-1h.png").read_bytes() == b"recorded plot"
    assert (out / "cvf-1h.png").read_bytes() == b"recorded curves"
    assert "seed 1: — (3 ep, lost)" in summary.table(rows)


def test_a_run_folder_updates_its_row_and_redraws_the_plot(summary, tmp_path):
    out = summary.OUT
    out.mkdir()
    (out / "vf-2h.json").write_text(json.dumps({"row": "vf-2h", "seeds": [
        seed(0, epochs=50, test=2.4), seed(1, status="running", epochs=29, test=None)]}))
    (out / "vf-2h.png").write_bytes(b"old plot")
    run = tmp_path / "runs" / "ernoult2020_vf-2h-seed1" / "vf-2h-20261205-034829"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: vf-2h\nseed: 1\n")
    (run / "summary.json").write_text(json.dumps({
        "status": "running", "epochs_completed": 2, "samples_per_s": 750.0, "best_val_accuracy": 0.96}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in [
        {"event": "train", "epoch": 1.0, "accuracy": 0.9, "samples": 100},
        {"event": "eval", "split": "val", "epoch": 1, "accuracy": 0.94},
        {"event": "train", "epoch": 2.0, "accuracy": 0.95, "samples": 100},
        {"event": "eval", "split": "val", "epoch": 2, "accuracy": 0.96}]))

    rows = summary.summarise(tmp_path / "runs")

    vf = json.loads((out / "vf-2h.json").read_text())
    assert [r["row"] for r in rows] == ["vf-2h"]
    assert [(s["seed"], s["status"], s["epochs_completed"]) for s in vf["seeds"]] == [(0, "finished", 50),
                                                                                     (1, "running", 2)]
    assert vf["seeds"][1]["val_error_pct_per_epoch"] == [[1, 6.0], [2, 4.0]]
    assert vf["seeds"][1]["train_error_pct_per_epoch"] == [[1, 10.0], [2, 5.0]]
    assert (out / "vf-2h.png").read_bytes()[:4] == b"\x89PNG"


def test_a_missing_runs_root_changes_nothing(summary, tmp_path, capsys):
    summary.OUT.mkdir()
    (summary.OUT / "README.md").write_text("<!-- rows -->\n<!-- /rows -->\n")
    assert summary.main([str(tmp_path / "no-such-folder")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert summary.main(["--help"]) == 0
    assert (summary.OUT / "README.md").read_text() == "<!-- rows -->\n<!-- /rows -->\n"
    assert sorted(p.name for p in summary.OUT.iterdir()) == ["README.md"]


def test_a_row_of_the_recipe_with_other_settings_reads_its_own_folder_and_says_why_it_ended(summary, tmp_path,
                                                                                            monkeypatch):
    """The same recipe run with other settings is a row of its own: its runs sit under the row's
    folder prefix (not the recipe's), its command names the settings, and a row stopped for good
    says why in place of a projection."""
    monkeypatch.setattr(summary, "ROWS", {
        "p-conv": summary.Row("P-conv", "ernoult2019/proto-conv", 40),
        "p-conv-other": summary.Row("P-conv, other nudge", "ernoult2019/proto-conv", 40,
                                    settings="-s model.nudge=pre_activation",
                                    folder="ernoult2019_proto-conv-pre_activation", ended="stopped: collapsed")})
    speed = 1000.0  # a made-up mean speed, samples/s
    for folder, epochs in (("ernoult2019_proto-conv-seed0", 5), ("ernoult2019_proto-conv-pre_activation-seed0", 3)):
        run = tmp_path / "runs" / folder / "proto-conv-20261205-185945"
        run.mkdir(parents=True)
        (run / "recipe.yaml").write_text("name: proto-conv\nseed: 0\n")
        (run / "summary.json").write_text(json.dumps({"status": "interrupted", "epochs_completed": epochs,
                                                      "samples_per_s": speed}))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"event": "eval", "split": "val", "epoch": e,
                                                               "accuracy": 0.97}) + "\n" for e in range(1, epochs + 1)))

    rows = summary.summarise(tmp_path / "runs")

    assert [(r["row"], r["seeds"][0]["epochs_completed"]) for r in rows] == [("p-conv", 5), ("p-conv-other", 3)]
    assert rows[1]["recipe"] == "ernoult2019/proto-conv -s model.nudge=pre_activation"
    table = summary.table(rows).splitlines()
    assert f"h of training to epoch 40 at {speed:,.0f} samples/s (mean)" in table[2]
    assert table[3].endswith("seed 0: — (3 ep, interrupted; stopped: collapsed) |")
    assert "ended" not in json.loads((summary.OUT / "p-conv.json").read_text())


def test_a_seed_stopped_for_good_says_why_and_its_row_goes_on_with_the_others(summary, tmp_path, monkeypatch):
    """One seed of a row stopped for good (``ended_seeds``) shows its reason in place of a
    projection and keeps it in its record; the row's other seeds are projected and averaged as usual."""
    reason = "stopped: at chance"  # a made-up reason
    monkeypatch.setattr(summary, "ROWS", {
        "cvf-1h": summary.Row("C-VF-1h", "ernoult2020/cvf-1h", 100, ended_seeds=((0, reason),))})
    for number, status, epochs, test in ((0, "interrupted", 55, None), (1, "finished", 100, 0.97),
                                         (2, "interrupted", 12, None)):
        run = tmp_path / "runs" / f"ernoult2020_cvf-1h-seed{number}" / "cvf-1h-20261206-074547"
        run.mkdir(parents=True)
        (run / "recipe.yaml").write_text(f"name: cvf-1h\nseed: {number}\n")
        (run / "summary.json").write_text(json.dumps({"status": status, "epochs_completed": epochs,
                                                      "samples_per_s": 1000.0, "test_accuracy": test}))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"event": "eval", "split": "val", "epoch": e,
                                                               "accuracy": 0.97}) + "\n" for e in range(1, epochs + 1)))

    [row] = summary.summarise(tmp_path / "runs")

    assert [s.get("ended") for s in row["seeds"]] == [reason, None, None]
    assert (row["n_full_length"], row["test_error_pct_mean"]) == (1, 3.0)
    per_seed = summary.table([row]).splitlines()[2]
    assert f"seed 0: — (55 ep, interrupted; {reason})" in per_seed
    assert "seed 2: — (12 ep, interrupted; 1.3 h of training to epoch 100" in per_seed
    recorded = json.loads((summary.OUT / "cvf-1h.json").read_text())
    assert recorded["seeds"][0]["ended"] == reason
