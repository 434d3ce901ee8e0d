"""The relaxation of a chain of dense layers, shared by the prototypical and vector-field MLPs.

:func:`relax_dense_` is the definition, in torch; where the compiled kernel applies (CPU,
float32, an MSE nudge or none, an activation it knows, a fixed number of steps or per-example
early stopping) it runs the same steps instead (:mod:`eprun.native.dense`), and
:func:`ep_phases_dense` runs EP's two phases in one call of it. The tests hold the engines equal.
"""

from __future__ import annotations

import torch

from eprun import stopping, triton_kernels
from eprun.native import dense as native_dense
from eprun.nets.dense import dense_constants
from eprun.nets.early_stop import check_tol_scope, largest_change, relax_each_example
from eprun.nets.relax_products import RelaxProducts


def relax_dense_(net, const: list[torch.Tensor], state: list[torch.Tensor], scratch: list[torch.Tensor],
                 bottom_up: list[torch.Tensor], top_down: list[torch.Tensor], steps: int, beta: float,
                 target: torch.Tensor | None, order: str = "sync", tol: float = 0.0,
                 check_every: int = 5, tol_scope: str = "batch") -> list[torch.Tensor]:
    """Up to ``steps`` steps of a chain of dense layers, in place on ``state``::

        z^i = const_i + a·(s^{i−1} @ bottom_up[i]) + a·(s^{i+1} @ top_down[i])  [+ nudge at the last layer]
        s^i ← g(z^i)                                   [+ β(y − s^N_t) at the last layer instead, for a
                                                        net that ``nudges_after_activation``]

    (row-major states; ``const_0`` already holds the input drive; a, g from ``net.act``).
    ``scratch`` is a second set of state buffers: steps alternate between the two sets, so a
    step allocates nothing.

    ``order``: ``sync`` updates every layer from s_t (the papers' schedule); ``async`` updates
    the layers s¹, s³, … from s_t, then s², s⁴, … from those fresh values (the even/odd
    schedule of Scellier et al. 2023).

    ``tol`` > 0 stops early, checked after every ``check_every``-th step t from the change
    |s_{t} − s_{t−1}| of that step (the check is the loop's only host synchronisation):

    * ``tol_scope`` "batch": the phase ends once no state of any example changed by ``tol``
      or more;
    * ``tol_scope`` "example": each example stops at its own first such check (its state is
      held from then on while the others go on); the phase ends when all have stopped.

    ``net.last_relax_steps`` holds the steps taken (with "example", their mean over the
    examples), ``net.last_relax_engine`` "native", "triton" or "torch".

    The products are the run's precision's (:class:`~eprun.nets.relax_products.RelaxProducts`);
    the compiled and Triton kernels run float32 products only; the Triton kernel does not run the
    nudge after σ.
    """
    a = net.act.scale
    n_layers = len(state)
    nudged = beta != 0.0 and target is not None
    after = nudged and net.nudges_after_activation
    per_example = tol > 0.0 and check_tol_scope(tol_scope) == "example"
    products = RelaxProducts.of_run()
    if products.exact and (tol == 0.0 or per_example) and relax_native_(
            net, const, state, bottom_up, top_down, steps, beta if nudged else 0.0, order, tol, check_every,
            target if after else None):
        return state
    if not after and products.exact and tol == 0.0 and relax_triton_(net, const, state, bottom_up, top_down, steps,
                                                       beta if nudged else 0.0, order):
        return state
    if per_example:  # const[0] is the input drive
        return relax_each_example(net, const[0], state, steps, beta, target, order, tol, check_every)
    cur, nxt = state, scratch
    bottom_up = [products.weight(w) for w in bottom_up]
    top_down = [products.weight(w) for w in top_down]

    def update(i: int, below: list[torch.Tensor], above: list[torch.Tensor], out: torch.Tensor) -> None:
        if i == 0:
            if n_layers > 1:
                products.addmm(const[0], above[1], top_down[0], a, out)
            else:
                out.copy_(const[0])
        else:
            products.addmm(const[i], below[i - 1], bottom_up[i], a, out)
            if i + 1 < n_layers:
                products.addmm_(out, above[i + 1], top_down[i], a)
        if nudged and i == n_layers - 1 and not after:
            net.nudge_(out, cur[i], beta, target)
        net.act.apply_to_affine_(out)
        if after and i == n_layers - 1:  # σ(z^N) + β(y − s^N_t)
            out.add_(target, alpha=beta).add_(cur[i], alpha=-beta)

    first, second = (range(0, n_layers, 2), range(1, n_layers, 2)) if order == "async" else (range(n_layers), ())
    taken = 0
    for _ in range(steps):
        stopping.check()
        for i in first:
            update(i, cur, cur, nxt[i])
        for i in second:  # neighbours of an odd-indexed layer are even-indexed: already fresh in nxt
            update(i, nxt, nxt, nxt[i])
        cur, nxt = nxt, cur
        taken += 1
        if tol > 0.0 and taken % check_every == 0 and largest_change(cur, nxt) < tol:
            break
    net.note_relax(taken, "torch")
    if cur is not state:
        for s, new in zip(state, cur):
            s.copy_(new)
    return state


def kernel_matrices(bottom_up: list[torch.Tensor], top_down: list[torch.Tensor]) -> tuple[list, list]:
    """The kernel's U_i = bottom_up[i]ᵀ (None for the first layer) and D_i = top_down[i] (None for
    the last), contiguous."""
    n_layers = len(bottom_up)
    up = [None] + [bottom_up[i].T.contiguous() for i in range(1, n_layers)]
    down = [top_down[i].contiguous() for i in range(n_layers - 1)] + [None]
    return up, down


def relax_native_(net, const: list[torch.Tensor], state: list[torch.Tensor], bottom_up: list[torch.Tensor],
                  top_down: list[torch.Tensor], steps: int, beta: float, order: str, tol: float = 0.0,
                  check_every: int = 1, after_target: torch.Tensor | None = None) -> bool:
    """Run :func:`relax_dense_`'s steps with the compiled kernel when it applies; return False to
    leave them to torch. The kernel's ν = −a·β on the output layer is the MSE nudge a·β(y − s^N),
    its a·β·y already in the output layer's constant; with ``after_target`` = y (a net that
    ``nudges_after_activation``) the kernel adds β(y − s^N_t) after σ instead. ``tol`` > 0 stops
    each example on its own."""
    if (beta != 0.0 and net.softmax_readout) or net.act.name not in native_dense.ACTIVATION_CODES:
        return False
    extra = [] if after_target is None else [after_target]
    if not native_dense.supports(state, *const, *extra, steps=steps):  # before the weights are copied for the kernel
        return False
    up, down = kernel_matrices(bottom_up, top_down)
    if not native_dense.cpu_float32(*[m for m in up + down if m is not None]):
        return False
    nudge, after = (-net.act.scale * beta, None) if after_target is None else (0.0, (beta, after_target))
    row_steps = native_dense.relax_dense(state, const, up, down, net.act.scale, net.act.name, nudge, steps, order,
                                         tol, check_every, after=after)
    net.note_relax(steps if row_steps is None else float(row_steps.float().mean()), "native")
    return True


def relax_triton_(net, const: list[torch.Tensor], state: list[torch.Tensor], bottom_up: list[torch.Tensor],
                  top_down: list[torch.Tensor], steps: int, beta: float, order: str) -> bool:
    """Run :func:`relax_dense_`'s steps as one fused Triton launch (:mod:`eprun.triton_kernels.dense`)
    where ``EPRUN_TRITON=1`` asks for it and it applies (a CUDA device, or Triton's CPU interpreter;
    one hidden layer; see ``applies``); return False to leave them to torch."""
    if not (triton_kernels.enabled() and (state[0].is_cuda or triton_kernels.interpreted())
            and triton_kernels.available()):
        return False
    from eprun.triton_kernels import dense as triton_dense

    if not triton_dense.applies(state, net.act.name, order, 0.0, beta == 0.0 or not net.softmax_readout):
        return False
    tf32 = state[0].is_cuda and torch.backends.cuda.matmul.allow_tf32  # train.precision (eprun/precision.py)
    triton_dense.relax_two_layers_(const, state, top_down[0], bottom_up[1], steps, net.act.scale,
                                   -net.act.scale * beta, net.act.name, tf32)
    net.note_relax(steps, "triton")
    return True


def ep_phases_dense(net, drive: torch.Tensor, labels: torch.Tensor, free_steps: int, nudged_steps: int, beta: float,
                    up: list[torch.Tensor | None], down: list[torch.Tensor | None], order: str = "sync",
                    tol: float = 0.0, check_every: int = 5, tol_scope: str = "batch"):
    """Both phases of one-sided EP with the MSE read-out through one call of the compiled kernel,
    when it applies (see :func:`relax_native_`; ``up`` / ``down`` are the kernel's U_i and D_i).

    Returns (s*, s^β, per-example loss at s*, (mean steps of the free phase, of the nudged
    phase)), or None to leave it to ``net.relax`` twice — the same dynamics, step for step."""
    if (net.softmax_readout or net.act.name not in native_dense.ACTIVATION_CODES or beta == 0.0
            or not RelaxProducts.of_run().exact):
        return None
    if tol > 0.0 and check_tol_scope(tol_scope) != "example":
        return None
    batch = drive.shape[0]
    const = dense_constants(net, drive, len(net.sizes) - 1, 0.0, None)
    free = [drive.new_empty(batch, size) for size in net.sizes[1:]]
    matrices = [m for m in up + down if m is not None]
    if (labels.device.type != "cpu" or labels.dtype != torch.int64 or not labels.is_contiguous()
            or not native_dense.supports(free, *const, *matrices, steps=min(free_steps, nudged_steps))):
        return None
    nudged = [torch.empty_like(s) for s in free]
    taken_free, taken_nudged, loss = native_dense.ep_dense_phases(
        free, nudged, const, up, down, labels, net.act.scale, net.act.name, beta, free_steps, nudged_steps, order,
        tol, check_every, after=net.nudges_after_activation)
    steps = (float(taken_free.float().mean()), float(taken_nudged.float().mean())) if tol > 0.0 else (
        float(free_steps), float(nudged_steps))
    net.note_relax(steps[1], "native")
    return free, nudged, loss, steps
