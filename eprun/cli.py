"""The ``eprun`` command line: parse, call the runner, print. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from eprun import catalog
from eprun.errors import EprunError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Experiment runner for Equilibrium Propagation, its variants, and their baselines.")
recipes_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                          help="List the bundled recipes, or show one.")
app.add_typer(recipes_app, name="recipes")

err = Console(stderr=True)


def _out() -> Console:
    """stdout; when piped, wide enough that tables are not wrapped."""
    return Console() if sys.stdout.isatty() else Console(width=200)


@app.callback()
def main_options(
    threads: Optional[int] = typer.Option(
        None, "--threads", envvar="EPRUN_THREADS",
        help="CPU threads for torch (default: torch's). 1 is fastest for small nets on a busy machine."),
):
    """Experiment runner for Equilibrium Propagation, its variants, and their baselines."""
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter(f"--threads must be ≥ 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def user_errors(fn):
    """Print an :class:`EprunError` as one line on stderr and exit with its code (2 for bad input);
    an environmental fault (a file that cannot be read or written) likewise, exit code 1; anything
    else is an internal error: one line saying so and where its full trace was written, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EprunError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)  # e.g. ".[mlflow]" kept
            raise typer.Exit(exc.exit_code)
        except typer.Exit:  # a command's own exit code
            raise
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)
        except OSError as exc:
            where = f" {exc.filename}:" if exc.filename else ""
            err.print(f"[red]error:[/red]{where} {exc.strerror or exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        except Exception as exc:  # noqa: BLE001 (the last resort: no traceback reaches the terminal)
            trace = _write_trace()
            err.print(f"[red]internal error:[/red] {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                      f"(a bug in eprun; the full trace is in {trace})", highlight=False, soft_wrap=True)
            raise typer.Exit(1)

    return wrapper


def _write_trace() -> str:
    """The current exception's traceback in a file under the cache folder (or the temp folder);
    returns its path."""
    import tempfile
    import time
    import traceback

    from eprun.cache import cache_dir

    text = f"eprun {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}"
    name = f"eprun-trace-{time.strftime('%Y%m%d-%H%M%S')}-{__import__('os').getpid()}.txt"
    for folder in (cache_dir() / "traces", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return str(folder / name)
        except OSError:
            continue
    return "(nowhere: no folder could be written)"


@app.command()
@user_errors
def train(
    recipe: Optional[str] = typer.Argument(None, help="Recipe file, or the name of a bundled recipe."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a value: -s rule.beta=0.2 (repeatable)."),
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Parent folder of the run directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log lines only, no progress bar."),
    fast_dev_run: bool = typer.Option(False, "--fast-dev-run",
                                      help="Validate, run 2 training + 1 eval batch on synthetic data; write nothing."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="With --resume: accept a recipe edited since the start."),
):
    """Train a recipe (or --resume a run); prints the run directory on the last line. Under
    torchrun (``torchrun --nproc_per_node=N -m eprun train R.yaml``) the ranks train one run together."""
    try:
        _train(recipe, set_, out_dir, quiet, fast_dev_run, resume, force)
    except BaseException:
        _leave_process_group(wait_for_the_others=False)  # another rank may be gone: no barrier to hang on
        raise
    _leave_process_group(wait_for_the_others=True)


def _leave_process_group(wait_for_the_others: bool) -> None:
    """Under torchrun, leave the process group; after a run that finished, only once every rank has
    (a rank tearing down its connections while another still finishes its run makes that one abort)."""
    dist = sys.modules.get("torch.distributed")  # loaded only if training began; never import torch here
    if dist is not None and dist.is_available() and dist.is_initialized():
        if wait_for_the_others:
            dist.barrier()
        dist.destroy_process_group()


def _train(recipe, set_, out_dir, quiet, fast_dev_run, resume, force) -> None:
    import os

    main_rank = int(os.environ.get("RANK", "0")) == 0  # the rank that prints (all train)
    if resume is not None:
        if recipe is not None or fast_dev_run:
            raise EprunError("--resume takes the run directory only: no RECIPE argument and no --fast-dev-run")
        from eprun import runner

        run_dir = runner.resume(resume, force=force, overrides=set_, quiet=quiet)
    else:
        if recipe is None:
            raise EprunError("train: give a RECIPE (file or bundled name), or --resume RUN_DIR")
        path = _read_first(catalog.resolve(recipe))
        from eprun import runner
        from eprun.recipe import load_recipe

        resolved = load_recipe(path, set_)
        if fast_dev_run:
            result = runner.fast_dev_run(resolved)
            losses = ", ".join(f"{v:.4f}" for v in result["train_losses"])
            print(f"fast-dev-run ok: {resolved.name}: train losses [{losses}], eval loss {result['loss']:.4f} "
                  f"on {result['n']} synthetic examples")
            return
        run_dir = runner.train(resolved, out_dir, quiet=quiet, argv=sys.argv)
        twin = runner.paired_recipe(resolved)
        if twin is not None:  # rule.pair_with: the same initial weights trained by BPTT
            if main_rank:
                _report(run_dir)
                print(run_dir)
            run_dir = runner.train(twin, out_dir, quiet=quiet, argv=sys.argv)
    if main_rank:
        _report(run_dir)
        print(run_dir)


def _read_first(path: Path) -> Path:
    """Parse the recipe file before the heavy imports (torch): a malformed or hostile file is
    refused in a fraction of a second and in little memory."""
    from eprun import schema

    schema.read_yaml(path)
    return path


def _report(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    err.print(f"{summary['name']}: test accuracy {summary['test_accuracy']:.4f}, best val accuracy "
              f"{_fmt(summary.get('best_val_accuracy'))}, {summary['samples_per_s']:,.0f} samples/s, "
              f"{summary['wall_time_s']:.1f} s", highlight=False)


@app.command()
@user_errors
def sweep(
    recipe: Optional[str] = typer.Argument(None, help="Recipe file, or the name of a bundled recipe."),
    set_: List[str] = typer.Option([], "--set", "-s",
                                   help="KEY=V1,V2,… sweeps KEY over the values; KEY=V sets it for every point. "
                                        "A comma inside [...], {...} or quotes does not split (repeatable)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j",
                                       help="Points run at once (local: default 1; slurm: the job array's limit)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="local (default) or slurm (through submitit)."),
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Parent folder of the sweep directory."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Run this sweep's unfinished points again."),
    partition: Optional[str] = typer.Option(None, "--partition", help="Slurm partition."),
    time_limit: Optional[str] = typer.Option(None, "--time", help="Slurm time limit per point: minutes or H:MM:SS."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Slurm GPUs per point."),
    cpus: Optional[int] = typer.Option(None, "--cpus", help="Slurm CPUs per point (also its torch threads)."),
    mem: Optional[str] = typer.Option(None, "--mem", help="Slurm memory per point: GB, or e.g. 32G, 500M."),
    slurm_config: Optional[Path] = typer.Option(None, "--slurm-config",
                                                help="YAML of Slurm settings (partition, time, gpus, cpus, mem, "
                                                     "account, qos, constraint, setup); flags win."),
    cluster: Optional[str] = typer.Option(None, "--cluster",
                                          help="With --backend slurm: slurm (default), or local to run the jobs "
                                               "through submitit's local executor on this machine."),
):
    """Train a recipe over a grid of values; prints the sweep directory on the last line."""
    from eprun.sweep import session

    options = session.BackendOptions(
        kind=backend, jobs=jobs, cluster=cluster, slurm_config=slurm_config,
        slurm_flags={"partition": partition, "time": time_limit, "gpus": gpus, "cpus": cpus, "mem": mem})
    log = lambda line: err.print(line, highlight=False, soft_wrap=True)  # noqa: E731
    if resume is not None:
        if recipe is not None or set_:
            raise EprunError("--resume takes the sweep directory only: no RECIPE argument and no -s")
        result, ending = session.resume(resume, options, log)
    else:
        if recipe is None:
            raise EprunError("sweep: give a RECIPE (file or bundled name) and -s KEY=V1,V2,…, or --resume SWEEP_DIR")
        result, ending = session.start(recipe, set_, out_dir, options, log)
    counts = ", ".join(f"{n} {status}" for status, n in result.counts().items())
    unfinished = any(p.status not in ("finished", "diverged") for p in result.points)
    hint = (f"resume with: eprun sweep --resume {result.path}" if unfinished
            else f"compare with: eprun compare {result.path}")
    log(f"{len(result.points)} point(s): {counts}; {hint}")
    print(result.path)
    if ending.signum is not None:
        raise typer.Exit(128 + ending.signum)
    if any(p.status != "finished" for p in result.points):
        raise typer.Exit(1)


@app.command("eval")
@user_errors
def eval_(
    checkpoint: Path = typer.Argument(..., help="A checkpoint, e.g. runs/NAME/checkpoints/last.pt."),
    split: str = typer.Option("test", "--split", help="test, val or train."),
    recipe: Optional[str] = typer.Option(None, "--recipe",
                                         help="Rebuild the network from this recipe (file or bundled name) instead."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda[:n]; default: the recipe's."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
):
    """Re-score a checkpoint on a split."""
    from eprun import runner

    if split not in ("test", "val", "train"):
        raise EprunError(f"--split: expected test, val or train, got {split!r}")
    result = runner.evaluate_checkpoint(checkpoint, split, recipe, device)
    if result["loss"] is None:
        err.print("warning: the loss is not finite on this split (NaN or Inf); it is reported as null")
    if as_json:
        print(json.dumps(result, allow_nan=False))
    else:
        print(f"{split}: accuracy {result['accuracy']:.4f}  loss {_fmt(result['loss'])}  (n = {result['n']})")


@app.command()
@user_errors
def compare(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories, or sweep directories (their runs)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write overlaid learning curves to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: a list of runs, or {varying_keys, groups}."),
    group: Optional[bool] = typer.Option(
        None, "--group/--no-group",
        help="Group runs whose recipes differ only in the seed (mean ± std, n). Default: when given a sweep "
             "directory or such runs."),
):
    """Put runs side by side; runs of one recipe over several seeds as mean ± std."""
    from eprun import plots, runs
    from eprun.runs import groups as grouping
    from eprun.sweep import record

    if plot is not None:  # refused before anything is read or printed
        if plot.is_dir():
            raise EprunError(f"--plot: {plot} is a folder; give a file name, e.g. {plot / 'compare.png'}")
        if not plot.parent.is_dir():
            raise EprunError(f"--plot: the folder {plot.parent} does not exist; create it or give another path")
    paths, sweeps = [], 0
    for given in run_dirs:
        if record.is_sweep_dir(given):
            found, total = record.sweep_runs(given), len(record.load_sweep(given).points)
            if not found:
                raise EprunError(f"{given}: no point of this sweep has a run yet (see its {record.SWEEP_FILE})")
            if len(found) < total:
                err.print(f"{given}: {total - len(found)} of {total} points have no run (see its {record.SWEEP_FILE})",
                          highlight=False)
            paths += found
            sweeps += 1
        else:
            paths.append(given)
    infos = [runs.open_run(p) for p in paths]
    rows = [_compare_row(i) for i in infos]
    if group is None:
        group = sweeps > 0 or grouping.shares_a_recipe([i.recipe for i in infos])
    if group:
        found = grouping.group_runs([i.recipe for i in infos], rows)
        labels = [g.label(str(infos[g.members[0]].recipe.get("name") or infos[g.members[0]].name)) for g in found]
        if as_json:
            print(json.dumps(_groups_json(found, labels, infos, rows), indent=2))
        else:
            _out().print(_groups_table(found, labels, rows))
    elif as_json:
        print(json.dumps(rows, indent=2))
    else:
        _out().print(_runs_table(rows))
    if plot is not None:
        if group:
            plots.plot_groups([(label, [infos[i].metrics for i in g.members]) for g, label in zip(found, labels)], plot)
        else:
            plots.plot_compare([(i.name, i.metrics) for i in infos], plot)
        err.print(f"plot written to {plot}")


def _runs_table(rows: list[dict]) -> Table:
    table = Table(show_header=True, header_style="bold")
    with_angle = any(r["angle_to_bptt_deg"] is not None for r in rows)
    with_bp_angle = any(r["angle_to_bp_deg"] is not None for r in rows)
    columns = ["name", "status", "rule", "epochs", "best val", "test", "wall time", "samples/s"]
    extra = (["angle to BPTT"] if with_angle else []) + (["angle to BP (per layer)"] if with_bp_angle else [])
    for col in columns + extra:
        table.add_column(col, justify="left" if col in ("name", "status", "rule") else "right")
    for r in rows:
        cells = [r["name"], r["status"], r["rule"], str(r["epochs"]), _fmt(r["best_val_accuracy"]),
                 _fmt(r["test_accuracy"]), _fmt(r["wall_time_s"], ".1f", " s"), _fmt(r["samples_per_s"], ",.0f")]
        if with_angle:
            cells.append(_fmt(r["angle_to_bptt_deg"], ".1f", "°"))
        if with_bp_angle:
            cells.append(_bp_angles(r))
        table.add_row(*cells)
    return table


#: a group table's score columns: (compare row key, header, format, suffix)
_GROUP_SCORES = (("epochs", "epochs", ".1f", ""), ("best_val_accuracy", "best val", ".4f", ""),
                 ("test_accuracy", "test", ".4f", ""), ("wall_time_s", "wall time", ".1f", " s"),
                 ("samples_per_s", "samples/s", ",.0f", ""), ("angle_to_bptt_deg", "angle to BPTT", ".1f", "°"),
                 ("angle_to_bp_deg", "angle to BP", ".1f", "°"))


def _groups_table(found, labels: list[str], rows: list[dict]) -> Table:
    """One row per group: its label, rule, n, statuses and each score as mean ± std."""
    n_runs = sum(g.n for g in found)
    table = Table(show_header=True, header_style="bold",
                  title=f"{n_runs} runs in {len(found)} group(s) of one recipe but the seed: mean ± std (n − 1)",
                  title_justify="left")
    shown = [s for s in _GROUP_SCORES if s[0] not in ("angle_to_bptt_deg", "angle_to_bp_deg")
             or any(g.scores[s[0]]["n"] for g in found)]
    for col in ["group", "rule", "n", "status"] + [s[1] for s in shown]:
        table.add_column(col, justify="left" if col in ("group", "rule", "status") else "right")
    for g, label in zip(found, labels):
        statuses: dict[str, int] = {}
        for i in g.members:
            statuses[rows[i]["status"]] = statuses.get(rows[i]["status"], 0) + 1
        cells = [label, rows[g.members[0]]["rule"], str(g.n), ", ".join(f"{n} {s}" for s, n in statuses.items())]
        cells += [_mean_std(g.scores[key], spec, suffix, g.n) for key, _, spec, suffix in shown]
        table.add_row(*cells)
    return table


def _mean_std(score: dict, spec: str, suffix: str, members: int) -> str:
    """``0.9512 ± 0.0031``; ``0.9512 ± -`` for one value; ``(n=4)`` appended where fewer runs than
    the group's have the score."""
    if score["n"] == 0:
        return "-"
    text = f"{_fmt(score['mean'], spec, suffix)} ± {_fmt(score['std'], spec, suffix)}"
    return text + (f" (n={score['n']})" if score["n"] != members else "")


def _groups_json(found, labels: list[str], infos, rows: list[dict]) -> dict:
    return {"varying_keys": list(found[0].varying) if found else [],
            "groups": [{"label": label, "varying": g.varying, "n": g.n,
                        "seeds": [infos[i].recipe.get("seed") for i in g.members],
                        "scores": g.scores,
                        "runs": [{**rows[i], "seed": infos[i].recipe.get("seed")} for i in g.members]}
                       for g, label in zip(found, labels)]}


def _compare_row(info) -> dict:
    s, recipe = info.summary, info.recipe or {}
    rule = recipe.get("rule", {}) if isinstance(recipe, dict) else {}
    label = s.get("rule") or (rule.get("kind", "?") + (f"/{rule['estimator']}" if rule.get("estimator") else ""))
    status = s.get("status", "running") + (" (no summary.json)" if s.get("summary_missing") else "")
    return {"name": info.name, "path": str(info.path), "status": status, "rule": label,
            "epochs": s.get("epochs_completed", 0), "best_val_accuracy": s.get("best_val_accuracy"),
            "test_accuracy": s.get("test_accuracy"), "wall_time_s": s.get("wall_time_s"),
            "samples_per_s": s.get("samples_per_s"), "angle_to_bptt_deg": _last(info.metrics, "gdu", "angle_deg"),
            **_alignment(info.metrics)}


def _alignment(metrics: list[dict]) -> dict:
    """Target propagation's last logged alignment with BP: the mean angle of the hidden layers'
    updates, and each layer's (``update_angle_deg/layer{l}``), in degrees."""
    records = [m for m in metrics if m.get("event") == "alignment"]
    last = records[-1] if records else {}
    prefix = "update_angle_deg/layer"
    per_layer = {k[len(prefix):]: v for k, v in last.items() if k.startswith(prefix)}
    return {"angle_to_bp_deg": last.get("update_angle_deg/mean"),
            "angles_to_bp_deg": dict(sorted(per_layer.items(), key=lambda kv: int(kv[0])))}


def _bp_angles(row: dict) -> str:
    if row["angle_to_bp_deg"] is None:
        return "-"
    layers = "/".join(f"{v:.0f}" for v in row["angles_to_bp_deg"].values())
    return f"{row['angle_to_bp_deg']:.1f}° ({layers})"


def _last(metrics: list[dict], event: str, key: str):
    """The last value of ``key`` among ``event`` records (e.g. the final angle to BPTT)."""
    values = [m.get(key) for m in metrics if m.get("event") == event and m.get(key) is not None]
    return values[-1] if values else None


def _fmt(value, spec: str = ".4f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


@app.command()
@user_errors
def gdu(
    recipe_or_run: str = typer.Argument(..., help="A recipe (file or bundled name) or a run directory."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Check at these weights (default: initial)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="K: second-phase steps compared (default: rule.K)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="β (default: rule.beta)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Examples from the training split (default: data.batch_size)."),
    dtype: str = typer.Option("float64", "--dtype", help="float32 or float64."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/gdu-NAME-TIME)."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a recipe value (repeatable)."),
):
    """The GDU check: EP's step-by-step updates against BPTT's gradients (gdu.json, gdu.csv, plots)."""
    from eprun import gdu as gdu_check
    from eprun.recipe import load_recipe

    if dtype not in ("float32", "float64"):
        raise EprunError(f"--dtype: expected float32 or float64, got {dtype!r}")
    path = Path(recipe_or_run)
    recipe_file = path / "recipe.yaml" if path.is_dir() else catalog.resolve(recipe_or_run)
    if path.is_dir() and checkpoint is None and (path / "checkpoints" / "last.pt").exists():
        checkpoint = path / "checkpoints" / "last.pt"
    recipe = load_recipe(recipe_file, set_)
    batch = batch if batch is not None else recipe.data.batch_size
    result, _, out = gdu_check.run_check(recipe, checkpoint=checkpoint, steps=steps, beta=beta, batch=batch,
                                         dtype=dtype, out_dir=out_dir)
    table = Table(show_header=True, header_style="bold",
                  title=f"GDU: {recipe.name}, T={result['T']}, K={result['K']}, β={result['beta']}, batch {result['batch']}")
    for col in ("tensor", "rel. RMSE", "sign agree", "cosine", "rel. RMSE ±β", "sign agree ±β"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    one, sym = result["estimators"]["one-sided"], result["estimators"]["symmetric"]
    for name in one:
        table.add_row(name, f"{one[name]['relative_rmse']:.4f}", f"{one[name]['sign_agreement']:.3f}",
                      f"{one[name]['cosine']:.4f}", f"{sym[name]['relative_rmse']:.4f}",
                      f"{sym[name]['sign_agreement']:.3f}")
    _out().print(table)
    err.print(f"{result['seconds']:.1f} s; gdu.json, gdu.csv, gdu-traces.png, gdu-rmse.png in {out}")
    print(out)


@app.command()
@user_errors
def bench(
    only: List[str] = typer.Option([], "--only",
                                   help="Run only this case (repeatable); an unknown name lists the cases."),
    batches: Optional[int] = typer.Option(None, "--batches",
                                          help="Timed batches per case, training and evaluation (default: per case)."),
    warmup: Optional[int] = typer.Option(None, "--warmup",
                                         help="Warm-up batches before each timing (default: per case)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64."),
    quick: bool = typer.Option(False, "--quick", help="Smoke run: 1 warm-up and 1 timed batch per case; on CPU "
                                                      "without the cases that take seconds per batch."),
    eval_mnist: bool = typer.Option(False, "--eval-mnist", help="Run the case eval-mlp-1h-test (784-512-10 "
                                                                "evaluation of a 10,000-image test set)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of the case results."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a value in every case's recipe (repeatable)."),
):
    """Time eprun's training step and evaluation against the autograd-of-Φ baseline, side by side."""
    from eprun import bench as benchmark

    options = benchmark.BenchOptions(
        only=(["eval-mlp-1h-test"] if eval_mnist else []) + list(only), batches=batches, warmup=warmup,
        device=device, dtype=dtype, quick=quick, overrides=list(set_))
    results, skipped = benchmark.run(options, log=lambda line: err.print(line, highlight=False))
    if as_json:
        print(json.dumps(results, indent=2))
        for line in skipped:
            err.print(f"skipped {line}", highlight=False)
        return
    table, lines = benchmark.table(results)
    out = _out()
    if table.row_count:
        out.print(table)
    for line in lines + benchmark.footnotes(results, skipped):
        out.print(line, highlight=False)


@recipes_app.callback()
@user_errors
def recipes_list(ctx: typer.Context):
    """List the bundled recipes."""
    if ctx.invoked_subcommand is not None:
        return
    found = catalog.bundled()
    if not found:
        raise EprunError("no recipes folder found (looked in $EPRUN_RECIPES, ./recipes and beside the package)")
    table = Table(show_header=True, header_style="bold")
    table.add_column("recipe")
    table.add_column("description")
    for r in found:
        table.add_row(r.name, r.description)
    _out().print(table)


@recipes_app.command("show")
@user_errors
def recipes_show(name: str = typer.Argument(..., help="A bundled recipe name, e.g. quickstart.")):
    """Print one bundled recipe."""
    path = catalog.resolve(name)
    if sys.stdout.isatty():
        _out().print(Syntax(path.read_text(), "yaml"))
    else:
        print(path.read_text(), end="")


def main():
    import signal

    if hasattr(signal, "SIGXFSZ"):  # past a file-size limit, a write fails (and is reported) instead of killing eprun
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    app()
