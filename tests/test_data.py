"""eprun.data: IDX format, MNIST lookup, splits, normalisation, synthetic data.

Fast and offline: every IDX file is generated in tmp_path, torchvision is replaced by a fake
module, and /work/shared or ./data are never read (except the embedded mnist-mini).
"""

from __future__ import annotations

import gzip
import socket
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eprun.data import (
    DATASETS, Split, Splits, load_splits, make_synthetic, read_idx, synthetic_like, write_idx,
)
from eprun.data.mnist import FILES, MNIST_MINI_DIR, SOURCES, candidate_dirs
from eprun.data.splits import split_indices
from eprun.errors import DataError, EprunError


# --------------------------------------------------------------------------- helpers


def fake_mnist(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images whose pixels (0,0) and (0,1) encode the example's index; labels i mod 10."""
    index = torch.arange(offset, offset + n)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 0, 0] = (index % 256).to(torch.uint8)
    images[:, 0, 1] = (index // 256).to(torch.uint8)
    images[:, 5:20, 5:20] = (index % 7 * 30).to(torch.uint8)[:, None, None]
    labels = (index % 10).to(torch.uint8)
    return images, labels


def write_mnist_folder(folder: Path, n_train: int = 300, n_test: int = 50, gz: bool = True) -> Path:
    """Write the four MNIST IDX files (tiny) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train = fake_mnist(n_train)
    x_test, y_test = fake_mnist(n_test, offset=10_000)
    tensors = {"train_images": x_train, "train_labels": y_train, "test_images": x_test, "test_labels": y_test}
    for role, tensor in tensors.items():
        write_idx(folder / (FILES[role] + (".gz" if gz else "")), tensor, gzip=gz)
    return folder


def decode_index(x: torch.Tensor) -> torch.Tensor:
    """Invert fake_mnist's index encoding from float images in [0, 1]."""
    pixels = (x[:, 0, 0, :2] * 255).round().long()
    return pixels[:, 0] + 256 * pixels[:, 1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No inherited data root; no real download unless a test installs fake_torchvision."""
    monkeypatch.delenv("EPRUN_DATA", raising=False)
    monkeypatch.setenv("EPRUN_OFFLINE", "1")


@pytest.fixture
def fake_torchvision(monkeypatch):
    """Replace torchvision.datasets with classes that record the call and fail like offline.

    Like torchvision, they create <root>/<Class>/raw before failing. Returns the list of
    (class name, root) calls.
    """
    calls: list[tuple[str, str]] = []

    def make(class_name: str):
        class Offline:
            def __init__(self, root, train=True, download=False):
                calls.append((class_name, root))
                (Path(root) / class_name / "raw").mkdir(parents=True, exist_ok=True)
                raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: Name or service not known")

        return Offline

    datasets = types.ModuleType("torchvision.datasets")
    datasets.MNIST = make("MNIST")
    datasets.FashionMNIST = make("FashionMNIST")
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    monkeypatch.delenv("EPRUN_OFFLINE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    return calls


# --------------------------------------------------------------------------- IDX format

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_idx_round_trip(tmp_path, dtype, gz):
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        tensor = torch.randn(3, 4, 5, generator=generator).to(dtype)
    else:
        info = torch.iinfo(dtype)
        tensor = torch.randint(info.min, info.max, (3, 4, 5), generator=generator, dtype=torch.int64).to(dtype)
    path = tmp_path / "array.idx"
    write_idx(path, tensor, gzip=gz)
    assert path.read_bytes().startswith(b"\x1f\x8b") == gz
    back = read_idx(path)
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_idx_header_is_big_endian_mnist_magic(tmp_path):
    write_idx(tmp_path / "labels", torch.arange(10, dtype=torch.uint8), gzip=False)
    write_idx(tmp_path / "images", torch.zeros(2, 28, 28, dtype=torch.uint8), gzip=False)
    assert (tmp_path / "labels").read_bytes()[:8] == bytes.fromhex("00000801 0000000a")
    assert (tmp_path / "images").read_bytes()[:16] == bytes.fromhex("00000803 00000002 0000001c 0000001c")
    write_idx(tmp_path / "i32", torch.tensor([1], dtype=torch.int32), gzip=False)
    assert (tmp_path / "i32").read_bytes() == bytes.fromhex("00000c01 00000001 00000001")


def test_gzip_detected_by_content_not_extension(tmp_path):
    tensor = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    write_idx(tmp_path / "gzipped-without-suffix", tensor, gzip=True)
    write_idx(tmp_path / "raw-with-suffix.gz", tensor, gzip=False)
    assert torch.equal(read_idx(tmp_path / "gzipped-without-suffix"), tensor)
    assert torch.equal(read_idx(tmp_path / "raw-with-suffix.gz"), tensor)


def test_gzip_output_is_reproducible(tmp_path):
    tensor = torch.arange(100, dtype=torch.uint8)
    write_idx(tmp_path / "a.gz", tensor, gzip=True)
    write_idx(tmp_path / "b.gz", tensor, gzip=True)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_wrong_magic_number(tmp_path):
    path = tmp_path / "bad-idx"
    path.write_bytes(bytes.fromhex("12345678") + bytes(16))
    with pytest.raises(DataError, match=r"bad-idx.*magic number 0x12345678.*0x00000803"):
        read_idx(path)


def test_unknown_dtype_code(tmp_path):
    path = tmp_path / "bad-dtype"
    path.write_bytes(bytes.fromhex("00000701 00000001") + b"\x00")
    with pytest.raises(DataError, match="magic number 0x00000701"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_payload(tmp_path, gz):
    path = tmp_path / "images"
    data = bytes.fromhex("00000803 00000002 0000001c 0000001c") + bytes(2 * 784 - 10)
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=r"images: IDX payload truncated: expected 1568 bytes .* found 1558"):
        read_idx(path)


def test_extra_bytes(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(bytes.fromhex("00000801 00000003") + bytes(5))
    with pytest.raises(DataError, match=r"labels: IDX payload has extra bytes: expected 3 bytes .* found 5"):
        read_idx(path)


def test_truncated_header_and_gzip(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(bytes.fromhex("00000803 00000002"))
    with pytest.raises(DataError, match="header truncated"):
        read_idx(short)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(bytes.fromhex("00000801 00000003 010203"))[:-6])
    with pytest.raises(DataError, match="broken.gz: corrupt or truncated gzip"):
        read_idx(broken)


def test_missing_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(tmp_path / "nothing")


# --------------------------------------------------------------------------- MNIST lookup


@pytest.mark.parametrize(
    "dataset, layout",
    [
        ("mnist", "."),
        ("mnist", "MNIST/raw"),
        ("mnist", "mnist"),
        ("fashion-mnist", "."),
        ("fashion-mnist", "FashionMNIST/raw"),
        ("fashion-mnist", "fashion-mnist"),
    ],
)
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_folder_layouts(tmp_path, dataset, layout, gz):
    write_mnist_folder(tmp_path / layout, n_train=40, n_test=20, gz=gz)
    splits = load_splits(dataset, root=str(tmp_path), val_size=10, split_seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 20)
    assert splits.train.x.shape == (30, 1, 28, 28) and splits.train.x.dtype == torch.float32
    assert splits.train.y.dtype == torch.int64
    assert splits.info is DATASETS[dataset]


def test_root_from_environment(tmp_path, monkeypatch):
    write_mnist_folder(tmp_path / "env-root" / "MNIST" / "raw", n_train=30, n_test=7)
    monkeypatch.setenv("EPRUN_DATA", str(tmp_path / "env-root"))
    assert len(load_splits("mnist", root=None, val_size=0, split_seed=0).test) == 7
    write_mnist_folder(tmp_path / "explicit", n_train=30, n_test=9)
    assert len(load_splits("mnist", root=str(tmp_path / "explicit"), val_size=0, split_seed=0).test) == 9


def test_default_root_is_dot_data(tmp_path, monkeypatch):
    write_mnist_folder(tmp_path / "data", n_train=30, n_test=5)
    monkeypatch.chdir(tmp_path)
    assert len(load_splits("mnist", root=None, val_size=0, split_seed=0).test) == 5


def test_missing_files_tries_download_then_names_files_and_folders(tmp_path, fake_torchvision):
    root = tmp_path / "empty"
    with pytest.raises(DataError) as caught:
        load_splits("mnist", root=str(root), val_size=0, split_seed=0)
    message = str(caught.value)
    for filename in FILES.values():
        assert f"{filename}(.gz)" in message
    for folder in (root, root / "MNIST" / "raw", root / "mnist"):
        assert str(folder) in message
    assert "data.root" in message and "$EPRUN_DATA" in message
    assert fake_torchvision == [("MNIST", str(root))]
    assert not root.exists(), "folders created by the failed download must be removed"
    assert socket.getdefaulttimeout() is None


def test_missing_some_files_names_only_those(tmp_path, fake_torchvision):
    folder = write_mnist_folder(tmp_path / "partial")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as caught:
        load_splits("mnist", root=str(folder), val_size=0, split_seed=0)
    message = str(caught.value)
    assert message.startswith("mnist: missing t10k-labels-idx1-ubyte(.gz);")
    assert "train-images" not in message
    assert fake_torchvision == [("MNIST", str(folder))]
    left = sorted(f + ".gz" for f in FILES.values() if "t10k-labels" not in f)
    assert sorted(p.name for p in folder.iterdir()) == left, "nothing written or removed"


def test_fashion_mnist_lookup_includes_debian_folder(tmp_path, fake_torchvision, monkeypatch):
    source = SOURCES["fashion-mnist"]
    assert candidate_dirs(source, Path("data")) == [
        Path("data"), Path("data/FashionMNIST/raw"), Path("data/fashion-mnist"),
        Path("/usr/share/datasets/fashion-mnist"),
    ]
    monkeypatch.setitem(SOURCES, "fashion-mnist", replace(source, system_dirs=(tmp_path / "system",)))
    with pytest.raises(DataError, match=r"fashion-mnist: missing .*; searched .*FashionMNIST/raw, .*system;"):
        load_splits("fashion-mnist", root=str(tmp_path), val_size=0, split_seed=0)
    assert fake_torchvision == [("FashionMNIST", str(tmp_path))]
    write_mnist_folder(tmp_path / "system", n_train=20, n_test=3)
    assert len(load_splits("fashion-mnist", root=str(tmp_path), val_size=0, split_seed=0).test) == 3


def test_offline_env_skips_download(tmp_path, fake_torchvision, monkeypatch):
    monkeypatch.setenv("EPRUN_OFFLINE", "1")
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte"):
        load_splits("mnist", root=str(tmp_path), val_size=0, split_seed=0)
    assert fake_torchvision == []


def test_successful_download_is_used(tmp_path, fake_torchvision, monkeypatch):
    def download(root, train=True, download=False):
        write_mnist_folder(Path(root) / "MNIST" / "raw", n_train=20, n_test=4, gz=False)

    monkeypatch.setattr(sys.modules["torchvision.datasets"], "MNIST", download)
    splits = load_splits("mnist", root=str(tmp_path), val_size=5, split_seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 4)


def test_image_label_count_mismatch(tmp_path):
    folder = write_mnist_folder(tmp_path, n_train=30)
    write_idx(folder / "train-labels-idx1-ubyte.gz", torch.zeros(29, dtype=torch.uint8), gzip=True)
    with pytest.raises(DataError, match=r"has 30 images but .*train-labels-idx1-ubyte.gz has 29 labels"):
        load_splits("mnist", root=str(tmp_path), val_size=0, split_seed=0)


def test_label_out_of_range(tmp_path):
    folder = write_mnist_folder(tmp_path, n_test=5)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", torch.tensor([0, 1, 2, 10, 3], dtype=torch.uint8), gzip=True)
    with pytest.raises(DataError, match=r"label 10 out of range; expected 0..9"):
        load_splits("mnist", root=str(tmp_path), val_size=0, split_seed=0)


def test_wrong_image_size(tmp_path):
    folder = write_mnist_folder(tmp_path, n_test=5)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", torch.zeros(5, 32, 32, dtype=torch.uint8), gzip=True)
    with pytest.raises(DataError, match=r"shape \(5, 32, 32\); expected uint8 of shape \(n, 28, 28\)"):
        load_splits("mnist", root=str(tmp_path), val_size=0, split_seed=0)


# --------------------------------------------------------------------------- splits


def test_val_split_is_deterministic_disjoint_and_complete(tmp_path):
    write_mnist_folder(tmp_path, n_train=300)
    first = load_splits("mnist", root=str(tmp_path), val_size=60, split_seed=7)
    again = load_splits("mnist", root=str(tmp_path), val_size=60, split_seed=7)
    other = load_splits("mnist", root=str(tmp_path), val_size=60, split_seed=8)
    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.val.y, again.val.y)
    train_ids, val_ids = decode_index(first.train.x), decode_index(first.val.x)
    assert (len(train_ids), len(val_ids)) == (240, 60)
    assert set(train_ids.tolist()).isdisjoint(val_ids.tolist())
    assert sorted(train_ids.tolist() + val_ids.tolist()) == list(range(300))
    assert torch.equal(first.train.y, train_ids % 10), "labels must stay with their images"
    assert not torch.equal(decode_index(other.val.x), val_ids)
    assert decode_index(first.test.x).tolist() == list(range(10_000, 10_050)), "test set untouched"


def test_val_size_zero_and_out_of_range(tmp_path):
    write_mnist_folder(tmp_path, n_train=50)
    assert load_splits("mnist", root=str(tmp_path), val_size=0, split_seed=0).val is None
    with pytest.raises(DataError, match=r"data.val_size = 50 .* expected 0 to 49"):
        load_splits("mnist", root=str(tmp_path), val_size=50, split_seed=0)
    with pytest.raises(DataError, match="data.val_size = -1"):
        load_splits("mnist", root=str(tmp_path), val_size=-1, split_seed=0)


def test_train_subset_keeps_permutation_prefix(tmp_path):
    write_mnist_folder(tmp_path, n_train=100)
    full = load_splits("mnist", root=str(tmp_path), val_size=20, split_seed=3)
    sub = load_splits("mnist", root=str(tmp_path), val_size=20, split_seed=3, train_subset=25)
    assert len(sub.train) == 25
    assert torch.equal(sub.train.x, full.train.x[:25])
    assert torch.equal(sub.val.x, full.val.x)
    with pytest.raises(DataError, match=r"data.train_subset = 81 .* expected 1 to 80"):
        load_splits("mnist", root=str(tmp_path), val_size=20, split_seed=3, train_subset=81)


def test_split_indices_partition():
    train, val = split_indices(1000, 100, split_seed=1)
    assert torch.equal(torch.cat([val, train]).sort().values, torch.arange(1000))
    assert torch.equal(split_indices(1000, 100, split_seed=1)[1], val)


def test_normalize_standard_uses_train_statistics(tmp_path):
    write_mnist_folder(tmp_path, n_train=200, n_test=50)
    raw = load_splits("mnist", root=str(tmp_path), val_size=40, split_seed=0)
    std = load_splits("mnist", root=str(tmp_path), val_size=40, split_seed=0, normalize="standard")
    assert raw.train.x.min() >= 0 and raw.train.x.max() <= 1
    assert abs(std.train.x.mean().item()) < 1e-5
    assert abs(std.train.x.std(correction=0).item() - 1) < 1e-4
    mean, sigma = raw.train.x.mean(), raw.train.x.std(correction=0)
    torch.testing.assert_close(std.test.x, (raw.test.x - mean) / sigma)
    torch.testing.assert_close(std.val.x, (raw.val.x - mean) / sigma)


def test_unknown_normalize_and_dataset():
    with pytest.raises(DataError, match=r"data.normalize: unknown value 'minmax'; allowed: none, standard"):
        load_splits("synthetic", root=None, val_size=0, split_seed=0, normalize="minmax")
    allowed = "allowed: " + ", ".join(sorted(DATASETS))
    with pytest.raises(DataError, match=rf"unknown dataset 'cifar-1000'; {allowed}"):
        load_splits("cifar-1000", root=None, val_size=0, split_seed=0)
    assert issubclass(DataError, EprunError)


# --------------------------------------------------------------------------- embedded, synthetic


def test_mnist_mini_is_embedded_and_small():
    files = sorted(p.name for p in MNIST_MINI_DIR.iterdir())
    assert files == sorted(f + ".gz" for f in FILES.values())
    assert sum((MNIST_MINI_DIR / f).stat().st_size for f in files) <= 3 * 1024 * 1024


def test_mnist_mini_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("EPRUN_DATA", str(tmp_path))  # no other data anywhere: must not matter
    splits = load_splits("mnist-mini", root=None, val_size=1000, split_seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9000, 1000, 2000)
    assert splits.train.x.shape == (9000, 1, 28, 28)
    assert 0 <= splits.train.x.min() and splits.train.x.max() <= 1 and splits.train.x.max() > 0.99
    for split in (splits.train, splits.val, splits.test):
        assert split.y.unique().tolist() == list(range(10))


def test_synthetic_is_deterministic_and_balanced():
    a = make_synthetic(100, 30, (1, 28, 28), 10, seed=5)
    b = make_synthetic(100, 30, (1, 28, 28), 10, seed=5)
    c = make_synthetic(100, 30, (1, 28, 28), 10, seed=6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    x_train, y_train, x_test, y_test = a
    assert x_train.shape == (100, 1, 28, 28) and x_test.shape == (30, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0 <= x_train.min() and x_train.max() <= 1
    assert y_train.bincount().tolist() == [10] * 10
    assert torch.equal(make_synthetic(100, 7, (1, 28, 28), 10, seed=5)[0], x_train), "train independent of n_test"


def test_synthetic_is_learnable():
    x_train, y_train, x_test, y_test = make_synthetic(500, 200, (1, 28, 28), 10, seed=0)
    centroids = torch.stack([x_train[y_train == c].mean(0) for c in range(10)]).flatten(1)
    predicted = torch.cdist(x_test.flatten(1), centroids).argmin(1)
    assert (predicted == y_test).float().mean() > 0.95


def test_synthetic_dataset_sizes_and_seed():
    splits = load_splits("synthetic", root=None, val_size=100, split_seed=1, synthetic_sizes=(400, 80))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (300, 100, 80)
    again = load_splits("synthetic", root=None, val_size=100, split_seed=1, synthetic_sizes=(400, 80))
    assert torch.equal(splits.train.x, again.train.x)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_synthetic_like_needs_no_files(tmp_path, monkeypatch, dataset):
    monkeypatch.setenv("EPRUN_DATA", str(tmp_path))
    splits = synthetic_like(dataset, n=8, seed=0, device="cpu")
    info = DATASETS[dataset]
    assert isinstance(splits, Splits) and isinstance(splits.val, Split)
    for split in (splits.train, splits.val, splits.test):
        assert split.x.shape == (8, *info.input_shape) and split.x.dtype == torch.float32
        assert split.y.shape == (8,) and split.y.dtype == torch.int64
        assert int(split.y.max()) < info.num_classes
    assert (splits.info.input_shape, splits.info.num_classes) == (info.input_shape, info.num_classes)
    assert list(tmp_path.iterdir()) == []
