"""Parameter helpers every network uses: per-layer values, the initialisation draw, and the
``.grad`` that updates accumulate into."""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn


def per_layer(value: Union[float, list[float]], n: int) -> list[float]:
    """A per-layer list from a scalar (repeated) or a list (as is)."""
    return list(value) if isinstance(value, list) else [float(value)] * n


def uniform_parameter(shape, fan_in: int, scale: float, generator: torch.Generator) -> nn.Parameter:
    """torch's Linear / Conv2d default, U(−1/√fan_in, 1/√fan_in), times ``scale``, from ``generator``."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * bound * scale)


def parameters_in(plist: nn.ParameterList) -> list[nn.Parameter]:
    """A ParameterList's parameters in order, as a plain list (cheaper to index on the hot path
    than the ParameterList itself)."""
    return list(plist.parameters(recurse=False))


def grad_of(p: nn.Parameter) -> torch.Tensor:
    """``p.grad``, created as zeros if missing (updates are accumulated into it in place)."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad
