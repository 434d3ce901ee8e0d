"""The GDU check (Ernoult et al. 2019, Theorem 1): EP's updates, step by step in the second
phase, against the gradients BPTT computes backward in time.

After a free phase of T steps (s* = s_T), the nudged phase gives s^β_0 = s*, s^β_1, … and::

    ΔEP_s(t) = (s^β_{t+1} − s^β_t) / (β·c)                          (neurons; c = the net's nudge scale, ε for the
                                                                    energy-based net whose nudge is εβ, else 1)
    ΔEP_θ(t) = (∂Φ/∂θ(x, s^β_{t+1}) − ∂Φ/∂θ(x, s^β_t)) / β          (parameters)

BPTT runs the same dynamics T steps from s_0 = 0 with L = ℓ(s_T, y), and::

    ∇_s(t) = ∂L/∂s_{T−t}          ∇_θ(t) = ∂L/∂θ_{T−t}  (the gradient through the step s_{T−t−1} → s_{T−t} only)

(L is the batch mean of ℓ for θ, as EP's ∂Φ/∂θ is a batch mean; each example's own ℓ for s.)

GDU: ΔEP_s(t) → −∇_s(t) and ΔEP_θ(t) → −∇_θ(t) as β → 0 when the free phase has converged
and the transition derives from Φ; the prototypical setting satisfies it approximately.

The BPTT side costs O(T): one backward pass through the last K steps of the unrolled dynamics
(the first T − K run without a graph), with every state's gradient retained; each step's
parameter gradient is then one vector–Jacobian product of that single step with ∂L/∂s_{t+1}.

Metrics per tensor (neurons of each layer, each parameter), over k = 0 … K−1:

* relative RMSE (the paper's): mean over units of
  √(Σ_k (EP − G)²) / max(√(Σ_k EP²), √(Σ_k G²)), with G = −∇;
* sign agreement: fraction of units whose cumulated updates Σ_k EP and Σ_k G have the same sign;
* cosine of the angle between the total EP update Σ_k EP and the total G.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Trajectories:
    """Per step k = 0…K−1, per tensor: EP's updates and BPTT's negated gradients."""

    names: list[str]
    ep: dict[str, torch.Tensor]  # name → (K, *shape)
    bptt: dict[str, torch.Tensor]  # name → (K, *shape), already −∇


def _neuron_names(net) -> list[str]:
    return [f"s{n + 1}" for n in range(len(net.init_state(1, torch.zeros(1))))]


def free_phase(net, x, steps: int, start: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``steps`` free steps from ``start`` (default s_0 = 0), without a graph."""
    with torch.no_grad():
        state = [s.clone() for s in start] if start is not None else net.init_state(x.shape[0], like=x)
        return net.relax(net.input_drive(x), state, steps)


def ep_updates(net, x, y, T: int, K: int, beta: float, symmetric: bool = False,
               free: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """ΔEP_s(t) and ΔEP_θ(t) for t = 0…K−1 (symmetric: the ±β average of the increments).
    ``free``: s* if already computed (T free steps from 0)."""
    scale = net.nudge_scale
    target = net.target(y, x)
    with torch.no_grad():
        drive = net.input_drive(x)
        free = free if free is not None else free_phase(net, x, T)
        betas = (beta, -beta) if symmetric else (beta,)
        runs = []
        for b in betas:
            prev, dprev = [s.clone() for s in free], net.dphi_dtheta(x, free)
            steps = []
            for _ in range(K):
                cur = net.relax(drive, [s.clone() for s in prev], 1, b, target)
                dcur = net.dphi_dtheta(x, cur)
                steps.append([(c - p) / (b * scale) for c, p in zip(cur, prev)]
                             + [(c - p) / b for c, p in zip(dcur, dprev)])
                prev, dprev = cur, dcur
            runs.append(steps)
        if symmetric:
            runs = [[[(u + v) / 2 for u, v in zip(a, b)] for a, b in zip(runs[0], runs[1])]]
    names = _neuron_names(net) + _param_names(net)
    return {name: torch.stack([step[i] for step in runs[0]]) for i, name in enumerate(names)}


def _param_names(net) -> list[str]:
    by_id = {id(p): name for name, p in net.named_parameters()}
    return [by_id[id(p)] for p in net.phi_parameters()]


def bptt_gradients(net, x, y, T: int, K: int, start: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """−∂L/∂s_{T−t} and −∂L/∂θ_{T−t} for t = 0…K−1, in O(T) (one backward pass).
    ``start``: s_{T−K} if already computed."""
    params = list(net.phi_parameters())
    state = start if start is not None else free_phase(net, x, T - K)
    states = [[s.clone().requires_grad_() for s in state]]
    with torch.enable_grad():
        for _ in range(K):
            nxt = net.step(x, states[-1])
            for s in nxt:
                s.retain_grad()
            states.append(nxt)
        loss = net.loss(states[-1], y).mean()
        grads_s = torch.autograd.grad(loss, [s for layer in states for s in layer], allow_unused=True)
    n_layers = len(state)
    per_state = [list(grads_s[i * n_layers:(i + 1) * n_layers]) for i in range(K + 1)]
    per_state = [[g if g is not None else torch.zeros_like(s) for g, s in zip(gs, st)]
                 for gs, st in zip(per_state, states)]
    out = {}
    names = _neuron_names(net)
    batch = x.shape[0]  # L is the batch mean; a neuron's gradient is per example: ∂ℓ/∂s = B·∂L/∂s
    for j, name in enumerate(names):  # t = 0…K−1  ↔  state index K − t
        out[name] = torch.stack([-batch * per_state[K - t][j] for t in range(K)])
    step_grads = []
    for t in range(K):  # the step from s_{T−t−1} (index K−t−1) to s_{T−t}
        src = [s.detach() for s in states[K - t - 1]]
        with torch.enable_grad():
            nxt = net.step(x, src)
            g = torch.autograd.grad(nxt, params, grad_outputs=per_state[K - t], allow_unused=True)
        step_grads.append([-(gi if gi is not None else torch.zeros_like(p)) for gi, p in zip(g, params)])
    for i, name in enumerate(_param_names(net)):
        out[name] = torch.stack([step[i] for step in step_grads])
    return out


def state_gradients_naive(net, x, y, T: int, K: int) -> dict[str, torch.Tensor]:
    """−∂L/∂s_{T−t}, t = 0…K−1, by K separate unrolls (O(K·T)): the test oracle for the
    retained gradients of :func:`bptt_gradients`."""
    out = {name: [] for name in _neuron_names(net)}
    for t in range(K):
        with torch.no_grad():
            state = net.relax(net.input_drive(x), net.init_state(x.shape[0], like=x), T - t)
        leaf = [s.clone().requires_grad_() for s in state]
        with torch.enable_grad():
            cur = leaf
            for _ in range(t):
                cur = net.step(x, cur)
            grads = torch.autograd.grad(net.loss(cur, y).sum(), leaf, allow_unused=True)
        for name, g, s in zip(out, grads, leaf):
            out[name].append(-(g if g is not None else torch.zeros_like(s)))
    return {k: torch.stack(v) for k, v in out.items()}


def metrics(ep: torch.Tensor, g: torch.Tensor) -> dict:
    """Relative RMSE, sign agreement and cosine for one tensor's (K, *shape) trajectories."""
    k = ep.shape[0]
    ep_flat, g_flat = ep.reshape(k, -1).double(), g.reshape(k, -1).double()
    diff = ((ep_flat - g_flat) ** 2).sum(0).sqrt()
    norm = torch.maximum((ep_flat ** 2).sum(0).sqrt(), (g_flat ** 2).sum(0).sqrt())
    active = norm > 0
    rel = (diff[active] / norm[active]).mean().item() if active.any() else 0.0
    ep_tot, g_tot = ep_flat.sum(0), g_flat.sum(0)
    nonzero = (ep_tot != 0) | (g_tot != 0)
    agree = ((torch.sign(ep_tot) == torch.sign(g_tot)) & nonzero).sum().item() / max(int(nonzero.sum()), 1)
    denom = ep_tot.norm() * g_tot.norm()
    cosine = (ep_tot @ g_tot / denom).item() if denom > 0 else float("nan")
    return {"relative_rmse": rel, "sign_agreement": agree, "cosine": cosine,
            "angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, cosine)))) if math.isfinite(cosine) else None}


def check(net, x, y, T: int, K: int, beta: float) -> dict:
    """The full comparison: trajectories and metrics for the one-sided and the symmetric estimate."""
    before = free_phase(net, x, T - K)  # s_{T−K}: where BPTT's graph starts
    free = free_phase(net, x, K, start=before)  # s* = s_T
    bptt = bptt_gradients(net, x, y, T, K, start=before)
    result = {"T": T, "K": K, "beta": beta, "batch": int(x.shape[0]), "estimators": {}}
    trajectories = {}
    for estimator, symmetric in (("one-sided", False), ("symmetric", True)):
        ep = ep_updates(net, x, y, T, K, beta, symmetric, free=free)
        result["estimators"][estimator] = {name: metrics(ep[name], bptt[name]) for name in bptt}
        trajectories[estimator] = Trajectories(list(bptt), ep, bptt)
    return result, trajectories


def run_check(recipe, *, checkpoint=None, steps: int | None = None, beta: float | None = None,
              batch: int = 20, dtype: str = "float64", out_dir=None) -> tuple[dict, dict, Path]:
    """``eprun gdu``: the recipe's network (initial weights, or a checkpoint's), one batch of its
    training split, T from the recipe, K and β from the recipe unless given; writes gdu.json,
    gdu.csv and the plots into ``out_dir``."""
    import csv
    import time

    from eprun import plots, runs
    from eprun.errors import CheckpointError, RecipeError
    from eprun.runner import assemble, load_data

    relaxation = recipe.rule.relaxation()
    if relaxation is None:
        raise RecipeError(f"{recipe.name}: rule.kind {recipe.rule.kind!r} has no relaxation (T); "
                          f"the GDU check needs an EP-type rule")
    T = relaxation.T
    K = steps if steps is not None else (relaxation.K or 10)
    b = beta if beta is not None else (relaxation.beta or 0.01)
    if not 1 <= K <= T:
        raise RecipeError(f"--steps: K must be between 1 and T = {T}, got {K}")
    if not math.isfinite(b) or b == 0.0:
        raise RecipeError(f"--beta: must be a finite, non-zero number (EP divides by β), got {b}")
    if batch < 1:
        raise RecipeError(f"--batch: must be ≥ 1, got {batch}")
    if dtype not in ("float32", "float64"):
        raise RecipeError(f"--dtype: expected float32 or float64, got {dtype!r}")
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise RecipeError(f"--out: {out_dir} is a file; give a folder for gdu.json, gdu.csv and the plots")
        if (out_dir / "gdu.json").exists():
            raise RecipeError(f"--out: {out_dir} already holds a GDU check (gdu.json); give another folder")
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    device = torch.device("cpu")
    splits = load_data(recipe, device)
    if batch > len(splits.train):
        raise RecipeError(f"--batch: the training split has {len(splits.train)} examples, got {batch}")
    exp = assemble(recipe, splits, device)
    if not exp.net.has_phi:
        raise RecipeError(f"{recipe.name}: model.kind {recipe.model.kind!r} has no primitive function Φ "
                          f"(a vector field); the GDU theorem and this check need one")
    if checkpoint is not None:
        state = runs.load_checkpoint(Path(checkpoint))
        try:
            exp.net.load_state_dict(state["model"])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{checkpoint}: does not fit the recipe's network ({str(exc).splitlines()[0]})") from None
    net = exp.net.to(torch_dtype)
    x = splits.train.x[:batch].to(torch_dtype)
    y = splits.train.y[:batch]
    start = time.perf_counter()
    result, trajectories = check(net, x, y, T, K, b)
    result.update(recipe=recipe.name, model=recipe.model.kind, dtype=dtype, seconds=time.perf_counter() - start,
                  checkpoint=str(checkpoint) if checkpoint else None)
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"gdu-{runs.sanitize_name(recipe.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_json(out / "gdu.json", result)
    rows = [{"estimator": est, "tensor": name, **m} for est, ms in result["estimators"].items() for name, m in ms.items()]
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    runs.atomic_write_text(out / "gdu.csv", buffer.getvalue())
    one = trajectories["one-sided"]
    first = {name: (t[:, 0] if name.startswith("s") else t) for name, t in one.ep.items()}
    first_bptt = {name: (t[:, 0] if name.startswith("s") else t) for name, t in one.bptt.items()}
    plots.plot_gdu_traces(first, first_bptt, out / "gdu-traces.png",
                          title=f"{recipe.name}: EP (dashed) vs BPTT (solid), β={b}, T={T}, K={K}")
    plots.plot_gdu_rmse(result["estimators"], out / "gdu-rmse.png", title=f"{recipe.name}: relative RMSE per tensor")
    return result, trajectories, out
