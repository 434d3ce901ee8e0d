"""Every bad input: exit code 2, a one-line message naming what and where, and no new files."""

import io
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from eprun.cli import app
from eprun.data import write_idx

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def files_under(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def mnist_files(root: Path, n=30, break_with=None):
    """Write a small MNIST-format folder; ``break_with`` corrupts one file."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for prefix, count in (("train", n), ("t10k", n // 2)):
        images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (count,), dtype=torch.uint8, generator=g)
        if break_with == "counts" and prefix == "train":
            labels = labels[:-3]
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, gzip=True)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, gzip=True)
    images = root / "train-images-idx3-ubyte.gz"
    if break_with == "magic":
        raw = root / "train-images-idx3-ubyte"
        raw.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 64)
        images.unlink()
    if break_with == "truncated":
        import gzip

        data = gzip.decompress(images.read_bytes())
        images.unlink()
        (root / "train-images-idx3-ubyte").write_bytes(data[: len(data) // 2])
    return root


RECIPE_CASES = [
    ("unknown key", ("  beta: 0.2", "  bta: 0.2"), "rule.bta: unknown key; did you mean 'beta'?"),
    ("wrong type", ("  K: 5", "  K: five"), "rule.K: expected an integer, got 'five'"),
    ("beta zero", ("  beta: 0.2", "  beta: 0"), "rule.beta: must be non-zero"),
    ("negative T", ("  T: 12", "  T: -4"), "rule.T: must be between 1 and 100,000, got -4"),
    ("lr list length", ("  lr: 0.002", "  lr: [0.1, 0.1, 0.1]"),
     "optim.lr: a list needs one entry per weight layer of the model (2), got 3"),
    ("yaml syntax", ("  K: 5", "  K: [5"), "YAML syntax error"),
    ("unknown section", ("train:", "trian:"), "trian: unknown key; did you mean 'train'?"),
    ("unknown kind", ("kind: ep", "kind: ep2"), "rule.kind: unknown kind 'ep2'"),
]


@pytest.mark.parametrize("name, edit, expected", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipes(name, edit, expected, tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_recipe.write_text(tiny_recipe.read_text().replace(*edit))
    before = files_under(tmp_path)
    result = invoke("train", tiny_recipe)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and expected in lines[0], lines
    assert f"{tiny_recipe}:" in lines[0]  # file and line
    assert files_under(tmp_path) == before


DATA_CASES = [
    ("missing files", None, "missing train-images-idx3-ubyte(.gz)"),
    ("wrong magic number", "magic", "magic"),
    ("truncated", "truncated", "train-images-idx3-ubyte"),
    ("wrong counts", "counts", "train"),
]


@pytest.mark.parametrize("name, break_with, expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_files(name, break_with, expected, tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "mnist"
    if name == "missing files":
        root.mkdir()
    else:
        mnist_files(root, break_with=break_with)
    before = files_under(tmp_path)
    result = invoke("train", tiny_recipe, "-s", "data.dataset=mnist", "-s", f"data.root={root}",
                    "-s", "data.val_size=5")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and expected in lines[0], lines
    assert files_under(tmp_path) == before


def test_good_mnist_files_train(tiny_recipe, tmp_path):
    root = mnist_files(tmp_path / "mnist")
    result = invoke("train", tiny_recipe, "-s", "data.dataset=mnist", "-s", f"data.root={root}",
                    "-s", "data.val_size=5", "-q", "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tests.conftest import TINY_RECIPE

    folder = tmp_path_factory.mktemp("trained")
    (folder / "tiny.yaml").write_text(TINY_RECIPE)
    result = invoke("train", folder / "tiny.yaml", "-q", "--out", folder / "runs", "-s", "train.epochs=1",
                    "-s", "train.max_batches=3")
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


def test_not_a_run_directory(tmp_path):
    for args in (("compare", tmp_path), ("train", "--resume", tmp_path), ("eval", tmp_path / "x.pt")):
        result = invoke(*args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, (args, result.output)
    assert list(tmp_path.iterdir()) == []


def _checkpoint_case(kind: str, run: Path, folder: Path) -> Path:
    good = run / "checkpoints" / "last.pt"
    path = folder / f"{kind}.pt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif kind == "old-format":
        state = torch.load(good, weights_only=True)
        state["format"] = "eprun-checkpoint-0"
        torch.save(state, path)
    elif kind == "other-network":
        state = torch.load(good, weights_only=True)
        state["model"] = {k: torch.zeros(3, 3) for k in state["model"]}
        torch.save(state, path)
    return path


@pytest.mark.parametrize("kind, expected", [
    ("truncated", "not a loadable eprun checkpoint"),
    ("garbage", "not a loadable eprun checkpoint"),
    ("old-format", "incompatible checkpoint format 'eprun-checkpoint-0'"),
    ("other-network", "does not fit the recipe's network"),
])
def test_bad_checkpoints(kind, expected, trained_run, tmp_path):
    path = _checkpoint_case(kind, trained_run, tmp_path)
    result = invoke("eval", path, "--recipe", trained_run / "recipe.yaml")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_pickle_that_runs_code_is_refused_and_does_not_run(trained_run, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    torch.save({"format": "eprun-checkpoint-1", "model": _Payload(str(marker))}, buffer)
    evil.write_bytes(buffer.getvalue())
    for args in (("eval", evil, "--recipe", trained_run / "recipe.yaml"),):
        result = invoke(*args)
        assert result.exit_code == 2 and "not a loadable eprun checkpoint" in result.output
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_Payload(str(marker))))
    assert invoke("eval", plain, "--recipe", trained_run / "recipe.yaml").exit_code == 2
    assert not marker.exists()


CONV_MODEL = """model:
  kind: conv
  channels: [4]
  kernels: [5]
  pools: [max]
  fc: [10]
"""


@pytest.mark.parametrize("edit, expected", [
    (("fc: [10]", "fc: [12]"), "model.fc: with readout: mse the last fc layer is the output and needs one unit per class (10), got 12"),
    (("kernels: [5]", "kernels: [40]"), "model.kernels"),
])
def test_network_that_does_not_fit_the_dataset(edit, expected, tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = tiny_recipe.read_text().replace("model:\n  kind: mlp\n  hidden: [24]\n", CONV_MODEL.replace(*edit))
    tiny_recipe.write_text(text)
    before = files_under(tmp_path)
    for args in (("train", tiny_recipe), ("train", tiny_recipe, "--fast-dev-run")):
        result = invoke(*args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2, result.output
        assert len(lines) == 1 and expected in lines[0] and str(tiny_recipe) in lines[0], lines
        assert "data.dataset 'synthetic' gives input (1, 28, 28) and 10 classes" in lines[0]
    assert files_under(tmp_path) == before
