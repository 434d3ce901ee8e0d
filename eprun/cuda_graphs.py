"""Whole training and evaluation steps replayed as CUDA graphs (``train.cuda_graphs``).

At the papers' batch sizes one relaxation step of a dense net is a handful of small kernels,
and a training step is T + K such steps, the update and the optimiser's kernels: the GPU waits
on the host launching them one by one. A CUDA graph records the kernels of one whole step once
and replays them with a single launch.

What one training graph holds, in order::

    .grad ← 0;  rule.train_step(x, y)  (free phase, nudged phase(s), −Δθ into .grad, C-EP's steps)
    loss_sum ← Σ_b ℓ_b;  correct ← Σ_b [argmax logits_b = y_b]          the batch's scores
    unseen_non_finite ← unseen_non_finite ∨ ¬finite(Σ ℓ, Σ .grad, Σ θ)   the divergence probe
    optimizer.step()                                                    (unless the rule steps it)

An evaluation graph holds ``rule.evaluate(x, y)`` and the scores.

Why a replay is the same step as an eager call:

* Inputs: each graph reads its batch from its own static ``x``, ``y`` buffers, copied in before
  the replay; its outputs are static tensors the replay overwrites.
* Host-side draws are made before the step, outside the graph (:meth:`Rule.prepare_batch`: EP's
  ``random-sign`` draws the sign of β from the rule's seeded generator, as it does eagerly), and
  what they select is part of the graph's key: one graph for +β, one for −β. The sequence of
  draws, and so the run, is the eager run's.
* Values the host passes to kernels as arguments when the step is recorded — the learning rates
  and the other hyperparameters of every optimiser group — are part of the key too: when a
  schedule changes a learning rate, the graphs are recorded anew.
* The first :data:`EAGER_STEPS` batches of each key run eagerly on a side stream (they are
  training steps, the same maths): they build the optimiser's state and let cuBLAS, cuDNN and
  autograd initialise lazily outside a capture, as CUDA graphs require.
* Adam and AdamW are built ``capturable`` (their step count lives on the device); SGD has no
  step count.
* Divergence: the eager loop reads the probe every batch, a host synchronisation per batch that
  would stall the replays. Here the flag accumulates on the device and the runner reads it
  before anything is logged or checkpointed, so no checkpoint ever holds a diverged state.

Where capture does not apply, :func:`plan` says why and the step runs eagerly, the reason
recorded in ``env.json``/``summary.json`` and in ``eprun bench``'s output: not a CUDA device,
a rule whose step reads values on the host (``tol`` > 0 ends a phase on a check read by the
host; target propagation), or data-parallel ranks (the all-reduce between the update and the
optimiser step). With ``auto`` a capture that fails falls back the same way, the error as the
reason; with ``on`` both are errors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Hashable, Literal, Optional, Protocol, Sequence

import torch

Mode = Literal["auto", "on", "off"]
MODES = ("auto", "on", "off")

#: eager steps of each new key (batch shape, draw, hyperparameters) before it is captured
EAGER_STEPS = 3


@dataclass(frozen=True)
class GraphPlan:
    """Whether training and evaluation steps are replayed as CUDA graphs, and why not."""

    mode: str
    active: bool
    reason: Optional[str] = None  # why not (None when active)

    def record(self) -> dict:
        """For ``env.json``, ``summary.json`` and the benchmark's output."""
        return {"mode": self.mode, "active": self.active, "reason": self.reason}


def obstacle(device: torch.device, rule, parallel: bool) -> Optional[str]:
    """Why a training step of ``rule`` on ``device`` cannot be captured; None if it can."""
    if device.type != "cuda":
        return f"the device is {device.type}: CUDA graphs exist on CUDA devices only"
    if parallel:
        return "data-parallel ranks all-reduce their updates between the update and the optimiser step"
    return rule.capture_obstacle()


def plan(mode: str, device: torch.device, rule, parallel: bool = False) -> GraphPlan:
    """``train.cuda_graphs`` resolved for this run: ``off`` never, ``auto`` where nothing stands
    in the way, ``on`` likewise but an obstacle is an error (raised by the caller, which knows the
    recipe's file)."""
    if mode not in MODES:
        raise ValueError(f"cuda_graphs must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return GraphPlan(mode, False, "train.cuda_graphs: off")
    why = obstacle(device, rule, parallel)
    return GraphPlan(mode, why is None, why)


class CaptureFailed(RuntimeError):
    """Recording a step as a CUDA graph raised; the message says what (``auto`` falls back)."""


class Recording(Protocol):
    """A recorded step: ``replay()`` runs it again on the same static tensors; ``reset()`` frees it."""

    def replay(self) -> None: ...

    def reset(self) -> None: ...


class Recorder(Protocol):
    """How steps are run eagerly before capture, and recorded."""

    def eager(self, body: Callable, inputs: Sequence[torch.Tensor]): ...

    def record(self, body: Callable, inputs: Sequence[torch.Tensor]) -> tuple[Recording, object]: ...


class CudaRecorder:
    """Eager steps on a side stream (CUDA graphs need the lazy initialisations of cuBLAS, cuDNN and
    autograd to happen outside a capture, on a stream other than the default), and
    ``torch.cuda.graph`` capture: the kernels are recorded, not run."""

    def __init__(self):
        self._side: Optional[torch.cuda.Stream] = None

    def eager(self, body: Callable, inputs: Sequence[torch.Tensor]):
        current = torch.cuda.current_stream()
        if self._side is None:
            self._side = torch.cuda.Stream()
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            outputs = body(*inputs)
        current.wait_stream(self._side)
        return outputs

    def record(self, body: Callable, inputs: Sequence[torch.Tensor]) -> tuple[Recording, object]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = body(*inputs)
        return graph, outputs


#: the recorder every :class:`GraphCache` uses (the tests put an emulation on the CPU in its place)
RECORDER: Recorder = CudaRecorder()


class _Entry:
    """One key's static inputs, eager-step count, recording and static outputs."""

    def __init__(self, inputs: Sequence[torch.Tensor]):
        self.inputs = [t.detach().clone() for t in inputs]
        self.eager_steps = 0
        self.recording: Optional[Recording] = None
        self.outputs = None


class GraphCache:
    """Replays ``body(*static_inputs)`` as one CUDA graph per key.

    ``run(key, inputs)`` copies ``inputs`` into the key's static buffers; the first
    ``eager_steps`` calls of a key run ``body`` eagerly, the next records it and replays it, and
    every later call replays it. ``body`` must launch device work only: no host read of a device
    value, and no host-side state it changes per call other than what the key names. Its
    outputs are the key's static tensors, overwritten by the next replay.
    """

    def __init__(self, body: Callable, eager_steps: int = EAGER_STEPS):
        self.body = body
        self.eager_steps = eager_steps
        self.entries: dict[Hashable, _Entry] = {}
        self.captures = 0  # steps recorded so far (read by the tests and the benchmark)

    def clear(self) -> None:
        """Forget every recording (their memory returns to the allocator)."""
        for entry in self.entries.values():
            if entry.recording is not None:
                entry.recording.reset()
        self.entries.clear()

    def run(self, key: Hashable, inputs: Sequence[torch.Tensor]):
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Entry(inputs)
        else:
            for static, value in zip(entry.inputs, inputs):
                static.copy_(value)
        if entry.recording is not None:
            entry.recording.replay()
            return entry.outputs
        if entry.eager_steps < self.eager_steps:
            entry.eager_steps += 1
            return RECORDER.eager(self.body, entry.inputs)
        try:
            recording, outputs = RECORDER.record(self.body, entry.inputs)
        except Exception as exc:  # an operation that cannot be recorded: nothing ran, the state is unchanged
            del self.entries[key]
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise CaptureFailed(f"{type(exc).__name__}: {first_line}") from exc
        entry.recording, entry.outputs = recording, outputs
        self.captures += 1
        recording.replay()
        return outputs


def hyperparameters(optimizer: torch.optim.Optimizer) -> tuple:
    """What the host passes to the optimiser's kernels, group by group (learning rates, betas,
    momentum, weight decay…): part of every training graph's key."""
    def frozen(value):
        if isinstance(value, (list, tuple)):
            return tuple(frozen(v) for v in value)
        if isinstance(value, (bool, int, float, str, type(None))):
            return value
        return repr(value)

    return tuple(tuple(sorted((k, frozen(v)) for k, v in group.items() if k != "params"))
                 for group in optimizer.param_groups)


class CapturedTraining:
    """The training step of :mod:`eprun.runner.loop` as CUDA graphs: ``step(x, y, draw)`` runs one
    batch (zeroed ``.grad``, the rule's step, the scores, the divergence probe, the optimiser
    step) and returns the device scalars (loss sum, number correct)."""

    def __init__(self, net, rule, optimizer: torch.optim.Optimizer, device: torch.device,
                 eager_steps: int = EAGER_STEPS):
        self.net, self.rule, self.optimizer, self.device = net, rule, optimizer, device
        self.unseen_non_finite = torch.zeros((), dtype=torch.bool, device=device)
        self.checked_step = 0  # the runner's step at its last read of the flag
        self.train = GraphCache(self._train_body, eager_steps)
        self.eval = GraphCache(self._eval_body, eager_steps)
        self._hyper: Optional[tuple] = None

    def _train_body(self, x: torch.Tensor, y: torch.Tensor):
        self.optimizer.zero_grad(set_to_none=False)
        logits, loss = self.rule.train_step(x, y)
        params = list(self.net.parameters())
        sums = [loss.sum()] + [p.grad.sum() for p in params if p.grad is not None] + [p.sum() for p in params]
        self.unseen_non_finite.logical_or_(~torch.isfinite(torch.stack(sums)).all())
        scores = _scores(logits, loss, y)
        if not self.rule.steps_optimizer:
            self.optimizer.step()
        return scores

    def _eval_body(self, x: torch.Tensor, y: torch.Tensor):
        logits, loss = self.rule.evaluate(x, y)
        return _scores(logits, loss, y)

    def step(self, x: torch.Tensor, y: torch.Tensor, draw: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        hyper = hyperparameters(self.optimizer)
        if hyper != self._hyper:  # a schedule moved a learning rate: record the step anew
            self.train.clear()
            self._hyper = hyper
        with _on(self.device):
            return self.train.run((tuple(x.shape), draw), (x, y))

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _on(self.device):
            return self.eval.run(tuple(x.shape), (x, y))

    def take_non_finite(self) -> bool:
        """Whether a NaN/Inf appeared since the last call (one host read), then reset."""
        seen = bool(self.unseen_non_finite)
        self.unseen_non_finite.zero_()
        return seen


def _on(device: torch.device):
    """The device's context (streams and captures are per device; ``cuda:1`` is not the current
    device unless made so); nothing on other devices."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _scores(logits: torch.Tensor, loss: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_b ℓ_b in float64, Σ_b [argmax logits_b = y_b] as an integer), on the device."""
    return loss.sum().double(), (logits.argmax(dim=1) == y).sum()
