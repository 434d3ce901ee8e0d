"""The fused Triton relaxation (eprun/triton_kernels/dense.py) against the torch path, on the CPU
through Triton's interpreter (``TRITON_INTERPRET=1``): the same steps within float32 rounding, for
the prototypical and the vector-field MLP, free and nudged, every activation it knows; and the
cases it leaves to torch."""

import importlib

import pytest
import torch

pytest.importorskip("triton")

from eprun.assemble import build_network  # noqa: E402
from eprun.recipe import from_plain  # noqa: E402


@pytest.fixture
def interpreted(monkeypatch):
    """The kernels through Triton's CPU interpreter (the decorator reads TRITON_INTERPRET when the
    module is imported, so it is imported afresh), asked for with EPRUN_TRITON=1, the compiled
    CPU kernel off so that the torch path is the one compared with."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("EPRUN_TRITON", "1")
    monkeypatch.setenv("EPRUN_NATIVE", "0")
    from eprun import native
    from eprun.triton_kernels import dense

    native.reset()  # the setting is read once per process
    importlib.reload(dense)
    yield dense
    monkeypatch.delenv("TRITON_INTERPRET")
    importlib.reload(dense)
    native.reset()


def net_of(kind: str, activation: str, hidden: int = 40):
    model = {"kind": kind, "hidden": [hidden], "activation": activation}
    if kind == "vf_mlp":
        model["initial_angle"] = 30.0
    recipe = from_plain({"name": "t", "seed": 3, "device": "cpu", "data": {"dataset": "mnist", "batch_size": 20},
                         "model": model, "rule": {"kind": "ep", "T": 8, "K": 4, "beta": 0.3},
                         "optim": {"kind": "sgd", "lr": 0.05}})
    return build_network(recipe, (1, 28, 28), 10, torch.device("cpu"))


def phases(net, x, y):
    """s* after 8 free steps from 0, then s^β after 4 nudged steps, and the engine of the last."""
    drive = net.input_drive(x)
    free = net.relax(drive, net.init_state(x.shape[0], like=x), 8)
    nudged = net.relax(drive, [s.clone() for s in free], 4, 0.3, net.target(y, x))
    return [s.clone() for s in free], [s.clone() for s in nudged], net.last_relax_engine


@pytest.mark.parametrize("kind, activation", [("mlp", "sigmoid"), ("mlp", "hard_sigmoid"), ("mlp", "tanh"),
                                              ("vf_mlp", "sigmoid")])
def test_the_fused_phases_are_the_torch_phases(interpreted, monkeypatch, kind, activation):
    net = net_of(kind, activation)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(37, 1, 28, 28, generator=g), torch.randint(0, 10, (37,), generator=g)  # 37: a partial block
    fused = phases(net, x, y)
    monkeypatch.setenv("EPRUN_TRITON", "0")
    plain = phases(net, x, y)
    assert fused[2] == "triton" and plain[2] == "torch"
    for a, b in zip(fused[0] + fused[1], plain[0] + plain[1]):
        assert float((a - b).abs().max()) < 1e-5


def test_what_the_kernel_leaves_to_torch(interpreted):
    s = [torch.zeros(4, 8), torch.zeros(4, 10)]
    assert interpreted.applies(s, "sigmoid", "sync", 0.0, True)
    assert not interpreted.applies(s + [torch.zeros(4, 3)], "sigmoid", "sync", 0.0, True)  # two hidden layers
    assert not interpreted.applies(s, "sigmoid", "async", 0.0, True)
    assert not interpreted.applies(s, "sigmoid", "sync", 1e-3, True)
    assert not interpreted.applies(s, "sigmoid", "sync", 0.0, False)  # the softmax read-out's nudge
    assert not interpreted.applies([t.double() for t in s], "sigmoid", "sync", 0.0, True)
    assert not interpreted.applies([torch.zeros(4, 2048), s[1]], "sigmoid", "sync", 0.0, True)


def test_off_unless_asked_for(monkeypatch):
    from eprun import native

    monkeypatch.setenv("EPRUN_NATIVE", "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("EPRUN_TRITON", raising=False)
    native.reset()
    net = net_of("mlp", "sigmoid")
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    assert phases(net, x, y)[2] == "torch"
    native.reset()
