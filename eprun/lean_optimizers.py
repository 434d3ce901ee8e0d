"""torch's fused Adam, AdamW and SGD with a short path for ``step`` and ``zero_grad``.

A training step of a small EP net is well under a millisecond, and the optimiser's Python around
its fused kernels is a visible part of it: ``Optimizer.step`` opens a profiler range, runs the
hook chains, rebuilds the lists of parameters, gradients and moment buffers of every parameter
group and calls the kernel once per group; ``zero_grad`` does the same walk. The subclasses here
keep everything of torch's optimisers (state, ``state_dict``, schedulers, hooks) and, once every
parameter has its state, run the same kernel on lists built once and kept:

    Adam / AdamW:  step_i ← step_i + 1;  torch._fused_adam_ / _fused_adamw_(θ, g, m, v, …)
    SGD:           torch._fused_sgd_(θ, g, momentum buffers, …)

with one call for all the groups that share their hyperparameters (the kernel is elementwise and
per tensor, so the result is the same bit for bit as one call per group). Anything else — a hook,
a closure, a gradient that is missing or was replaced, a tensor learning rate, an ``amsgrad``
state not built yet, a non-fused group — takes torch's own ``step``, unchanged.

The short path calls private parts of torch (the fused kernels, the optimiser hook registries and
its step wrapper), which a torch release may change. So :func:`build` uses it only after a check,
once per process, that every private part exists and that the short path gives torch's own fused
optimisers' parameters and state bit for bit over a few steps, for each class; otherwise it
returns torch's optimiser in its default (public, unfused) implementation and :func:`status`
says why (``env.json`` records it).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.optim.optimizer import Optimizer

_status: dict = {}  # "ok": bool once checked, "reason": why not
_parts: dict = {}


def _private_parts() -> dict:
    """The private torch names the short path calls (raises AttributeError / ImportError if one is
    missing); looked up once."""
    if not _parts:
        _parts.update(_look_up_private_parts())
    return _parts


def _look_up_private_parts() -> dict:
    from torch.optim import optimizer as optimizer_module

    return {"adam": torch._fused_adam_, "adamw": torch._fused_adamw_, "sgd": torch._fused_sgd_,
            "zero": torch._foreach_zero_, "add": torch._foreach_add_,
            "pre_hooks": optimizer_module._global_optimizer_pre_hooks,
            "post_hooks": optimizer_module._global_optimizer_post_hooks,
            "profile_hook_step": Optimizer.profile_hook_step}


def _torch_step(cls: type) -> Callable:
    """torch's ``cls.step`` with its hook and profiler wrapper (added here if torch has not yet
    wrapped it, which it does on the first optimiser of that class)."""
    step = cls.step
    if getattr(step, "hooked", False):
        return step
    return Optimizer.profile_hook_step(step)


class _LeanStep:
    """The short path shared by the three optimisers; subclasses say how a group's tensors and
    hyperparameters are read (:meth:`_group_plan`) and how one merged call runs (:meth:`_run`)."""

    _lean: Optional[tuple] = None  # (hyperparameter keys, grads, merged calls), built once the state exists
    _torch_class: type

    def _lean_ready(self) -> Optional[list]:
        """The merged calls, when the short path applies to this step; None otherwise."""
        parts = _private_parts()
        if (parts["pre_hooks"] or parts["post_hooks"] or self._optimizer_step_pre_hooks
                or self._optimizer_step_post_hooks or getattr(self, "grad_scale", None) is not None
                or getattr(self, "found_inf", None) is not None):
            return None
        keys = [self._group_key(group) for group in self.param_groups]
        lean = self._lean
        if lean is not None and lean[0] == keys and all(p.grad is g for p, g in lean[1]):
            return lean[2]
        if any(key is None for key in keys):
            return None
        pairs = [(p, p.grad) for group in self.param_groups for p in group["params"]]
        if any(g is None or g.is_sparse for _, g in pairs):
            return None
        merged: dict[tuple, list[list]] = {}
        for group, key in zip(self.param_groups, keys):
            lists = self._group_plan(group)
            if lists is None:
                return None
            if key in merged:
                for into, extra in zip(merged[key], lists):
                    into.extend(extra)
            else:
                merged[key] = [list(x) for x in lists]
        self._lean = (keys, pairs, list(merged.items()))
        return self._lean[2]

    def step(self, closure=None):
        calls = self._lean_ready() if closure is None else None
        if calls is None:
            return self._full_step(closure)
        with torch.no_grad():
            for key, lists in calls:
                self._run(key, lists)
        return None

    step.hooked = True  # torch must not wrap this step in its hook runner: it runs them (via _full_step)

    def _full_step(self, closure):
        self._lean = None
        return _torch_step(self._torch_class)(self, closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        lean = self._lean
        if not set_to_none and lean is not None and all(p.grad is g for p, g in lean[1]):
            torch._foreach_zero_([g for _, g in lean[1]])
            return
        super().zero_grad(set_to_none)

    def load_state_dict(self, state_dict) -> None:
        self._lean = None
        super().load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        self._lean = None
        super().add_param_group(param_group)


class LeanAdam(_LeanStep, torch.optim.Adam):
    """``torch.optim.Adam`` (fused) with the short step path (same results bit for bit)."""

    _torch_class = torch.optim.Adam

    @staticmethod
    def _group_key(group: dict) -> Optional[tuple]:
        if (not group["fused"] or group["capturable"] or group["differentiable"]
                or torch.is_tensor(group["lr"])):
            return None
        beta1, beta2 = group["betas"]
        return (float(group["lr"]), float(beta1), float(beta2), float(group["weight_decay"]), float(group["eps"]),
                bool(group["amsgrad"]), bool(group["maximize"]), bool(group.get("decoupled_weight_decay", False)))

    def _group_plan(self, group: dict) -> Optional[tuple]:
        """(θ, g, m, v, max v, steps) of the group, or None while a state is missing."""
        out = ([], [], [], [], [], [])
        for p in group["params"]:
            state = self.state.get(p)
            if not state or "exp_avg" not in state or (group["amsgrad"] and "max_exp_avg_sq" not in state):
                return None
            for into, t in zip(out, (p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                     state.get("max_exp_avg_sq"), state["step"])):
                if t is not None:
                    into.append(t)
        return out

    @staticmethod
    def _run(key: tuple, lists: list[list]) -> None:
        lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled = key
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
        torch._foreach_add_(steps, 1)
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad=amsgrad, lr=lr, beta1=beta1,
               beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=maximize, grad_scale=None, found_inf=None)


class LeanAdamW(LeanAdam, torch.optim.AdamW):
    """``torch.optim.AdamW`` (fused) with the short step path (same results bit for bit)."""

    _torch_class = torch.optim.AdamW


class LeanSGD(_LeanStep, torch.optim.SGD):
    """``torch.optim.SGD`` (fused) with the short step path (same results bit for bit)."""

    _torch_class = torch.optim.SGD

    @staticmethod
    def _group_key(group: dict) -> Optional[tuple]:
        if not group["fused"] or group.get("differentiable", False) or torch.is_tensor(group["lr"]):
            return None
        return (float(group["lr"]), float(group["momentum"]), float(group["weight_decay"]), float(group["dampening"]),
                bool(group["nesterov"]), bool(group["maximize"]))

    def _group_plan(self, group: dict) -> Optional[tuple]:
        """(θ, g, momentum buffers) of the group, or None before the buffers exist."""
        out = ([], [], [])
        for p in group["params"]:
            out[0].append(p)
            out[1].append(p.grad)
            if group["momentum"] != 0.0:
                buffer = self.state.get(p, {}).get("momentum_buffer")
                if buffer is None:
                    return None
                out[2].append(buffer)
        return out

    @staticmethod
    def _run(key: tuple, lists: list[list]) -> None:
        lr, momentum, weight_decay, dampening, nesterov, maximize = key
        params, grads, buffers = lists
        torch._fused_sgd_(params, grads, buffers, weight_decay=weight_decay, momentum=momentum, lr=lr,
                          dampening=dampening, nesterov=nesterov, maximize=maximize, is_first_step=False,
                          grad_scale=None, found_inf=None)


LEAN = {"adam": (LeanAdam, torch.optim.Adam), "adamw": (LeanAdamW, torch.optim.AdamW),
        "sgd": (LeanSGD, torch.optim.SGD)}
#: the settings the check runs each class with (every branch of the short path's kernels)
_CHECKS = {"adam": dict(betas=(0.9, 0.99), eps=1e-7, weight_decay=1e-3), "adamw": dict(weight_decay=1e-2),
           "sgd": dict(momentum=0.9, nesterov=True, weight_decay=1e-4)}


def _same_as_torch(kind: str) -> bool:
    """The short path of ``kind`` gives torch's fused optimiser's parameters and state bit for bit
    over 4 steps (two groups of one learning rate and one of another), and torch's public
    per-tensor implementation's parameters to float rounding (which a private kernel that changed
    its meaning would not)."""
    lean_cls, torch_cls = LEAN[kind]
    results = []
    for cls, fused in ((torch_cls, True), (lean_cls, True), (torch_cls, False)):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((5, 3), (5,), (2, 5), (2,))]
        groups = [{"params": params[:2], "lr": 0.01}, {"params": params[2:3], "lr": 0.01},
                  {"params": params[3:], "lr": 0.003}]
        implementation = {"fused": True} if fused else {"foreach": False}
        optimizer = cls(groups, lr=0.01, **implementation, **_CHECKS[kind])
        for _ in range(4):
            optimizer.zero_grad(set_to_none=False)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) if p.grad is None else p.grad.add_(
                    torch.randn(p.shape, generator=g))
            optimizer.step()
        state = optimizer.state_dict()["state"]
        results.append(([p.detach().clone() for p in params],
                        [t for i in sorted(state) for _, t in sorted(state[i].items()) if torch.is_tensor(t)]))
    (params_fused, state_fused), (params_lean, state_lean), (params_public, _) = results
    return (len(state_fused) == len(state_lean) and all(torch.equal(a, b) for a, b in zip(params_fused, params_lean))
            and all(torch.equal(a, b) for a, b in zip(state_fused, state_lean))
            and all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(params_lean, params_public)))


def status() -> dict:
    """Whether :func:`build` returns the short-path optimisers here, or why not (checked once)."""
    if "ok" not in _status:
        try:
            _private_parts()
            failed = [kind for kind in LEAN if not _same_as_torch(kind)]
            if failed:
                _status.update(ok=False, reason=f"the short path did not give torch's result ({', '.join(failed)})")
            else:
                _status.update(ok=True, reason=None)
        except (AttributeError, ImportError, RuntimeError, TypeError) as error:
            _status.update(ok=False, reason=f"a private part of torch is missing or changed: {error}")
    return {"lean": _status["ok"], "reason": _status["reason"]}


def reset() -> None:
    """Check again at the next :func:`status` (e.g. after a test changed torch's names)."""
    _status.clear()
    _parts.clear()


def build(kind: str, groups: list[dict], fused: bool | None = None, **kwargs) -> torch.optim.Optimizer:
    """The optimiser ``kind`` (adam, adamw, sgd) on ``groups``: with ``fused``, the short-path class
    where :func:`status` allows it; otherwise torch's own class in its default implementation
    (the fused kernels are private parts too: where the check failed they are not relied on)."""
    lean_cls, torch_cls = LEAN[kind]
    if fused and status()["lean"]:
        return lean_cls(groups, fused=True, **kwargs)
    return torch_cls(groups, **kwargs)
