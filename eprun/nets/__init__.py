"""Networks, keyed by the recipe's ``model.kind``.

A network knows its state shapes, one step of its dynamics given (x, state, β, y), Φ and
∂Φ/∂θ in closed form, and its read-out. It knows nothing of optimisers, files or the CLI.
Adding a network is one file plus one line here.
"""

from eprun.nets.conv import ConvNet
from eprun.nets.energy_mlp import EnergyMLP
from eprun.nets.feedforward import FeedforwardConvNet, FeedforwardMLP
from eprun.nets.mlp import PrototypicalMLP
from eprun.nets.vf_conv import VectorFieldConvNet
from eprun.nets.vf_mlp import VectorFieldMLP

NETWORKS = {
    "mlp": PrototypicalMLP,
    "energy_mlp": EnergyMLP,
    "conv": ConvNet,
    "vf_mlp": VectorFieldMLP,
    "vf_conv": VectorFieldConvNet,
    "ff_mlp": FeedforwardMLP,
    "ff_conv": FeedforwardConvNet,
}


def network_configs() -> dict[str, type]:
    """``{kind: ConfigClass}`` for the recipe validator."""
    return {kind: cls.Config for kind, cls in NETWORKS.items()}
