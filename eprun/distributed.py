"""Data-parallel training with torch.distributed: one run over several processes.

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
variables), every process — a *rank* — builds the same experiment from the same recipe and seed,
so the weights, the shuffling, the augmentation and every rule's draws are the same on every
rank. Each global mini-batch (``data.batch_size`` examples) is cut into one contiguous shard per
rank (:func:`shard`); each rank computes its rule's update on its shard (a mean over the shard's
examples) and the updates are combined before every optimiser step (:class:`ReducedOptimizer`)::

    g = Σ_r (n_r / n) · g_r          n_r: the examples of rank r's shard, n = Σ_r n_r

which is the update of the whole batch — EP's ∂Φ/∂θ difference, BPTT's and BP's gradients and
target propagation's losses are all batch means — up to the rounding of the summation. Scores are
summed over ranks the same way, so every rank holds the same metrics; rank 0 alone writes the run
directory. NCCL is used for CUDA devices, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from eprun.errors import EprunError


@dataclass
class World:
    """This process's place among the ranks of one run; the default is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    #: of the batch in progress (set by the runner before each training step): this rank's rows,
    #: the batch's size n, and n_r / n
    rows: slice | None = None
    batch: int = 0
    batch_weight: float = 1.0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory and prints."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """A member of a process group (launched by torchrun, even as its only rank)."""
        return self.backend is not None

    def describe(self) -> dict:
        """What env.json records."""
        return {"world_size": self.size, "distributed_backend": self.backend}


SINGLE = World()


def launched() -> bool:
    """True inside a launch by torchrun (which sets ``RANK`` and ``WORLD_SIZE``), even of one
    process: ``torchrun --nproc_per_node=1`` runs every collective, on one rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join(device_type: str) -> World:
    """Join the process group torchrun set up (NCCL for CUDA, gloo otherwise); :data:`SINGLE`
    outside torchrun."""
    if not launched():
        return SINGLE
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend)
        except (RuntimeError, ValueError) as error:
            raise EprunError(f"torch.distributed: could not join the process group ({backend}): "
                             f"{str(error).splitlines()[0]}") from None
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=backend)


def leave(world: World) -> None:
    if world.parallel and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, world: World) -> slice:
    """Rank ``world.rank``'s rows of a batch of ``n``: contiguous, sizes differing by at most one."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (1 if world.rank < extra else 0))


def all_sum_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place. NCCL reduces CUDA tensors only: a CPU tensor (the
    per-batch scores) makes the trip through this rank's GPU."""
    if not world.parallel:
        return tensor
    if world.backend == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        return tensor.copy_(on_gpu)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_text(text: str | None, world: World) -> str | None:
    """Rank 0's ``text`` on every rank."""
    if not world.parallel:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.parallel:
        dist.barrier()


class ReducedOptimizer:
    """An optimiser whose ``step`` first replaces every gradient by the batch's combined one,
    g ← Σ_r w_r g_r with w_r = ``world.batch_weight`` of rank r; everything else is the wrapped
    optimiser's. Rules that step an optimiser of their own (C-EP during its nudged phase, target
    propagation's feedback layers) are given one too, so the ranks' weights never part."""

    def __init__(self, optimizer: torch.optim.Optimizer, world: World):
        self.optimizer = optimizer
        self.world = world

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads]).mul_(self.world.batch_weight)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
