"""eprun.data.imagenet32: ImageNet 32×32 pickle and npz batches, registry, recipe, CLI.

Fast and offline: every file is generated in tmp_path (ten training batches of 3 images and
a validation file of 5), ./data and $EPRUN_DATA are never read.
"""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eprun.cli import app
from eprun.data import DATASETS, load_imagenet32, load_splits, synthetic_like
from eprun.data.imagenet32 import TRAIN_BATCHES, candidates, read_batch, read_batches
from eprun.data.splits import NORMALIZE_CONSTANTS
from eprun.errors import DataError
from eprun.recipe import load_recipe
from eprun.runner import load_data

N_BATCH = 3   # images per generated training batch
N_VAL = 5     # images in the generated validation file
N_TRAIN = N_BATCH * len(TRAIN_BATCHES)
VAL_OFFSET = 1000

RECIPE = """\
name: inet32
seed: 0
device: cpu
data:
  dataset: imagenet32
  root: {root}
  val_size: 6
  batch_size: 4
  eval_batch_size: 8
  normalize: imagenet32
model:
  kind: mlp
  hidden: [8]
rule:
  kind: ep
  T: 4
  K: 2
  beta: 0.5
optim:
  kind: sgd
  lr: 0.01
train:
  epochs: 1
  log_every: 2
"""


# --------------------------------------------------------------------------- helpers


def label_of(index: np.ndarray) -> np.ndarray:
    """The one-based label given to example ``index``: every value 1..1000 is reachable."""
    return (index * 37 + 999) % 1000 + 1


def fake_batch(n: int, offset: int) -> tuple[np.ndarray, list[int]]:
    """n rows (n, 3072): red pixels 0 and 1 encode the example's index; the planes hold 10, 20, 30.

    The red pixel at row 1, column 1 (flat 33 of the red plane) is 200, so the channel and
    row-major order of the reshape can be checked.
    """
    index = np.arange(offset, offset + n)
    data = np.zeros((n, 3, 1024), dtype=np.uint8)
    data[:, 0], data[:, 1], data[:, 2] = 10, 20, 30
    data[:, 0, 0] = index % 256
    data[:, 0, 1] = index // 256
    data[:, 0, 33] = 200
    return data.reshape(n, 3072), [int(v) for v in label_of(index)]


def decode_index(x: torch.Tensor) -> torch.Tensor:
    """Invert fake_batch's index encoding from uint8 (n, 3, 32, 32) or float images in [0, 1]."""
    pixels = x[:, 0, 0, :2]
    pixels = pixels.long() if x.dtype == torch.uint8 else (pixels * 255).round().long()
    return pixels[:, 0] + 256 * pixels[:, 1]


def write_pickle(path: Path, data: object, labels: object, protocol: int = 4, **extra: object) -> Path:
    """A batch like the distributed ones: a pickled dict of 'data', 'labels' and 'mean'."""
    batch = {"data": data, "labels": labels, "mean": np.full(3072, 117.5), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    return path


def write_npz(path: Path, data: object, labels: object, **extra: object) -> Path:
    """A batch of the npz variant: arrays 'data', 'labels' and 'mean'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, data=data, labels=np.asarray(labels), mean=np.full(3072, 117.5), **extra)
    return path


def write_split(folder: Path, names: tuple[str, ...], fmt: str, n: int, offset: int) -> list[Path]:
    """Write one file per name (``n`` images each, indices from ``offset``) in ``fmt``."""
    paths = []
    for i, name in enumerate(names):
        data, labels = fake_batch(n, offset + 100 * i)
        if fmt == "npz":
            paths.append(write_npz(folder / f"{name}.npz", data, labels))
        else:
            paths.append(write_pickle(folder / name, data, labels))
    return paths


def write_imagenet32(root: Path, fmt: str = "pickle", layout: str = "subfolders",
                     val_fmt: str | None = None) -> Path:
    """Write the whole dataset (tiny) under ``root/imagenet32`` in one of the accepted layouts."""
    base = root / "imagenet32"
    suffix = "_npz" if fmt == "npz" else ""
    val_fmt = val_fmt or fmt
    val_suffix = "_npz" if val_fmt == "npz" else ""
    flat = layout == "flat"
    write_split(base if flat else base / f"Imagenet32_train{suffix}", TRAIN_BATCHES, fmt, N_BATCH, 0)
    write_split(base if flat else base / f"Imagenet32_val{val_suffix}", ("val_data",), val_fmt, N_VAL, VAL_OFFSET)
    return base


def expected_train_index() -> torch.Tensor:
    return torch.cat([torch.arange(100 * i, 100 * i + N_BATCH) for i in range(len(TRAIN_BATCHES))])


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No inherited data root, no download attempt."""
    monkeypatch.delenv("EPRUN_DATA", raising=False)
    monkeypatch.setenv("EPRUN_OFFLINE", "1")


def load_error(root: Path) -> str:
    """The one-line DataError message of loading ``root``."""
    with pytest.raises(DataError) as err:
        load_imagenet32(root)
    message = str(err.value)
    assert "\n" not in message and message.startswith("imagenet32: ")
    return message


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", ["pickle", "npz"])
@pytest.mark.parametrize("layout", ["subfolders", "flat"])
def test_round_trip(tmp_path, fmt, layout):
    write_imagenet32(tmp_path, fmt, layout)
    x_train, y_train, x_test, y_test = load_imagenet32(tmp_path)

    assert x_train.shape == (N_TRAIN, 3, 32, 32) and x_train.dtype == torch.uint8
    assert x_test.shape == (N_VAL, 3, 32, 32) and x_test.dtype == torch.uint8
    assert y_train.shape == (N_TRAIN,) and y_train.dtype == torch.int64
    assert y_test.shape == (N_VAL,) and y_test.dtype == torch.int64
    # Training batches in file order (1, 2, …, 10, not 1, 10, 2 …); ImageNet's val is the test split.
    assert torch.equal(decode_index(x_train), expected_train_index())
    assert torch.equal(decode_index(x_test), torch.arange(VAL_OFFSET, VAL_OFFSET + N_VAL))
    # One-based labels shifted to 0..999.
    assert torch.equal(y_train, torch.from_numpy(label_of(expected_train_index().numpy())) - 1)
    assert torch.equal(y_test, torch.from_numpy(label_of(np.arange(VAL_OFFSET, VAL_OFFSET + N_VAL))) - 1)
    # A row is the red plane, then green, then blue, each 32×32 row-major.
    assert (x_train[:, 0, 1, 1] == 200).all() and (x_train[:, 1, 1, 1] == 20).all()
    assert (x_train[:, 2, 31, 31] == 30).all() and (x_train[:, 0, 5, 7] == 10).all()


def test_labels_1_and_1000_become_0_and_999(tmp_path):
    data, _ = fake_batch(4, 0)
    for fmt_path in (write_pickle(tmp_path / "val_data", data, [1, 1000, 2, 999]),
                     write_npz(tmp_path / "val_data.npz", data, [1, 1000, 2, 999])):
        _, labels = read_batch(fmt_path)
        assert labels.dtype == np.int64 and labels.tolist() == [0, 999, 1, 998]


def test_mixed_formats_and_search_order(tmp_path):
    """Train and val are found independently; pickles before npz; subfolders before the flat folder."""
    base = write_imagenet32(tmp_path, "pickle", "subfolders", val_fmt="npz")
    x_train, _, x_test, _ = load_imagenet32(tmp_path)
    assert len(x_train) == N_TRAIN and len(x_test) == N_VAL
    order = {split: [(folder.relative_to(base).as_posix(), names[0]) for folder, names in places]
             for split, places in candidates(tmp_path).items()}
    assert order == {
        "train": [("Imagenet32_train", "train_data_batch_1"), ("Imagenet32_train_npz", "train_data_batch_1.npz"),
                  (".", "train_data_batch_1"), (".", "train_data_batch_1.npz")],
        "val": [("Imagenet32_val", "val_data"), ("Imagenet32_val_npz", "val_data.npz"),
                (".", "val_data"), (".", "val_data.npz")],
    }


def test_root_from_environment(tmp_path, monkeypatch):
    write_imagenet32(tmp_path / "env-root")
    monkeypatch.setenv("EPRUN_DATA", str(tmp_path / "env-root"))
    assert len(load_imagenet32()[0]) == N_TRAIN


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_protocols(tmp_path, protocol):
    data, labels = fake_batch(N_BATCH, 0)
    path = write_pickle(tmp_path / "val_data", data, labels, protocol=protocol)
    images, got = read_batch(path)
    assert np.array_equal(images, data) and got.tolist() == [v - 1 for v in labels]


def test_byte_keys_and_integer_array_labels(tmp_path):
    """Keys may be byte strings (Python 2 style) and labels a numpy integer array."""
    data, labels = fake_batch(N_BATCH, 0)
    path = tmp_path / "val_data"
    path.write_bytes(pickle.dumps({b"data": data, b"labels": np.array(labels, dtype=np.int32)}, protocol=2))
    assert read_batch(path)[1].tolist() == [v - 1 for v in labels]


def test_read_batches_joins_batches_of_different_sizes(tmp_path):
    paths = []
    for i, n in enumerate((7, 1, 4)):
        data, labels = fake_batch(n, 100 * i)
        paths.append(write_pickle(tmp_path / f"b{i}", data, labels))
    x, y = read_batches(paths)
    assert x.shape == (12, 3, 32, 32) and x.is_contiguous()
    expected = torch.cat([torch.arange(0, 7), torch.arange(100, 101), torch.arange(200, 204)])
    assert torch.equal(decode_index(x), expected)
    assert torch.equal(y, torch.from_numpy(label_of(expected.numpy())) - 1)


# --------------------------------------------------------------------------- missing files


def test_missing_directory_says_where_to_put_what(tmp_path):
    message = load_error(tmp_path / "nowhere")
    base = tmp_path / "nowhere" / "imagenet32"
    assert f"missing train_data_batch_1 … train_data_batch_10 in {base / 'Imagenet32_train'}" in message
    assert f"val_data in {base / 'Imagenet32_val'}" in message
    assert "image-net.org" in message and "cannot download" in message
    assert f"{base / 'Imagenet32_train'}/train_data_batch_1" in message
    assert "data.root / $EPRUN_DATA" in message
    assert not (tmp_path / "nowhere").exists()


def test_missing_batch_named(tmp_path):
    base = write_imagenet32(tmp_path, "npz")
    (base / "Imagenet32_train_npz" / "train_data_batch_3.npz").unlink()
    message = load_error(tmp_path)
    assert f"missing train_data_batch_3.npz in {base / 'Imagenet32_train_npz'}" in message
    assert "batch_1" not in message.split("(searched")[0] and "val_data in" not in message


def test_several_missing_batches_listed(tmp_path):
    base = write_imagenet32(tmp_path)
    for i in (2, 5, 7, 9):
        (base / "Imagenet32_train" / f"train_data_batch_{i}").unlink()
    message = load_error(tmp_path)
    assert "missing train_data_batch_2, train_data_batch_5, train_data_batch_7, train_data_batch_9 in" in message


def test_missing_val_only(tmp_path):
    base = write_imagenet32(tmp_path)
    (base / "Imagenet32_val" / "val_data").unlink()
    message = load_error(tmp_path)
    assert message.startswith(f"imagenet32: missing val_data in {base / 'Imagenet32_val'} (searched")


# --------------------------------------------------------------------------- bad contents


def corrupt(tmp_path: Path, fmt: str, data: object, labels: object, name: str = "train_data_batch_3") -> str:
    """A complete dataset whose batch ``name`` holds ``data`` and ``labels``; the error message."""
    base = write_imagenet32(tmp_path, fmt)
    folder = base / ("Imagenet32_train" if name.startswith("train") else "Imagenet32_val")
    if fmt == "npz":
        path = write_npz(Path(f"{folder}_npz") / f"{name}.npz", data, labels)
    else:
        path = write_pickle(folder / name, data, labels)
    message = load_error(tmp_path)
    assert message.startswith(f"imagenet32: {path}: "), message
    return message


@pytest.mark.parametrize("fmt", ["pickle", "npz"])
def test_wrong_column_count(tmp_path, fmt):
    data, labels = fake_batch(N_BATCH, 0)
    message = corrupt(tmp_path, fmt, data[:, :3000], labels)
    assert message.endswith("train_data_batch_3" + (".npz" if fmt == "npz" else "")
                            + ": 'data' has 3000 columns, expected 3072 (3×32×32)")


def test_imagenet64_batch_is_recognised(tmp_path):
    data = np.zeros((N_BATCH, 3 * 64 * 64), dtype=np.uint8)
    message = corrupt(tmp_path, "pickle", data, [1] * N_BATCH)
    assert "'data' has 12288 columns, expected 3072 (3×32×32); these look like 64×64 images" in message


@pytest.mark.parametrize("fmt", ["pickle", "npz"])
@pytest.mark.parametrize("bad", [0, 1001, -3])
def test_label_out_of_range(tmp_path, fmt, bad):
    data, labels = fake_batch(N_BATCH, 0)
    labels[1] = bad
    message = corrupt(tmp_path, fmt, data, labels, name="val_data")
    assert f"label {bad} (image 1) out of range; expected 1..1000 (ImageNet32 class ids are one-based)" in message


def test_zero_based_labels_refused(tmp_path):
    data, _ = fake_batch(N_BATCH, 0)
    assert "label 0 (image 0) out of range" in corrupt(tmp_path, "pickle", data, [0, 1, 2])


@pytest.mark.parametrize("fmt", ["pickle", "npz"])
def test_wrong_dtype(tmp_path, fmt):
    data, labels = fake_batch(N_BATCH, 0)
    message = corrupt(tmp_path, fmt, data.astype(np.float32), labels)
    assert "'data' is a float32 array; expected uint8 pixels 0..255" in message


def test_wrong_shape(tmp_path):
    data, labels = fake_batch(N_BATCH, 0)
    message = corrupt(tmp_path, "npz", data.reshape(N_BATCH, 3, 32, 32), labels)
    assert "'data' has shape (3, 3, 32, 32); expected (n, 3072)" in message


def test_count_mismatch(tmp_path):
    data, labels = fake_batch(N_BATCH, 0)
    assert "3 images in 'data' but 2 'labels'" in corrupt(tmp_path, "pickle", data, labels[:2])


@pytest.mark.parametrize("fmt", ["pickle", "npz"])
def test_labels_not_integers(tmp_path, fmt):
    data, labels = fake_batch(N_BATCH, 0)
    message = corrupt(tmp_path, fmt, data, [float(v) for v in labels])
    assert "'labels' is a " in message and "expected n integer class ids 1..1000" in message


def test_missing_key_and_not_a_dict(tmp_path):
    base = write_imagenet32(tmp_path)
    path = base / "Imagenet32_val" / "val_data"
    path.write_bytes(pickle.dumps({"data": fake_batch(2, 0)[0], "mean": 0}))
    assert f"{path}: missing key 'labels' (found 'data', 'mean')" in load_error(tmp_path)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    assert f"{path}: holds a pickled list; expected a dict" in load_error(tmp_path)


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    data, labels = fake_batch(N_BATCH, 0)
    base = write_imagenet32(tmp_path)
    path = write_pickle(base / "Imagenet32_train" / "train_data_batch_7", data, labels, extra=_System(marker))
    message = load_error(tmp_path)
    assert message.startswith(f"imagenet32: {path}: refuses to load: pickle references {os.system.__module__}.system")
    assert not marker.exists()


def test_truncated_pickle(tmp_path):
    base = write_imagenet32(tmp_path)
    path = base / "Imagenet32_train" / "train_data_batch_10"
    path.write_bytes(path.read_bytes()[:2000])
    assert f"{path}: corrupt or truncated pickle" in load_error(tmp_path)


def test_npz_with_object_array_is_refused(tmp_path):
    """np.load(allow_pickle=False): an object array (which would need pickle) is not loaded."""
    base = write_imagenet32(tmp_path, "npz")
    path = base / "Imagenet32_val_npz" / "val_data.npz"
    with open(path, "wb") as f:
        np.savez(f, data=fake_batch(2, 0)[0], labels=np.array([1, "x"], dtype=object))
    message = load_error(tmp_path)
    assert f"{path}: not a readable .npz archive (ValueError" in message


@pytest.mark.parametrize("content", [b"<html>login required</html>", b"PK\x03\x04truncated"])
def test_not_an_npz_archive(tmp_path, content):
    base = write_imagenet32(tmp_path, "npz")
    path = base / "Imagenet32_train_npz" / "train_data_batch_2.npz"
    path.write_bytes(content)
    assert f"{path}: not a readable .npz archive" in load_error(tmp_path)


def test_npy_instead_of_npz(tmp_path):
    base = write_imagenet32(tmp_path, "npz")
    path = base / "Imagenet32_val_npz" / "val_data.npz"
    with open(path, "wb") as f:
        np.save(f, fake_batch(2, 0)[0])
    assert f"{path}: holds a single .npy array, not an .npz archive" in load_error(tmp_path)


# --------------------------------------------------------------------------- registry, splits, recipe, CLI


def test_registry_entry():
    info = DATASETS["imagenet32"]
    assert info.input_shape == (3, 32, 32) and info.num_classes == 1000


def test_load_splits_carves_validation_from_training(tmp_path):
    write_imagenet32(tmp_path, "npz")
    splits = load_splits("imagenet32", root=str(tmp_path), val_size=6, split_seed=2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (N_TRAIN - 6, 6, N_VAL)
    assert splits.train.x.shape == (N_TRAIN - 6, 3, 32, 32) and splits.train.x.dtype == torch.float32
    assert splits.info is DATASETS["imagenet32"]
    seen = torch.cat([decode_index(splits.train.x), decode_index(splits.val.x)]).sort().values
    assert torch.equal(seen, expected_train_index())
    assert torch.equal(decode_index(splits.test.x), torch.arange(VAL_OFFSET, VAL_OFFSET + N_VAL))
    assert 0 <= int(splits.train.y.min()) and int(splits.train.y.max()) <= 999


def test_normalize_imagenet32_constants(tmp_path):
    write_imagenet32(tmp_path)
    plain = load_splits("imagenet32", root=str(tmp_path), val_size=4, split_seed=0)
    fixed = load_splits("imagenet32", root=str(tmp_path), val_size=4, split_seed=0, normalize="imagenet32")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZE_CONSTANTS["imagenet32"])
    assert mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    for a, b in [(plain.train, fixed.train), (plain.val, fixed.val), (plain.test, fixed.test)]:
        assert torch.allclose(b.x, (a.x - mean) / std) and torch.equal(a.y, b.y)


def test_recipe_loads_through_the_runner(tmp_path):
    write_imagenet32(tmp_path / "data")
    path = tmp_path / "inet32.yaml"
    path.write_text(RECIPE.format(root=tmp_path / "data"))
    recipe = load_recipe(path)
    assert recipe.data.dataset == "imagenet32" and recipe.data.normalize == "imagenet32"
    splits = load_data(recipe, torch.device("cpu"))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (N_TRAIN - 6, 6, N_VAL)
    assert splits.train.x.shape[1:] == (3, 32, 32) and splits.info.num_classes == 1000


def test_cli_train_on_generated_files(tmp_path):
    write_imagenet32(tmp_path / "data", "npz")
    path = tmp_path / "inet32.yaml"
    path.write_text(RECIPE.format(root=tmp_path / "data"))
    result = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "runs"), "--quiet"])
    assert result.exit_code == 0, result.output
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert (run_dir / "summary.json").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()


def test_cli_reports_missing_files(tmp_path):
    path = tmp_path / "inet32.yaml"
    path.write_text(RECIPE.format(root=tmp_path / "empty"))
    result = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "imagenet32: missing train_data_batch_1" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_fast_dev_run_needs_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "inet32.yaml"
    path.write_text(RECIPE.format(root=tmp_path / "empty"))
    result = CliRunner().invoke(app, ["train", str(path), "--fast-dev-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("fast-dev-run ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inet32.yaml"]


def test_synthetic_like_imagenet32():
    splits = synthetic_like("imagenet32", 4, seed=0)
    assert splits.train.x.shape == (4, 3, 32, 32) and int(splits.train.y.max()) < 1000
