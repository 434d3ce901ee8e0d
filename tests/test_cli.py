"""The command line end to end on tiny nets and synthetic data (Typer's test runner)."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from eprun import catalog
from eprun.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def trained(tiny_recipe, tmp_path):
    result = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "--quiet")
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


def test_train_writes_a_complete_run_directory(trained, tmp_path):
    assert trained.parent == tmp_path / "runs" and trained.name.startswith("tiny-")
    for rel in ("recipe.yaml", "env.json", "metrics.jsonl", "summary.json", "checkpoints/last.pt",
                "checkpoints/best.pt", "plots/curves.png"):
        assert (trained / rel).is_file(), rel
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["epochs_completed"] == 2
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["test_accuracy"] > 0.5
    assert summary["best_val_accuracy"] > 0.5
    for key in ("wall_time_s", "samples_per_s"):
        assert summary[key] > 0
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert {r["event"] for r in records} == {"train", "eval"}
    assert [r["split"] for r in records if r["event"] == "eval"] == ["val", "val", "test"]
    # each log window's own speed: the windows together account for no more than the training time
    windows = [r for r in records if r["event"] == "train"]
    assert all(r["window_samples_per_s"] > 0 for r in windows)
    assert sum(r["samples"] / r["window_samples_per_s"] for r in windows) <= summary["train_time_s"] * (1 + 1e-9)
    env = json.loads((trained / "env.json").read_text())
    assert env["torch"] == torch.__version__
    ckpt = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and "model" in ckpt and "optimizer" in ckpt


def test_resolved_recipe_is_saved_with_overrides(tiny_recipe, tmp_path):
    result = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "-q", "-s", "rule.beta=0.3",
                    "-s", "train.epochs=1")
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    saved = (run / "recipe.yaml").read_text()
    assert "beta: 0.3" in saved and "epochs: 1" in saved and "estimator: one-sided" in saved


def test_eval_reproduces_the_recorded_test_accuracy(trained):
    summary = json.loads((trained / "summary.json").read_text())
    result = invoke("eval", trained / "checkpoints" / "last.pt", "--json")
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["accuracy"] == summary["test_accuracy"]
    assert scored["split"] == "test" and scored["n"] == summary["n_test"]


def test_eval_other_splits_and_explicit_recipe(trained, tiny_recipe):
    val = json.loads(invoke("eval", trained / "checkpoints" / "best.pt", "--split", "val", "--json").stdout)
    summary = json.loads((trained / "summary.json").read_text())
    assert val["accuracy"] == summary["best_val_accuracy"]
    result = invoke("eval", trained / "checkpoints" / "last.pt", "--recipe", tiny_recipe, "--split", "train")
    assert result.exit_code == 0 and result.stdout.startswith("train: accuracy")


def test_reruns_never_overwrite(tiny_recipe, tmp_path):
    dirs = set()
    for _ in range(2):
        result = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "-q", "-s", "train.epochs=1",
                        "-s", "train.max_batches=2")
        dirs.add(result.stdout.strip().splitlines()[-1])
    assert len(dirs) == 2


def test_same_seed_gives_same_metrics(tiny_recipe, tmp_path):
    summaries = []
    for out in ("a", "b"):
        result = invoke("train", tiny_recipe, "--out", tmp_path / out, "-q", "-s", "train.epochs=1",
                        "-s", "rule.estimator=random-sign")
        run = Path(result.stdout.strip().splitlines()[-1])
        summaries.append(json.loads((run / "summary.json").read_text()))
        weights = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
        summaries[-1]["weights"] = weights
    a, b = summaries
    for key in ("test_accuracy", "best_val_accuracy", "train_loss", "train_accuracy"):
        assert a[key] == b[key]
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name])


def test_bp_rule_trains(tiny_recipe, tmp_path):
    result = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "-q", "-s", "rule.kind=bp",
                    "-s", "rule.T=null")
    assert result.exit_code == 2  # T is not a key of the bp rule
    assert "rule.T: unknown key" in result.output
    text = tiny_recipe.read_text().replace("  T: 12\n  K: 5\n  beta: 0.2\n", "").replace("kind: ep", "kind: bp")
    tiny_recipe.write_text(text)
    result = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "-q")
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    assert json.loads((run / "summary.json").read_text())["test_accuracy"] > 0.5


@pytest.mark.parametrize("edit", [
    ("  beta: 0.2", "  betaa: 0.2"),
    ("  T: 12", "  T: twelve"),
    ("  K: 5", "  K: [5"),
    ("  beta: 0.2", "  beta: 0"),
])
def test_bad_recipe_exits_2_with_one_line_and_creates_nothing(tiny_recipe, tmp_path, edit):
    tiny_recipe.write_text(tiny_recipe.read_text().replace(*edit))
    out = tmp_path / "runs"
    result = invoke("train", tiny_recipe, "--out", out)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tiny_recipe) in lines[0]
    assert not out.exists()


def test_fast_dev_run_writes_nothing(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", tiny_recipe, "--fast-dev-run", "-s", "data.dataset=mnist")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("fast-dev-run ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_compare_table_json_and_plot(trained, tiny_recipe, tmp_path):
    other = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "-q", "-s", "rule.estimator=symmetric",
                   "-s", "train.epochs=1")
    other_run = other.stdout.strip().splitlines()[-1]
    result = invoke("compare", trained, other_run, "--json")
    rows = json.loads(result.stdout)
    assert [r["rule"] for r in rows] == ["ep/one-sided", "ep/symmetric"]
    assert rows[0]["epochs"] == 2 and rows[1]["epochs"] == 1
    plot = tmp_path / "cmp.png"
    result = invoke("compare", trained, other_run, "--plot", plot)
    assert result.exit_code == 0, result.output
    assert "best val" in result.stdout and "samples/s" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_groups_runs_that_differ_only_in_their_seed(trained, tiny_recipe, tmp_path):
    other = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "-q", "-s", "seed=2")
    other_run = Path(other.stdout.strip().splitlines()[-1])
    data = json.loads(invoke("compare", trained, other_run, "--json").stdout)
    assert data["varying_keys"] == [] and len(data["groups"]) == 1
    group = data["groups"][0]
    assert group["n"] == 2 and group["seeds"] == [1, 2]
    tests = [json.loads((r / "summary.json").read_text())["test_accuracy"] for r in (trained, other_run)]
    assert group["scores"]["test_accuracy"]["mean"] == pytest.approx(sum(tests) / 2)
    assert group["scores"]["test_accuracy"]["std"] == pytest.approx(abs(tests[0] - tests[1]) / 2 ** 0.5)
    rows = json.loads(invoke("compare", trained, other_run, "--json", "--no-group").stdout)
    assert [r["name"] for r in rows] == [trained.name, other_run.name]


def test_compare_and_eval_refuse_non_runs(tmp_path):
    result = invoke("compare", tmp_path)
    assert result.exit_code == 2 and "not an eprun run directory" in result.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = invoke("eval", bad)
    assert result.exit_code == 2 and "not a loadable eprun checkpoint" in result.output


def test_recipes_list_and_show():
    result = invoke("recipes")
    assert result.exit_code == 0 and "quickstart" in result.stdout
    shown = invoke("recipes", "show", "quickstart")
    assert shown.exit_code == 0 and "kind: ep" in shown.stdout
    assert invoke("recipes", "show", "nope").exit_code == 2


@pytest.mark.parametrize("recipe", [r.name for r in catalog.bundled()])
def test_every_bundled_recipe_passes_fast_dev_run(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", catalog.resolve(recipe).resolve(), "--fast-dev-run", "-s", "device=cpu")
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []
