"""Fault injection: crash, kill or interrupt a run anywhere, resume it, and get the run that
never stopped — same weights and metrics, bit for bit, on CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from eprun.cli import app
from eprun.rules.ep import EP

from .conftest import crash_at

runner = CliRunner()
TIMING_KEYS = {"samples_per_s", "window_samples_per_s", "wall_time_s", "train_time_s", "resumes"}
OUTCOME_KEYS = ("status", "epochs_completed", "best_val_accuracy", "best_epoch", "val_accuracy",
                "test_accuracy", "test_loss", "train_loss", "train_accuracy")
SETTINGS = ["-s", "rule.estimator=random-sign", "-s", "train.checkpoint_every=3", "-s", "train.max_batches=10",
            "-s", "train.log_every=4", "-s", "train.epochs=2"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def run_path(result) -> Path:
    return Path(result.stdout.strip().splitlines()[-1])


def outcome(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    weights = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    return {"summary": {k: summary.get(k) for k in OUTCOME_KEYS}, "metrics": metrics, "weights": weights}


def assert_same(a: dict, b: dict):
    assert a["summary"] == b["summary"]
    assert a["metrics"] == b["metrics"]
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from tests.conftest import TINY_RECIPE

    folder = tmp_path_factory.mktemp("reference")
    recipe = folder / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    result = invoke("train", recipe, "--out", folder / "ref", "-q", *SETTINGS)
    assert result.exit_code == 0, result.output
    return outcome(run_path(result))


@pytest.mark.parametrize("crash_call", [2, 5, 10, 11, 17])
def test_crash_anywhere_then_resume_equals_uninterrupted(crash_call, tiny_recipe, tmp_path, monkeypatch, reference):
    crash_at(monkeypatch, crash_call)
    result = invoke("train", tiny_recipe, "--out", tmp_path / "crash", "-q", *SETTINGS)
    assert result.exit_code != 0
    run = next((tmp_path / "crash").iterdir())
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    resumed = invoke("train", "--resume", run, "-q")
    assert resumed.exit_code == 0, resumed.output
    assert run_path(resumed) == run
    assert_same(outcome(run), reference)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumes"][0]["edited_recipe"] is False


def test_torn_metrics_line_is_tolerated_on_resume(tiny_recipe, tmp_path, monkeypatch, reference):
    crash_at(monkeypatch, 7)
    invoke("train", tiny_recipe, "--out", tmp_path / "crash", "-q", *SETTINGS)
    run = next((tmp_path / "crash").iterdir())
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "ste')  # killed mid-write
    monkeypatch.undo()
    assert invoke("train", "--resume", run, "-q").exit_code == 0
    assert_same(outcome(run), reference)


def test_sigterm_checkpoints_and_exits_143_then_resumes(tiny_recipe, tmp_path, monkeypatch, reference,
                                                        sigterm_on_batch):
    sigterm_on_batch(8)
    result = invoke("train", tiny_recipe, "--out", tmp_path / "int", "-q", *SETTINGS)
    assert result.exit_code == 143
    # the compiled relaxation finishes the batch the signal came in and checkpoints it; torch's
    # stops inside it, and the run keeps its last periodic checkpoint (every 3 batches here)
    if "SIGTERM: stopped at epoch 1, batch 8" in result.output:
        steps_kept = 8
    else:
        assert "SIGTERM: stopped during epoch 1, batch 8" in result.output, result.output
        steps_kept = 6
    run = next((tmp_path / "int").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == steps_kept
    monkeypatch.undo()
    assert invoke("train", "--resume", run, "-q").exit_code == 0
    assert_same(outcome(run), reference)


def test_a_stop_in_an_epochs_last_batch_ends_after_that_epoch(tiny_recipe, tmp_path, monkeypatch, reference,
                                                              sigterm_on_batch):
    """A signal during the epoch's last batch: the epoch ends as usual (its checkpoint, its
    validation), then the run stops and says after which epoch; torch's relaxation stops inside
    the batch instead, keeping the periodic checkpoint of step 9."""
    sigterm_on_batch(10)
    result = invoke("train", tiny_recipe, "--out", tmp_path / "int", "-q", *SETTINGS)
    assert result.exit_code == 143
    run = next((tmp_path / "int").iterdir())
    if "SIGTERM: stopped after epoch 1;" in result.output:
        steps_kept = 10
        assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 1
    else:
        assert "SIGTERM: stopped during epoch 1, batch 10" in result.output, result.output
        steps_kept = 9
    assert f"eprun train --resume {run}" in result.output.replace("\n", "")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == steps_kept
    monkeypatch.undo()
    assert invoke("train", "--resume", run, "-q").exit_code == 0
    assert_same(outcome(run), reference)


def stop_at_evaluation(monkeypatch, n: int) -> None:
    """SIGTERM this process as the run's n-th evaluation starts; the evaluation's first relaxation
    step (here: at once) sees the request."""
    from eprun import stopping
    from eprun.runner import loop as run_module

    real, calls = run_module.evaluate, []

    def evaluating(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
            while stopping.pending() is None:
                time.sleep(0.001)
            stopping.check()
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", evaluating)


@pytest.mark.parametrize("evaluation, said, epoch", [(1, "the validation of epoch 1", 1), (3, "the test scoring", 2)])
def test_a_stop_during_an_evaluation_keeps_the_epochs_training(evaluation, said, epoch, tiny_recipe, tmp_path,
                                                               monkeypatch, reference):
    """The epoch's training is checkpointed before its validation: a stop there loses no batch
    (the last periodic checkpoint was at step 9 of 10), and the resumed run validates it first."""
    stop_at_evaluation(monkeypatch, evaluation)
    result = invoke("train", tiny_recipe, "--out", tmp_path / "int", "-q", *SETTINGS)
    assert result.exit_code == 143
    assert f"SIGTERM: stopped during {said}" in result.output, result.output
    run = next((tmp_path / "int").iterdir())
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (kept["epoch"], kept["batch"], kept["step"]) == (epoch, 0, 10 * epoch)
    assert kept["val_pending"] is (evaluation == 1)
    monkeypatch.undo()
    resumed = invoke("train", "--resume", run, "-q")
    assert resumed.exit_code == 0, resumed.output
    assert_same(outcome(run), reference)


def test_sigkill_of_a_real_process_then_resume(tiny_recipe, tmp_path, reference):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "eprun", "train", str(tiny_recipe), "--out", str(out), "-q", *SETTINGS,
           "-s", "train.max_batches=10"]
    env = {**os.environ, "EPRUN_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.stat().st_size for p in out.glob("*/metrics.jsonl")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = next(out.iterdir())
    status = json.loads((run / "summary.json").read_text())["status"]
    if status == "finished":
        pytest.skip("the run finished before it could be killed")
    assert (run / ".lock").exists()  # the dead process's stale lock must not block the resume
    resumed = invoke("train", "--resume", run, "-q")
    assert resumed.exit_code == 0, resumed.output
    assert_same(outcome(run), reference)


def test_resume_refuses_an_edited_recipe_unless_forced(tiny_recipe, tmp_path, monkeypatch):
    crash_at(monkeypatch, 5)
    invoke("train", tiny_recipe, "--out", tmp_path / "crash", "-q", *SETTINGS)
    run = next((tmp_path / "crash").iterdir())
    monkeypatch.undo()
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("beta: 0.2", "beta: 0.3"))
    before = sorted(p.name for p in run.rglob("*"))
    refused = invoke("train", "--resume", run)
    assert refused.exit_code == 2
    assert "rule.beta: 0.2 → 0.3" in refused.output and "--force" in refused.output
    assert sorted(p.name for p in run.rglob("*")) == before
    overridden = invoke("train", "--resume", run, "-s", "train.epochs=3")
    assert overridden.exit_code == 2
    forced = invoke("train", "--resume", run, "--force", "-q")
    assert forced.exit_code == 0, forced.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumes"][-1]["edited_recipe"] is True


def test_resume_refuses_finished_runs_and_non_runs(tiny_recipe, tmp_path):
    done = run_path(invoke("train", tiny_recipe, "--out", tmp_path / "r", "-q", "-s", "train.max_batches=2"))
    result = invoke("train", "--resume", done)
    assert result.exit_code == 2 and "has finished" in result.output
    result = invoke("train", "--resume", tmp_path)
    assert result.exit_code == 2 and "not an eprun run directory" in result.output
    result = invoke("train", tiny_recipe, "--resume", done)
    assert result.exit_code == 2


def test_a_live_writer_locks_the_run(tiny_recipe, tmp_path, monkeypatch):
    crash_at(monkeypatch, 5)
    invoke("train", tiny_recipe, "--out", tmp_path / "crash", "-q", *SETTINGS)
    run = next((tmp_path / "crash").iterdir())
    monkeypatch.undo()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / ".lock").write_text(str(sleeper.pid))
        result = invoke("train", "--resume", run)
        assert result.exit_code == 2 and f"another process (pid {sleeper.pid})" in result.output
    finally:
        sleeper.kill()
        sleeper.wait()
    assert invoke("train", "--resume", run, "-q").exit_code == 0  # the dead owner's lock is taken over


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(tiny_recipe, tmp_path, monkeypatch):
    original = EP.train_step
    calls = {"n": 0}

    def poisoned(self, x, y):
        out = original(self, x, y)
        calls["n"] += 1
        if calls["n"] == 5:
            self.net.weights[1].grad[0, 0] = float("nan")
        return out

    monkeypatch.setattr(EP, "train_step", poisoned)
    result = invoke("train", tiny_recipe, "--out", tmp_path / "div", "-q", *SETTINGS)
    assert result.exit_code == 1
    assert "diverged at epoch 1, batch 5 (step 5): NaN/Inf in the update of weights.1" in result.output
    run = next((tmp_path / "div").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "weights.1" in summary["error"]
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 3
    assert all(torch.isfinite(t).all() for t in last["model"].values())
