"""Checks every EP net's tests apply, written once: the fast relaxation against the reference step,
∂Φ/∂θ and EP's in-place accumulation against autograd of Φ, BPTT's gradient (the ground truth of
the GDU theorem) against EP's update, the BP rule against autograd of the feed-forward twin, and a
short training run on a separable task."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from eprun.nets.base import EPNetwork, Network
from eprun.rules.base import Rule

Batch = tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]  # inputs, labels, a state


def close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], rtol: float = 1e-12,
          atol: float = 1e-12) -> None:
    """Two lists of tensors equal element by element (and of the same length)."""
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over all the tensors of the lists together."""
    num = math.sqrt(sum(((g - w) ** 2).sum().item() for g, w in zip(got, want)))
    return num / math.sqrt(sum((w ** 2).sum().item() for w in want))


def zero_grads(*nets: torch.nn.Module) -> None:
    for net in nets:
        for p in net.parameters():
            p.grad = None


def assert_relax_equals_steps(net: EPNetwork, x: torch.Tensor, y: torch.Tensor, state: list[torch.Tensor],
                              phases: Sequence[tuple[float, int]], rtol: float = 1e-12,
                              atol: float = 1e-12) -> list[torch.Tensor]:
    """For each (β, steps): ``net.relax`` from the input drive, in place on a copy of ``state``,
    equals ``steps`` reference steps s_{t+1} = ``net.step(x, s_t, β, target)``. Returns the last
    relaxed state."""
    target = net.target(y, x)
    drive = net.input_drive(x)
    fast = state
    for beta, steps in phases:
        fast = [s.clone() for s in state]
        net.relax(drive, fast, steps, beta, target)
        ref = [s.clone() for s in state]
        with torch.no_grad():
            for _ in range(steps):
                ref = net.step(x, ref, beta, target)
        close(fast, ref, rtol, atol)
    return fast


def assert_relax_updates_the_state_in_place(net: EPNetwork, random_batch: Callable[[EPNetwork, int], Batch],
                                            batches: Sequence[int], steps: int) -> None:
    """``net.relax`` returns the very tensors it was given, batch after batch of the sizes
    ``batches`` (``random_batch(net, batch)`` → inputs, labels, state), its buffers following a
    change of batch size."""
    for batch in batches:
        x, _, state = random_batch(net, batch)
        ids = [id(s) for s in state]
        out = net.relax(net.input_drive(x), state, steps)
        assert [id(s) for s in out] == ids


def assert_dphi_dtheta_matches_autograd(net: EPNetwork, x: torch.Tensor, state: list[torch.Tensor],
                                        other: list[torch.Tensor], scale: float = 2.5) -> None:
    """``dphi_dtheta`` equals autograd of mean Φ at ``state``, and the in-place accumulation EP
    uses writes θ.grad = c (∂Φ/∂θ(state) − ∂Φ/∂θ(other)) with c = ``scale``."""
    expected = torch.autograd.grad(net.phi(x, state).mean(), net.phi_parameters())
    close(net.dphi_dtheta(x, state), expected)
    at_other = net.dphi_dtheta(x, other)
    zero_grads(net)
    net.accumulate_dphi_dtheta_difference_(x, state, other, scale)
    close([p.grad for p in net.phi_parameters()], [scale * (a - b) for a, b in zip(expected, at_other)])


def bptt_gradient(net: EPNetwork, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[torch.Tensor, ...]:
    """∂ℓ(s_T)/∂θ by autograd through T = ``steps`` steps of ``net.step`` from s_0 = 0 (the ground
    truth of the GDU theorem)."""
    state = net.init_state(len(x), x)
    for _ in range(steps):
        state = net.step(x, state)
    return torch.autograd.grad(net.loss(state, y).mean(), list(net.parameters()))


def ep_gradient(net: EPNetwork, x: torch.Tensor, y: torch.Tensor, beta: float, steps: int,
                estimator: str = "one-sided") -> list[torch.Tensor]:
    """EP's update of one training step with T = K = ``steps``, as written into the gradients."""
    from eprun.rules.ep import EP, EPConfig

    zero_grads(net)
    EP(EPConfig(T=steps, K=steps, beta=beta, estimator=estimator), net,
       torch.Generator().manual_seed(0)).train_step(x, y)
    return [p.grad.clone() for p in net.parameters()]


def assert_bp_rule_gives_autograd_of_the_feedforward_twin(net: Network, x: torch.Tensor,
                                                          y: torch.Tensor) -> None:
    """The BP rule writes ∂ℓ(f(x))/∂θ, f the net's feed-forward twin, as autograd gives it."""
    from eprun.rules.bp import BP, BPConfig

    want = torch.autograd.grad(net.loss(net.feedforward(x), y).mean(), list(net.parameters()))
    zero_grads(net)
    BP(BPConfig(), net, torch.Generator()).train_step(x, y)
    for p, w in zip(net.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w)  # torch's tolerance for the dtype: BP sums in another order


def train_on(rule: Rule, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
             set_to_none: bool = True) -> tuple[float, float, float]:
    """``steps`` full-batch training steps of ``rule`` with ``optimizer``; returns the mean loss
    before, the mean loss after and the accuracy after."""
    before = rule.evaluate(x, y)[1].mean().item()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=set_to_none)
        rule.train_step(x, y)
        optimizer.step()
    logits, loss = rule.evaluate(x, y)
    return before, loss.mean().item(), (logits.argmax(1) == y).float().mean().item()
