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


def test_a_run_replaces_its_seed_and_finished_records_without_runs_stay(summary):
    recorded = [seed(0), seed(1, test=3.0), seed(2, status="interrupted", epochs=4, test=None),
                seed(3, epochs=20)]  # seed 3 finished a shorter run: not the published length
    from_runs = [seed(1, status="running", epochs=7, test=None)]
    merged = summary.merge_seeds(recorded, from_runs, published_epochs=30)
    assert [(s["seed"], s["status"], s["epochs_completed"]) for s in merged] == [(0, "finished", 30),
                                                                                  (1, "running", 7)]


def test_the_running_training_error_weights_records_by_samples(summary):
    metrics = [{"event": "train", "epoch": 0.5, "accuracy": 0.8, "samples": 300},
               {"event": "train", "epoch": 1.0, "accuracy": 0.9, "samples": 100},
               {"event": "eval", "split": "val", "epoch": 1, "accuracy": 0.95},
               {"event": "train", "epoch": 1.5, "accuracy": 0.96, "samples": 50}]
    assert summary.train_error_per_epoch(metrics) == [[1, 17.5], [2, 4.0]]


def test_rows_without_runs_keep_their_finished_seeds_and_drop_the_lost_ones(summary, tmp_path):
    out = summary.OUT
    out.mkdir()
    kept = {"row": "p-1h", "seeds": [seed(0), seed(1)], "n_full_length": 2}
    (out / "p-1h.json").write_text(json.dumps(kept))
    (out / "p-1h.png").write_bytes(b"recorded plot")
    lost = {"row": "p-3h", "seeds": [seed(0, status="interrupted", epochs=2, test=None)]}
    (out / "p-3h.json").write_text(json.dumps(lost))
    (out / "p-3h.png").write_bytes(b"partial plot")
    partly = {"row": "cvf-1h", "seeds": [seed(0, epochs=100), seed(1, status="running", epochs=1, test=None)]}
    (out / "cvf-1h.json").write_text(json.dumps(partly))

    rows = summary.summarise(tmp_path / "no-runs-here")

    assert [r["row"] for r in rows] == ["p-1h", "cvf-1h"]
    assert json.loads((out / "p-1h.json").read_text()) == kept  # untouched, plot too
    assert (out / "p-1h.png").read_bytes() == b"recorded plot"
    assert not (out / "p-3h.json").exists() and not (out / "p-3h.png").exists()
    cvf = json.loads((out / "cvf-1h.json").read_text())
    assert [s["seed"] for s in cvf["seeds"]] == [0]
    assert cvf["n_full_length"] == 1 and cvf["test_error_pct_mean"] == 2.5
    assert (out / "cvf-1h.png").stat().st_size > 0
