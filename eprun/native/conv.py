"""The conv nets' kernels: the max-pooled top-down term Wᵀ ⋆ Pᵀ(s) from the nonzeros of Pᵀ(s)
(``unpool_conv_t.c``), and a 5 × 5 convolution with the 2 × 2 max pooling after it by Winograd's
F(4 × 4, 5 × 5) (``winograd_conv_pool.c``). Both on AVX-512 builds, for the geometries their
sources instantiate; every function returns False, having done nothing, where they do not apply,
and the caller runs torch, the definition."""

from __future__ import annotations

import ctypes

import torch

from eprun.native import build, parallel

_i64, _i32, _f, _v = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
build.declare("eprun_unpool_conv_t", _i32, [_v, _v, _f, _i32, _v, _v, _v, _i64, ctypes.POINTER(_i64),
                                            ctypes.POINTER(_i64), ctypes.POINTER(_i64), _i32])
build.declare("eprun_unpool_conv_t_available", _i32, [_i64] * 6)
build.declare("eprun_winograd_conv_pool", _i32, [_v, _v, _v, _v, _i64, ctypes.POINTER(_i64), _i32])
build.declare("eprun_winograd_conv_pool_available", _i32, [_i64] * 7)


def unpool_conv_t_available(kernel: int, stride: int, padding: int, z_width: int, width: int, channels: int) -> bool:
    """True when :func:`unpool_conv_t` runs compiled for this geometry (stride 1, a kernel /
    padding / widths that ``unpool_conv_t.c`` instantiates, ``channels`` the output channels)."""
    lib = build.library()
    return lib is not None and bool(lib.eprun_unpool_conv_t_available(kernel, stride, padding, z_width, width,
                                                                       channels))


def unpool_conv_t(above: torch.Tensor, indices: torch.Tensor, weight_r: torch.Tensor, z_size: tuple[int, int],
                  size: tuple[int, int], padding: int, out: torch.Tensor, base: torch.Tensor | None = None,
                  alpha: float = 1.0, clamp01: bool = False) -> bool:
    """out = base + α·(Wᵀ ⋆ Pᵀ(above)), then clamped to [0, 1] if ``clamp01``: the transposed
    convolution (stride 1) of the max-pool adjoint,
    ``conv_transpose2d(max_unpool2d(above, indices, …, z_size), W, padding)``, with the rest of a
    layer's update fused in.

    ``above`` [batch, co, hp, wp] float32 and ``indices`` (int64, the argmax of each window,
    row-major in the z_size plane) with any strides; ``weight_r`` = W.permute(2, 0, 3, 1),
    contiguous [k, co, k, ci]; ``out`` and ``base`` (or None: 0) contiguous [batch, h, w, ci]
    float32 (``size`` = (h, w): a channels-last [batch, ci, h, w] tensor permuted), ``out`` written
    whole; ``base`` must not overlap ``out`` (which holds partial sums on the way)."""
    lib = build.library()
    if lib is None:
        return False
    batch, co, hp, wp = above.shape
    k, c_out, _, ci = weight_r.shape
    tensors = (above, weight_r, out) if base is None else (above, weight_r, out, base)
    if (indices.shape != above.shape or c_out != co or out.shape != (batch, *size, ci) or not out.is_contiguous()
            or not weight_r.is_contiguous() or indices.dtype != torch.int64
            or (base is not None and (base.shape != out.shape or not base.is_contiguous()))
            or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)
            or not lib.eprun_unpool_conv_t_available(k, 1, padding, z_size[1], size[1], ci)):
        return False
    shape = (ctypes.c_int64 * 10)(co, hp, wp, z_size[0], z_size[1], ci, size[0], size[1], k, padding)
    code = lib.eprun_unpool_conv_t(out.data_ptr(), None if base is None else base.data_ptr(), float(alpha),
                                   int(clamp01), above.data_ptr(), indices.data_ptr(), weight_r.data_ptr(), batch,
                                   shape, (ctypes.c_int64 * 4)(*above.stride()),
                                   (ctypes.c_int64 * 4)(*indices.stride()), parallel.all_threads(lib))
    if code == -2:
        raise MemoryError("the native transposed convolution could not allocate its scratch")
    return code == 0


def winograd_conv_pool_available(kernel: int, stride: int, pool: int, z_size: tuple[int, int], in_channels: int,
                                 out_channels: int) -> bool:
    """True when :func:`winograd_conv_pool` runs compiled for this geometry (5 × 5 kernel,
    stride 1, 2 × 2 max pooling, z's sides multiples of 4, ``in_channels`` a multiple of 16,
    ``out_channels`` of 64)."""
    lib = build.library()
    return lib is not None and bool(lib.eprun_winograd_conv_pool_available(kernel, stride, pool, *z_size,
                                                                           in_channels, out_channels))


def winograd_conv_pool(s: torch.Tensor, weight_u: torch.Tensor, padding: int, pooled: torch.Tensor,
                       indices: torch.Tensor) -> bool:
    """pooled, indices ← ``F.max_pool2d(F.conv2d(s, W, padding=padding), 2, 2, return_indices=True)``
    by Winograd's F(4 × 4, 5 × 5) with the pooling fused in; values equal to rounding, indices
    those of the max of the values computed.

    ``s`` [batch, ci, h, w] float32 channels-last (``s.permute(0, 2, 3, 1)`` contiguous);
    ``weight_u`` = :func:`eprun.nets.winograd.transform_weights` of W, [64, ci, co];
    ``pooled`` (float32) and ``indices`` (int64) [batch, co, hz/2, wz/2] channels-last, written whole."""
    lib = build.library()
    if lib is None:
        return False
    batch, ci, h, w = s.shape
    co = weight_u.shape[2]
    hz, wz = h + 2 * padding - 4, w + 2 * padding - 4
    rows = (s.permute(0, 2, 3, 1), pooled.permute(0, 2, 3, 1), indices.permute(0, 2, 3, 1))
    if (weight_u.shape != (64, ci, co) or not weight_u.is_contiguous() or not all(r.is_contiguous() for r in rows)
            or pooled.shape != (batch, co, hz // 2, wz // 2) or indices.shape != pooled.shape
            or indices.dtype != torch.int64
            or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (s, weight_u, pooled))
            or not lib.eprun_winograd_conv_pool_available(5, 1, 2, hz, wz, ci, co)):
        return False
    shape = (ctypes.c_int64 * 5)(h, w, ci, co, padding)
    code = lib.eprun_winograd_conv_pool(pooled.data_ptr(), indices.data_ptr(), s.data_ptr(), weight_u.data_ptr(),
                                        batch, shape, parallel.all_threads(lib))
    if code == -2:
        raise MemoryError("the native Winograd convolution could not allocate its scratch")
    return code == 0
