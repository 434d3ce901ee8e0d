"""SIGKILL a training run at random moments, resume it, and check that it ends bit-identical to
a run that was never interrupted (weights, metrics and summary outcomes), on CPU.

    python scripts/kill_resume_trials.py [--trials 20] [--recipe quickstart] [--seed 0] [--threads 1] [--out /tmp/kill-trials]

Each trial starts ``eprun train`` in a subprocess, waits until its run directory holds the
step-0 checkpoint (the process has started and loaded its data), kills it with SIGKILL after a
further random delay (uniform over the reference run's training time), resumes it with
``eprun train --resume``, then compares. Prints one line per trial and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

TIMING_KEYS = {"samples_per_s", "wall_time_s", "train_time_s", "resumes"}
OUTCOME_KEYS = ("status", "epochs_completed", "best_val_accuracy", "best_epoch", "val_accuracy",
                "test_accuracy", "test_loss", "train_loss", "train_accuracy")


def eprun(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "eprun", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, **kwargs)


def wait_for_start(out: Path, timeout: float = 300.0) -> float:
    """Block until a run under ``out`` has written its step-0 checkpoint; return the time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(out.glob("*/checkpoints/last.pt")):
            return time.perf_counter()
        time.sleep(0.01)
    raise TimeoutError(f"no run started under {out}")


def outcome(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"summary": {k: summary.get(k) for k in OUTCOME_KEYS}, "metrics": metrics,
            "last": torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"],
            "best": torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]}


def identical(a: dict, b: dict) -> tuple[bool, str]:
    if a["summary"] != b["summary"]:
        return False, f"summary differs: {a['summary']} vs {b['summary']}"
    if a["metrics"] != b["metrics"]:
        return False, "metrics differ"
    for which in ("last", "best"):
        for name in a[which]:
            if not torch.equal(a[which][name], b[which][name]):
                return False, f"{which}.pt {name} differs"
    return True, "bit-identical"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/kill-trials"))
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (EPRUN_THREADS)")
    parser.add_argument("--require-mid-run", action="store_true",
                        help="a trial whose run finished before the kill is repeated, so that every "
                             "counted trial interrupts training")
    args = parser.parse_args()
    os.environ["EPRUN_THREADS"] = str(args.threads)
    settings = ["-q", "-s", "device=cpu", "-s", f"train.checkpoint_every={args.checkpoint_every}"]
    rng = random.Random(args.seed)

    ref = eprun("train", args.recipe, "--out", str(args.out / "reference"), *settings)
    started = wait_for_start(args.out / "reference")
    ref_dir = Path(ref.communicate()[0].strip().splitlines()[-1])
    duration = time.perf_counter() - started
    reference = outcome(ref_dir)
    print(f"reference run: {ref_dir} ({duration:.1f} s after its first checkpoint)", flush=True)

    results = []
    trial = 0
    while len(results) < args.trials:
        trial += 1
        out = args.out / f"trial-{trial:02d}"
        delay = rng.uniform(0.0, duration)
        proc = eprun("train", args.recipe, "--out", str(out), *settings)
        wait_for_start(out)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        runs = list(out.iterdir()) if out.exists() else []
        if not runs:
            results.append({"trial": trial, "delay_s": delay, "result": "killed before the run directory existed"})
            print(f"trial {trial:2d}: killed at {delay:5.1f} s before the run directory existed", flush=True)
            continue
        run = runs[0]
        status = json.loads((run / "summary.json").read_text()).get("status") if (run / "summary.json").exists() else None
        if status == "finished" and args.require_mid_run:
            print(f"trial {trial:2d}: the run finished before the kill at {delay:5.1f} s; repeated", flush=True)
            continue
        ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True) if (run / "checkpoints" / "last.pt").exists() else None
        killed_at = f"epoch {ckpt['epoch'] + 1}, batch {ckpt['batch']}" if ckpt else "before the first checkpoint"
        if status != "finished":
            resumed = eprun("train", "--resume", str(run), "-q")
            resumed.communicate()
            rc = resumed.returncode
        else:
            rc = 0
        same, why = identical(outcome(run), reference) if rc == 0 else (False, f"resume exited {rc}")
        results.append({"trial": trial, "delay_s": round(delay, 2), "status_when_killed": status,
                        "last_checkpoint": killed_at, "identical": same, "detail": why})
        print(f"trial {trial:2d}: killed at {delay:5.1f} s (status {status}, last checkpoint {killed_at}) "
              f"-> {why}", flush=True)
    n_same = sum(1 for r in results if r.get("identical"))
    print(json.dumps({"trials": len(results), "identical": n_same, "reference_s": duration,
                      "results": results}, indent=1))
    sys.exit(0 if n_same == len(results) else 1)


if __name__ == "__main__":
    main()
