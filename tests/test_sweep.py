"""eprun sweep and the grouped eprun compare: the grid, checks before anything starts, the local and
Slurm (submitit's local executor) backends end to end on tiny synthetic runs, a failed point, Ctrl-C
and resume, and mean ± std over seeds on hand-made and swept runs."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from eprun.cli import app
from eprun.errors import SweepError
from eprun.sweep import record, session, slurm, worker
from eprun.sweep.grid import parse_grid, split_values
from eprun.sweep.slurm_settings import mem_gb, read_settings, time_minutes

from .conftest import TINY_RECIPE

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
#: every point of these tests: one short epoch
SHORT = ["-s", "train.epochs=1", "-s", "train.max_batches=4", "-s", "data.val_size=100"]

cli = CliRunner()


def invoke(*args):
    return cli.invoke(app, [str(a) for a in args])


def read_record(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / record.SWEEP_FILE).read_text())


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# ----------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("text, values", [
    ("0,1,2", ["0", "1", "2"]),
    ("[512,512]", ["[512,512]"]),
    ("[256],[512]", ["[256]", "[512]"]),
    ("[[1,2],[3]],[4]", ["[[1,2],[3]]", "[4]"]),
    ("{a: 1, b: 2},{a: 3}", ["{a: 1, b: 2}", "{a: 3}"]),
    ("'a, b',c", ["'a, b'", "c"]),
    (' "x,y" , z ', ['"x,y"', "z"]),
    ("0.1", ["0.1"]),
])
def test_values_split_at_commas_outside_brackets_and_quotes(text, values):
    assert split_values(text) == values


def test_grid_is_the_product_of_the_axes_last_fastest_with_fixed_values_everywhere():
    grid = parse_grid(["seed=0,1,2", "train.epochs=3", "rule.beta=0.1,0.2", "model.hidden=[512,512]",
                       "optim.lr=[1e-3,1e-4],[2e-3,2e-4]"])
    assert grid.fixed == ("train.epochs=3", "model.hidden=[512,512]")
    assert grid.as_dict() == {"seed": ["0", "1", "2"], "rule.beta": ["0.1", "0.2"],
                              "optim.lr": ["[1e-3,1e-4]", "[2e-3,2e-4]"]}
    points = grid.points()
    assert len(points) == 12
    assert points[0] == {"seed": "0", "rule.beta": "0.1", "optim.lr": "[1e-3,1e-4]"}
    assert points[1] == {"seed": "0", "rule.beta": "0.1", "optim.lr": "[2e-3,2e-4]"}
    assert points[-1] == {"seed": "2", "rule.beta": "0.2", "optim.lr": "[2e-3,2e-4]"}
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 12
    assert parse_grid([]).points() == [{}]


@pytest.mark.parametrize("options, fragment", [
    (["seed"], "expected KEY.PATH=VALUE"),
    (["=0,1"], "empty key"),
    (["rule..beta=0.1,0.2"], "empty key"),
    (["seed=0,,1"], "empty value"),
    (["seed=0,1,"], "empty value"),
    (["seed=0,1", "seed=2"], "given twice"),
    (["seed=0,1,0"], "listed twice"),
    (["seed=" + ",".join(map(str, range(101))), "train.epochs=" + ",".join(map(str, range(1, 101)))],
     "at most 10,000"),
])
def test_bad_grids_are_refused_naming_the_option(options, fragment):
    with pytest.raises(SweepError, match=fragment.replace(".", r"\.")):
        parse_grid(options)


# ----------------------------------------------------------------------------- checked before anything starts


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.parametrize("options", [
    ["-s", "rule.beta=0.1,0"],  # one point's value out of range
    ["-s", "model.hidden=[8],[8,oops]"],  # one point's list of the wrong type
    ["-s", "rule.betaa=0.1,0.2"],  # an unknown key
    ["-s", "seed=0,1", "--backend", "slurm"],  # no time limit
    ["-s", "seed=0,1", "--backend", "slurm", "--time", "1:xx"],
    ["-s", "seed=0,1", "--partition", "gpu"],  # a Slurm setting for the local backend
    ["-s", "seed=0,1", "--jobs", "0"],
    ["-s", "seed=0,1", "--backend", "cloud"],
    ["-s", "rule.pair_with=bptt", "-s", "seed=0,1"],  # two runs per point
])
def test_a_bad_point_or_setting_exits_2_before_anything_is_made(tiny_recipe, tmp_path, options):
    out = tmp_path / "runs"
    one_line_error(invoke("sweep", tiny_recipe, *options, "--out", out))
    assert not out.exists()


def test_the_failing_point_is_named_by_its_override(tiny_recipe, tmp_path):
    line = one_line_error(invoke("sweep", tiny_recipe, "-s", "rule.beta=0.1,0", "--out", tmp_path / "runs"))
    assert "rule.beta=0" in line


def test_resume_refuses_a_folder_that_is_not_a_sweep(tmp_path):
    one_line_error(invoke("sweep", "--resume", tmp_path))
    one_line_error(invoke("sweep", "--resume", tmp_path / "missing"))


# ----------------------------------------------------------------------------- Slurm settings


def test_slurm_times_and_sizes():
    assert [time_minutes(t) for t in (90, "90", "1:30", "2:00:00", "1-0", "1-2:30", "0:0:59")] == \
           [90, 90, 2, 120, 1440, 1590, 1]
    assert [mem_gb(m) for m in (16, "16", "16G", "512M", "1T", "2.5g")] == [16, 16, 16, 0.5, 1024, 2.5]
    for bad in ("soon", "0", "1:2:3:4", -5):
        with pytest.raises(ValueError):
            time_minutes(bad)
    with pytest.raises(ValueError):
        mem_gb("lots")


def test_slurm_settings_from_yaml_with_flags_winning(tmp_path):
    config = tmp_path / "slurm.yaml"
    config.write_text("partition: gpu\ntime: '4:00:00'\ngpus: 1\ncpus: 8\nmem: 32G\nsetup: [module load cuda]\n")
    settings = read_settings(config, {"time": "30", "cpus": None, "partition": None})
    params = settings.executor_parameters("slurm")
    assert params == {"timeout_min": 30, "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32.0,
                      "slurm_partition": "gpu", "slurm_setup": ["module load cuda"]}
    assert settings.executor_parameters("local")["local_setup"] == ["module load cuda"]
    config.write_text("partition: gpu\ntime: 60\ngpu: 1\n")
    with pytest.raises(Exception, match=rf"{config}:3: gpu: unknown key; did you mean 'gpus'"):
        read_settings(config, {})


# ----------------------------------------------------------------------------- the local backend, end to end


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """Four tiny points, two at a time: seeds 1 and 2 on synthetic data (they finish) and on MNIST,
    which is absent (they fail)."""
    base = tmp_path_factory.mktemp("local")
    recipe = base / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EPRUN_OFFLINE", "1")
        mp.setenv("EPRUN_DATA", str(base / "no-data"))
        result = invoke("sweep", recipe, "-s", "seed=1,2", "-s", "data.dataset=synthetic,mnist", *SHORT,
                        "--jobs", 2, "--out", base / "runs")
    return result, base


def test_local_sweep_runs_two_at_once_and_records_every_point(local_sweep):
    result, base = local_sweep
    assert result.exit_code == 1, result.output  # some points failed
    sweep_dir = Path(result.stdout.strip().splitlines()[-1])
    assert sweep_dir.parent == base / "runs" and sweep_dir.name.startswith("sweep-tiny-")
    data = read_record(sweep_dir)
    assert data["format"] == record.SWEEP_FORMAT and data["status"] == "failed"
    assert data["grid"] == {"seed": ["1", "2"], "data.dataset": ["synthetic", "mnist"]}
    assert data["fixed"] == ["train.epochs=1", "train.max_batches=4", "data.val_size=100"]
    assert data["backend"]["kind"] == "local" and data["backend"]["jobs"] == 2
    assert (sweep_dir / data["recipe_copy"]).read_text() == TINY_RECIPE
    points = data["points"]
    assert [p["id"] for p in points] == ["p000", "p001", "p002", "p003"]
    assert [p["status"] for p in points] == ["finished", "failed", "finished", "failed"]
    assert points[2]["overrides"] == data["fixed"] + ["seed=2", "data.dataset=synthetic"]
    assert data["counts"] == {"finished": 2, "failed": 2}
    # two at once: the second point started before the first one ended
    assert points[1]["started_at"] <= points[0]["ended_at"]
    for point, seed in ((points[0], 1), (points[2], 2)):
        run = sweep_dir / point["run"]
        assert run.parent == sweep_dir / point["id"] and point["exit_code"] == 0 and point["error"] is None
        assert summary(run)["status"] == "finished" and summary(run)["seed"] == seed
        assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_batches"] == 4
        threads = json.loads((run / "env.json").read_text())["torch_threads"]
        assert threads == data["backend"]["threads_per_worker"]


def test_a_failed_point_is_recorded_and_does_not_block_the_others(local_sweep):
    result, _ = local_sweep
    sweep_dir = Path(result.stdout.strip().splitlines()[-1])
    for point in (p for p in read_record(sweep_dir)["points"] if p["status"] == "failed"):
        assert point["exit_code"] == 2 and point["run"] is None  # refused before its run directory
        assert point["error"].startswith("error:")
        assert point["error"] == worker.last_line(sweep_dir / point["id"] / record.STDERR_FILE)


def test_compare_of_a_sweep_gives_mean_std_and_n_over_the_seeds(local_sweep, tmp_path):
    result, _ = local_sweep
    sweep_dir = Path(result.stdout.strip().splitlines()[-1])
    runs = [sweep_dir / p["run"] for p in read_record(sweep_dir)["points"] if p["run"]]
    shown = invoke("compare", sweep_dir, "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["varying_keys"] == [] and len(data["groups"]) == 1
    group = data["groups"][0]
    assert group["n"] == 2 and group["seeds"] == [1, 2]
    assert [r["path"] for r in group["runs"]] == [str(r.resolve()) for r in runs]
    tests = [summary(r)["test_accuracy"] for r in runs]
    assert group["scores"]["test_accuracy"] == {"mean": pytest.approx(statistics.fmean(tests)),
                                                "std": pytest.approx(statistics.stdev(tests)), "n": 2}
    table = invoke("compare", sweep_dir, "--plot", tmp_path / "sweep.png")
    assert table.exit_code == 0, table.output
    assert f"{statistics.fmean(tests):.4f} ± {statistics.stdev(tests):.4f}" in table.stdout
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG)


# ----------------------------------------------------------------------------- Ctrl-C and resume


def test_ctrl_c_stops_the_workers_cleanly_and_resume_runs_only_the_unfinished_points(tiny_recipe, tmp_path,
                                                                                     monkeypatch):
    """One point at a time; SIGINT while the second trains: it checkpoints and ends interrupted, the
    first stays finished. Resuming continues the second from its checkpoint and leaves the first alone.

    The second point must still be training when the signal lands: on the torch engine (the native
    kernels stop an example at a bitwise fixed point, so a long T alone would not slow them) its
    1,000 steps a phase make it last over a second, far longer than the poll below."""
    monkeypatch.setenv("EPRUN_NATIVE", "0")
    out = tmp_path / "runs"
    second_slow = ["-s", "rule.T=12,1000", "-s", "train.max_batches=40", "-s", "train.checkpoint_every=2",
                   "-s", "train.log_every=2", "-s", "train.epochs=1", "-s", "data.val_size=100"]
    env = {**os.environ, "EPRUN_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "eprun", "sweep", str(tiny_recipe), *second_slow,
                                "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            second = list(out.glob("sweep-*/p001/tiny-*/metrics.jsonl"))
            if second and second[0].stat().st_size > 0:  # the second point is training
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("the second point never started training")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    sweep_dir = Path(stdout.strip().splitlines()[-1])
    data = read_record(sweep_dir)
    assert data["status"] == "interrupted"
    first, second = data["points"]
    assert (first["status"], second["status"]) == ("finished", "interrupted")
    assert second["exit_code"] == 130 and second["run"] is not None
    assert summary(sweep_dir / second["run"])["status"] == "interrupted"
    assert (sweep_dir / second["run"] / "checkpoints" / "last.pt").is_file()
    first_summary = (sweep_dir / first["run"] / "summary.json").read_bytes()

    resumed = invoke("sweep", "--resume", sweep_dir)
    assert resumed.exit_code == 0, resumed.output
    data = read_record(sweep_dir)
    assert data["status"] == "finished" and [p["status"] for p in data["points"]] == ["finished", "finished"]
    first, second = data["points"]
    assert (first["attempts"], second["attempts"]) == (1, 2)
    assert (sweep_dir / first["run"] / "summary.json").read_bytes() == first_summary  # left alone
    continued = summary(sweep_dir / second["run"])
    assert continued["status"] == "finished" and len(continued["resumes"]) == 1  # resumed, not restarted
    assert continued["resumes"][0]["from_step"] > 0
    assert sorted(p.name for p in (sweep_dir / "p001").iterdir() if p.is_dir()) == [Path(second["run"]).name]

    again = invoke("sweep", "--resume", sweep_dir)
    assert again.exit_code == 0 and [p["attempts"] for p in read_record(sweep_dir)["points"]] == [1, 2]


def hand_made_sweep(tmp_path: Path, statuses: list[str]) -> Path:
    """A sweep record of len(statuses) points, without any run."""
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    points = [record.Point(index=i, id=f"p{i:03d}", values={"seed": str(i)}, overrides=[f"seed={i}"], status=s)
              for i, s in enumerate(statuses)]
    record.Sweep(path=sweep_dir, name="tiny", recipe="tiny.yaml", recipe_copy="recipe/tiny.yaml", cwd=str(tmp_path),
                 fixed=[], grid={"seed": [str(i) for i in range(len(statuses))]},
                 backend={"kind": "local", "jobs": 1}, points=points, status="interrupted").save()
    return sweep_dir


def fake_run(parent: Path, name: str, recipe: dict, status: str, checkpoint: bool = True, **scores) -> Path:
    run = parent / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "summary.json").write_text(json.dumps({"status": status, **scores}))
    if checkpoint:
        (run / "checkpoints" / "last.pt").write_bytes(b"")
    return run


def test_resume_takes_each_point_from_its_run_on_disk(tmp_path):
    sweep_dir = hand_made_sweep(tmp_path, ["running", "running", "submitted", "finished", "failed"])
    fake_run(sweep_dir / "p000", "tiny-20260101-000000", {"seed": 0}, "finished")  # ended after the sweep stopped
    fake_run(sweep_dir / "p001", "tiny-20260101-000000", {"seed": 1}, "running")  # killed with its sweep
    sweep = record.load_sweep(sweep_dir)
    todo = session.reconcile(sweep)
    assert [p.status for p in sweep.points] == ["finished", "interrupted", "interrupted", "finished", "failed"]
    assert [p.id for p in todo] == ["p001", "p002", "p004"]
    assert sweep.points[1].run == "p001/tiny-20260101-000000"
    resumes = worker.build_task(sweep, sweep.points[1], threads=2).args
    assert resumes == ("-m", "eprun", "--threads", "2", "train", "--resume",
                       str((sweep_dir / "p001" / "tiny-20260101-000000").resolve()), "-q")
    fresh = worker.build_task(sweep, sweep.points[2], threads=None).args
    assert fresh[:3] == ("-m", "eprun", "train") and fresh[4:6] == ("-s", "seed=2")
    assert fresh[-3:] == ("--out", str((sweep_dir / "p002").resolve()), "-q")


def test_resume_is_refused_while_a_run_of_the_sweep_is_being_written(tmp_path):
    sweep_dir = hand_made_sweep(tmp_path, ["running"])
    run = fake_run(sweep_dir / "p000", "tiny-20260101-000000", {"seed": 0}, "running")
    (run / ".lock").write_text(str(os.getppid()))  # a live process other than this one
    line = one_line_error(invoke("sweep", "--resume", sweep_dir))
    assert "p000" in line and str(run) in line
    assert read_record(sweep_dir)["points"][0]["status"] == "running"  # nothing changed


def test_a_slurm_job_stopped_by_its_time_limit_is_requeued_as_the_resume_of_its_run(tmp_path):
    point = tmp_path / "p000"
    task = worker.Task("p000", ("-m", "eprun", "--threads", "4", "train", "r.yaml", "-s", "seed=0", "--out",
                                str(point), "-q"), str(tmp_path), str(point / "stdout.txt"), str(point / "stderr.txt"))
    assert slurm.resume_task(task) == task  # no run yet: started afresh
    run = fake_run(point, "tiny-20260101-000000", {"seed": 0}, "interrupted")
    assert slurm.resume_task(task).args == ("-m", "eprun", "--threads", "4", "train", "--resume", str(run), "-q")
    requeued = slurm.PointJob(task).checkpoint()
    assert requeued.function.task.args == slurm.resume_task(task).args


class FakeAttempt:
    """A worker that ends after ``polls`` looks with ``code``; records how many run at once."""

    def __init__(self, task, code, polls, live):
        self.task, self.code, self.polls, self.live = task, code, polls, live
        live.append(self)

    handle = "fake"

    def started(self):
        return True

    def poll(self):
        self.polls -= 1
        if self.polls > 0:
            return None
        if self in self.live:
            self.live.remove(self)
        if self.code == 0:
            fake_run(Path(self.task.stdout).parent, "tiny-20260101-000000", {"seed": 0}, "finished")
        return worker.Outcome(self.code, None if self.code == 0 else "error: boom")

    def stop(self, signum):
        pass


class FakeBackend:
    queues = False

    def __init__(self, slots, codes):
        self.slots, self.codes, self.live, self.most = slots, codes, [], 0

    def threads(self):
        return None

    def launch(self, tasks):
        attempts = [FakeAttempt(t, self.codes[t.point_id], 3, self.live) for t in tasks]
        self.most = max(self.most, len(self.live))
        return attempts

    def describe(self):
        return {"kind": "fake", "jobs": self.slots}


def test_the_driver_keeps_its_slots_full_and_a_failure_blocks_nothing(tmp_path, monkeypatch):
    from eprun.sweep import driver

    monkeypatch.setattr(driver, "POLL_S", 0.0)
    sweep_dir = hand_made_sweep(tmp_path, ["pending"] * 5)
    sweep = record.load_sweep(sweep_dir)
    backend = FakeBackend(2, {"p000": 0, "p001": 2, "p002": 0, "p003": -9, "p004": 0})
    lines = []
    ending = driver.drive(sweep, backend, list(sweep.points), lines.append)
    assert ending.signum is None and backend.most == 2
    data = read_record(sweep_dir)
    assert [p["status"] for p in data["points"]] == ["finished", "failed", "finished", "interrupted", "finished"]
    assert [p["exit_code"] for p in data["points"]] == [0, 2, 0, -9, 0]
    assert [p["run"] for p in data["points"]] == ["p000/tiny-20260101-000000", None, "p002/tiny-20260101-000000",
                                                  None, "p004/tiny-20260101-000000"]
    assert data["points"][1]["error"] == "error: boom" and data["status"] == "failed"
    assert all(p["attempts"] == 1 and p["ended_at"] for p in data["points"])


# ----------------------------------------------------------------------------- Slurm (submitit's local executor)


def test_slurm_backend_through_submitits_local_executor(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the jobs import eprun as this test does
    config = tmp_path / "slurm.yaml"
    config.write_text("time: 30\ncpus: 1\npartition: ignored-by-the-local-executor\n")
    result = invoke("sweep", tiny_recipe, "-s", "seed=1,2", *SHORT, "--backend", "slurm", "--cluster", "local",
                    "--slurm-config", config, "--time", "10", "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    sweep_dir = Path(result.stdout.strip().splitlines()[-1])
    data = read_record(sweep_dir)
    assert data["status"] == "finished"
    backend = data["backend"]
    assert (backend["kind"], backend["cluster"], backend["logs"]) == ("slurm", "local", record.SLURM_LOGS)
    assert backend["settings"]["time"] == "10" and backend["settings"]["cpus"] == 1  # the flag won
    for point, seed in zip(data["points"], (1, 2)):
        assert point["status"] == "finished" and point["exit_code"] == 0
        assert point["job"].startswith("slurm job ")
        run = sweep_dir / point["run"]
        assert summary(run)["status"] == "finished" and summary(run)["seed"] == seed
        assert json.loads((run / "env.json").read_text())["torch_threads"] == 1  # --cpus
        job_id = point["job"].split()[-1]
        assert list((sweep_dir / record.SLURM_LOGS).glob(f"{job_id}_*_log.out"))  # submitit's logs
        assert list((sweep_dir / record.SLURM_LOGS).glob(f"{job_id}_*_result.pkl"))


# ----------------------------------------------------------------------------- compare's groups on hand-made runs


def recipe_of(seed: int, beta: float) -> dict:
    return {"name": "demo", "seed": seed, "data": {"dataset": "synthetic"}, "model": {"kind": "mlp", "hidden": [8]},
            "rule": {"kind": "ep", "beta": beta, "estimator": "one-sided"}, "train": {"epochs": 2}}


def metrics(acc: float) -> str:
    records = [{"event": "train", "epoch": e / 2, "step": e, "loss": 1.0, "accuracy": acc - 0.1 + e * 0.01}
               for e in range(1, 5)]
    records += [{"event": "eval", "split": "val", "epoch": float(e), "step": 2 * e, "loss": 1.0, "accuracy": acc}
                for e in (1, 2)]
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def hand_made_runs(tmp_path):
    """beta 0.1 over seeds 0, 1, 2 (test accuracy 0.90, 0.92, 0.94); beta 0.2 over seed 0 only."""
    runs = []
    for seed, beta, test in ((0, 0.1, 0.90), (1, 0.1, 0.92), (2, 0.1, 0.94), (0, 0.2, 0.80)):
        run = fake_run(tmp_path / "runs", f"demo-s{seed}-b{beta}", recipe_of(seed, beta), "finished",
                       epochs_completed=2, best_val_accuracy=test + 0.01, test_accuracy=test,
                       wall_time_s=10.0 + seed, samples_per_s=1000.0)
        (run / "metrics.jsonl").write_text(metrics(test))
        runs.append(run)
    return runs


def test_compare_groups_runs_of_one_recipe_but_the_seed(hand_made_runs, tmp_path):
    result = invoke("compare", *hand_made_runs, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["varying_keys"] == ["rule.beta"]
    first, second = data["groups"]
    assert (first["varying"], first["n"], first["seeds"]) == ({"rule.beta": 0.1}, 3, [0, 1, 2])
    assert first["label"] == "rule.beta=0.1"
    assert first["scores"]["test_accuracy"] == {"mean": pytest.approx(0.92), "std": pytest.approx(0.02), "n": 3}
    assert first["scores"]["best_val_accuracy"]["mean"] == pytest.approx(0.93)
    assert first["scores"]["wall_time_s"] == {"mean": pytest.approx(11.0), "std": pytest.approx(1.0), "n": 3}
    assert first["scores"]["epochs"] == {"mean": 2.0, "std": 0.0, "n": 3}
    assert first["scores"]["angle_to_bptt_deg"] == {"mean": None, "std": None, "n": 0}
    assert [r["path"] for r in first["runs"]] == [str(r.resolve()) for r in hand_made_runs[:3]]
    assert [r["seed"] for r in first["runs"]] == [0, 1, 2]
    assert (second["n"], second["seeds"]) == (1, [0])
    assert second["scores"]["test_accuracy"] == {"mean": pytest.approx(0.80), "std": None, "n": 1}

    table = invoke("compare", *hand_made_runs, "--plot", tmp_path / "groups.png")
    assert table.exit_code == 0, table.output
    assert "0.9200 ± 0.0200" in table.stdout and "0.8000 ± -" in table.stdout
    assert (tmp_path / "groups.png").read_bytes().startswith(PNG)


def test_compare_without_shared_recipes_or_with_no_group_keeps_the_list_of_runs(hand_made_runs):
    distinct = json.loads(invoke("compare", hand_made_runs[0], hand_made_runs[3], "--json").stdout)
    assert isinstance(distinct, list) and [r["test_accuracy"] for r in distinct] == [0.90, 0.80]
    ungrouped = json.loads(invoke("compare", *hand_made_runs, "--json", "--no-group").stdout)
    assert isinstance(ungrouped, list) and len(ungrouped) == 4
    assert "seed" not in ungrouped[0]
    forced = json.loads(invoke("compare", hand_made_runs[0], "--json", "--group").stdout)
    assert forced["groups"][0]["n"] == 1 and forced["groups"][0]["scores"]["test_accuracy"]["std"] is None


def test_a_run_without_a_score_is_left_out_of_that_score_only(hand_made_runs):
    fake_run(hand_made_runs[0].parent, "demo-s3-b0.1", recipe_of(3, 0.1), "interrupted", best_val_accuracy=0.5,
             epochs_completed=1)
    runs = hand_made_runs[:3] + [hand_made_runs[0].parent / "demo-s3-b0.1"]
    group = json.loads(invoke("compare", *runs, "--json").stdout)["groups"][0]
    assert group["n"] == 4 and group["scores"]["test_accuracy"]["n"] == 3
    assert group["scores"]["best_val_accuracy"]["n"] == 4
    table = invoke("compare", *runs).stdout
    assert "0.9200 ± 0.0200 (n=3)" in table and "3 finished, 1 interrupted" in table


def test_a_run_written_before_a_key_existed_groups_with_one_written_after():
    """A stored recipe lacking a key that today's schema defaults (here ``train.log_to``, added
    after some runs were written) is the same experiment as one that spells the default out;
    a real difference (β) still parts them."""
    from eprun import recipe as recipes, schema
    from eprun.runs.groups import group_runs

    full = schema.to_plain(recipes.from_plain(yaml.safe_load(TINY_RECIPE)))
    older = json.loads(json.dumps(full))
    del older["train"]["log_to"]
    other_beta = json.loads(json.dumps(full))
    other_beta["rule"]["beta"] = 0.3
    for i, r in enumerate((full, older, other_beta)):
        r["seed"] = i
    rows = [{"test_accuracy": a} for a in (0.9, 0.8, 0.5)]
    groups = group_runs([full, older, other_beta], rows)
    assert [g.members for g in groups] == [[0, 1], [2]]
    assert groups[0].varying == {"rule.beta": 0.2} and groups[0].scores["test_accuracy"]["n"] == 2


def test_groups_of_different_recipes_are_labelled_by_name_and_settings_not_prose():
    from eprun import recipe as recipes, schema
    from eprun.runs.groups import group_runs

    a = schema.to_plain(recipes.from_plain(yaml.safe_load(TINY_RECIPE)))
    b = json.loads(json.dumps(a))
    b["description"], b["rule"]["T"] = "another experiment, in words", 20
    groups = group_runs([a, b], [{}, {}])
    assert [g.label("tiny") for g in groups] == ["tiny rule.T=12", "tiny rule.T=20"]
