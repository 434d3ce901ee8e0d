"""Tests for eprun.runs: atomic writes, run dirs, metrics, env, summary, safe checkpoints."""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from eprun.errors import CheckpointError, EprunError, RunDirError
from eprun.runs import (
    CHECKPOINT_FORMAT,
    MetricsWriter,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    create_run_dir,
    load_checkpoint,
    open_run,
    read_metrics,
    read_summary,
    run_dir_of,
    save_checkpoint,
    write_env,
    write_summary,
)

NOW = dt.datetime(2024, 5, 6, 7, 8, 9)


def make_marker(path: str) -> None:
    """What a malicious checkpoint would run on load: create a marker file."""
    Path(path).write_text("pwned")


class Malicious:
    """Pickles to a call of make_marker(marker) — arbitrary code on unpickling."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (make_marker, (self.marker,))


class MaliciousSystem:
    """Pickles to os.system('touch marker')."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_run(tmp_path: Path, recipe: str = "name: demo\nseed: 1\n") -> Path:
    """A run dir with a recipe.yaml."""
    run = create_run_dir(tmp_path / "runs", "demo", now=NOW)
    (run / "recipe.yaml").write_text(recipe)
    return run


# --- atomic writes -------------------------------------------------------------------------

def test_atomic_writes_round_trip_and_leave_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    atomic_write_json(tmp_path / "j.json", {"z": 1, "a": [1.5, None]})
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    text = (tmp_path / "j.json").read_text()
    assert text.endswith("}\n") and text.index('"z"') < text.index('"a"')  # order kept
    assert json.loads(text) == {"z": 1, "a": [1.5, None]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "j.json", "t.txt"]


def test_atomic_write_json_converts_tensors(tmp_path):
    atomic_write_json(tmp_path / "j.json", {"loss": torch.tensor(0.5), "v": torch.arange(3)})
    assert json.loads((tmp_path / "j.json").read_text()) == {"loss": 0.5, "v": [0, 1, 2]}


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_write_failure_during_serialisation_writes_nothing(tmp_path):
    target = tmp_path / "j.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["j.json"]


# --- run directories -----------------------------------------------------------------------

def test_create_run_dir_is_unique_within_one_second(tmp_path):
    dirs = [create_run_dir(tmp_path / "runs", "mnist-ep", now=NOW) for _ in range(3)]
    names = [d.name for d in dirs]
    assert names == [
        "mnist-ep-20240506-070809",
        "mnist-ep-20240506-070809-1",
        "mnist-ep-20240506-070809-2",
    ]
    for d in dirs:
        assert (d / "checkpoints").is_dir() and (d / "plots").is_dir()


def test_create_run_dir_never_reuses_existing_dir(tmp_path):
    first = create_run_dir(tmp_path, "x", now=NOW)
    (first / "recipe.yaml").write_text("keep: me\n")
    second = create_run_dir(tmp_path, "x", now=NOW)
    assert second != first
    assert (first / "recipe.yaml").read_text() == "keep: me\n"


def test_create_run_dir_sanitises_name(tmp_path):
    d = create_run_dir(tmp_path, "../my recipe/é!", now=NOW)
    assert d.parent == tmp_path
    assert d.name == "my_recipe_-20240506-070809"
    assert create_run_dir(tmp_path, "...", now=NOW).name == "run-20240506-070809"


def test_create_run_dir_under_a_file_is_a_run_dir_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="cannot create a run directory"):
        create_run_dir(tmp_path / "file", "x", now=NOW)


def test_run_dir_of_paths_inside_a_run(tmp_path):
    run = make_run(tmp_path)
    ckpt = run / "checkpoints" / "last.pt"
    ckpt.write_bytes(b"")
    expected = run.resolve()
    for p in (run, ckpt, run / "checkpoints", run / "plots", run / "recipe.yaml"):
        assert run_dir_of(p) == expected


def test_run_dir_of_non_run_paths(tmp_path):
    with pytest.raises(RunDirError, match="not an eprun run directory"):
        run_dir_of(tmp_path)
    with pytest.raises(RunDirError, match="does not exist"):
        run_dir_of(tmp_path / "missing")


def test_open_run_on_non_run_dir(tmp_path):
    with pytest.raises(RunDirError, match=r"is not an eprun run directory \(no recipe.yaml\)"):
        open_run(tmp_path)


def test_open_run_while_running(tmp_path):
    """Without a summary.json a run is ``running`` while a live process holds its lock, else
    ``unknown`` (or ``finished`` once its metrics hold the test score)."""
    import subprocess
    import sys

    run = make_run(tmp_path)
    info = open_run(run)
    assert info.summary == {"status": "unknown", "summary_missing": True}
    assert info.metrics == [] and info.recipe == {"name": "demo", "seed": 1}
    assert info.name == run.name and info.path == run.resolve()

    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / ".lock").write_text(str(writer.pid))
        assert open_run(run).summary == {"status": "running"}
        (run / "summary.json").write_text('{"status": "fini')  # partial (not via our writer)
        assert open_run(run).summary == {"status": "running"}
    finally:
        writer.kill()
        writer.wait()


def test_open_run_finished_from_checkpoint_path(tmp_path):
    run = make_run(tmp_path)
    with MetricsWriter(run / "metrics.jsonl") as w:
        w.log({"event": "train", "epoch": 0.5, "loss": 1.0})
    write_summary(run, {"status": "finished", "best": {"val_accuracy": 0.9}})
    save_checkpoint(run / "checkpoints" / "best.pt", {"epoch": 1})
    info = open_run(run / "checkpoints" / "best.pt")
    assert info.path == run.resolve()
    assert info.summary["status"] == "finished" and info.status == "finished"
    assert info.metrics == [{"event": "train", "epoch": 0.5, "loss": 1.0}]
    assert read_summary(run) == info.summary


def test_open_run_bad_recipe_yaml(tmp_path):
    run = make_run(tmp_path, recipe="a: [1, 2\n")
    with pytest.raises(RunDirError, match="invalid YAML"):
        open_run(run)


# --- metrics -------------------------------------------------------------------------------

def test_metrics_round_trip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"event": "train", "epoch": i / 4, "loss": 1.0 / (i + 1)} for i in range(5)]
    with MetricsWriter(path) as w:
        for r in records:
            w.log(r)
    assert w.closed
    with MetricsWriter(path) as w:  # append mode
        w.log({"event": "eval", "split": "val", "accuracy": torch.tensor(0.75)})
    assert read_metrics(path) == records + [{"event": "eval", "split": "val", "accuracy": 0.75}]
    assert len(path.read_text().splitlines()) == 6


def test_metrics_writer_flushes_each_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path, fsync=True)
    w.log({"a": 1})
    assert read_metrics(path) == [{"a": 1}]  # visible before close
    w.close()
    w.close()


def test_metrics_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "lo')
    assert read_metrics(path) == [{"a": 1}, {"a": 2}]
    path.write_bytes(b'{"a": 1}\n{"a": \xe2\x82')  # torn inside a UTF-8 character
    assert read_metrics(path) == [{"a": 1}]


def test_metrics_bad_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "lo\n{"a": 3}\n')
    with pytest.raises(RunDirError) as info:
        read_metrics(path)
    message = str(info.value)
    assert f"{path}:2" in message and "\n" not in message


def test_metrics_writer_cuts_torn_tail_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "lo')  # a crashed run, now resumed
    with MetricsWriter(path) as w:
        w.log({"a": 3})
    assert read_metrics(path) == [{"a": 1}, {"a": 3}]


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(RunDirError, match="cannot read metrics"):
        read_metrics(tmp_path / "metrics.jsonl")


# --- env and summary -----------------------------------------------------------------------

def test_write_env(tmp_path):
    env = write_env(tmp_path, device="cpu", argv=["eprun", "train", "r.yaml"], extra={"seed": 3})
    on_disk = json.loads((tmp_path / "env.json").read_text())
    assert on_disk == env
    for key in ("python", "torch", "torchvision", "eprun", "platform", "cpu_count",
                "torch_threads", "device", "git_sha", "argv", "hostname", "start_time"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["command"] == "eprun train r.yaml" and env["seed"] == 3
    dt.datetime.fromisoformat(env["start_time"])


def test_summary_round_trip(tmp_path):
    write_summary(tmp_path, {"status": "finished", "wall_time_s": 1.5})
    assert read_summary(tmp_path) == {"status": "finished", "wall_time_s": 1.5}
    with pytest.raises(RunDirError):
        read_summary(tmp_path / "nope")


# --- checkpoints ---------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    optim = {  # shaped like torch.optim.Adam.state_dict(), without building one
        "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2, 3)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "params": [0, 1]}],
    }
    state = {
        "model": model.state_dict(),
        "optim": optim,
        "shape": torch.Size([2, 3]),
        "dtype": torch.float16,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "counters": {"epoch": 2, "step": 100, "best": 0.97, "done": False, "note": None},
        "nested": [1, (2.5, "x"), {"t": torch.ones(2, 2, dtype=torch.float64)}],
    }
    path = tmp_path / "last.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["format"] == CHECKPOINT_FORMAT
    assert torch.equal(loaded["model"]["weight"], model.weight.detach())
    assert loaded["counters"] == state["counters"]
    assert loaded["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(loaded["nested"][2]["t"], state["nested"][2]["t"])
    assert loaded["nested"][1] == (2.5, "x")
    assert torch.equal(loaded["optim"]["state"][0]["exp_avg"], optim["state"][0]["exp_avg"])
    assert loaded["optim"]["param_groups"] == optim["param_groups"]
    assert loaded["shape"] == torch.Size([2, 3]) and loaded["dtype"] is torch.float16
    torch.nn.Linear(3, 2).load_state_dict(loaded["model"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_save_checkpoint_rejects_objects_with_key_path(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(TypeError, match=r"state\['a'\]\[1\]"):
        save_checkpoint(path, {"a": [1, object()]})
    assert not path.exists()


def _refused(path: Path, match: str = "not a loadable eprun checkpoint") -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    assert isinstance(info.value, EprunError) and info.value.exit_code == 2
    return message


def test_truncated_checkpoint_refused(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.randn(100, 100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(path)


def test_random_bytes_and_missing_and_empty_refused(tmp_path):
    path = tmp_path / "r.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    _refused(path)
    _refused(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    _refused(tmp_path / "empty.pt")


def test_wrong_format_refused(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"format": "other-9", "w": torch.ones(1)}, path)
    _refused(path, match="incompatible checkpoint format 'other-9', expected 'eprun-checkpoint-1'")
    torch.save({"w": torch.ones(1)}, path)  # a bare state_dict
    _refused(path, match="incompatible checkpoint format none")
    torch.save([torch.ones(1)], path)
    _refused(path, match="incompatible checkpoint format")


def test_malicious_payload_would_run_without_weights_only(tmp_path):
    """Sanity check that the payload used below really executes code when unpickled."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Malicious(marker)))
    assert marker.exists()


@pytest.mark.parametrize("payload", [Malicious, MaliciousSystem])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_checkpoint_refused_and_not_run(tmp_path, payload, writer):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    state = {"format": CHECKPOINT_FORMAT, "model": {"w": torch.ones(1)}, "x": payload(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f)
    message = _refused(path)
    assert "weights-only" in message
    assert not marker.exists()
