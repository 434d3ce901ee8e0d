"""Every step of a phase of a two-layer dense chain (one hidden layer) in one Triton launch.

For a block of BM examples, with the states held on chip for the whole phase::

    z¹ = c¹ + a·(s² D)          D = top_down[0]           (O × H; W_1 for the prototypical MLP)
    z² = c² + a·(s¹ Uᵀ) + ν s²  U = bottom_up[1]ᵀ         (O × H; W_1, or B_1's twin for VF nets)
    s¹, s² ← g(z¹), g(z²)       both from s_t: the papers' synchronous schedule

with c¹ the input drive a·(W_0 x + b_1) + c, c² = a·b_2 + c (+ a·β·y nudged) and ν = −a·β the
MSE nudge's state term (0 in the free phase): the steps of :func:`eprun.nets.dense_relax.relax_dense_`
for two layers, ``order: sync``, no ``tol``. Padding: H and O are padded to powers of two
(O to at least 16, the smallest side of a ``tl.dot``); padded weight entries are zero, so padded
state lanes never reach a real unit. Products in IEEE float32 unless ``train.precision: tf32``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eprun import stopping

#: g of :mod:`eprun.nets.activations` by name, as the kernel's compile-time code
ACTIVATION_CODES = {"sigmoid": 0, "hard_sigmoid": 1, "hard_sigmoid_half": 1, "tanh": 2}
BLOCK_ROWS = 16  # examples per program
MAX_UNITS = 1024  # widest layer held on chip (H padded)
NUM_WARPS = 8  # a block's 16 × H states spread over 256 threads


@triton.jit
def _relax_two_layers(c1_ptr, c2_ptr, s1_ptr, s2_ptr, d_ptr, u_ptr, B, H, O, steps, a, nu,
                      BM: tl.constexpr, HP: tl.constexpr, OP: tl.constexpr, ACT: tl.constexpr,
                      PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    h = tl.arange(0, HP)
    o = tl.arange(0, OP)
    in_rows = rows < B
    m1 = in_rows[:, None] & (h < H)[None, :]
    m2 = in_rows[:, None] & (o < O)[None, :]
    mw = (o < O)[:, None] & (h < H)[None, :]
    s1 = tl.load(s1_ptr + rows[:, None] * H + h[None, :], mask=m1, other=0.0)
    s2 = tl.load(s2_ptr + rows[:, None] * O + o[None, :], mask=m2, other=0.0)
    for _ in range(steps):
        # constants and couplings re-read each step (from L1/L2: every program reads the same
        # D and U), so that only the states stay live in registers across steps
        c1 = tl.load(c1_ptr + rows[:, None] * H + h[None, :], mask=m1, other=0.0)
        c2 = tl.load(c2_ptr + rows[:, None] * O + o[None, :], mask=m2, other=0.0)
        d = tl.load(d_ptr + o[:, None] * H + h[None, :], mask=mw, other=0.0)  # OP × HP
        u = tl.load(u_ptr + o[:, None] * H + h[None, :], mask=mw, other=0.0)  # OP × HP
        z1 = c1 + a * tl.dot(s2, d, input_precision=PRECISION)  # a·(s² D)
        z2 = c2 + a * tl.dot(s1, tl.trans(u), input_precision=PRECISION) + nu * s2  # a·(s¹ Uᵀ) + ν s²
        if ACT == 0:  # logistic
            s1 = 1.0 / (1.0 + tl.exp(-z1))
            s2 = 1.0 / (1.0 + tl.exp(-z2))
        elif ACT == 1:  # clamp to [0, 1]
            s1 = tl.minimum(tl.maximum(z1, 0.0), 1.0)
            s2 = tl.minimum(tl.maximum(z2, 0.0), 1.0)
        else:  # tanh z = 2·logistic(2z) − 1
            s1 = 2.0 / (1.0 + tl.exp(-2.0 * z1)) - 1.0
            s2 = 2.0 / (1.0 + tl.exp(-2.0 * z2)) - 1.0
    tl.store(s1_ptr + rows[:, None] * H + h[None, :], s1, mask=m1)
    tl.store(s2_ptr + rows[:, None] * O + o[None, :], s2, mask=m2)


def applies(state: list[torch.Tensor], activation: str, order: str, tol: float, nudge_is_mse: bool) -> bool:
    """Whether :func:`relax_two_layers_` runs these steps: two float32 layers of batch-first rows
    (H ≤ :data:`MAX_UNITS`), an activation it knows, the synchronous schedule without ``tol``,
    and the MSE nudge or none."""
    return (len(state) == 2 and all(s.dtype == torch.float32 and s.dim() == 2 and s.is_contiguous() for s in state)
            and state[0].shape[1] <= MAX_UNITS and activation in ACTIVATION_CODES and order == "sync"
            and tol == 0.0 and nudge_is_mse)


def relax_two_layers_(const: list[torch.Tensor], state: list[torch.Tensor], top_down: torch.Tensor,
                      bottom_up: torch.Tensor, steps: int, a: float, nu: float, activation: str,
                      tf32: bool = False) -> None:
    """``steps`` steps in place on ``state`` = [s¹ (B × H), s²  (B × O)] (module docstring);
    ``top_down`` = D (O × H), ``bottom_up`` = the layer's bottom-up matrix (H × O, i.e. Uᵀ)."""
    s1, s2 = state
    B, H = s1.shape
    O = s2.shape[1]
    c1 = const[0].expand(B, H).contiguous()
    c2 = const[1].expand(B, O).contiguous()
    d = top_down.contiguous()
    u = bottom_up.T.contiguous()
    stopping.check()
    hp = triton.next_power_of_2(H)
    op = max(16, triton.next_power_of_2(O))
    _relax_two_layers[(triton.cdiv(B, BLOCK_ROWS),)](
        c1, c2, s1, s2, d, u, B, H, O, steps, a, nu, BM=BLOCK_ROWS, HP=hp, OP=op,
        ACT=ACTIVATION_CODES[activation], PRECISION="tf32" if tf32 else "ieee", num_warps=NUM_WARPS)
