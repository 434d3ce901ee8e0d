"""A learnable synthetic dataset for tests and ``--fast-dev-run``: no files needed.

Each class c has a prototype image p_c ~ U[0, 1]^shape. A sample of class c is
x = clip(p_c + σ·ε, 0, 1) with ε ~ N(0, I) and σ = ``noise``. Prototypes are far apart
(‖p_c − p_c'‖ ≈ √(d/6) ≈ 11 for d = 784) compared with the noise along any direction (σ),
so even a linear read-out separates the classes after a few steps.

Everything is drawn from one ``torch.Generator`` seeded with ``seed``, in a fixed order
(prototypes, training set, test set), so the same arguments give the same tensors and the
training set does not depend on ``n_test``.
"""

from __future__ import annotations

import torch

DEFAULT_NOISE = 0.3


def make_synthetic(
    n_train: int,
    n_test: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    noise: float = DEFAULT_NOISE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (x_train, y_train, x_test, y_test): float32 in [0, 1] and int64 labels.

    Labels are balanced (class i mod num_classes, shuffled), so every class appears once
    n ≥ num_classes.
    """
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((num_classes, *input_shape), generator=generator)
    x_train, y_train = _draw(prototypes, n_train, noise, generator)
    x_test, y_test = _draw(prototypes, n_test, noise, generator)
    return x_train, y_train, x_test, y_test


def _draw(
    prototypes: torch.Tensor, n: int, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples x = clip(p_y + noise·ε, 0, 1) with balanced, shuffled labels y."""
    num_classes = prototypes.shape[0]
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=generator)]
    eps = torch.randn((n, *prototypes.shape[1:]), generator=generator)
    images = (prototypes[labels] + noise * eps).clamp_(0.0, 1.0)
    return images, labels.long()
