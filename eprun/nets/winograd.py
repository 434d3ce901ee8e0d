"""Winograd's minimal filtering F(4 × 4, 5 × 5) for the conv nets' relaxation (Lavin & Gray 2016).

A valid correlation of a length-8 input d with a length-5 filter w, y_i = Σ_k d_{i+k} w_k for
i < 4, is the transpose of a polynomial product (deg 3 × deg 4 → deg 7) computed by evaluation
at 8 points and interpolation (Cook–Toom). With E_n the α × n evaluation matrix of the points
p_0 … p_6 and ∞ (row [1, p, p², …, p^{n−1}], and [0, …, 0, 1] for ∞) and L = E_8⁻¹::

    y = Aᵀ [(G w) ⊙ (Bᵀ d)],     Aᵀ = E_4ᵀ (4 × 8),   G = E_5 (8 × 5),   Bᵀ = Lᵀ (8 × 8)

and in two dimensions, for an 8 × 8 input tile and a 5 × 5 kernel, a 4 × 4 output tile::

    Y = Aᵀ [(G W Gᵀ) ⊙ (Bᵀ D B)] A

The points 0, ±1, ±2, ±½ keep the float32 error at a few times a direct convolution's
(:func:`reference_conv`, ``tests/test_winograd.py``). The compiled kernel
(``eprun/native/winograd_conv_pool.c``) runs the transforms, the sum over input channels as 64
matrix products and the 2 × 2 max pooling, with Bᵀ and Aᵀ written out there as constants (so
that its unrolled transforms skip the zeros; the tests compare its output with torch's
convolution, which any disagreement with this module's matrices would fail). This module builds
the matrices and the transformed weights U[ξν, ci, co] = (G W[co, ci] Gᵀ)[ξ, ν] in float64.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import torch

TILE = 4  # m: output tile side
KERNEL = 5  # r
ALPHA = TILE + KERNEL - 1  # 8: the transformed tile's side
POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2))


def _evaluation(n: int) -> list[list[Fraction]]:
    """E_n: row i evaluates a polynomial of degree n − 1 (coefficients, lowest first) at p_i;
    the last row, ∞, takes its leading coefficient."""
    return [[p ** j for j in range(n)] for p in POINTS] + [[Fraction(0)] * (n - 1) + [Fraction(1)]]


def _inverse(matrix: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact inverse by Gauss–Jordan elimination over the rationals."""
    n = len(matrix)
    rows = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        lead = rows[col][col]
        rows[col] = [v / lead for v in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [v - factor * w for v, w in zip(rows[r], rows[col])]
    return [row[n:] for row in rows]


@lru_cache(maxsize=None)
def matrices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Aᵀ [4, 8], G [8, 5], Bᵀ [8, 8]) in float64, exact up to the final rounding."""
    def tensor(rows):
        return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)

    e_out = _evaluation(TILE)
    a_t = [[e_out[i][j] for i in range(ALPHA)] for j in range(TILE)]  # E_4ᵀ
    inverse = _inverse(_evaluation(ALPHA))
    b_t = [[inverse[i][j] for i in range(ALPHA)] for j in range(ALPHA)]  # Lᵀ
    return tensor(a_t), tensor(_evaluation(KERNEL)), tensor(b_t)


def transform_weights(weight: torch.Tensor) -> torch.Tensor:
    """U[ξ·8 + ν, ci, co] = (G W[co, ci] Gᵀ)[ξ, ν], computed in float64, returned contiguous in
    ``weight``'s dtype: [64, ci, co]."""
    _, g, _ = matrices()
    g = g.to(weight.device)
    u = torch.einsum("xk,ockl,yl->xyco", g, weight.detach().double(), g)
    return u.reshape(ALPHA * ALPHA, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def reference_conv(s: torch.Tensor, weight: torch.Tensor, padding: int = 0) -> torch.Tensor:
    """W ⋆ s (stride 1, bias-free) by the same algorithm in torch, tile by tile: the readable
    form of what the compiled kernel computes. s [batch, ci, h, w]; the output's sides must be
    multiples of 4."""
    a_t, _, b_t = (m.to(s.device, s.dtype) for m in matrices())
    u = transform_weights(weight).reshape(ALPHA, ALPHA, weight.shape[1], weight.shape[0]).to(s.dtype)
    s = torch.nn.functional.pad(s, (padding,) * 4)
    batch, _, h, w = s.shape
    ty, tx = (h - KERNEL + 1) // TILE, (w - KERNEL + 1) // TILE
    tiles = s.unfold(2, ALPHA, TILE).unfold(3, ALPHA, TILE)  # [batch, ci, ty, tx, 8, 8]
    v = torch.einsum("xk,bcijkl,yl->xybijc", b_t, tiles, b_t)  # Bᵀ D B
    m = torch.einsum("xybijc,xyco->xybijo", v, u)  # Σ_ci U ⊙ V
    y = torch.einsum("px,xybijo,qy->boipjq", a_t, m, a_t)  # Aᵀ M A
    return y.reshape(batch, weight.shape[0], ty * TILE, tx * TILE)
