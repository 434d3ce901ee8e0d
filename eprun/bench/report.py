"""The benchmark's results as a table and footnotes."""

from __future__ import annotations

import torch

from eprun import native


def _mib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2 ** 20:,.1f}"


def _gflops(r: dict, phase: str) -> str:
    gflops, fraction = r.get(f"{phase}_gflop_per_s"), r.get(f"{phase}_fraction_of_peak")
    return "-" if gflops is None else f"{gflops:,.1f} ({100 * fraction:.0f}%)"


def table(results: list[dict]):
    """The training cases as a rich table, and one line per evaluation-test case."""
    from rich.table import Table

    t = Table(show_header=True, header_style="bold", title="eprun against the autograd-of-Φ baseline")
    for col in ("case", "net", "rule", "T/K", "batch", "train/s eprun · base", "×", "eval/s eprun · base", "×",
                "MiB train eprun · base", "MiB eval eprun · base", "GFLOP/s (peak)", "Δupdate f32 · f64"):
        t.add_column(col, justify="left" if col in ("case", "net", "rule") else "right")
    lines = []
    for r in results:
        if r["kind"] == "eval-test":
            lines.append(f"{r['case']}: {r['n_images']:,} images (batches of {r['eval_batch']}, T={r['T']}) in "
                         f"{r['eprun_seconds']:.3f} s; baseline {r['baseline_seconds']:.3f} s, "
                         f"×{r['ratio']:.1f}; eprun GFLOP/s (of peak) {_gflops(r, 'eval')}; "
                         f"prediction rel. diff {r['max_relative_eval_difference']:.1e}")
            continue
        tk = "/".join(str(r[k]) for k in ("T", "K") if r[k] is not None) or "-"
        t.add_row(r["case"], r["net"], r["rule"], tk, str(r["batch"]),
                  f"{r['train_eprun_samples_per_s']:,.0f} · {r['train_baseline_samples_per_s']:,.0f}",
                  f"{r['train_ratio']:.1f}",
                  f"{r['eval_eprun_samples_per_s']:,.0f} · {r['eval_baseline_samples_per_s']:,.0f}",
                  f"{r['eval_ratio']:.1f}",
                  f"{_mib(r['train_peak_bytes_eprun'])} · {_mib(r['train_peak_bytes_baseline'])}",
                  f"{_mib(r['eval_peak_bytes_eprun'])} · {_mib(r['eval_peak_bytes_baseline'])}",
                  _gflops(r, "train"),
                  "n/a (vs BP)" if r["max_relative_update_difference"] is None else
                  f"{r['max_relative_update_difference']:.0e} · {r['max_relative_update_difference_float64']:.0e}")
    return t, lines


def footnotes(results: list[dict], skipped: list[str]) -> list[str]:
    notes = []
    if results:
        r = results[0]
        notes.append(f"device {r['device']}, {r['dtype']}, {r['threads']} thread(s); machine peak "
                     f"{r['peak_gflop_per_s']:,.1f} GFLOP/s ({r['peak_method']})")
        train = [x for x in results if x["kind"] == "train"]
        if train:
            notes.append(f"samples/s over {', '.join(str(n) for n in sorted({x['batches'] for x in train}))} timed "
                         f"batch(es) after warm-up, in up to 5 rounds alternating baseline and eprun, each side "
                         f"its median round; × = baseline time / eprun time; evaluation = free phase "
                         f"at the training batch size")
            notes.append(f"memory: {train[0]['memory_method']}")
            notes.append("GFLOP/s: 2 × multiply-adds of eprun's step counted from the shapes for T and K steps "
                         "(eprun.bench.cost.train_macs) over its measured time; peak = the matmul above; a phase that "
                         "stops early (tol; the compiled kernel at a bitwise fixed point) computes fewer, and so "
                         "do the compiled kernels of a max-pooled conv layer (the top-down term from its "
                         "nonzeros only: a quarter of the transposed convolution with 2×2 pools; a 5×5 "
                         "convolution by Winograd's F(4×4, 5×5): about a fifth of the direct multiply-adds), "
                         "so a conv net can read over 100%")
            notes.append(f"Δupdate: max over parameters of ‖u_eprun − u_base‖ / ‖u_base‖ from the same weights, "
                         f"on the first batch in {r['dtype']} · on its first {train[0]['float64_check_examples']} "
                         f"examples in float64; EB = energy-based")
        engines = {x["case"]: x.get("relax_engine") for x in results if x.get("relax_engine")}
        if engines:
            state = native.status()
            vectors = ", AVX-512 one pass for one hidden layer, AVX2" if state["avx512"] else ", AVX2"
            built = "compiled" + (vectors if state["vectorized"] else ", scalar") \
                + (", split on torch's OpenMP threads" if state["openmp"] else "") if state["available"] \
                else f"unavailable: {state['reason']}"
            notes.append("relaxation engine (eprun.native, " + built + "; EPRUN_NATIVE=0 for torch only; "
                         "torch+native: the max-pooled top-down term and, where it applies, the 5×5 convolution and "
                         "its max pooling compiled, torch for the rest): "
                         + ", ".join(f"{case} {engine}" for case, engine in engines.items()))
        graphs = {x["case"]: x["cuda_graphs"] for x in results if x.get("cuda_graphs")}
        if r["device"].startswith("cuda") and graphs:
            notes.append("CUDA graphs (train.cuda_graphs; -s train.cuda_graphs=off for eager steps): " + ", ".join(
                f"{case} " + ("replayed" if g["active"] else f"eager ({g['reason']})") for case, g in graphs.items()))
        if r["device"].startswith("cuda") and torch.backends.cudnn.allow_tf32:
            notes.append("CUDA: cuDNN convolutions may use TF32 (torch's default), the peak matmul does not")
    for s in skipped:
        notes.append(f"skipped {s}")
    return notes
