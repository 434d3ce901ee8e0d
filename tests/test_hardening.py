"""Hostile and careless inputs and environmental faults: each is refused in one line (exit 2) or
handled, with nothing half-written and nothing lost. One test per case of docs/reliability.md's
table of bad inputs and faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eprun.cli import app

cli = CliRunner()
ENV = {**os.environ, "EPRUN_OFFLINE": "1"}


def invoke(*args):
    return cli.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments) -> str:
    """The CLI refused with exit code 2 and one line naming every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and text.startswith("error:"), text
    assert len(text.splitlines()) == 1 or all(line.startswith(" ") for line in text.splitlines()[1:]), text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


# ----------------------------------------------------------------------------- recipes that are not YAML a recipe can be


def billion_laughs(levels: int = 9) -> str:
    text = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text


def test_an_alias_bomb_is_refused_within_2_gb(tmp_path):
    """Nine levels of nine aliases, at the top and inside model.hidden, under ``ulimit -v`` 2 GB:
    refused before torch is even imported (how fast: docs/reliability.md)."""
    for name, text in (("top", billion_laughs()), ("hidden", billion_laughs().replace("a8:", "model:\n  hidden:"))):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        run = subprocess.run(["bash", "-c", f"ulimit -v 2000000; exec {sys.executable} -m eprun train {path}"],
                             capture_output=True, text=True, env=ENV, timeout=60)
        assert run.returncode == 2, run.stderr
        assert "expands to more than 10,000 values" in run.stderr and "Traceback" not in run.stderr


def test_a_small_alias_is_allowed(tiny_recipe, tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text(tiny_recipe.read_text().replace("  batch_size: 25\n  eval_batch_size: 100",
                                                    "  batch_size: &b 25\n  eval_batch_size: *b"))
    result = invoke("train", path, "--fast-dev-run")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("text, fragment", [
    ("rule:\n  kind: ep\n  T: 3\n  T: 4\n", ":4: key 'T' is given twice in the same section (first at line 3)"),
    ("model: {kind: mlp}\nrule: {kind: ep}\nmodel: {kind: conv}\n", ":3: key 'model' is given twice"),
    ("", "the recipe is empty"),
    ("# only a comment\n", "the recipe is empty"),
    ("a: &a [*a]\n", "recipes cannot be recursive"),
    ("x: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ("---\nname: a\n---\nname: b\n", "YAML syntax error"),
], ids=["key twice", "section twice", "empty", "only a comment", "recursive alias", "deep nesting", "two documents"])
def test_duplicate_keys_empty_and_malformed_documents_are_refused(text, fragment, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    one_line_error(invoke("train", path), fragment)
    assert not (Path("runs").exists() and any(Path("runs").glob("bad-*")))


# ----------------------------------------------------------------------------- values out of range


@pytest.mark.parametrize("override, fragment", [
    ("rule.T=4294967326", "rule.T: must be between 1 and 100,000, got 4,294,967,326"),
    ("rule.T=2147483648", "rule.T: must be between 1 and 100,000"),
    ("rule.K=1000000000000", "rule.K: must be between 1 and 100,000"),
    ("rule.beta=.nan", "rule.beta: must be a finite number, got nan"),
    ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
    ("optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
    ("optim.weight_decay=.nan", "optim.weight_decay: must be a finite number, got nan"),
    ("optim.lr=[0.1, .nan]", "optim.lr.1: must be a finite number, got nan"),
    ("seed=1180591620717411303424", "seed: 1180591620717411303424 is out of range"),
    ("seed=-1", "seed: must be between 0 and"),
    ("optim.betas=[2,3]", "optim.betas: each must be in [0, 1)"),
    ("optim.eps=0", "optim.eps: must be > 0"),
    ("optim.momentum=1.5", "optim.momentum: must be in [0, 1)"),
    ("data.batch_size=0", "data.batch_size: must be between 1 and 1,000,000"),
    ("data.batch_size=10000000", "data.batch_size: must be between 1 and 1,000,000"),
    ("model.hidden=[2000000]", "model.hidden: must be between 1 and 1,000,000"),
    ("train.epochs=10000000000", "train.epochs: must be between 1 and 1,000,000,000"),
    ("train.convergence_tol=0", "train.convergence_tol: must be > 0"),
    ("schedule.gamma=-1", "schedule.gamma: must be > 0"),
])
def test_out_of_range_and_non_finite_values_are_refused(override, fragment, tiny_recipe):
    one_line_error(invoke("train", tiny_recipe, "-s", override), fragment)


def test_a_network_that_cannot_fit_in_memory_is_refused_before_it_is_built(tiny_recipe):
    result = invoke("train", tiny_recipe, "-s", "model.hidden=[1000000, 1000000]", "--fast-dev-run")
    one_line_error(result, "need about", "GiB", "parameters", "available; use smaller layers or batches")


# ----------------------------------------------------------------------------- signals inside a long relaxation


LONG = ["-s", "model.kind=energy_mlp", "-s", "model.hidden=[16]", "-s", "rule.T=100000", "-s", "rule.K=4",
        "-s", "train.max_batches=3"]


def start_long_run(tiny_recipe, out: Path) -> subprocess.Popen:
    """A run whose first free phase takes many seconds on the torch path (whose relaxation checks
    for a stop request every step); returns once it is in it."""
    proc = subprocess.Popen([sys.executable, "-m", "eprun", "--threads", "1", "train", str(tiny_recipe), "--out",
                             str(out), "-q", *LONG], env={**ENV, "EPRUN_NATIVE": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*/checkpoints/last.pt")):
        time.sleep(0.05)
    time.sleep(1.0)  # into the relaxation
    assert proc.poll() is None, proc.communicate()
    return proc


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_a_long_relaxation_promptly_and_the_run_resumes(signum, code, tiny_recipe, tmp_path):
    out = tmp_path / "runs"
    proc = start_long_run(tiny_recipe, out)
    sent = time.perf_counter()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert time.perf_counter() - sent < 10  # a phase of 100,000 steps would take minutes
    assert "Traceback" not in err and "stopped during epoch 1, batch 1" in err
    run = next(out.iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == signal.Signals(signum).name
    resumed = invoke("train", "--resume", run, "--force", "-s", "rule.T=5", "-q")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_a_second_sigint_stops_at_once_and_says_interrupted(tiny_recipe, tmp_path):
    """A step that does not check for a stop (here: EP's step replaced by a long sleep, as a
    compiled call would be): the first SIGINT waits for the batch boundary, the second stops at
    once, and the run says ``interrupted`` (not ``failed``), exit 130."""
    out = tmp_path / "runs"
    program = ("import sys, time\n"
               "from eprun.rules.ep import EP\n"
               "EP.train_step = lambda self, x, y: time.sleep(600)\n"
               "from eprun.cli import main\n"
               f"sys.argv = ['eprun', 'train', {str(tiny_recipe)!r}, '--out', {str(out)!r}, '-q']\n"
               "main()\n")
    proc = subprocess.Popen([sys.executable, "-c", program], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*/checkpoints/last.pt")):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # the first waits for the batch boundary
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "SIGINT again: stopped at once" in err
    summary = json.loads((next(out.iterdir()) / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == "SIGINT"


# ----------------------------------------------------------------------------- a full disk, a file-size limit


def test_a_full_disk_at_a_checkpoint_fails_in_one_line_keeps_the_last_checkpoint_and_resumes(
        tiny_recipe, tmp_path, monkeypatch):
    from eprun import runs
    from tests.test_resume import SETTINGS, assert_same, outcome, run_path

    reference = run_path(invoke("train", tiny_recipe, "--out", tmp_path / "ref", "-q", *SETTINGS))
    original, calls = runs.save_checkpoint, {"n": 0}

    def full_disk(path, state):
        calls["n"] += 1
        if calls["n"] == 3:  # the step-0 checkpoint, one at batch 3, then this one at batch 6
            raise OSError(28, "No space left on device", str(path))
        return original(path, state)

    monkeypatch.setattr(runs, "save_checkpoint", full_disk)
    result = invoke("train", tiny_recipe, "--out", tmp_path / "full", "-q", *SETTINGS)
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert "Traceback" not in text and "No space left on device" in text and "the last good checkpoint is" in text
    run = next((tmp_path / "full").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert json.loads(json.dumps(outcome(run)["summary"]))  # the files are whole
    monkeypatch.undo()
    resumed = invoke("train", "--resume", run, "-q")
    assert resumed.exit_code == 0, resumed.output
    assert_same(outcome(run), outcome(reference))


def test_a_file_size_limit_fails_in_one_line_with_status_failed(tiny_recipe, tmp_path):
    """``ulimit -f``: the checkpoint cannot be written; eprun is not killed by SIGXFSZ, says so in
    one line (exit 1) and leaves summary.json at ``failed``."""
    out = tmp_path / "runs"
    run = subprocess.run(["bash", "-c", f"ulimit -f 24; exec {sys.executable} -m eprun train {tiny_recipe} "
                                        f"--out {out} -q"], capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "File too large" in run.stderr, run.stderr
    summary = json.loads((next(out.iterdir()) / "summary.json").read_text())
    assert summary["status"] == "failed" and "File too large" in summary["error"]


# ----------------------------------------------------------------------------- commands given bad arguments


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tests.conftest import TINY_RECIPE

    folder = tmp_path_factory.mktemp("finished")
    (folder / "tiny.yaml").write_text(TINY_RECIPE)
    result = invoke("train", folder / "tiny.yaml", "--out", folder / "runs", "-q", "-s", "train.max_batches=3",
                    "-s", "train.epochs=1")
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


def test_compare_plot_into_a_missing_folder_or_onto_a_folder_is_refused(finished_run, tmp_path):
    one_line_error(invoke("compare", finished_run, "--plot", tmp_path / "missing" / "x.png"),
                   "--plot: the folder", "does not exist")
    one_line_error(invoke("compare", finished_run, "--plot", tmp_path), "--plot:", "is a folder")


def test_compare_reads_a_finished_run_without_its_summary_as_finished(finished_run, tmp_path):
    import shutil

    copy = tmp_path / finished_run.name
    shutil.copytree(finished_run, copy)
    (copy / "summary.json").unlink()
    rows = json.loads(invoke("compare", copy, "--json").stdout)
    assert rows[0]["status"] == "finished (no summary.json)"
    (copy / "metrics.jsonl").write_text("")
    assert json.loads(invoke("compare", copy, "--json").stdout)[0]["status"] == "unknown (no summary.json)"


@pytest.mark.parametrize("args, fragment", [
    (["--batch", "0"], "--batch: must be ≥ 1, got 0"),
    (["--batch", "-1"], "--batch: must be ≥ 1, got -1"),
    (["--batch", "100000"], "--batch: the training split has"),
    (["--beta", "0"], "--beta: must be a finite, non-zero number"),
    (["--beta", "nan"], "--beta: must be a finite, non-zero number"),
    (["--steps", "0"], "--steps: K must be between 1 and T"),
])
def test_gdu_refuses_bad_arguments(args, fragment, tiny_recipe, tmp_path):
    one_line_error(invoke("gdu", tiny_recipe, "--out", tmp_path / "g", *args), fragment)
    assert not (tmp_path / "g").exists()


def test_gdu_refuses_an_out_that_is_a_file_or_holds_a_check(tiny_recipe, tmp_path):
    (tmp_path / "file").write_text("keep me")
    one_line_error(invoke("gdu", tiny_recipe, "--out", tmp_path / "file", "--batch", "2"), "is a file")
    assert (tmp_path / "file").read_text() == "keep me"
    assert invoke("gdu", tiny_recipe, "--out", tmp_path / "g", "--batch", "2").exit_code == 0
    one_line_error(invoke("gdu", tiny_recipe, "--out", tmp_path / "g", "--batch", "2"), "already holds a GDU check")


# ----------------------------------------------------------------------------- eval


def test_eval_refuses_nan_weights_and_prints_valid_json(finished_run, tmp_path):
    import torch

    from eprun import runs

    state = torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True)
    state["model"]["weights.0"][0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    runs.save_checkpoint(bad, state)
    one_line_error(invoke("eval", bad, "--json"), "hold NaN or Inf (weights.0)", "nothing to score")
    good = invoke("eval", finished_run / "checkpoints" / "last.pt", "--json")
    assert good.exit_code == 0 and json.loads(good.stdout)["n"] > 0


def test_a_checkpoint_copied_out_of_its_run_is_evaluated_from_its_own_recipe_or_a_named_one(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "elsewhere.pt"
    shutil.copy(finished_run / "checkpoints" / "last.pt", copy)
    inside = json.loads(invoke("eval", finished_run / "checkpoints" / "last.pt", "--json").stdout)
    alone = invoke("eval", copy, "--json")
    assert alone.exit_code == 0, alone.output
    assert json.loads(alone.stdout) == inside
    named = invoke("eval", copy, "--json", "--recipe", finished_run / "recipe.yaml")
    assert named.exit_code == 0 and json.loads(named.stdout) == inside


# ----------------------------------------------------------------------------- two resumes of one run


def crashed_run(tiny_recipe, out: Path, monkeypatch) -> Path:
    from tests.test_resume import SETTINGS, crash_at

    crash_at(monkeypatch, 5)
    assert invoke("train", tiny_recipe, "--out", out, "-q", *SETTINGS).exit_code != 0
    monkeypatch.undo()
    return next(out.iterdir())


def test_two_resumes_started_together_the_second_changes_nothing(tiny_recipe, tmp_path, monkeypatch):
    from tests.test_resume import SETTINGS, assert_same, outcome, run_path

    reference = outcome(run_path(invoke("train", tiny_recipe, "--out", tmp_path / "ref", "-q", *SETTINGS)))
    run = crashed_run(tiny_recipe, tmp_path / "crash", monkeypatch)
    cmd = [sys.executable, "-m", "eprun", "train", "--resume", str(run), "-q"]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is writing this run" in loser or "has finished" in loser
    assert_same(outcome(run), reference)


def test_a_resume_after_the_run_finished_is_refused(tiny_recipe, tmp_path, monkeypatch):
    run = crashed_run(tiny_recipe, tmp_path / "crash", monkeypatch)
    assert invoke("train", "--resume", run, "-q").exit_code == 0
    metrics = (run / "metrics.jsonl").read_text()
    one_line_error(invoke("train", "--resume", run, "-q"), "has finished")
    assert (run / "metrics.jsonl").read_text() == metrics


# ----------------------------------------------------------------------------- anything else: an internal error


def test_an_internal_error_is_one_line_with_the_trace_in_a_file(tiny_recipe, monkeypatch, tmp_path):
    from eprun import runner

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setenv("EPRUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runner, "fast_dev_run", broken)
    result = invoke("train", tiny_recipe, "--fast-dev-run")
    assert result.exit_code == 1
    text = result.output.strip()
    assert "Traceback" not in text and text.startswith("internal error: ZeroDivisionError: division by zero")
    trace = Path(text.split("the full trace is in ")[1].rstrip(")"))
    assert trace.parent == tmp_path / "cache" / "traces" and "Traceback" in trace.read_text()


def test_a_resume_started_while_another_is_under_way_changes_nothing(tiny_recipe, tmp_path, monkeypatch):
    """The second resumer reaches the run while the first holds it, and is slow to load its data
    (so that, had it read the run before taking the lock, the first would be finished by then):
    it exits 2 at once, and the first's records and weights stay."""
    from eprun.runner import resuming
    from tests.test_resume import SETTINGS, assert_same, outcome, run_path

    reference = outcome(run_path(invoke("train", tiny_recipe, "--out", tmp_path / "ref", "-q", *SETTINGS)))
    run = crashed_run(tiny_recipe, tmp_path / "crash", monkeypatch)
    first = subprocess.Popen([sys.executable, "-m", "eprun", "train", "--resume", str(run), "-q"], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (run / ".lock").exists():
        time.sleep(0.01)
    load_data = resuming.load_data

    def slow_load_data(*args, **kwargs):
        first.wait(timeout=300)
        return load_data(*args, **kwargs)

    monkeypatch.setattr(resuming, "load_data", slow_load_data)
    second = invoke("train", "--resume", run, "-q")
    assert first.wait(timeout=300) == 0
    assert second.exit_code == 2 and "is writing this run" in second.output, second.output
    assert_same(outcome(run), reference)
