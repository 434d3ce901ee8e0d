"""The short-path optimisers give torch's fused optimisers' results bit for bit."""

import pytest
import torch

from eprun.lean_optimizers import LeanAdam, LeanAdamW, LeanSGD

CASES = [
    (LeanAdam, torch.optim.Adam, dict(betas=(0.9, 0.99), eps=1e-7)),
    (LeanAdam, torch.optim.Adam, dict(amsgrad=True, weight_decay=1e-3)),
    (LeanAdam, torch.optim.Adam, dict(maximize=True)),
    (LeanAdamW, torch.optim.AdamW, dict(weight_decay=1e-2)),
    (LeanSGD, torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-4)),
    (LeanSGD, torch.optim.SGD, dict(momentum=0.5, dampening=0.1)),
    (LeanSGD, torch.optim.SGD, dict(momentum=0.0)),
]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (7,), (3, 7), (3,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _groups(params, lrs):
    return [{"params": params[0:2], "lr": lrs[0]}, {"params": params[2:4], "lr": lrs[1]}]


def _set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(torch.randn(p.shape, generator=g))


def _run(cls, kwargs, steps=6, lrs=(1e-2, 1e-2), scheduler=False, between=None):
    params = _params()
    opt = cls(_groups(params, list(lrs)), lr=lrs[0], fused=True, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        _set_grads(params, step)
        opt.step()
        if sched is not None:
            sched.step()
        if between is not None:
            between(step, opt, params)
    return params, opt


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _same_state(a, b):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    return sa.keys() == sb.keys() and all(
        sa[k].keys() == sb[k].keys() and all(torch.equal(sa[k][n], sb[k][n]) for n in sa[k]) for k in sa)


@pytest.mark.parametrize("lean, plain, kwargs", CASES)
@pytest.mark.parametrize("lrs, scheduler", [((1e-2, 1e-2), False), ((1e-2, 3e-3), True)])
def test_same_parameters_and_state_as_torch(lean, plain, kwargs, lrs, scheduler):
    ours, opt_ours = _run(lean, kwargs, lrs=lrs, scheduler=scheduler)
    theirs, opt_theirs = _run(plain, kwargs, lrs=lrs, scheduler=scheduler)
    assert opt_ours._lean is not None  # the short path did run
    assert _same(ours, theirs)
    assert _same_state(opt_ours, opt_theirs)


def test_short_path_is_taken_after_the_first_step_and_merges_equal_groups():
    params = _params()
    opt = LeanAdam(_groups(params, [1e-2, 1e-2]), lr=1e-2, fused=True)
    _set_grads(params, 0)
    opt.step()
    assert opt._lean is None  # the first step builds the state through torch's step
    opt.step()
    keys, pairs, calls = opt._lean
    assert len(calls) == 1 and len(calls[0][1][0]) == 4  # one kernel call for both groups
    opt.param_groups[1]["lr"] = 5e-3
    opt.step()
    assert len(opt._lean[2]) == 2  # different learning rates: two calls


def test_hooks_and_closures_go_through_torch():
    calls = []
    params, opt = _run(LeanAdam, {}, steps=3)
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.step()
    assert calls == ["pre", "post"]
    assert opt.step(closure=lambda: torch.tensor(1.5)) == 1.5


def test_replaced_gradient_and_state_dict_round_trip():
    def replace_grad(step, opt, params):
        if step == 2:
            params[0].grad = torch.zeros_like(params[0])  # a new tensor: the kept lists are stale
        if step == 3:
            opt.load_state_dict(opt.state_dict())

    ours, opt_ours = _run(LeanAdam, {}, between=replace_grad)
    theirs, _ = _run(torch.optim.Adam, {}, between=replace_grad)
    assert _same(ours, theirs)


def test_zero_grad_short_path_and_set_to_none():
    params, opt = _run(LeanSGD, dict(momentum=0.9), steps=3)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    _set_grads(params, 0)
    opt.step()  # new grads: torch's step, then the short path again
    _set_grads(params, 1)
    opt.step()
    assert opt._lean is not None


def test_build_optimizer_gives_the_lean_classes():
    from eprun.optim import build_optimizer
    from eprun.recipe import OptimConfig

    params = _params()
    groups = [params[0:2], params[2:4]]
    assert isinstance(build_optimizer(OptimConfig(kind="adam", lr=[1e-3, 1e-3]), groups), LeanAdam)
    assert isinstance(build_optimizer(OptimConfig(kind="adamw", lr=[1e-3, 1e-3]), groups), torch.optim.AdamW)
    assert isinstance(build_optimizer(OptimConfig(kind="sgd", lr=[1e-3, 1e-3]), groups), LeanSGD)


# ----------------------------------------------------------------------------- the guard around torch's private parts

from eprun import lean_optimizers  # noqa: E402
from eprun.optim import build_optimizer  # noqa: E402
from eprun.recipe import OptimConfig  # noqa: E402


@pytest.fixture
def fresh_check():
    lean_optimizers.reset()
    yield
    lean_optimizers.reset()


def _train_with(optimizer, params, steps=4):
    for step in range(steps):
        optimizer.zero_grad(set_to_none=False)
        _set_grads(params, step)
        optimizer.step()
    return params


def test_the_short_path_is_used_where_its_check_passes(fresh_check):
    assert lean_optimizers.status() == {"lean": True, "reason": None}
    params = _params()
    assert isinstance(build_optimizer(OptimConfig(kind="adam", lr=[1e-2, 1e-2]), [params[:2], params[2:]]),
                      LeanAdam)


@pytest.mark.parametrize("missing", ["_fused_adam_", "_fused_sgd_", "_foreach_zero_"])
def test_a_missing_private_kernel_falls_back_to_torchs_optimiser(missing, fresh_check, monkeypatch):
    """A torch without one of the private kernels: the check says so and build_optimizer returns
    torch's own optimiser, which trains as torch's does."""
    monkeypatch.delattr(torch, missing)
    state = lean_optimizers.status()
    assert state["lean"] is False and missing in state["reason"]
    for kind, torch_cls in (("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)):
        params = _params()
        opt = build_optimizer(OptimConfig(kind=kind, lr=[1e-2, 3e-3], momentum=0.0), [params[:2], params[2:]])
        assert type(opt) is torch_cls
        reference = _params()
        _train_with(torch_cls(_groups(reference, [1e-2, 3e-3]), lr=1e-2), reference)
        assert _same(_train_with(opt, params), reference)


def test_a_private_kernel_that_behaves_differently_falls_back(fresh_check, monkeypatch):
    """A private kernel that exists but computes something else (a changed signature or meaning in
    a later torch): the check's comparison with torch's own step catches it."""
    original = torch._fused_adam_

    def changed(params, *args, lr, **kwargs):
        return original(params, *args, lr=lr * 2, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", changed)
    state = lean_optimizers.status()
    assert state["lean"] is False and "adam" in state["reason"]
    params = _params()
    assert type(build_optimizer(OptimConfig(kind="adam", lr=1e-2), [params])) is torch.optim.Adam


def test_missing_hook_registries_fall_back(fresh_check, monkeypatch):
    import torch.optim.optimizer as optimizer_module

    monkeypatch.delattr(optimizer_module, "_global_optimizer_pre_hooks")
    assert lean_optimizers.status()["lean"] is False
