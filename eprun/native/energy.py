"""The energy-based dense net's kernel: its relaxation (``energy_relax.c``), the closed-form step
of :class:`eprun.nets.energy_mlp.EnergyMLP` run for every example of a block together::

    r_i = ρ(s_i),  d_i = ρ'(s_i)/k                                   (all layers first)
    h_i = drive (i = 0) or b_i + W_i r_{i−1},  + W_{i+1}ᵀ r_{i+1} below the output
    s_i ← clamp?((1 − ε) s_i + ε·k·d_i ⊙ h_i  [− εβ s_i + εβ y at the output])

A block of examples stops once a step leaves all its states unchanged bit for bit: every further
step would return the same states, so the result is that of all the steps, to the bit.

:func:`relax_energy` returns False, having done nothing, when the library or the tensors (CPU,
float32, contiguous) do not allow it; the caller then runs torch, the definition.
"""

from __future__ import annotations

import ctypes

import torch

from eprun import stopping
from eprun.native import build, parallel
from eprun.native.dense import ACTIVATION_CODES, C_INT_MAX, MAX_LAYERS, array, cpu_float32, pointers

#: steps per call: between two calls the relaxation checks for a stop request (SIGINT, SIGTERM)
STEPS_PER_CALL = 1000

_p, _i64, _i32, _f, _v = ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
build.declare("eprun_relax_energy", _i32, [
    _i32, ctypes.POINTER(_i64), _p, _v, _p, _p, _v, _f, _f, _f, _i32, _f, _f, _i32, _i32, _i64, _i32])


def relax_energy(state: list[torch.Tensor], drive: torch.Tensor, biases: list[torch.Tensor],
                 weights: list[torch.Tensor], target: torch.Tensor | None, activation: str, scale: float,
                 shift: float, slope: float, eps: float, beta: float, clamp: bool, steps: int) -> bool:
    """Run ``steps`` steps in place on ``state`` ([batch, n_i] per layer, the output last).

    ``drive`` [batch, n_0] is W_0 x̃ + b_1; ``weights[i]`` [n_i, n_{i−1}] and ``biases[i]`` [n_i]
    for i ≥ 1 (entry 0 unused); ``target`` [batch, n_{L−1}] (None: free phase); ρ(s) = g(a·s + c)
    with a = ``scale``, c = ``shift``, g named by ``activation``; ρ'(s) = ``slope``·d(s).
    Returns False, having done nothing, when the kernel cannot run this relaxation."""
    n = len(state)
    if not 1 <= steps <= C_INT_MAX or not 1 <= n <= MAX_LAYERS or activation not in ACTIVATION_CODES:
        return False
    tensors = [*state, drive, *weights[1:], *biases[1:]] + ([target] if target is not None else [])
    if not cpu_float32(*tensors):
        return False
    lib = build.library()
    if lib is None:
        return False
    batch = state[0].shape[0]
    sizes = array(ctypes.c_int64, [s.shape[1] for s in state])
    state_p, bias_p = pointers(state), pointers([None, *biases[1:]])
    weight_p = pointers([None, *weights[1:]])
    threads = parallel.threads_for(lib, batch)
    done = 0
    while done < steps:
        stopping.check()
        chunk = min(STEPS_PER_CALL, steps - done)
        code = lib.eprun_relax_energy(n, sizes, state_p, drive.data_ptr(), bias_p, weight_p,
                                      target.data_ptr() if target is not None else None, float(scale), float(shift),
                                      float(slope), ACTIVATION_CODES[activation], float(eps), float(beta), int(clamp),
                                      chunk, batch, threads)
        if code != 0:
            raise MemoryError("the native relaxation could not allocate its scratch state")
        done += chunk
    return True
