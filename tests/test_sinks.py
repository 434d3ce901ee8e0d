"""Metric sinks (train.log_to): TensorBoard and MLflow hold every numeric value of every record of
metrics.jsonl at its step, read back with the libraries' own readers; resume continues the same
MLflow run; a missing package is refused before anything is written; no sink, nothing written."""

import configparser
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from eprun import plots
from eprun.cli import app
from eprun.errors import RecipeError
from eprun.recipe import TrainConfig, load_recipe
from eprun.runs.sinks import REQUIRED_MODULES, SINK_TYPES, TensorBoardSink, metric_values

from .conftest import crash_at

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["-s", "train.max_batches=6", "-s", "train.log_every=2", "-s", "train.gdu_every=3",
            "-s", "train.checkpoint_every=3"]
BOTH = ["-s", "train.log_to=[tensorboard, mlflow]"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def run_path(result) -> Path:
    return Path(result.stdout.strip().splitlines()[-1])


def expected_points(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric value of every record of metrics.jsonl, by metric name, with its step."""
    points = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        prefix = record["event"] + (f"/{record['split']}" if "split" in record else "")
        for key, value in record.items():
            if key in ("event", "split", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            points.setdefault(f"{prefix}/{key}", []).append((record["step"], float(value)))
    return points


def tensorboard_points(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def as_float32(points):
    return [(step, float(np.float32(value))) for step, value in points]


def mlflow_run(run: Path, uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client, client.get_run(json.loads((run / "mlflow_run.json").read_text())["run_id"])


def mlflow_points(client, run_id: str, names) -> dict[str, list[tuple[int, float]]]:
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name)) for name in names}


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def mlflow_env(monkeypatch, mlflow_uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return mlflow_uri


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, mlflow_uri):
    """A tiny run with both sinks (train, gdu and eval records; keys with slashes and dots)."""
    from tests.conftest import TINY_RECIPE

    folder = tmp_path_factory.mktemp("logged")
    (folder / "tiny.yaml").write_text(TINY_RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        result = invoke("train", folder / "tiny.yaml", "-q", "--out", folder / "runs", *SETTINGS, *BOTH)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    return run_path(result)


def test_tensorboard_holds_every_metric_of_the_run(logged_run):
    expected = expected_points(logged_run)
    assert {"train/loss", "eval/val/accuracy", "eval/test/n", "gdu/angle_deg", "gdu/angle_deg/weights.0"} <= set(expected)
    found = tensorboard_points(logged_run)
    assert set(found) == set(expected)
    for tag, points in expected.items():
        assert found[tag] == as_float32(points), tag
    assert sum(len(p) for p in found.values()) == sum(len(p) for p in expected.values()) > 60


def test_mlflow_holds_every_metric_at_its_step(logged_run, mlflow_uri):
    client, run = mlflow_run(logged_run, mlflow_uri)
    expected = expected_points(logged_run)
    assert set(run.data.metrics) == set(expected)
    assert mlflow_points(client, run.info.run_id, expected) == {name: sorted(p) for name, p in expected.items()}
    assert run.info.run_name == logged_run.name
    assert run.info.status == "FINISHED"
    assert json.loads((logged_run / "summary.json").read_text())["status"] == "finished"
    assert run.data.tags["eprun.run_dir"] == str(logged_run.resolve())
    params = run.data.params
    assert params["rule.beta"] == "0.2" and params["model.hidden"] == "[24]" and params["data.root"] == "null"
    assert params["train.log_to"] == '["tensorboard", "mlflow"]' and params["name"] == "tiny"
    assert params["data.augment.horizontal_flip"] == "false"


def plots_fail_once(monkeypatch):
    """The disk fills up while the plots are drawn: after the test record, after the last checkpoint."""
    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device", "curves.png")

    monkeypatch.setattr(plots, "plot_curves", failing)


@pytest.mark.parametrize("crash, checkpoint_step", [("mid-epoch", 3), ("after-test", 12)])
def test_resume_continues_the_mlflow_run_and_tensorboard_holds_each_value_once(
        crash, checkpoint_step, tiny_recipe, tmp_path, monkeypatch, mlflow_env):
    if crash == "mid-epoch":
        crash_at(monkeypatch, 5)  # step 4's record is written after the step-3 checkpoint
    else:
        plots_fail_once(monkeypatch)  # the test record (step 12) is written after the last checkpoint
    result = invoke("train", tiny_recipe, "-q", "--out", tmp_path / "runs", *SETTINGS, *BOTH)
    assert result.exit_code != 0
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    client, first = mlflow_run(run, mlflow_env)
    assert first.info.status == "FAILED"
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_env)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")

    resumed = invoke("train", "--resume", run, "-q")
    assert resumed.exit_code == 0, resumed.output
    client, after = mlflow_run(run, mlflow_env)
    assert after.info.run_id == first.info.run_id and after.info.status == "FINISHED"
    same_dir = client.search_runs([after.info.experiment_id], filter_string=f"tags.`eprun.run_dir` = '{run.resolve()}'")
    assert [r.info.run_id for r in same_dir] == [first.info.run_id]

    expected = expected_points(run)
    found = tensorboard_points(run)
    assert set(found) == set(expected)
    for tag, points in expected.items():
        assert found[tag] == as_float32(points), tag  # each value once, the resumed one
    history = mlflow_points(client, after.info.run_id, expected)
    repeated = []
    for name, points in expected.items():
        extra = list(history[name])
        for point in points:
            extra.remove(point)  # every kept value is there
        repeated += [(name, step) for step, _ in extra]
    assert repeated and all(step >= checkpoint_step for _, step in repeated)  # written before the stop, kept twice


def test_missing_package_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from tests.conftest import TINY_RECIPE

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE + "  log_to: [tensorboard, mlflow]\n")
    line = TINY_RECIPE.count("\n") + 1
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    result = invoke("train", recipe, "-q", "--out", tmp_path / "runs")
    assert result.exit_code == 2
    lines = [text for text in result.output.splitlines() if text.strip()]
    assert lines == [f'error: {recipe}:{line}: train.log_to: mlflow needs the module mlflow, not installed: '
                     f'pip install -e ".[mlflow]"']
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]
    with pytest.raises(RecipeError, match=r"override 'train.log_to=\[tensorboard\]': train.log_to: tensorboard "
                                          r"needs the module tensorboard"):
        monkeypatch.setitem(sys.modules, "tensorboard", None)
        load_recipe(recipe, ["train.log_to=[tensorboard]"])


def test_a_sink_listed_twice_is_refused(tiny_recipe):
    with pytest.raises(RecipeError, match=r"train.log_to: tensorboard is listed 2 times; list each sink once"):
        load_recipe(tiny_recipe, ["train.log_to=[tensorboard, mlflow, tensorboard]"])
    with pytest.raises(RecipeError, match=r"train.log_to: expected a list of 'tensorboard' \| 'mlflow', got \['wandb'\]"):
        load_recipe(tiny_recipe, ["train.log_to=[wandb]"])
    assert load_recipe(tiny_recipe).train.log_to == []


def test_a_run_without_sinks_writes_neither_and_imports_neither(tiny_recipe, tmp_path):
    script = ("import sys\nfrom pathlib import Path\nfrom eprun import runner\nfrom eprun.recipe import load_recipe\n"
              f"recipe = load_recipe({str(tiny_recipe)!r}, ['train.epochs=1', 'train.max_batches=2'])\n"
              f"runner.train(recipe, Path({str(tmp_path / 'runs')!r}), quiet=True, argv=[])\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'mlflow')\n"
              "             or m.startswith('torch.utils.tensorboard')))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": ""}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    (run,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "env.json", "metrics.jsonl", "plots",
                                                     "recipe.yaml", "summary.json"]


def test_a_failing_sink_is_one_warning_and_the_run_goes_on(tiny_recipe, tmp_path, monkeypatch):
    original = TensorBoardSink.log
    calls = {"n": 0}

    def failing(self, record):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        original(self, record)

    monkeypatch.setattr(TensorBoardSink, "log", failing)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")  # mlflow cannot open
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    result = invoke("train", tiny_recipe, "-q", "--out", tmp_path / "runs", "-s", "train.epochs=1",
                    "-s", "train.max_batches=4", "-s", "train.log_every=1", *BOTH)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, result.output
    assert warnings[0].startswith("warning: metric sink mlflow could not be opened (")
    assert warnings[1] == ("warning: metric sink tensorboard failed (OSError: [Errno 28] No space left on device); "
                           "the run goes on without it, metrics.jsonl holds every record")
    assert "Traceback" not in result.output
    run = run_path(result)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["warnings"]) == 2
    assert calls["n"] == 2  # dropped after its failure
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6  # 4 train, val, test
    assert [step for step, _ in tensorboard_points(run)["train/loss"]] == [1]


def test_metric_names():
    record = {"event": "eval", "split": "val", "epoch": 2, "step": 40, "loss": 0.25, "accuracy": 0.5, "n": 200,
              "note": "text", "missing": None, "flag": True}
    assert metric_values(record) == {"eval/val/epoch": 2.0, "eval/val/loss": 0.25, "eval/val/accuracy": 0.5,
                                     "eval/val/n": 200.0}
    assert metric_values({"event": "train", "step": 3, "vf_angle_deg/B1": 12.5}) == {"train/vf_angle_deg/B1": 12.5}


def test_the_sinks_the_recipe_allows_are_those_setup_cfg_installs():
    allowed = typing.get_args(typing.get_args(typing.get_type_hints(TrainConfig)["log_to"])[0])
    assert set(allowed) == set(SINK_TYPES) == set(REQUIRED_MODULES) == {"tensorboard", "mlflow"}
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = {name: set(config["options.extras_require"][name].split()) for name in ("test", "tensorboard", "mlflow")}
    assert {"tensorboard"} <= {p.split(">")[0].split("=")[0] for p in extras["tensorboard"]}
    assert {"mlflow-skinny", "sqlalchemy", "alembic"} <= {p.split(">")[0].split("=")[0] for p in extras["mlflow"]}
    assert extras["tensorboard"] | extras["mlflow"] <= extras["test"]  # CI installs .[test] and runs these tests


def test_a_resumed_tensorboard_session_names_its_file_after_the_earlier_ones(tmp_path):
    """Event files are read in name order and named by their creation second: the resumed session's
    purge step must come after what it discards, whichever process wrote that."""
    import time

    from eprun.runs.sinks.tensorboard_sink import _wait_past_creation_second

    now = int(time.time())
    earlier = tmp_path / f"events.out.tfevents.{now}.host.99999.0"
    earlier.write_bytes(b"")
    _wait_past_creation_second([earlier])
    assert int(time.time()) > now
