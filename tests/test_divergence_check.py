"""The per-batch NaN/Inf check of the training loop (eprun.runner.divergence.first_non_finite)."""

from types import SimpleNamespace

import torch

from eprun.runner.divergence import first_non_finite


def _experiment():
    net = torch.nn.Linear(4, 3)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    return SimpleNamespace(net=net)


def test_all_finite_is_none():
    exp = _experiment()
    assert first_non_finite(exp, torch.ones(5)) is None


def test_names_where_the_nan_or_inf_is():
    exp = _experiment()
    assert first_non_finite(exp, torch.tensor([1.0, float("nan")])) == "the loss (the network's states)"
    exp.net.weight.grad[1, 2] = float("inf")
    assert first_non_finite(exp, torch.ones(5)) == "the update of weight"
    exp.net.weight.grad.zero_()
    with torch.no_grad():
        exp.net.bias[0] = float("-inf")
    assert first_non_finite(exp, torch.ones(5)) == "the parameter bias"


def test_nan_and_inf_that_cancel_in_a_sum_are_still_found():
    exp = _experiment()
    exp.net.weight.grad[0, 0], exp.net.weight.grad[0, 1] = float("inf"), float("-inf")  # sum: NaN
    assert first_non_finite(exp, torch.ones(5)) == "the update of weight"


def test_finite_values_whose_sum_overflows_are_not_a_divergence():
    exp = _experiment()
    with torch.no_grad():
        exp.net.weight.fill_(3e38)  # every value finite, the sum is +Inf
    assert not torch.isfinite(exp.net.weight.sum())
    assert first_non_finite(exp, torch.ones(5)) is None
