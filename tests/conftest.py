import pytest

TINY_RECIPE = """\
name: tiny
description: tiny EP net on synthetic data
seed: 1
device: cpu
data:
  dataset: synthetic
  val_size: 200
  batch_size: 25
  eval_batch_size: 100
model:
  kind: mlp
  hidden: [24]
rule:
  kind: ep
  T: 12
  K: 5
  beta: 0.2
optim:
  kind: adam
  lr: 0.002
schedule:
  kind: cosine
train:
  epochs: 2
  log_every: 10
  max_batches: 30
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Tests never download anything."""
    monkeypatch.setenv("EPRUN_OFFLINE", "1")


@pytest.fixture
def tiny_recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """``eprun --threads N`` sets torch's thread count for the whole process: restore it after a
    test that invokes the CLI with it, so later in-process results (and their rounding, which
    can depend on the thread count) match subprocesses that start with the default."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture
def bundled_fast_dev_run(tmp_path, monkeypatch):
    """``bundled_fast_dev_run(name, *args)``: ``eprun train <bundled recipe name> --fast-dev-run
    *args``, run from an empty folder, passes, says so, and writes nothing."""
    from typer.testing import CliRunner

    from eprun import catalog
    from eprun.cli import app

    def run(name: str, *args: str) -> None:
        path = catalog.resolve(name).resolve()
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(app, ["train", str(path), "--fast-dev-run", *args])
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("fast-dev-run ok")
        assert list(tmp_path.iterdir()) == []

    return run


@pytest.fixture
def native_build(monkeypatch):
    """``native_build(*defines, arch=None)`` loads a variant build of the native kernels (e.g.
    ``"EPRUN_EVERY_STEP"``, ``"EPRUN_NO_BLOCKS"``) in place of the default library, for the rest
    of the test; with no defines, the default build; ``arch`` None: ``EPRUN_NATIVE_ARCH``'s.
    Returns the library."""
    from eprun.native import build, parallel

    monkeypatch.setenv("EPRUN_NATIVE", "auto")
    build.reset()

    def use(*defines: str, arch: str | None = None):
        library = build.compile_library(arch or build.arch(), tuple(defines))
        monkeypatch.setattr(build, "_library", library)
        monkeypatch.setattr(build, "_failure", None)
        parallel.reset()
        return library

    yield use
    build.reset()


@pytest.fixture(autouse=True)
def native_tests_use_the_kernels(request, monkeypatch):
    """The compiled kernels' own tests (marker ``native``) run them even in a suite run with
    ``EPRUN_NATIVE=0``, which puts every other test on the torch path."""
    import os

    if request.node.get_closest_marker("native") is not None and os.environ.get("EPRUN_NATIVE") == "0":
        from eprun import native

        monkeypatch.setenv("EPRUN_NATIVE", "auto")
        native.reset()
        yield
        native.reset()
    else:
        yield


def on_training_step(monkeypatch, call: int, action) -> None:
    """From now on EP's training step runs ``action()`` when it is called for the ``call``-th time,
    before computing (a crash or a signal arriving mid-run)."""
    from eprun.rules.ep import EP

    original, calls = EP.train_step, {"n": 0}

    def step(self, x, y):
        calls["n"] += 1
        if calls["n"] == call:
            action()
        return original(self, x, y)

    monkeypatch.setattr(EP, "train_step", step)


def crash_at(monkeypatch, call: int) -> None:
    """Make the EP rule raise at its ``call``-th training step (a crash between checkpoints)."""

    def crash():
        raise RuntimeError("simulated crash")

    on_training_step(monkeypatch, call, crash)


@pytest.fixture
def sigterm_on_batch(monkeypatch):
    """``sigterm_on_batch(n)``: from now on EP's training step sends this process SIGTERM when it
    is called for the n-th time (before computing), as a signal arriving mid-run would."""
    import os
    import signal

    return lambda n: on_training_step(monkeypatch, n, lambda: os.kill(os.getpid(), signal.SIGTERM))
