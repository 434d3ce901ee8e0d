"""Data-parallel training with torch.distributed (gloo, 2 ranks on the CPU) against one process with
the same global batch: the same weights within float32 rounding of the all-reduce; a killed
2-rank run resumes to the uninterrupted 2-rank run's weights, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eprun.distributed import World, shard

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo")

SETTINGS = ["-s", "rule.estimator=random-sign", "-s", "data.augment.horizontal_flip=true", "-s", "train.epochs=2",
            "-s", "train.max_batches=6", "-s", "train.checkpoint_every=2", "-s", "train.log_every=3",
            "-s", "data.batch_size=24", "-s", "data.val_size=100", "-s", "device=cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, ranks: int, out: Path, wait: bool = True, torchrun: bool = False):
    """``eprun train ARGS`` in one process, or under torchrun with ``ranks`` processes."""
    env = {**os.environ, "EPRUN_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if ranks == 1 and not torchrun:
        cmd = [sys.executable, "-m", "eprun", "--threads", "1", "train", *map(str, args), "--out", str(out), "-q"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "eprun", "train", *map(str, args), "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return Path(stdout.strip().splitlines()[-1])


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def largest_difference(a: dict, b: dict) -> float:
    """max over tensors of ‖a − b‖ / ‖b‖."""
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


def test_a_shard_of_every_rank_covers_the_batch_once():
    for n in (1, 7, 24, 25):
        for size in (1, 2, 3, 4):
            rows = [shard(n, World(rank=r, size=size)) for r in range(size)]
            covered = [i for s in rows for i in range(n)[s]]
            assert covered == list(range(n))
            assert max(s.stop - s.start for s in rows) - min(s.stop - s.start for s in rows) <= 1


@pytest.mark.parametrize("extra", [[], ["-s", "rule.kind=cep", "-s", "rule.K=4", "-s", "optim.kind=sgd",
                                        "-s", "optim.lr=0.01", "-s", "optim.momentum=0.5"]],
                         ids=["ep, random sign, flips", "c-ep"])
def test_two_ranks_give_one_process_weights(extra, tiny_recipe, tmp_path):
    """The same global batch of 24 cut in two shards of 12: after 12 steps the weights equal one
    process's to float32 rounding (the all-reduce sums the two shards' means in another order);
    the scores agree likewise, and rank 0 alone wrote the run, recording the world size.

    C-EP with momentum, so that one process takes the nudged-phase loop the ranks take (with
    plain SGD one process follows the input drive through x̃x̃ᵀ instead, rules/cep.py: the same
    maths, other rounding)."""
    args = [tiny_recipe, *SETTINGS, *extra]
    one = launch(args, 1, tmp_path / "one")
    two = launch(args, 2, tmp_path / "two")
    difference = largest_difference(weights(two), weights(one))
    print(f"largest relative weight difference: {difference:.2e}")
    assert difference < 5e-5, difference  # float32 rounding (the measured differences: docs/distributed.md)
    s1, s2 = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    assert s2["status"] == "finished" and s2["epochs_completed"] == 2
    assert abs(s1["test_accuracy"] - s2["test_accuracy"]) <= 0.02
    # the training scores, combined over the ranks: the one process's (loss and accuracy in their places)
    assert 0.0 <= s2["train_accuracy"] <= 1.0 and abs(s1["train_accuracy"] - s2["train_accuracy"]) <= 0.02
    assert abs(s1["train_loss"] - s2["train_loss"]) <= 0.02 * max(1.0, s1["train_loss"])
    env = json.loads((two / "env.json").read_text())
    assert env["world_size"] == 2 and env["distributed_backend"] == "gloo"
    assert len(list((tmp_path / "two").iterdir())) == 1


def test_target_propagation_on_two_ranks_draws_one_process_noise(tmp_path):
    """L-DRL's feedback noise is drawn for the whole batch and each rank keeps its rows, and its
    feedback optimisers combine the ranks' gradients: the two ranks make one process's run."""
    recipe = tmp_path / "dtp.yaml"
    recipe.write_text("name: dtp\nseed: 2\ndevice: cpu\n"
                      "data: {dataset: synthetic, val_size: 100, batch_size: 20, eval_batch_size: 100}\n"
                      "model: {kind: ff_mlp, hidden: [16, 12]}\n"
                      "rule: {kind: dtp, beta: 0.5, noise: 0.1, feedback_iterations: 2, feedback_lr: 0.01}\n"
                      "optim: {kind: sgd, lr: 0.05, momentum: 0.9}\n"
                      "train: {epochs: 1, max_batches: 5, log_every: 5}\n")
    one = launch([recipe], 1, tmp_path / "one")
    two = launch([recipe], 2, tmp_path / "two")
    assert largest_difference(weights(two), weights(one)) < 1e-5


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (torchrun's workers run in sessions of their own), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_one(tiny_recipe, tmp_path):
    args = [tiny_recipe, *SETTINGS, "-s", "train.max_batches=30", "-s", "train.checkpoint_every=5"]
    whole = launch(args, 2, tmp_path / "whole")
    proc = launch(args, 2, tmp_path / "killed", wait=False)
    deadline = time.time() + 300
    checkpoint = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed").glob("*/checkpoints/last.pt"))
        if found and torch.load(found[0], weights_only=True)["step"] >= 10:
            checkpoint = found[0]
            break
        time.sleep(0.05)
    if checkpoint is None:
        pytest.skip("the run finished before it could be killed")
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    time.sleep(0.5)
    run = checkpoint.parent.parent
    assert json.loads((run / "summary.json").read_text())["status"] != "finished"
    resumed = launch(["--resume", run], 2, tmp_path / "unused")
    assert resumed == run
    a, b = weights(run), weights(whole)
    assert all(torch.equal(a[k], b[k]) for k in b)
    timing = ("samples_per_s", "window_samples_per_s")
    metrics = lambda r: [{k: v for k, v in json.loads(line).items() if k not in timing}  # noqa: E731
                         for line in (r / "metrics.jsonl").read_text().splitlines()]
    assert metrics(run) == metrics(whole)


def test_one_rank_under_torchrun_joins_a_process_group_and_matches_one_process(tiny_recipe, tmp_path):
    """``torchrun --nproc_per_node=1`` runs every collective on its one rank (gloo here; NCCL on a
    GPU): the same weights as a plain process, bit for bit (a sum over one rank is exact)."""
    args = [tiny_recipe, *SETTINGS]
    one = launch(args, 1, tmp_path / "one")
    group = launch(args, 1, tmp_path / "group", torchrun=True)
    env = json.loads((group / "env.json").read_text())
    assert env["world_size"] == 1 and env["distributed_backend"] == "gloo"
    a, b = weights(group), weights(one)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_resuming_with_another_number_of_ranks_is_refused(tiny_recipe, tmp_path):
    run = launch([tiny_recipe, *SETTINGS, "-s", "train.epochs=1", "-s", "train.max_batches=2"], 1, tmp_path / "r")
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = "interrupted"
    (run / "summary.json").write_text(json.dumps(summary))
    proc = launch(["--resume", run], 2, tmp_path / "unused", wait=False)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "trained by 1 process(es), this launch has 2" in stderr
