"""Target propagation: L-DRL DTP, DRL, vanilla DTP and TP (Ernoult et al. 2022, arXiv:2201.13415).

On a feed-forward net with feedback layers (``eprun.nets.feedforward``: F_l: h_{l−1} → h_l,
G_l: h_l → h_{l−1}), one mini-batch is:

1. **Feedback training**, layer by layer from the top, K_l iterations each (``feedback_iterations``;
   on the very first batch ``feedback_warmup_iterations`` more, since G starts random), noise
   scale σ_l (``noise``), each G_l with its own optimiser and learning rate (``feedback_lr``).
   The loss decides the method:

   * ``dtp`` — L-DRL, the paper's layer-wise difference reconstruction loss. With h = h_{l−1},
     ε, η ~ N(0, σ_l² I)::

         L(ω_l) = E[ −2 εᵀ (G_l(F_l(h + ε)) − G_l(F_l(h))) + ‖G_l(F_l(h) + η) − G_l(F_l(h))‖² ]

     To first order in σ this is σ²(‖J_G‖²_F − 2 tr(J_G J_F)) = σ²‖J_G − J_Fᵀ‖²_F − const, so it
     drives G_l's Jacobian to F_l's transpose: the targets below then carry BP's gradient.
   * ``drl`` — the difference reconstruction loss of Meulemans et al. 2020: perturb h_{l−1},
     run the forward layers to the output, propagate back with the difference-corrected
     targets through G_N … G_l (trained: G_l only), compare with the perturbed h_{l−1}::

         L(ω_l) = E ‖ t_{l−1}(F_N ∘ … ∘ F_l(h + ε)) − (h + ε) ‖²

   * ``vanilla_dtp`` and ``tp`` — the reconstruction loss of Lee et al. 2015::

         L(ω_l) = E ‖ G_l(F_l(h + ε)) − (h + ε) ‖²

2. **Targets**, from the loss gradient at the output (ℓ: one example's cross-entropy)::

       t_N = h_N − β ∂ℓ/∂h_N
       t_{l−1} = h_{l−1} + G_l(t_l) − G_l(h_l)          difference correction (dtp, drl, vanilla_dtp)
       t_{l−1} = G_l(t_l)                                plain target propagation (tp)

3. **Forward update**: each F_l, its input detached (no gradient crosses layers), minimises::

       L_l = (1/β) · mean over the batch of ½‖F_l(h_{l−1}) − t_l‖²

   The 1/β makes the update directly comparable to BP's: for the output layer
   ∂L_N/∂θ_N is exactly the gradient of the mean loss, and for the others it tends to it as
   β → 0 when J_{G_l} = J_{F_l}ᵀ. The gradients go into ``.grad``; the recipe's optimiser
   (forward weights only) applies them.

:meth:`DTP.alignment` measures, on a batch, the angle and relative distance between each
layer's DTP update and BP's gradient, the angle between G_l's Jacobian and F_l's transpose
(on a random direction), and the last feedback loss of each layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

import torch
import torch.nn.functional as F

from eprun.nets.parameters import per_layer
from eprun import stopping
from eprun.limits import MAX_STEPS, each_within, magnitude, within
from eprun.rules.base import Rule, RuleConfig



@dataclass
class DTPConfig(RuleConfig):
    """``rule:`` section for ``kind: dtp`` (L-DRL); the defaults are the paper's CIFAR-10 β and momentum."""

    kind: str = "dtp"
    beta: float = 0.7
    noise: Union[float, list[float]] = 0.4  # σ_l, one per feedback layer G_2 … G_N
    feedback_iterations: Union[int, list[int]] = 20  # K_l per batch
    feedback_warmup_iterations: int = 0  # extra feedback iterations on the first batch, before any forward update
    feedback_samples: int = 1  # noise draws averaged per iteration
    feedback_optimizer: Literal["sgd", "adam"] = "sgd"
    feedback_lr: Union[float, list[float]] = 1e-3
    feedback_momentum: float = 0.9
    feedback_weight_decay: float = 0.0

    def check(self):
        if self.beta <= 0.0:
            yield "beta", f"the output target is h_N − β ∂ℓ/∂h_N and updates divide by β: must be > 0, got {self.beta}"
        for sigma in self.noise if isinstance(self.noise, list) else [self.noise]:
            if sigma <= 0.0:
                yield "noise", f"noise scales must be > 0, got {sigma}"
        yield from each_within("feedback_iterations", self.feedback_iterations, 0, MAX_STEPS)
        for name, values in (("beta", self.beta), ("noise", self.noise), ("feedback_lr", self.feedback_lr),
                             ("feedback_weight_decay", self.feedback_weight_decay)):
            yield from magnitude(name, values)
        lrs = self.feedback_lr if isinstance(self.feedback_lr, list) else [self.feedback_lr]
        for lr in lrs:
            if lr < 0.0:
                yield "feedback_lr", f"must be ≥ 0, got {lr}"
        yield from within("feedback_warmup_iterations", self.feedback_warmup_iterations, 0, MAX_STEPS)
        yield from within("feedback_samples", self.feedback_samples, 1, MAX_STEPS)
        if not 0.0 <= self.feedback_momentum < 1.0:
            yield "feedback_momentum", f"must be in [0, 1), got {self.feedback_momentum}"
        if self.feedback_weight_decay < 0.0:
            yield "feedback_weight_decay", f"must be ≥ 0, got {self.feedback_weight_decay}"

    def check_model(self, model, n_layers: int):
        """Cross-checks against the network: a feedback path, and one entry per feedback layer."""
        from eprun.nets import NETWORKS
        from eprun.nets.feedforward import FeedforwardNet

        feedback_nets = [kind for kind, net in NETWORKS.items() if issubclass(net, FeedforwardNet)]
        if model.kind not in feedback_nets:
            yield "kind", (f"{self.kind} needs a feed-forward net with feedback layers "
                           f"(model.kind: {' or '.join(feedback_nets)}), got model.kind: {model.kind}")
            return
        for name, value in (("noise", self.noise), ("feedback_iterations", self.feedback_iterations),
                            ("feedback_lr", self.feedback_lr)):
            if isinstance(value, list) and len(value) != n_layers - 1:
                yield name, (f"a list needs one entry per feedback layer G_2 … G_N ({n_layers - 1} for a net "
                             f"of {n_layers} weight layers), got {len(value)}")


@dataclass
class DRLConfig(DTPConfig):
    """``rule:`` section for ``kind: drl``."""

    kind: str = "drl"


@dataclass
class VanillaDTPConfig(DTPConfig):
    """``rule:`` section for ``kind: vanilla_dtp``."""

    kind: str = "vanilla_dtp"


@dataclass
class TPConfig(DTPConfig):
    """``rule:`` section for ``kind: tp``."""

    kind: str = "tp"


def _sq_norm(v: torch.Tensor) -> torch.Tensor:
    """‖v‖² per example."""
    return v.flatten(1).pow(2).sum(dim=1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀb per example."""
    return (a.flatten(1) * b.flatten(1)).sum(dim=1)


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """∠(a, b) in degrees, tensors flattened; 90° if either is zero."""
    a, b = a.flatten().double(), b.flatten().double()
    denom = a.norm() * b.norm()
    if float(denom) == 0.0:
        return 90.0
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / denom)))))


class DTP(Rule):
    """L-DRL target propagation (``kind: dtp``); the subclasses change the feedback loss or the targets."""

    Config = DTPConfig
    needs_dynamics = False  # runs on feed-forward nets
    measures_alignment = True
    difference_targets = True  # t_{l−1} = h_{l−1} + G_l(t_l) − G_l(h_l); False: t_{l−1} = G_l(t_l)

    def __init__(self, cfg: DTPConfig, net, generator: torch.Generator):
        super().__init__(cfg, net, generator)
        n_feedback = net.depth - 1
        self.noise = per_layer(cfg.noise, n_feedback)  # index l−2 for G_l
        self.iterations = [int(k) for k in per_layer(cfg.feedback_iterations, n_feedback)]
        lrs = per_layer(cfg.feedback_lr, n_feedback)
        self.feedback_optimizers = [self._optimizer(group, lr) for group, lr in zip(net.feedback_groups(), lrs)]
        device = net.layers[0].weight.device
        # the noise ε, η is drawn on the net's device, from a generator seeded by the rule's own
        self.noise_generator = torch.Generator(device=device)
        self.noise_generator.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=generator)))
        self.last_feedback_loss: dict[int, torch.Tensor] = {}
        self.world = None  # set by distribute() in a data-parallel run
        self.warmed_up = cfg.feedback_warmup_iterations == 0

    def _optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        """One optimiser per feedback layer, so stepping G_l never moves another layer (momentum)."""
        cfg = self.cfg
        if cfg.feedback_optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=cfg.feedback_weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=cfg.feedback_momentum, weight_decay=cfg.feedback_weight_decay)

    def distribute(self, world) -> None:
        """Each feedback layer's optimiser combines the ranks' gradients; noise is drawn for the
        whole batch and this rank keeps its rows (:meth:`_randn_like`)."""
        from eprun.distributed import ReducedOptimizer

        self.world = world
        self.feedback_optimizers = [ReducedOptimizer(opt, world) for opt in self.feedback_optimizers]

    def _randn_like(self, t: torch.Tensor, sigma: float) -> torch.Tensor:
        if self.world is not None and self.world.rows is not None:  # the batch's draw, this rank's rows
            full = torch.randn((self.world.batch, *t.shape[1:]), generator=self.noise_generator, device=t.device,
                               dtype=t.dtype)
            return full[self.world.rows] * sigma
        return torch.randn(t.shape, generator=self.noise_generator, device=t.device, dtype=t.dtype) * sigma

    # ------------------------------------------------------------------ feedback losses

    def feedback_loss(self, l: int, hs: list[torch.Tensor], indices: list) -> torch.Tensor:
        """L-DRL for G_l (batch mean), ε, η ~ N(0, σ_l²)::

            −2 εᵀ (G_l(F_l(h_{l−1} + ε)) − G_l(h_l)) + ‖G_l(h_l + η) − G_l(h_l)‖²

        Both terms see G_l only through differences, each one application of its linear part
        (:meth:`~eprun.nets.feedforward.FeedforwardNet.feedback_difference`): V_l is applied twice
        a noise draw, where G_l on each of the three inputs would apply it three times, and c_l
        gets no gradient."""
        net, sigma = self.net, self.noise[l - 2]
        h_below, h, idx = hs[l - 1], hs[l], indices[l - 1]
        eps = self._randn_like(h_below, sigma)
        with torch.no_grad():
            h_noisy, idx_noisy = net.forward_layer(l, h_below + eps)
        dr = net.feedback_difference(l, h_noisy, idx_noisy, h, idx)  # G_l(F_l(h_{l−1} + ε)) − G_l(h_l)
        eta = self._randn_like(h, sigma)
        dr_eta = net.feedback_difference(l, h + eta, idx, h, idx)  # G_l(h_l + η) − G_l(h_l)
        return (-2.0 * _dot(eps, dr) + _sq_norm(dr_eta)).mean()

    def _feedback_step(self, l: int, hs: list[torch.Tensor], indices: list) -> torch.Tensor:
        samples = self.cfg.feedback_samples
        loss = sum(self.feedback_loss(l, hs, indices) for _ in range(samples)) / samples
        optimizer = self.feedback_optimizers[l - 2]
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        for p in self.net.feedback_groups()[l - 2]:
            if p.grad is None:  # c_l under L-DRL and DRL: a zero gradient, so momentum and decay still apply
                p.grad = torch.zeros_like(p)
        optimizer.step()
        return loss.detach()

    # ------------------------------------------------------------------ targets and the forward update

    def output_target(self, h_out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """t_N = h_N − β ∂ℓ/∂h_N, with ∂ℓ/∂h_N = softmax(h_N) − onehot(y) for the cross-entropy."""
        grad = torch.softmax(h_out, dim=1) - F.one_hot(y, h_out.shape[1]).to(h_out.dtype)
        return h_out - self.cfg.beta * grad

    @torch.no_grad()
    def targets(self, hs: list[torch.Tensor], indices: list, y: torch.Tensor) -> list:
        """[None, t_1 … t_N] (index l for t_l), propagated down from t_N through the feedback layers."""
        net, n = self.net, self.net.depth
        t = [None] * (n + 1)
        t[n] = self.output_target(hs[n], y)
        for l in range(n, 1, -1):
            if self.difference_targets:  # h_{l−1} + G_l(t_l) − G_l(h_l)
                t[l - 1] = hs[l - 1] + net.feedback_difference(l, t[l], indices[l - 1], hs[l], indices[l - 1])
            else:
                t[l - 1] = net.feedback(l, t[l], indices[l - 1])
        return t

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Train the feedback layers, then write the forward layers' DTP update into ``.grad``
        (assumed zeroed); return the logits and per-example loss of this batch's forward pass."""
        net, beta = self.net, self.cfg.beta
        with torch.no_grad():
            hs, indices = net.forward_all(x)
        warmup = 0 if self.warmed_up else self.cfg.feedback_warmup_iterations
        with torch.enable_grad():
            for l in range(net.depth, 1, -1):
                for _ in range(warmup + self.iterations[l - 2]):
                    stopping.check()
                    self.last_feedback_loss[l] = self._feedback_step(l, hs, indices)
        self.warmed_up = True
        t = self.targets(hs, indices, y)
        with torch.enable_grad():
            total = 0.0
            for l in range(1, net.depth + 1):
                out, _ = net.forward_layer(l, hs[l - 1])  # input detached: no gradient crosses layers
                total = total + 0.5 * _sq_norm(out - t[l]).mean() / beta  # L_l
            total.backward()
        logits = hs[-1]
        return logits, F.cross_entropy(logits, y, reduction="none")

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net.forward_all(x)[0][-1]
        return logits, F.cross_entropy(logits, y, reduction="none")

    # ------------------------------------------------------------------ alignment with BP

    def alignment(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, float]:
        """On this batch, with the DTP update in ``.grad`` (before the optimiser step):

        * ``update_angle_deg/layer{l}``, ``update_distance/layer{l}``: ∠(Δθ_l^DTP, ∇θ_l ℓ^BP) and
          ‖Δθ_l^DTP − ∇θ_l ℓ^BP‖ / ‖∇θ_l ℓ^BP‖, (W_l, b_l) together; ``update_angle_deg/mean`` over
          l = 1 … N−1 (the output layer's update is BP's by construction);
        * ``jacobian_angle_deg/layer{l}``: ∠(J_{G_l}(h_l) u, J_{F_l}(h_{l−1})ᵀ u), u ~ N(0, I) drawn
          from ``seed`` (not from the training noise);
        * ``feedback_loss/layer{l}``: the last feedback loss of G_l.
        """
        net = self.net
        groups = net.layer_groups()
        with torch.enable_grad():
            loss = net.loss(net.feedforward(x), y).mean()
            bp = torch.autograd.grad(loss, [p for g in groups for p in g])
        out: dict[str, float] = {}
        angles = []
        k = 0
        for l, group in enumerate(groups, start=1):
            dtp = torch.cat([p.grad.flatten() for p in group])
            ref = torch.cat([g.flatten() for g in bp[k:k + len(group)]])
            k += len(group)
            angle = angle_degrees(dtp, ref)
            out[f"update_angle_deg/layer{l}"] = angle
            out[f"update_distance/layer{l}"] = float((dtp - ref).norm() / ref.norm().clamp_min(1e-30))
            if l < net.depth:
                angles.append(angle)
        out["update_angle_deg/mean"] = sum(angles) / len(angles) if angles else 0.0
        out.update(self.jacobian_angles(x, seed))
        for l, value in sorted(self.last_feedback_loss.items()):
            out[f"feedback_loss/layer{l}"] = float(value)
        return out

    def jacobian_angles(self, x: torch.Tensor, seed: int) -> dict[str, float]:
        """∠(J_{G_l} u, J_{F_l}ᵀ u) per feedback layer, at this batch's forward pass."""
        net = self.net
        with torch.no_grad():
            hs, indices = net.forward_all(x)
        g = torch.Generator(device=x.device).manual_seed(seed)
        out = {}
        for l in range(2, net.depth + 1):
            u = torch.randn(hs[l].shape, generator=g, device=x.device, dtype=hs[l].dtype)
            with torch.enable_grad():
                h_below = hs[l - 1].detach().requires_grad_()
                (jf_t_u,) = torch.autograd.grad(net.forward_layer(l, h_below)[0], h_below, u)  # J_Fᵀ u
                h = hs[l].detach().requires_grad_()
                r = net.feedback(l, h, indices[l - 1])
                w = torch.zeros_like(r, requires_grad=True)
                (jg_t_w,) = torch.autograd.grad(r, h, w, create_graph=True)  # J_Gᵀ w, linear in w
                (jg_u,) = torch.autograd.grad(jg_t_w, w, u)  # ∂⟨J_Gᵀ w, u⟩/∂w = J_G u
            out[f"jacobian_angle_deg/layer{l}"] = angle_degrees(jg_u, jf_t_u)
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "noise_generator": self.noise_generator.get_state(),
                "feedback_optimizers": [opt.state_dict() for opt in self.feedback_optimizers],
                "warmed_up": self.warmed_up}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.noise_generator.set_state(state["noise_generator"])
        for opt, s in zip(self.feedback_optimizers, state["feedback_optimizers"]):
            opt.load_state_dict(s)
        self.warmed_up = bool(state["warmed_up"])


class DRL(DTP):
    """``kind: drl``: difference targets, feedback trained with Meulemans et al.'s DRL."""

    Config = DRLConfig

    def feedback_loss(self, l: int, hs: list[torch.Tensor], indices: list) -> torch.Tensor:
        """‖t_{l−1} − (h_{l−1} + ε)‖² (batch mean), t propagated from F_N ∘ … ∘ F_l(h_{l−1} + ε)
        down through G_N … G_l with difference correction; only G_l receives the gradient."""
        net, sigma = self.net, self.noise[l - 2]
        noisy_below = hs[l - 1] + self._randn_like(hs[l - 1], sigma)
        with torch.no_grad():
            h = noisy_below
            for k in range(l, net.depth + 1):
                h, _ = net.forward_layer(k, h)
            t = h  # the perturbed output is its own target
            for k in range(net.depth, l, -1):
                t = hs[k - 1] + net.feedback_difference(k, t, indices[k - 1], hs[k], indices[k - 1])
        t_below = hs[l - 1] + net.feedback_difference(l, t, indices[l - 1], hs[l], indices[l - 1])
        return _sq_norm(t_below - noisy_below).mean()


class VanillaDTP(DTP):
    """``kind: vanilla_dtp``: difference targets, feedback trained to invert F_l (Lee et al. 2015)."""

    Config = VanillaDTPConfig

    def feedback_loss(self, l: int, hs: list[torch.Tensor], indices: list) -> torch.Tensor:
        """‖G_l(F_l(h_{l−1} + ε)) − (h_{l−1} + ε)‖² (batch mean)."""
        net = self.net
        noisy_below = hs[l - 1] + self._randn_like(hs[l - 1], self.noise[l - 2])
        with torch.no_grad():
            h_noisy, idx_noisy = net.forward_layer(l, noisy_below)
        return _sq_norm(net.feedback(l, h_noisy, idx_noisy) - noisy_below).mean()


class TP(VanillaDTP):
    """``kind: tp``: plain target propagation, t_{l−1} = G_l(t_l), feedback as vanilla DTP."""

    Config = TPConfig
    difference_targets = False
