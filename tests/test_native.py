"""The compiled dense relaxation (eprun.native) against the torch path of the same nets."""

from __future__ import annotations

import copy
import shutil

from pathlib import Path

import pytest
import torch

from eprun import native
from eprun.native import build, parallel
from eprun.nets.mlp import MLPConfig, PrototypicalMLP
from eprun.nets.vf_mlp import VFMLPConfig, VectorFieldMLP

pytestmark = pytest.mark.native  # also run on the forced AVX2 build in CI (.ci/run)

needs_compiler = pytest.mark.skipif(build.compiler() is None, reason="no C compiler on this machine")
needs_kernels = pytest.mark.skipif(build.compiler() is None or not set(build.VECTOR_FLAGS) <= build.cpu_flags(),
                                   reason="the compiled kernels need a C compiler and AVX2/FMA")


@pytest.fixture(autouse=True)
def fresh_native_state():
    """Every test starts and ends with EPRUN_NATIVE and the build result read afresh."""
    native.reset()
    yield
    native.reset()


@pytest.fixture
def torch_only(monkeypatch):
    """Run the block with the torch path (EPRUN_NATIVE=0)."""
    def use(flag: bool):
        monkeypatch.setenv("EPRUN_NATIVE", "0" if flag else "auto")
        native.reset()
    return use


def _net(hidden, activation="sigmoid", readout="mse", seed=0, in_features=23, classes=6, scale=1.0, kind="mlp",
         nudge="pre_activation"):
    g = torch.Generator().manual_seed(seed)
    if kind == "vf":
        cfg = VFMLPConfig(hidden=list(hidden), activation=activation, readout=readout, nudge=nudge)
        return VectorFieldMLP(cfg, (in_features,), classes, g)
    cfg = MLPConfig(hidden=list(hidden), activation=activation, readout=readout, weight_scale=scale, nudge=nudge)
    return PrototypicalMLP(cfg, (in_features,), classes, g)


def _relax(net, x, y, steps, beta, order, start=None):
    drive = net.input_drive(x)
    state = [s.clone() for s in start] if start is not None else net.init_state(x.shape[0], like=x)
    target = net.target(y, x) if beta else None
    out = net.relax(drive, state, steps, beta, target, order=order) if net.relax_schedules \
        else net.relax(drive, state, steps, beta, target)
    return out, net.last_relax_engine


def _data(batch, in_features=23, classes=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, in_features, generator=g), torch.randint(0, classes, (batch,), generator=g)


def _assert_engines_agree(net, data, steps, beta, torch_only):
    """A nudged relaxation from s = 0 through the kernel, then through torch: within 1e-5."""
    x, y = data
    with torch.no_grad():
        torch_only(False)
        ours, engine = _relax(net, x, y, steps, beta, "sync")
        assert engine == "native"
        torch_only(True)
        theirs, engine = _relax(net, x, y, steps, beta, "sync")
        assert engine == "torch"
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


@needs_kernels
@pytest.mark.parametrize("hidden", [[16], [13], [40, 9], [8, 17, 33]])
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid", "hard_sigmoid_half", "tanh"])
@pytest.mark.parametrize("order", ["sync", "async"])
def test_native_matches_torch_free_and_nudged(hidden, activation, order, torch_only):
    """Same steps as the torch path: free phase, then a nudged phase from its end (MSE nudge),
    for layer sizes on and off the 8-wide vectors, every activation and both schedules. Both
    float32 paths are compared with the float64 torch relaxation: the kernel's error is float32
    rounding, no larger than torch's own (plus 1e-5)."""
    net = _net(hidden, activation, scale=2.0)
    x, y = _data(11)

    def phases(model, inputs):
        free, engine_free = _relax(model, inputs, y, 25, 0.0, order)
        nudged, engine_nudged = _relax(model, inputs, y, 8, 0.5, order, start=free)
        return free + nudged, (engine_free, engine_nudged)

    with torch.no_grad():
        torch_only(False)
        ours, engines = phases(net, x)
        assert engines == ("native", "native")
        torch_only(True)
        theirs, engines = phases(net, x)
        assert engines == ("torch", "torch")
        exact, _ = phases(copy.deepcopy(net).double(), x.double())
    for a, b, e in zip(ours, theirs, exact):
        err_ours, err_theirs = float((a.double() - e).abs().max()), float((b.double() - e).abs().max())
        assert err_ours <= 2 * err_theirs + 1e-5, (err_ours, err_theirs)
    # the nudge moved the output: the comparison above covers a non-trivial nudged phase
    assert float((theirs[-1] - theirs[len(hidden)]).abs().max()) > 1e-3


@needs_kernels
@pytest.mark.parametrize("hidden, classes", [([37], 10), ([37], 6), ([16], 1), ([40], 17), ([512], 10)])
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid", "tanh"])
@pytest.mark.parametrize("order", ["sync", "async"])
def test_two_layer_nets_match_torch(hidden, classes, activation, order, torch_only):
    """One hidden layer under an output of up to 16 units runs in one pass over the hidden units
    a step (with AVX-512; ten outputs unrolled, other sizes in masked vectors, a hidden layer
    off the 16-wide blocks in a masked tail), more outputs on the general path: free and
    nudged phases within float32 rounding of the torch path."""
    net = _net(hidden, activation, classes=classes, scale=2.0)
    x, y = _data(9, classes=classes)

    def phases():
        free, engine_free = _relax(net, x, y, 20, 0.0, order)
        nudged, engine_nudged = _relax(net, x, y, 6, 0.5, order, start=free)
        return free + nudged, (engine_free, engine_nudged)

    with torch.no_grad():
        torch_only(False)
        ours, engines = phases()
        assert engines == ("native", "native")
        torch_only(True)
        theirs, _ = phases()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=2e-5, rtol=0), float((a - b).abs().max())
    assert float((theirs[-1] - theirs[1]).abs().max()) > 1e-3  # the nudge moved the output


@needs_kernels
@pytest.mark.parametrize("hidden, classes, variant", [
    ([37], 10, ""), ([16], 1, ""), ([40], 17, ""), ([40, 9], 6, ""), ([8, 17, 33], 6, ""),
    ([40, 9], 6, "EPRUN_NO_BLOCKS"), ([8, 17, 33], 6, "EPRUN_NO_BLOCKS")])
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid", "tanh"])
@pytest.mark.parametrize("order", ["sync", "async"])
def test_the_nudge_after_sigma_matches_torch(hidden, classes, variant, activation, order, torch_only,
                                             native_build):
    """A net nudged after σ (``model.nudge: post_activation``, s^N ← σ(z^N) + β(y − s^N_t)) on
    every path of the kernel: one pass a step (one hidden layer under ten outputs, or one), pairs
    (17 outputs; the deeper nets built without blocks), blocks (the deeper nets): free and nudged
    phases within float32 rounding of the torch path, and (σ' ≠ 1) away from the nudge inside σ."""
    x, y = _data(9, classes=classes)

    def phases(net):
        free, engine_free = _relax(net, x, y, 20, 0.0, order)
        nudged, engine_nudged = _relax(net, x, y, 6, 0.5, order, start=free)
        return free + nudged, (engine_free, engine_nudged)

    after = _net(hidden, activation, classes=classes, scale=2.0, nudge="post_activation")
    inside = _net(hidden, activation, classes=classes, scale=2.0)
    with torch.no_grad():
        torch_only(False)
        native_build(*[variant] if variant else [])
        ours, engines = phases(after)
        assert engines == ("native", "native")
        other, _ = phases(inside)
        torch_only(True)
        theirs, engines = phases(after)
        assert engines == ("torch", "torch")
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=2e-5, rtol=0), float((a - b).abs().max())
    assert float((theirs[-1] - theirs[len(hidden)]).abs().max()) > 1e-3  # the nudge moved the output
    if activation != "hard_sigmoid":  # inside its linear range the hard sigmoid makes the two forms one
        assert float((ours[-1] - other[-1]).abs().max()) > 1e-3  # the nudge inside σ moves it otherwise


@needs_kernels
def test_each_examples_stop_compares_the_state_nudged_after_sigma(torch_only):
    """With the nudge after σ, each example's early stop (``tol_scope: example``) compares the
    nudged state, not σ(z) alone, with the last: the kernel stops where torch does."""
    net, (x, y) = _net([21, 7], "sigmoid", nudge="post_activation"), _data(6)
    with torch.no_grad():
        torch_only(False)
        drive, target = net.input_drive(x), net.target(y, x)
        start = net.init_state(6, like=x)
        stopped = net.relax(drive, [s.clone() for s in start], 400, 0.3, target, tol=1e-4, check_every=1,
                            tol_scope="example")
        steps = net.last_relax_steps
        assert net.last_relax_engine == "native"
        torch_only(True)
        stopped_torch = net.relax(drive, [s.clone() for s in start], 400, 0.3, target, tol=1e-4, check_every=1,
                                  tol_scope="example")
        assert 1 < steps < 400 and abs(steps - net.last_relax_steps) <= 1
    for a, b in zip(stopped, stopped_torch):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


@needs_kernels
def test_vector_field_net_with_one_hidden_layer(torch_only):
    """The one-pass path reads the top-down matrix D and the bottom-up U separately: the
    vector-field net's feedback B ≠ Wᵀ reaches it as it is."""
    net = _net([24], kind="vf", classes=10)
    with torch.no_grad():
        for f in net.feedback:
            f.mul_(-1.5)
    _assert_engines_agree(net, _data(7, classes=10), 15, 0.3, torch_only)


@needs_kernels
def test_status_reports_the_vector_paths():
    """status() says which vector paths the build holds; AVX-512 implies AVX2."""
    state = native.status()
    assert state["available"] and isinstance(state["avx512"], bool)
    assert state["vectorized"] or not state["avx512"]


@needs_kernels
def test_native_float32_error_is_rounding_against_float64(torch_only):
    """Both float32 paths sit within float32 rounding of the float64 torch relaxation."""
    net = _net([64, 32])
    x, y = _data(9)
    with torch.no_grad():
        torch_only(False)
        ours, engine = _relax(net, x, y, 40, 0.0, "sync")
        assert engine == "native"
        net64 = _net([64, 32]).double()
        exact, engine = _relax(net64, x.double(), y, 40, 0.0, "sync")
        assert engine == "torch"  # float64 always runs on torch
    for a, b in zip(ours, exact):
        assert float((a.double() - b).abs().max()) < 1e-5


@needs_kernels
def test_vector_field_net_uses_its_feedback_matrices(torch_only):
    """The vector-field MLP's top-down matrices are B_n, not W_nᵀ: the kernel gets them as they are."""
    net = _net([24, 12], kind="vf")
    with torch.no_grad():
        for f in net.feedback:  # make B clearly different from Wᵀ
            f.mul_(-1.5)
    _assert_engines_agree(net, _data(7), 15, 0.3, torch_only)


@needs_kernels
@pytest.mark.parametrize("hidden", [[48, 11], [37]])
def test_batch_split_over_threads_is_bit_identical(hidden):
    """Examples relax independently: splitting the batch over threads changes no bit, nor does
    which example shares a pass with which (63 rows in 4 ranges of whole pairs on the OpenMP
    workers: 16 + 16 + 16 + 15), with a fixed number of steps and with per-example early stopping."""
    if native.library() is None or not native.status()["openmp"]:
        pytest.skip("the kernel was built without OpenMP here: it runs on one thread")
    net = _net(hidden)
    x, _ = _data(63)
    threads = torch.get_num_threads()
    drive = net.input_drive(x)

    def relaxed(tol: float):
        state = net.init_state(63, like=x)
        with torch.no_grad():
            net.relax(drive, state, 20, tol=tol, check_every=2, tol_scope="example")
        return state, net.last_relax_steps

    try:
        torch.set_num_threads(1)
        one, one_tol = relaxed(0.0), relaxed(1e-4)
        torch.set_num_threads(4)
        assert parallel.threads_for(native.library(), 63) == 4
        four, four_tol = relaxed(0.0), relaxed(1e-4)
    finally:
        torch.set_num_threads(threads)
    assert net.last_relax_engine == "native"
    for (a_state, a_steps), (b_state, b_steps) in ((one, four), (one_tol, four_tol)):
        assert a_steps == b_steps
        for a, b in zip(a_state, b_state):
            assert torch.equal(a, b)
    assert one_tol[1] < 20  # the per-example stop did stop examples: both paths of the split are covered


@needs_kernels
def test_softmax_readout_nudge_falls_back_to_torch():
    """The softmax read-out's nudge is outside the kernel: its free phase runs native, its nudged
    phase on torch."""
    net = _net([20], readout="softmax")
    x, y = _data(5)
    with torch.no_grad():
        free, engine = _relax(net, x, y, 10, 0.0, "sync")
        assert engine == "native"
        _, engine = _relax(net, x, y, 5, 0.4, "sync", start=free)
        assert engine == "torch"


@needs_kernels
def test_single_steps_tolerance_and_strided_inputs_use_torch():
    net = _net([20])
    x, y = _data(5)
    with torch.no_grad():
        drive = net.input_drive(x)
        net.relax(drive, net.init_state(5, like=x), 10, tol=1e-4)
        assert net.last_relax_engine == "torch"
        net.relax(drive, net.init_state(5, like=x), 1)  # one step: cheaper on torch than through the call
        assert net.last_relax_engine == "torch"
        net.relax(drive, net.init_state(5, like=x), native.dense.MIN_STEPS)
        assert net.last_relax_engine == "native"
        strided = [torch.zeros(20, 5).T, torch.zeros(5, 6)]  # a transposed view: not contiguous
        net.relax(drive, strided, 3)
        assert net.last_relax_engine == "torch"


@needs_kernels
def test_build_is_cached_and_keyed(tmp_path, monkeypatch, capsys):
    """The first use compiles, saying so on stderr; the next process finds the build in the cache."""
    monkeypatch.setenv("EPRUN_CACHE", str(tmp_path))
    native.reset()
    try:
        assert native.library() is not None
        assert "eprun: compiling the native kernels" in capsys.readouterr().err
        built = list((tmp_path / "native").glob("eprun-kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.reset()
        assert native.library() is not None
        assert capsys.readouterr().err == ""  # nothing compiled, nothing said
        assert built[0].stat().st_mtime_ns == stamp  # found in the cache, not rebuilt
        assert native.status()["available"] and native.status()["reason"] is None
    finally:
        native.reset()


def test_an_instruction_set_the_cpu_lacks_is_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("EPRUN_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "cpu_flags", lambda: {"sse2"})
    monkeypatch.setenv("EPRUN_NATIVE_ARCH", "avx2")
    native.reset()
    assert native.library() is None
    assert native.status()["reason"] == ("EPRUN_NATIVE_ARCH=avx2: this CPU lacks avx2, fma, which the compiled "
                                         "kernels need (torch runs instead)")
    for value in ("neon", "generic"):
        monkeypatch.setenv("EPRUN_NATIVE_ARCH", value)
        native.reset()
        assert native.library() is None
        assert f"EPRUN_NATIVE_ARCH={value!r} is not one of native, avx2, avx512" in native.status()["reason"]


def test_missing_compiler_falls_back_or_fails_as_asked(tmp_path, monkeypatch):
    """No compiler: "auto" runs torch and says why; EPRUN_NATIVE=1 is an error naming the cause."""
    monkeypatch.setenv("EPRUN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    native.reset()
    try:
        net = _net([12])
        x, y = _data(4)
        with torch.no_grad():
            _, engine = _relax(net, x, y, 5, 0.0, "sync")
        assert engine == "torch"
        state = native.status()
        assert not state["available"] and "no C compiler" in state["reason"]
        monkeypatch.setenv("EPRUN_NATIVE", "1")
        native.reset()
        with pytest.raises(native.NativeUnavailable, match="no C compiler"):
            native.library()
        monkeypatch.setenv("EPRUN_NATIVE", "0")
        native.reset()
        assert native.status() == {"mode": "0", "arch": build.arch(), "available": False, "vectorized": False,
                                   "avx512": False, "openmp": False, "reason": "EPRUN_NATIVE=0"}
    finally:
        native.reset()


@needs_compiler
def test_compiler_error_is_reported(tmp_path, monkeypatch):
    """A compiler that fails on every flag set: the reason carries its message."""
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\necho 'boom: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("EPRUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    native.reset()
    try:
        assert native.library() is None
        assert "boom: cannot compile" in native.status()["reason"]
        # each failed flag set left a note: the next process does not run the compiler again
        notes = sorted((tmp_path / "cache" / "native").glob("*.failed"))
        assert len(notes) == len(build.flag_sets("native"))
        fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                        "echo called > \"$0.called\"\nexit 1\n")
        native.reset()
        assert native.library() is None
        assert not (tmp_path / "fake-cc.called").exists()
        assert "boom: cannot compile" in native.status()["reason"] and "cached" in native.status()["reason"]
    finally:
        native.reset()


@needs_kernels
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid", "tanh"])
@pytest.mark.parametrize("nudge", ["pre_activation", "post_activation"])
def test_scalar_loops_follow_the_same_dynamics(activation, nudge, torch_only, native_build):
    """The scalar loops (which finish every vector loop, and are all a build without vector
    instructions has) follow the same dynamics, the nudge inside σ or after it: a generic build
    against torch."""
    net, (x, y) = _net([21, 7], activation, nudge=nudge), _data(6)
    with torch.no_grad():
        torch_only(True)
        theirs, _ = _relax(net, x, y, 12, 0.3, "sync")
        torch_only(False)
        native_build(arch="generic")
        ours, engine = _relax(net, x, y, 12, 0.3, "sync")
    assert engine == "native"
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_no_library_without_avx2_torch_runs_instead(tmp_path, monkeypatch):
    """Without AVX2 and FMA the kernels would be slower than torch: none is built, and the
    reason says so."""
    monkeypatch.setenv("EPRUN_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "cpu_flags", lambda: {"sse2", "neon"})
    native.reset()
    net, (x, y) = _net([12]), _data(4)
    with torch.no_grad():
        _, engine = _relax(net, x, y, 5, 0.0, "sync")
    assert engine == "torch" and native.library() is None
    assert "lacks avx2, fma, which the compiled kernels need" in native.status()["reason"]
    assert not list(tmp_path.glob("native/*.so"))


@needs_kernels
def test_openmp_build_shares_torchs_runtime():
    """Built with OpenMP, the kernel's parallel region must run on torch's worker threads: the
    process holds one OpenMP runtime, not a second pool of threads spinning on the same cores."""
    lib = native.library()
    if not lib.eprun_native_openmp():
        pytest.skip("the kernel was built without OpenMP here")
    if "OpenMP" not in torch.__config__.parallel_info() or not Path("/proc/self/maps").exists():
        pytest.skip("torch without OpenMP, or no /proc: the split runs on Python threads")
    assert native.status()["openmp"]
    assert parallel.one_openmp_runtime()


@needs_kernels
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid", "tanh"])
@pytest.mark.parametrize("order", ["sync", "async"])
@pytest.mark.parametrize("hidden", [[30, 12], [30]])
def test_stop_at_a_bitwise_fixed_point_changes_no_bit(activation, order, hidden, native_build):
    """With a fixed number of steps, an example stops computing once a step leaves its state
    unchanged bit for bit: the result equals running every step, bit for bit, free and nudged,
    and most examples of this contracting net stop well before the end (three layers, and two:
    the one-pass path)."""
    net = _net(hidden, activation, scale=0.5)
    x, y = _data(13)
    drive = net.input_drive(x)
    target = net.target(y, x)
    weights = [w.detach() for w in net.weights][1:]  # W_i between s^i and s^{i+1}
    up, down = [None, *weights], [*[w.contiguous() for w in weights], None]
    const_free = [drive] + [b.detach() * net.act.scale + net.act.shift for b in list(net.biases)[1:]]
    a = net.act.scale

    def run(stop: bool, beta: float, start):
        native_build() if stop else native_build("EPRUN_EVERY_STEP")
        state = [s.clone() for s in start]
        const = list(const_free)
        if beta:
            const[-1] = const[-1] + a * beta * target
        taken = native.dense.relax_dense(state, const, up, down, a, activation, -a * beta, 200, order, count_steps=True)
        return state, taken

    with torch.no_grad():
        zero = net.init_state(13, like=x)
        every, every_steps = run(False, 0.0, zero)
        stopped, stopped_steps = run(True, 0.0, zero)
        assert (every_steps == 200).all()
        assert (stopped_steps < 200).float().mean() > 0.5
        for u, v in zip(every, stopped):
            assert torch.equal(u, v)
        nudged_every, _ = run(False, 0.4, every)
        nudged_stopped, nudged_steps = run(True, 0.4, every)
        # a float32 relaxation need not reach a fixed point: with tanh on the three-layer net the
        # blocked path's nudged phase ends in a two-step cycle of the last bit, which never stops
        assert (nudged_steps < 200).any() or (activation == "tanh" and len(hidden) == 2)
        for u, v in zip(nudged_every, nudged_stopped):
            assert torch.equal(u, v)


@needs_kernels
@pytest.mark.parametrize("hidden, classes", [([48, 11], 6), ([40], 17), ([8, 17, 33], 6), ([64, 64, 64], 10)])
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid", "tanh"])
@pytest.mark.parametrize("order", ["sync", "async"])
def test_block_path_matches_the_pair_path(hidden, classes, activation, order, native_build):
    """Wider and deeper nets relax in blocks of examples (up to 12 on AVX-512, 6 on AVX2): a free
    phase then a nudged phase of 19 examples (blocks of 10 and 9, or of 5, 5, 5 and 4, on one
    thread), against the float64
    torch relaxation: the block path's error is float32 rounding, no larger than the pair
    path's (plus 2e-5; large weights and tanh amplify rounding to ~1e-4 on either path)."""
    native.library()
    if not native.status()["vectorized"]:
        pytest.skip("a scalar build: every net relaxes in pairs")
    net = _net(hidden, activation, classes=classes, scale=2.0)
    x, y = _data(19, classes=classes)

    def phases(model, inputs):
        with torch.no_grad():
            free, _ = _relax(model, inputs, y, 25, 0.0, order)
            nudged, _ = _relax(model, inputs, y, 8, 0.5, order, start=free)
        return free + nudged

    native_build()
    blocks = phases(net, x)
    native_build("EPRUN_NO_BLOCKS")
    pairs = phases(net, x)
    exact = phases(copy.deepcopy(net).double(), x.double())
    for a, b, e in zip(blocks, pairs, exact):
        err_blocks, err_pairs = float((a.double() - e).abs().max()), float((b.double() - e).abs().max())
        assert err_blocks <= 2 * err_pairs + 2e-5, (err_blocks, err_pairs)
    assert float((blocks[-1] - blocks[len(hidden)]).abs().max()) > 1e-3  # the nudge moved the output


@needs_compiler
@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")
@pytest.mark.parametrize("arch", ["avx2", "avx512"])
def test_every_instruction_set_compiles(arch, tmp_path):
    """Every build a user's machine may take compiles without a warning, whether or not this CPU
    can run it (an AVX-512 build is compiled here even where only CI's other machines run it)."""
    import subprocess

    flags = [f for f in build.flag_sets(arch)[0] if f != "-fopenmp"]
    run = subprocess.run([build.compiler(), *flags, "-Wall", "-o", str(tmp_path / "k.so"),
                          *map(str, build.SOURCES), "-lm"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "warning" not in run.stderr, run.stderr


@needs_kernels
def test_step_counts_the_kernel_cannot_represent_are_refused_not_wrapped():
    """2³² + 30 steps would wrap to 30 in a C int: the kernel declines such a relaxation (torch
    takes it) and its wrapper refuses the value outright."""
    net, (x, _) = _net([12]), _data(4)
    with torch.no_grad():
        state = net.init_state(4, like=x)
        const = [net.input_drive(x), net.biases[1].detach() * net.act.scale + net.act.shift]
        assert not native.dense.supports(state, *const, steps=(1 << 32) + 30)
        w = net.weights[1].detach()
        with pytest.raises(ValueError, match="does not fit the kernel's 32-bit step counts"):
            native.dense.relax_dense(state, const, [None, w], [w.contiguous(), None], net.act.scale, "sigmoid", 0.0,
                                     (1 << 32) + 30, "sync")


@pytest.mark.parametrize("mode, engine", [("auto", "native"), ("0", "torch")])
def test_the_run_summary_names_the_relaxation_engine(mode, engine, tiny_recipe, tmp_path, monkeypatch):
    """summary.json says which engine relaxed the training batches (here the tiny MLP: the
    compiled dense kernel, or torch with EPRUN_NATIVE=0)."""
    import json

    from typer.testing import CliRunner

    from eprun.cli import app

    if mode == "auto" and (build.compiler() is None or not set(build.VECTOR_FLAGS) <= build.cpu_flags()):
        pytest.skip("the compiled kernels need a C compiler and AVX2/FMA")
    monkeypatch.setenv("EPRUN_NATIVE", mode)
    native.reset()
    result = CliRunner().invoke(app, ["train", str(tiny_recipe), "--out", str(tmp_path / "runs"), "-q",
                                      "-s", "train.max_batches=3", "-s", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "summary.json").read_text())["relaxation_engine"] == engine
