"""The run lock: one writer per run, even among writers started at the same instant."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from eprun.errors import RunDirError
from eprun.runs import RunLock

CONTENDERS = 8


def _contend(run_dir: str, barrier, wins) -> None:
    barrier.wait()
    try:
        with RunLock(run_dir):
            wins.put(os.getpid())
            time.sleep(0.5)  # longer than every other contender takes to try
    except RunDirError:
        pass


def _race(run_dir) -> list[int]:
    ctx = multiprocessing.get_context("fork")
    barrier, wins = ctx.Barrier(CONTENDERS), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(run_dir), barrier, wins)) for _ in range(CONTENDERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    winners = []
    while not wins.empty():
        winners.append(wins.get())
    return winners


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_writers_started_together_on_a_free_run_have_one_winner(tmp_path):
    for _ in range(3):
        assert len(_race(tmp_path)) == 1
        assert not (tmp_path / ".lock").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left behind


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_writers_started_together_on_a_stale_lock_have_one_winner(tmp_path):
    for _ in range(3):
        (tmp_path / ".lock").write_text(str(_dead_pid()))
        assert len(_race(tmp_path)) == 1


def test_the_lock_holds_its_writers_pid_and_refuses_a_second_writer(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".lock").write_text(str(holder.pid))
        with pytest.raises(RunDirError, match=f"another process \\(pid {holder.pid}\\) is writing this run"):
            RunLock(tmp_path).__enter__()
        assert (tmp_path / ".lock").read_text() == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # its owner is gone: taken over
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


def test_a_release_leaves_a_lock_that_another_writer_has_since_taken(tmp_path):
    lock = RunLock(tmp_path, what="sweep")
    lock.__enter__()
    (tmp_path / ".lock").write_text("424242")  # as after a take-over by another process
    lock.__exit__(None, None, None)
    assert (tmp_path / ".lock").read_text() == "424242"
