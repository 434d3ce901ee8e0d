"""What the runner logs about the relaxation and the estimate while training.

* :func:`relaxation` — after the free phase (T steps) and the nudged phase (K steps): the
  residual ‖s_{t+1} − s_t‖ (RMS over units, one more step), the fraction of saturated units
  (within 1e-3 of the activation's bounds), and Φ at the free fixed point (where the network
  has a Φ). A free-phase residual above ``train.convergence_tol`` means s* is not a fixed
  point, and the EP estimate is then biased.
* :func:`update_angles` — the angle between the update in ``.grad`` (EP's −Δθ) and the BPTT
  gradient on the same batch (autograd through T steps of the same dynamics), per parameter
  and overall, as Ernoult et al. 2020 relate alignment to performance.
"""

from __future__ import annotations

import math

import torch

def _rms_change(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    total = sum(((u - v) ** 2).sum() for u, v in zip(a, b))
    count = sum(u.numel() for u in a)
    return math.sqrt(float(total) / max(count, 1))


@torch.no_grad()
def relaxation(net, x: torch.Tensor, y: torch.Tensor, T: int, K: int, beta: float) -> dict:
    """Residuals at the end of each phase, saturation, and Φ at s*."""
    drive = net.input_drive(x)
    target = net.target(y, x)
    free = net.relax(drive, net.init_state(x.shape[0], like=x), T)
    once = net.relax(drive, [s.clone() for s in free], 1)
    out = {"free_residual": _rms_change(once, free)}
    nudged = net.relax(drive, [s.clone() for s in free], K, beta, target)
    once = net.relax(drive, [s.clone() for s in nudged], 1, beta, target)
    out["nudged_residual"] = _rms_change(once, nudged)
    bounds = net.state_bounds()
    if bounds is not None:
        low, high = bounds
        saturated = sum(((s <= low + 1e-3) | (s >= high - 1e-3)).sum() for s in free)
        out["saturated_fraction"] = float(saturated) / sum(s.numel() for s in free)
    if net.has_phi:
        out["phi"] = float(net.phi(x, free).mean())
    return out


def update_angles(net, x: torch.Tensor, y: torch.Tensor, T: int) -> dict:
    """Angles (degrees) between each parameter's ``.grad`` and the BPTT gradient, and overall."""
    params = [(name, p) for name, p in net.named_parameters() if p.grad is not None]
    with torch.enable_grad():
        state = net.init_state(x.shape[0], like=x)
        for _ in range(T):
            state = net.step(x, state)
        loss = net.loss(state, y).mean()
        bptt = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    out, dot, na, nb = {}, 0.0, 0.0, 0.0
    for (name, p), g in zip(params, bptt):
        if g is None:
            continue
        a, b = p.grad.detach().double().flatten(), g.detach().double().flatten()
        out[f"angle_deg/{name}"] = _angle(float(a @ b), float(a @ a), float(b @ b))
        dot, na, nb = dot + float(a @ b), na + float(a @ a), nb + float(b @ b)
    out["angle_deg"] = _angle(dot, na, nb)
    return out


def _angle(dot: float, na: float, nb: float) -> float | None:
    if na == 0 or nb == 0:
        return None
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / math.sqrt(na * nb)))))
