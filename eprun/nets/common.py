"""Pieces every network shares: parameter initialisation, per-layer values, ``.grad``
accumulation, and the read-out (MSE on s^N, or a softmax read-out outside Φ)."""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn


def per_layer(value: Union[float, list[float]], n: int) -> list[float]:
    """A per-layer list from a scalar (repeated) or a list (as is)."""
    return list(value) if isinstance(value, list) else [float(value)] * n


def uniform_parameter(shape, fan_in: int, scale: float, generator: torch.Generator) -> nn.Parameter:
    """torch's Linear / Conv2d default, U(−1/√fan_in, 1/√fan_in), times ``scale``, from ``generator``."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * bound * scale)


def init_dense_chain(net: nn.Module, cfg, input_shape: tuple[int, ...], num_classes: int, n_layers: int,
                     generator: torch.Generator) -> None:
    """Give ``net`` the fully connected chain x = s⁰ → s¹ … s^N of ``cfg.hidden`` (+ the classes
    for an MSE read-out), drawn in a fixed order — W_n, b_{n+1} per layer, then the softmax
    read-out — so every net built this way from the same seed has the same W."""
    from eprun.nets.activations import ACTIVATIONS

    net.cfg = cfg
    net.act = ACTIVATIONS[cfg.activation]
    net.num_classes = num_classes
    net.softmax_readout = cfg.readout == "softmax"
    out_sizes = list(cfg.hidden) if net.softmax_readout else list(cfg.hidden) + [num_classes]
    net.sizes = [math.prod(input_shape)] + out_sizes  # sizes of s⁰ (= x) … s^N
    scales = per_layer(cfg.weight_scale, n_layers)
    net.weights = nn.ParameterList()
    net.biases = nn.ParameterList()
    for n in range(len(net.sizes) - 1):
        fan_in = net.sizes[n]
        net.weights.append(uniform_parameter((net.sizes[n + 1], fan_in), fan_in, scales[n], generator))
        net.biases.append(uniform_parameter((net.sizes[n + 1],), fan_in, 1.0, generator))
    if net.softmax_readout:
        fan_in = net.sizes[-1]
        net.readout_weight = uniform_parameter((num_classes, fan_in), fan_in, scales[-1], generator)
        net.readout_bias = uniform_parameter((num_classes,), fan_in, 1.0, generator)


class ScratchStates:
    """A second set of state buffers per (batch size, dtype, device), for relaxations that
    alternate between two sets so a step allocates nothing. Needs ``self._scratch = {}``."""

    def _scratch_for(self, state: list[torch.Tensor]) -> list[torch.Tensor]:
        key = (state[0].shape[0], state[0].dtype, state[0].device)
        if key not in self._scratch:  # one set per batch size (the last batch may be smaller)
            self._scratch[key] = [torch.empty_like(s) for s in state]
        return self._scratch[key]


def parameters_in(plist: nn.ParameterList) -> list[nn.Parameter]:
    """A ParameterList's parameters in order, read from its table: iterating the list itself
    parses an index per item (~2 µs each), which adds up on the relaxation's hot path."""
    return list(plist._parameters.values())


def dense_constants(net, drive: torch.Tensor, n_layers: int, beta: float,
                    target: torch.Tensor | None) -> list[torch.Tensor]:
    """The constants of a dense net's layers during a phase: c_1 = the input drive, then
    a·b_n + c for the layers above (the bias itself when a = 1 and c = 0), plus a·β·y at the
    output for the MSE nudge (a, c: σ's scale and shift)."""
    a, shift = net.act.scale, net.act.shift
    biases = parameters_in(net.biases)[1:n_layers]
    const = [drive] + [b if a == 1.0 and shift == 0.0 else b * a + shift for b in biases]
    if beta != 0.0 and target is not None and not net.softmax_readout:
        const[-1] = torch.add(const[-1], target, alpha=a * beta)
    return const


def dense_feedforward(net, x: torch.Tensor) -> list[torch.Tensor]:
    """s^{n+1} = σ(W_n s^n + b_{n+1}) bottom-up through ``net.weights`` / ``net.biases``: the
    feed-forward twin of a dense EP net (the BP baseline), autograd-friendly."""
    h = x.reshape(x.shape[0], -1)
    state = []
    for w, b in zip(net.weights, net.biases):
        h = net.act(h @ w.T + b)
        state.append(h)
    return state


class ConvLayerLists:
    """For conv-net configs with ``channels``: settings given once or one entry per conv layer."""

    def per_conv_layer(self, name: str) -> list:
        """``kernels`` / ``strides`` / ``paddings`` / ``pools`` as one entry per conv layer."""
        value = getattr(self, name)
        return list(value) if isinstance(value, list) else [value] * len(self.channels)

    def check_conv_lists(self, lowest: dict[str, int], pools: str = "pools"):
        """(key, message) for a list whose length is not the number of conv layers, or an entry
        below its lowest allowed value."""
        n = len(self.channels)
        for name, low in lowest.items():
            values = self.per_conv_layer(name)
            if len(values) != n:
                yield name, f"one entry per conv layer ({n} for channels={self.channels}) or a single value, got {len(values)}"
            for v in values:
                if v < low:
                    yield name, f"must be ≥ {low}, got {v}"
        if len(self.per_conv_layer(pools)) != n:
            yield pools, (f"one entry per conv layer ({n} for channels={self.channels}) or a single value, "
                          f"got {len(self.per_conv_layer(pools))}")


def grad_of(p: nn.Parameter) -> torch.Tensor:
    """``p.grad``, created as zeros if missing (updates are accumulated into it in place)."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


class WeightLayers:
    """Parameters by weight layer: W_n, b_{n+1} per layer, then the softmax read-out if any.
    Needs ``weights``, ``biases``, ``softmax_readout`` (and the read-out's parameters)."""

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters grouped by weight layer, in order (for per-layer learning rates)."""
        groups = [[w, b] for w, b in zip(self.weights, self.biases)]
        if self.softmax_readout:
            groups.append([self.readout_weight, self.readout_bias])
        return groups

    def phi_parameters(self) -> list[nn.Parameter]:
        """θ of Φ in the order ``dphi_dtheta`` returns: W_0, b_1, W_1, b_2, …"""
        return [p for w, b in zip(self.weights, self.biases) for p in (w, b)]


class Readout:
    """Prediction and loss from the last state s^N.

    MSE: the prediction is s^N, ℓ = ½‖y − s^N‖² with one-hot y. Softmax read-out (Laborieux
    et al. 2021): a layer outside the dynamics, prediction softmax(W_out s^N + b_out),
    ℓ = cross-entropy. Needs ``num_classes``, ``softmax_readout`` and, for the softmax
    read-out, ``readout_weight`` / ``readout_bias``.
    """

    num_classes: int
    softmax_readout: bool

    def target(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """One-hot targets in the state dtype (labels are checked against the class count when the
        data is loaded; ``scatter_`` still refuses an out-of-range index)."""
        return torch.zeros(y.shape[0], self.num_classes, dtype=like.dtype, device=like.device).scatter_(
            1, y.unsqueeze(1), 1.0)

    @staticmethod
    def flatten(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)

    def logits(self, state: list[torch.Tensor]) -> torch.Tensor:
        """The prediction scores: s^N (MSE) or W_out s^N + b_out (softmax read-out, s^N flattened)."""
        if self.softmax_readout:
            return self.flatten(state[-1]) @ self.readout_weight.T + self.readout_bias
        return state[-1]

    def loss(self, state: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Per-example loss ℓ: ½‖y − s^N‖² (MSE) or cross-entropy of the softmax read-out."""
        out = self.logits(state)
        if self.softmax_readout:
            return F.cross_entropy(out, y, reduction="none")
        return 0.5 * ((self.target(y, out) - out) ** 2).sum(dim=1)

    @torch.no_grad()
    def accumulate_readout_grad_(self, state: list[torch.Tensor], y: torch.Tensor) -> None:
        """For the softmax read-out (outside Φ): W_out.grad += ∂ℓ/∂W_out = (p − y) s^Nᵀ (batch mean)."""
        if not self.softmax_readout:
            return
        s_last = self.flatten(state[-1])
        err = torch.softmax(self.logits(state), dim=1) - self.target(y, s_last)
        grad_of(self.readout_weight).addmm_(err.T, s_last, alpha=1.0 / s_last.shape[0])
        grad_of(self.readout_bias).add_(err.mean(dim=0))

    def _nudge_(self, out: torch.Tensor, s_last: torch.Tensor, beta: float, target: torch.Tensor) -> None:
        """Add a·β·∂(−ℓ)/∂s^N to the output layer's pre-activation ``out`` (a = σ's scale; for
        MSE without the constant a·β·y, which the caller folds into the layer's constant)."""
        a = self.act.scale
        if self.softmax_readout:  # −∂ℓ/∂s^N = W_outᵀ (y − softmax(W_out s^N + b_out)), s^N flattened
            flat = self.flatten(s_last)
            p = torch.softmax(torch.addmm(self.readout_bias, flat, self.readout_weight.T), dim=1)
            out.view(flat.shape).addmm_(p - target, self.readout_weight, alpha=-a * beta)
        else:  # −∂ℓ/∂s^N = y − s^N
            out.add_(s_last, alpha=-a * beta)


def relax_dense_(net, const: list[torch.Tensor], state: list[torch.Tensor], scratch: list[torch.Tensor],
                 bottom_up: list[torch.Tensor], top_down: list[torch.Tensor], steps: int, beta: float,
                 target: torch.Tensor | None, order: str = "sync", tol: float = 0.0,
                 check_every: int = 5, tol_scope: str = "batch") -> list[torch.Tensor]:
    """Up to ``steps`` steps of a chain of dense layers, in place on ``state``::

        z^i = const_i + a·(s^{i−1} @ bottom_up[i]) + a·(s^{i+1} @ top_down[i])  [+ nudge at the last layer]
        s^i ← g(z^i)

    (row-major states; ``const_0`` already holds the input drive; a, g from ``net.act``).
    ``scratch`` is a second set of state buffers: steps alternate between the two sets, so a
    step allocates nothing.

    ``order``: ``sync`` updates every layer from s_t (the papers' schedule); ``async`` updates
    the layers s¹, s³, … from s_t, then s², s⁴, … from those fresh values (the even/odd
    schedule of Scellier et al. 2023). On the CPU in float32 the compiled kernel of
    :mod:`eprun.native` runs the same steps (see :func:`_relax_native_`), with a fixed number of
    steps or ``tol_scope`` "example".

    ``tol`` > 0 stops early, checked after every ``check_every``-th step t from the change
    |s_{t} − s_{t−1}| of that step (the check is the loop's only host synchronisation):

    * ``tol_scope`` "batch": the phase ends once no state of any example changed by ``tol``
      or more;
    * ``tol_scope`` "example": each example stops at its own first such check (its state is
      held from then on while the others go on); the phase ends when all have stopped.

    ``net.last_relax_steps`` holds the steps taken (with "example", their mean over the
    examples), ``net.last_relax_engine`` "native" or "torch".
    """
    a = net.act.scale
    n_layers = len(state)
    nudged = beta != 0.0 and target is not None
    per_example = tol > 0.0 and check_tol_scope(tol_scope) == "example"
    if (tol == 0.0 or per_example) and _relax_native_(net, const, state, bottom_up, top_down, steps,
                                                      beta if nudged else 0.0, order, tol, check_every):
        return state
    if per_example:  # const[0] is the input drive
        return relax_each_example(net, const[0], state, steps, beta, target, order, tol, check_every)
    cur, nxt = state, scratch

    def update(i: int, below: list[torch.Tensor], above: list[torch.Tensor], out: torch.Tensor) -> None:
        if i == 0:
            if n_layers > 1:
                torch.addmm(const[0], above[1], top_down[0], alpha=a, out=out)
            else:
                out.copy_(const[0])
        else:
            torch.addmm(const[i], below[i - 1], bottom_up[i], alpha=a, out=out)
            if i + 1 < n_layers:
                out.addmm_(above[i + 1], top_down[i], alpha=a)
        if nudged and i == n_layers - 1:
            net._nudge_(out, cur[i], beta, target)
        net.act.apply_to_affine_(out)

    first, second = (range(0, n_layers, 2), range(1, n_layers, 2)) if order == "async" else (range(n_layers), ())
    taken = 0
    for _ in range(steps):
        for i in first:
            update(i, cur, cur, nxt[i])
        for i in second:  # neighbours of an odd-indexed layer are even-indexed: already fresh in nxt
            update(i, nxt, nxt, nxt[i])
        cur, nxt = nxt, cur
        taken += 1
        if tol > 0.0 and taken % check_every == 0 and largest_change(cur, nxt) < tol:
            break
    note_relax(net, taken, "torch")
    if cur is not state:
        for s, new in zip(state, cur):
            s.copy_(new)
    return state


def row_change(new: list[torch.Tensor], old: list[torch.Tensor]) -> torch.Tensor:
    """[batch]: each example's max |s_{t+1} − s_t| over its layers (no host synchronisation)."""
    return torch.stack([(n - o).abs().flatten(1).amax(1) for n, o in zip(new, old)]).amax(0)


def largest_change(new: list[torch.Tensor], old: list[torch.Tensor]) -> float:
    """max |s_{t+1} − s_t| over every layer and example (one host synchronisation)."""
    return float(row_change(new, old).max())


def check_tol_scope(scope: str) -> str:
    if scope not in ("batch", "example"):
        raise ValueError(f"tol_scope must be 'batch' or 'example', got {scope!r}")
    return scope


def relax_each_example(net, drive: torch.Tensor, state: list[torch.Tensor], steps: int, beta: float,
                       target: torch.Tensor | None, order: str, tol: float, check_every: int) -> list[torch.Tensor]:
    """``tol_scope`` "example" on the torch path: every example stops at its own first check (a step
    t, multiple of ``check_every``, in which none of its states moved by ``tol`` or more; a NaN
    counts as moving), in place on ``state``. The examples still relaxing are gathered into a
    smaller batch after each check, so a stopped example costs nothing more: ``net.relax`` runs
    ``check_every`` − 1 steps on them, then the checked step. ``net.last_relax_steps`` is the mean
    of the steps the examples took."""
    batch = state[0].shape[0]
    rows = torch.arange(batch, device=drive.device)  # the original index of each example still relaxing
    row_steps = torch.full((batch,), float(steps), device=drive.device)
    live, live_drive, live_target = state, drive, target
    taken = 0
    while taken < steps:
        chunk = min(check_every, steps - taken)
        if chunk == check_every:  # this chunk ends at a check (taken is a multiple of check_every)
            if chunk > 1:
                live = net.relax(live_drive, live, chunk - 1, beta, live_target, order=order)
            before = [s.clone() for s in live]
            live = net.relax(live_drive, live, 1, beta, live_target, order=order)
            taken += chunk
            stopped = row_change(live, before) < tol
            if bool(stopped.any()):
                done = rows[stopped]
                row_steps[done] = float(taken)
                for out, s in zip(state, live):
                    out[done] = s[stopped]
                going = ~stopped
                rows, live = rows[going], [s[going] for s in live]
                live_drive = live_drive[going]
                live_target = live_target[going] if live_target is not None else None
                if rows.numel() == 0:
                    break
        else:
            live = net.relax(live_drive, live, chunk, beta, live_target, order=order)
            taken += chunk
    if rows.numel() and live is not state:
        for out, s in zip(state, live):
            out[rows] = s
    note_relax(net, float(row_steps.mean()), "torch")
    return state


def note_relax(net, steps: float, engine: str) -> None:
    """``net.last_relax_steps`` / ``net.last_relax_engine``, set without nn.Module's __setattr__
    (it searches the parameter, buffer and module tables first: slow at two calls a phase)."""
    object.__setattr__(net, "last_relax_steps", steps)
    object.__setattr__(net, "last_relax_engine", engine)


def ep_phases_dense(net, drive: torch.Tensor, labels: torch.Tensor, free_steps: int, nudged_steps: int, beta: float,
                    up: list[torch.Tensor | None], down: list[torch.Tensor | None], order: str = "sync",
                    tol: float = 0.0, check_every: int = 5, tol_scope: str = "batch"):
    """Both phases of one-sided EP with the MSE read-out through one call of the compiled kernel
    (:func:`eprun.native.ep_dense_phases`), when it applies: CPU, float32, an activation it
    knows, a fixed number of steps or ``tol_scope`` "example". ``up`` / ``down`` are the kernel's
    U_i and D_i (see :func:`_relax_native_`).

    Returns (s*, s^β, per-example loss at s*, (mean steps of the free phase, of the nudged
    phase)), or None to leave it to :meth:`relax` twice — the same dynamics, step for step."""
    from eprun import native

    if net.softmax_readout or net.act.name not in native.ACTIVATION_CODES or beta == 0.0:
        return None
    if tol > 0.0 and check_tol_scope(tol_scope) != "example":
        return None
    batch = drive.shape[0]
    const = dense_constants(net, drive, len(net.sizes) - 1, 0.0, None)
    free = [drive.new_empty(batch, size) for size in net.sizes[1:]]
    matrices = [m for m in up + down if m is not None]
    if (labels.device.type != "cpu" or labels.dtype != torch.int64 or not labels.is_contiguous()
            or not native.supports(free, *const, *matrices, steps=min(free_steps, nudged_steps))
            or not native.phases_in_one_call(batch)):
        return None
    nudged = [torch.empty_like(s) for s in free]
    taken_free, taken_nudged, loss = native.ep_dense_phases(free, nudged, const, up, down, labels, net.act.scale,
                                                            net.act.name, beta, free_steps, nudged_steps, order, tol,
                                                            check_every)
    steps = (float(taken_free.float().mean()), float(taken_nudged.float().mean())) if tol > 0.0 else (
        float(free_steps), float(nudged_steps))
    note_relax(net, steps[1], "native")
    return free, nudged, loss, steps


def _relax_native_(net, const: list[torch.Tensor], state: list[torch.Tensor], bottom_up: list[torch.Tensor],
                   top_down: list[torch.Tensor], steps: int, beta: float, order: str, tol: float = 0.0,
                   check_every: int = 1) -> bool:
    """Run :func:`relax_dense_`'s steps with the compiled kernel when it applies (CPU, float32,
    an MSE nudge or none, an activation it knows); return False to leave it to torch. ``tol`` > 0
    stops each example on its own (``tol_scope`` "example").

    The kernel's layer update is  s_i ← g(c_i + a·(U_i s_{i−1}) + a·(D_iᵀ s_{i+1}) + ν·s_i)  with
    U_i = bottom_up[i]ᵀ, D_i = top_down[i] and ν = −a·β on the output layer (the MSE nudge
    a·β(y − s^N), its a·β·y already in the output layer's constant).
    """
    from eprun import native

    if (beta != 0.0 and net.softmax_readout) or net.act.name not in native.ACTIVATION_CODES:
        return False
    n_layers = len(state)
    up = [None] + [bottom_up[i].T.contiguous() for i in range(1, n_layers)]
    down = [top_down[i].contiguous() for i in range(n_layers - 1)] + [None]
    matrices = [m for m in up + down if m is not None]
    if not native.supports(state, *const, *matrices, steps=steps):
        return False
    row_steps = native.relax_dense(state, const, up, down, net.act.scale, net.act.name, -net.act.scale * beta,
                                   steps, order, tol, check_every)
    note_relax(net, steps if row_steps is None else float(row_steps.float().mean()), "native")
    return True
