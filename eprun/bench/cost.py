"""The arithmetic of a step, counted from the shapes: multiply-adds of eprun's training step and
evaluation per batch, for the benchmark's GFLOP/s (FLOP = 2 × multiply-adds).

Terms, from :meth:`~eprun.nets.base.Network.weight_products`: P_j, the multiply-adds of
applying weight layer j once to a batch of B (dense: B·n_j·n_{j+1}; conv: B·C_{j+1}·C_j·k_j²·H'_j·W'_j
with H'_j × W'_j the convolution's output before pooling), and the energy-based net's lateral
products B·n_i². Elementwise work (σ, pooling, the nudge, the optimiser) is not counted, nor the
softmax read-out's products.
"""

from __future__ import annotations

from typing import Optional

#: the rules whose steps are counted here
COUNTED_RULES = ("ep", "cep", "bptt")


def eval_macs(net, rule_cfg, batch: int) -> Optional[int]:
    """Multiply-adds of the free phase (``rule.evaluate``) on one batch::

        P_0 + T · S,      S = Σ_{j≥1} 2·P_j + Σ_i B·n_i²

    the input drive (weight 0, once per batch), then per step every weight above the first
    twice — bottom-up (a product or a convolution) and top-down (the transposed one) — plus the
    laterals. None where no count is written (the net or the rule)."""
    cost = net.weight_products(batch) if rule_cfg.kind in COUNTED_RULES else None
    if cost is None:
        return None
    p, lat = cost.products, cost.laterals
    return p[0] + rule_cfg.relaxation().T * (2 * sum(p[1:]) + sum(lat))


def train_macs(net, rule_cfg, batch: int, follows_input_drive: bool = False) -> Optional[int]:
    """Multiply-adds of the training step on one batch::

        EP     P_0 + (T + K·m)·S + U            m = 2 for the symmetric estimator, else 1
        C-EP   P_0 + T·S + K·(P_0 + S + U)      the drive is rebuilt at every nudged step
               2·P_0 + T·S + K·(S + U − P_0)    ``follows_input_drive`` (rules/cep.py): the drive
                                                and W_0's update once; its B×B products not counted
        BPTT   2·P_0 + T·(6·Σ_{j≥1} P_j + 3·Σ_i B·n_i²)

    U, the ∂Φ/∂θ difference: dense W_0 one product (the input is shared), P_0; every other dense
    weight two, 2·P_j; laterals 2·B·n². Conv: W_0 the first convolution again (for the argmax)
    and its weight gradient, 2·P_0; a conv weight above, a convolution at each state (argmaxes)
    and one weight gradient over the stacked 2B batch, 4·P_j. BPTT (``net.step`` under
    autograd): the input drive once forward and once backward (its weight gradient); per step the
    forward's two products per weight above the first and the backward's two per product.

    E.g. 784-512-10, EP one-sided, T=30, K=10, B=50: B·[2·n_0·n_1 + 2·(T + K + 1)·n_1·n_2] multiply-adds.
    """
    cost = net.weight_products(batch) if rule_cfg.kind in COUNTED_RULES else None
    if cost is None:
        return None
    p, is_conv, lat = cost.products, cost.is_conv, cost.laterals
    relaxation = rule_cfg.relaxation()
    T, K = relaxation.T, relaxation.K
    step = 2 * sum(p[1:]) + sum(lat)
    if rule_cfg.kind == "bptt":
        return 2 * p[0] + T * (6 * sum(p[1:]) + 3 * sum(lat))
    update = (2 if is_conv[0] else 1) * p[0] + sum((4 if c else 2) * pj for pj, c in zip(p[1:], is_conv[1:]))
    update += 2 * sum(lat)
    if rule_cfg.kind == "cep":
        if follows_input_drive:
            return 2 * p[0] + T * step + K * (step + update - p[0])
        return p[0] + T * step + K * (p[0] + step + update)
    phases = 2 if relaxation.estimator in ("symmetric", "centered") else 1
    return p[0] + (T + K * phases) * step + update


def flop(count, net, rule_cfg, batch: int, **options) -> Optional[int]:
    """2 × ``count(net, rule_cfg, batch, **options)``, or None where no count is written."""
    macs = count(net, rule_cfg, batch, **options)
    return None if macs is None else 2 * macs
