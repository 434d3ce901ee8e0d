"""Whole steps as CUDA graphs (``train.cuda_graphs``), checked on the CPU.

The CUDA part (``torch.cuda.graph``) is exercised by tests/test_cuda.py on a GPU. Here the
recorder is replaced by an emulation with a CUDA graph's semantics — recording runs nothing
(every tensor the step touches is left as it was), a replay runs the step again on the same
static inputs and writes the same static outputs — so that everything around it is tested
without a GPU: the keys (batch shape, β's sign, learning rates), the eager steps before a
capture, the scores summed on the device, the deferred divergence check, the fall-back with
its reason, and a whole run equal, bit for bit, to the eager run.
"""

import json

import pytest
import torch

from eprun import cuda_graphs, runner as runner_module
from eprun.runner import experiment as experiment_module

from .conftest import crash_at
from .test_resume import SETTINGS, assert_same, invoke, outcome, reference, run_path  # noqa: F401 (fixture)


class _Replay:
    def __init__(self, recorder, body, inputs, outputs):
        self.recorder, self.body, self.inputs, self.outputs = recorder, body, inputs, outputs

    def replay(self):
        self.recorder.replays += 1
        for static, value in zip(self.outputs, self.body(*self.inputs)):
            static.copy_(value)

    def reset(self):
        self.recorder.resets += 1


class EmulatedRecorder:
    """A CUDA graph's semantics on the CPU (module docstring)."""

    def __init__(self, fail: str | None = None):
        self.fail, self.eager_steps, self.records, self.replays, self.resets = fail, 0, 0, 0, 0

    def eager(self, body, inputs):
        self.eager_steps += 1
        return body(*inputs)

    def record(self, body, inputs):
        if self.fail:
            raise RuntimeError(self.fail)
        owner = body.__self__  # the CapturedTraining whose step this is
        saved = _snapshot(owner)
        outputs = tuple(t.clone() for t in body(*inputs))
        _restore(owner, saved)  # a capture runs nothing
        self.records += 1
        return _Replay(self, body, inputs, outputs), outputs


def _tensors(owner):
    found = [owner.unseen_non_finite]
    for p in owner.net.parameters():
        found.append(p.data)
        if p.grad is not None:
            found.append(p.grad)
    found += list(owner.net.buffers())
    for state in owner.optimizer.state.values():
        found += [v for v in state.values() if torch.is_tensor(v)]
    return found


def _snapshot(owner):
    return [t.clone() for t in _tensors(owner)], owner.rule.generator.get_state()


def _restore(owner, saved):
    tensors, generator_state = saved
    for t, value in zip(_tensors(owner), tensors):
        t.copy_(value)
    owner.rule.generator.set_state(generator_state)


@pytest.fixture
def emulated(monkeypatch):
    """Steps replayed through the emulated recorder on the CPU: the device check is lifted, and the
    optimiser is built as on the CPU (torch's ``capturable`` exists for CUDA tensors)."""
    return emulate(monkeypatch)


def emulate(monkeypatch) -> EmulatedRecorder:
    recorder = EmulatedRecorder()
    monkeypatch.setattr(cuda_graphs, "RECORDER", recorder)
    monkeypatch.setattr(cuda_graphs, "obstacle", lambda device, rule, parallel: rule.capture_obstacle())
    build = experiment_module.build_optimizer
    monkeypatch.setattr(experiment_module, "build_optimizer", lambda cfg, groups, capturable=False: build(cfg, groups))
    return recorder


def test_a_run_replayed_from_graphs_equals_the_reference(emulated, tiny_recipe, tmp_path, reference):
    result = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "-q", *SETTINGS)
    assert result.exit_code == 0, result.output
    run = run_path(result)
    assert_same(outcome(run), reference)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cuda_graphs"] == {"mode": "auto", "active": True, "reason": None}
    assert json.loads((run / "env.json").read_text())["cuda_graphs"]["active"] is True
    # two signs of β in each of two epochs (the cosine schedule moves the learning rates between
    # them), and evaluation graphs; most batches replayed
    assert emulated.records >= 4 and emulated.replays > emulated.records
    assert emulated.resets >= 2  # the first epoch's training graphs, freed when the rates moved


@pytest.mark.parametrize("crash_call", [6, 13])  # an eager step, a replay
def test_a_replayed_run_crashed_and_resumed_equals_the_eager_run(crash_call, monkeypatch, tiny_recipe, tmp_path,
                                                               reference):
    emulate(monkeypatch)
    crash_at(monkeypatch, crash_call)
    result = invoke("train", tiny_recipe, "--out", tmp_path / "crash", "-q", *SETTINGS)
    assert result.exit_code != 0
    run = next((tmp_path / "crash").iterdir())
    monkeypatch.undo()
    recorder = emulate(monkeypatch)
    resumed = invoke("train", "--resume", run, "-q")
    assert resumed.exit_code == 0, resumed.output
    assert recorder.replays > 0
    assert_same(outcome(run), reference)


def test_keys_eager_steps_and_a_learning_rate_change(emulated, tiny_recipe):
    from eprun.recipe import load_recipe

    recipe = load_recipe(tiny_recipe, overrides=["rule.estimator=random-sign"])
    exp = runner_module.assemble(recipe, runner_module.load_data(recipe, torch.device("cpu")), torch.device("cpu"))
    graphs = exp.graphs
    x, y = exp.splits.train.x[:25], exp.splits.train.y[:25]
    for _ in range(12):
        draw = exp.rule.prepare_batch()
        graphs.step(x, y, draw)
    signs = {key[1] for key in graphs.train.entries}
    assert signs == {0.2, -0.2}
    assert all(entry.eager_steps == cuda_graphs.EAGER_STEPS for entry in graphs.train.entries.values())
    assert graphs.train.captures == sum(entry.recording is not None for entry in graphs.train.entries.values())
    exp.scheduler.step()  # a new learning rate: the recordings are dropped
    graphs.step(x, y, exp.rule.prepare_batch())
    assert graphs.train.captures >= 1 and len(graphs.train.entries) == 1
    (entry,) = graphs.train.entries.values()
    assert entry.recording is None and entry.eager_steps == 1


def test_prepared_draws_are_the_draws_of_an_unprepared_step(tiny_recipe):
    from eprun.recipe import load_recipe

    recipe = load_recipe(tiny_recipe, overrides=["rule.estimator=random-sign"])
    runs = []
    for prepare in (False, True):
        exp = runner_module.assemble(recipe, runner_module.load_data(recipe, torch.device("cpu")), torch.device("cpu"))
        x, y = exp.splits.train.x[:25], exp.splits.train.y[:25]
        for _ in range(6):
            if prepare:
                exp.rule.prepare_batch()
            exp.optimizer.zero_grad(set_to_none=False)
            exp.rule.train_step(x, y)
            exp.optimizer.step()
        runs.append([p.detach().clone() for p in exp.net.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_divergence_in_replayed_steps_is_caught_before_a_checkpoint(emulated, tiny_recipe, tmp_path, monkeypatch):
    from eprun.rules.ep import EP

    original, calls = EP.train_step, {"n": 0}

    def poisoned(self, x, y):  # from the 9th call on (the recording's dry run counts): a NaN update
        out = original(self, x, y)
        calls["n"] += 1
        if calls["n"] >= 9:
            self.net.weights[1].grad[0, 0] = float("nan")
        return out

    monkeypatch.setattr(EP, "train_step", poisoned)
    result = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "-q", *SETTINGS)
    assert result.exit_code == 1, result.output
    run = next((tmp_path / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "between step" in summary["error"], summary
    assert emulated.replays > 0
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert all(bool(torch.isfinite(w).all()) for w in last["model"].values())
    first, final = (int(word) for word in summary["error"].split("between step ")[1].split(" (")[0].split(" and step "))
    assert last["step"] < first <= final


def test_a_failed_capture_falls_back_under_auto_with_its_reason(emulated, tiny_recipe, tmp_path, reference):
    emulated.fail = "operation not permitted when stream is capturing"
    result = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "-q", *SETTINGS)
    assert result.exit_code == 0, result.output
    run = run_path(result)
    assert_same(outcome(run), reference)
    record = json.loads((run / "summary.json").read_text())["cuda_graphs"]
    assert record["active"] is False and "capture failed" in record["reason"]
    assert "operation not permitted" in record["reason"]


def test_a_failed_capture_is_an_error_under_on(emulated, tiny_recipe, tmp_path):
    emulated.fail = "operation not permitted when stream is capturing"
    result = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "-q", "-s", "train.cuda_graphs=on")
    assert result.exit_code == 2  # the setting cannot apply to this step, as where the plan refuses it
    assert "train.cuda_graphs: on" in result.output and "operation not permitted" in result.output
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"


def test_on_where_capture_cannot_apply_is_refused(tiny_recipe, tmp_path):
    result = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "-q", "-s", "train.cuda_graphs=on")
    assert result.exit_code == 2
    assert "train.cuda_graphs: on" in result.output and "the device is cpu" in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_unknown_mode_names_the_allowed_ones(tiny_recipe, tmp_path):
    result = invoke("train", tiny_recipe, "--out", tmp_path / "runs", "-q", "-s", "train.cuda_graphs=always")
    assert result.exit_code == 2
    assert "train.cuda_graphs" in result.output and "auto" in result.output and "off" in result.output


def test_a_bare_on_or_off_in_yaml_is_the_mode(tiny_recipe):
    from eprun.recipe import load_recipe

    tiny_recipe.write_text(tiny_recipe.read_text() + "  cuda_graphs: off\n")
    assert load_recipe(tiny_recipe).train.cuda_graphs == "off"  # YAML 1.1 reads a bare off as false
    assert load_recipe(tiny_recipe, overrides=["train.cuda_graphs=on"]).train.cuda_graphs == "on"


class _Rule:
    def __init__(self, why):
        self.why = why

    def capture_obstacle(self):
        return self.why


def test_plan_says_why_not():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cuda_graphs.plan("auto", cuda, _Rule(None)).active
    assert "cpu" in cuda_graphs.plan("auto", cpu, _Rule(None)).reason
    assert cuda_graphs.plan("off", cuda, _Rule(None)).reason == "train.cuda_graphs: off"
    assert "all-reduce" in cuda_graphs.plan("auto", cuda, _Rule(None), parallel=True).reason
    assert cuda_graphs.plan("on", cuda, _Rule("because")).reason == "because"
    with pytest.raises(ValueError):
        cuda_graphs.plan("sometimes", cuda, _Rule(None))


def test_rules_state_their_obstacles(tiny_recipe):
    from eprun.recipe import load_recipe

    def obstacle(*overrides):
        recipe = load_recipe(tiny_recipe, overrides=list(overrides))
        exp = runner_module.assemble(recipe, runner_module.load_data(recipe, torch.device("cpu")), torch.device("cpu"))
        return exp.rule.capture_obstacle()

    assert obstacle() is None
    assert obstacle("rule.kind=cep") is None
    assert obstacle("rule={kind: bptt, T: 12}") is None
    assert "tol" in obstacle("rule.tol=0.001")


@pytest.mark.parametrize("fail", [None, "operation not permitted when stream is capturing"])
def test_the_benchmark_times_replayed_steps_or_says_why_not(fail, monkeypatch):
    from typer.testing import CliRunner

    from eprun.bench import measure
    from eprun.cli import app

    recorder = emulate(monkeypatch)
    recorder.fail = fail
    build = measure.build_optimizer
    monkeypatch.setattr(measure, "build_optimizer", lambda cfg, groups, capturable=False: build(cfg, groups))
    tiny = ["-s", "model.hidden=[16]", "-s", "rule.T=4", "-s", "rule.K=2", "-s", "data.batch_size=4",
            "-s", "data.eval_batch_size=8"]
    result = CliRunner().invoke(app, ["--threads", "1", "bench", "--device", "cpu", "--json", "--batches", "6",
                                      "--warmup", "1", "--only", "proto-mlp-1h", *tiny])
    assert result.exit_code == 0, result.output
    (r,) = json.loads(result.stdout)
    assert r["train_eprun_samples_per_s"] > 0
    if fail is None:
        assert r["cuda_graphs"]["active"] is True and r["cuda_graphs"]["captures"] >= 2  # training and evaluation
        assert recorder.replays > 0
    else:
        assert r["cuda_graphs"]["active"] is False and "capture failed" in r["cuda_graphs"]["reason"]
