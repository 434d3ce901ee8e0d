"""The faster engines behind a conv net's relaxation, prepared once per call of ``relax``.

:meth:`~eprun.nets.conv.ConvNet.relax` computes, per step, for each conv layer n ≥ 1 the pooled
convolution v_n, i_n = P_n(W_n ⋆ s^n) and the top-down term W_nᵀ ⋆ P_nᵀ(s^{n+1}; i_n). This
module computes both through the compiled kernels of :mod:`eprun.native.conv` where they apply,
and through the net's own torch code (the definition) everywhere else:

* the top-down term of a max-pooled layer from the nonzeros of P_nᵀ(s^{n+1}), one in p² of the
  unpooled map, instead of ``max_unpool2d`` and a dense ``conv_transpose2d``; for s¹ also adding
  the drive and applying σ (hard sigmoids) in the same pass. Its output is channels-last, so the
  state layers that receive it relax in channels-last scratch copies (the given state is updated
  in place at the end), and so does the convolution that reads them;
* a 5 × 5 convolution with stride 1 and the 2 × 2 max pooling after it by Winograd's
  F(4 × 4, 5 × 5) (:mod:`eprun.nets.winograd`), the pooling fused in.

Large CPU maps are pooled through a channels-last copy (:func:`eprun.nets.pooling.max_pool_with_indices`).

Under ``train.precision: bf16`` the compiled kernels (float32) step aside and both operations
take bfloat16 operands (:class:`~eprun.nets.relax_products.RelaxProducts`): the pooled
convolution is pooled as it comes out (max pooling picks among the rounded values) and brought to
float32; the top-down term is routed and transposed-convolved in bfloat16 and added to the
float32 state.
"""

from __future__ import annotations

import torch

from eprun.native import conv as native_conv
from eprun.nets import winograd
from eprun.nets.relax_products import RelaxProducts

CLAMPED_ACTIVATIONS = ("hard_sigmoid", "hard_sigmoid_half")  # g = clamp to [0, 1]: the compiled kernel applies it
class ConvKernels:
    """For one relaxation of ``net`` on ``state``: which layers take which compiled kernel, their
    prepared weights and buffers, and the three operations of a step with their torch fallbacks.

    ``down_weights[n]`` is the weight that carries s^{n+1} down into s^n (W_n, or a vector-field
    net's B_n). ``products``: the run's precision (float32 unless bf16)."""

    def __init__(self, net, state: list[torch.Tensor], down_weights: list[torch.Tensor],
                 products: RelaxProducts | None = None):
        self.net = net
        self.products = products or RelaxProducts()
        exact = self.products.exact
        self.top_down_kernels = self._top_down_kernels(state, down_weights) if exact else {}
        #: state layers that receive a compiled top-down term: they relax channels-last
        self.channels_last = {n - 1 for n in self.top_down_kernels}
        self.winograd_kernels = self._winograd_kernels(state) if exact else {}
        #: conv layer n ≥ 1: (W_n, its down weight) as the products take them (rounded copies in bf16)
        self.rounded = {} if exact else {n: (self.products.weight(net.weights[n]), self.products.weight(down_weights[n]))
                                         for n in range(1, net.n_conv)}

    # ------------------------------------------------------------------ set-up

    def _top_down_kernels(self, state: list[torch.Tensor], down_weights: list[torch.Tensor]) -> dict:
        """{n: (the weight permuted to [k, co, k, ci], the output buffer [batch, h, w, ci])} for the
        conv layers n ≥ 1 whose top-down term the compiled kernel computes (max pooling, stride 1,
        CPU float32, a geometry it instantiates)."""
        net = self.net
        found = {}
        batch = state[0].shape[0]
        for n in range(1, net.n_conv):
            below, weight = state[n - 1], down_weights[n]
            if (net.pools[n] != "max" or net.strides[n] != 1 or below.device.type != "cpu"
                    or below.dtype != torch.float32 or weight.dtype != torch.float32):
                continue
            ci, h, w = below.shape[1:]
            if not native_conv.unpool_conv_t_available(weight.shape[2], 1, net.paddings[n], net.conv_hw[n][1], w, ci):
                continue
            key = ("top-down", n, batch)
            if key not in net._scratch:
                net._scratch[key] = below.new_empty(batch, h, w, ci)
            found[n] = (weight.detach().permute(2, 0, 3, 1).contiguous(), net._scratch[key])
        return found

    def _winograd_kernels(self, state: list[torch.Tensor]) -> dict:
        """{n: (U_n = W_n transformed, the pooled values' and indices' buffers [batch, co, h/2, w/2],
        channels-last)} for the conv layers n ≥ 1 whose P_n(W_n ⋆ s^n) the compiled Winograd kernel
        computes (5 × 5, stride 1, 2 × 2 max pooling, s^n channels-last).

        U_n is kept with a copy of the W_n it came from and recomputed when W_n differs from that
        copy: a comparison costs far less than the transform, which the per-example early stop
        would otherwise pay at every check. The parameter's version counter cannot tell: the fused
        optimisers change parameters without bumping it."""
        net = self.net
        found = {}
        batch = state[0].shape[0]
        for n in range(1, net.n_conv):
            weight = net.weights[n]
            if (n - 1 not in self.channels_last or net.pools[n] != "max" or net.pool_size != 2 or net.strides[n] != 1
                    or weight.dtype != torch.float32
                    or not native_conv.winograd_conv_pool_available(weight.shape[-1], 1, 2, net.conv_hw[n],
                                                                    weight.shape[1], weight.shape[0])):
                continue
            key = ("winograd-out", n, batch)
            if key not in net._scratch:
                shape = (batch, weight.shape[0], net.conv_hw[n][0] // 2, net.conv_hw[n][1] // 2)
                net._scratch[key] = tuple(torch.empty(shape, dtype=dtype, device=weight.device,
                                                      memory_format=torch.channels_last)
                                          for dtype in (weight.dtype, torch.int64))
            kept = net._scratch.get(("winograd-weights", n))
            if kept is None or kept[0].shape != weight.shape or not torch.equal(kept[0], weight):
                kept = net._scratch[("winograd-weights", n)] = (weight.detach().clone(),
                                                                winograd.transform_weights(weight))
            found[n] = (kept[1], *net._scratch[key])
        return found

    def state_buffers(self, state: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(current, next) state buffers of the relaxation: channels-last scratch copies for the
        layers in :attr:`channels_last`, ``state`` itself and the net's scratch set for the others."""
        net = self.net
        cur, nxt = list(state), list(net.scratch_states(state))
        for i in self.channels_last:
            key = ("channels-last", i, state[i].shape[0])
            if key not in net._scratch:
                net._scratch[key] = [torch.empty_like(state[i], memory_format=torch.channels_last) for _ in range(2)]
            cur[i], nxt[i] = net._scratch[key]
            cur[i].copy_(state[i])
        return cur, nxt

    # ------------------------------------------------------------------ the operations of a step

    def convolve(self, n: int, below: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """v_n, i_n = P_n(W_n ⋆ s^n), bias-free, s^n = ``below``. Where the compiled top-down kernel
        takes i_n, both stay in the pooling's own layout (channels-last on the CPU)."""
        if n in self.winograd_kernels:
            weight_u, out, out_indices = self.winograd_kernels[n]
            if native_conv.winograd_conv_pool(below, weight_u, self.net.paddings[n], out, out_indices):
                return out, out_indices
        net = self.net
        if n in self.rounded:
            z = self.products.conv2d(below, self.rounded[n][0], net.strides[n], net.paddings[n])
            pooled, indices = net._pool(n, z)
            return self.products.to_float(pooled, below), indices
        return net._pool(n, net._conv(n, below, bias=False), keep_channels_last=n in self.top_down_kernels)

    def top_down(self, n: int, above: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        """W_nᵀ ⋆ P_nᵀ(s^{n+1}; i_n) into s^n (the net's down weight)."""
        if n in self.top_down_kernels:
            weight_r, buffer = self.top_down_kernels[n]
            if native_conv.unpool_conv_t(above, indices, weight_r, self.net.conv_hw[n], buffer.shape[1:3],
                                         self.net.paddings[n], buffer):
                return buffer.permute(0, 3, 1, 2)
        net = self.net
        if n in self.rounded:
            routed = net._unpool(n, self.products.operand(above), indices)
            return self.products.conv_transpose2d(routed, self.rounded[n][1], net.strides[n], net.paddings[n],
                                                  net.output_paddings[n])
        return net._conv_t_down(n, net._unpool(n, above, indices))

    def first_layer_fused(self, drive: torch.Tensor, above: torch.Tensor, indices: torch.Tensor | None,
                          out: torch.Tensor) -> bool:
        """s¹ ← g(drive + a·W_1ᵀ ⋆ P_1ᵀ(s²; i_1)) in one compiled pass (σ's clamp included for the
        hard sigmoids); False, having done nothing, where it does not apply."""
        if 1 not in self.top_down_kernels:
            return False
        act = self.net.act
        clamps = act.name in CLAMPED_ACTIVATIONS
        weight_r, buffer = self.top_down_kernels[1]
        done = native_conv.unpool_conv_t(above, indices, weight_r, self.net.conv_hw[1], buffer.shape[1:3],
                                         self.net.paddings[1], out.permute(0, 2, 3, 1), drive.permute(0, 2, 3, 1),
                                         act.scale, clamps)
        if done and not clamps:
            act.apply_to_affine_(out)
        return done

    @property
    def engine(self) -> str:
        return "torch+native" if self.top_down_kernels else "torch"
