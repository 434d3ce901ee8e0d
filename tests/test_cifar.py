"""eprun.data.cifar: CIFAR-10/100 python batches, safe unpickling, archive, registry, splits.

Fast and offline: every batch is generated in tmp_path (20 images each), torchvision is
replaced by a fake module where a download could be attempted, ./data is never read.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import re
import shlex
import struct
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from eprun.data import DATASETS, load_cifar, load_splits, synthetic_like
from eprun.data.cifar import SOURCES, candidate_dirs, read_batch
from eprun.data.splits import NORMALIZE_CONSTANTS
from eprun.errors import DataError

N = 20  # images per generated batch


# --------------------------------------------------------------------------- helpers


def fake_batch(n: int, offset: int, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """n rows (n, 3072) whose first two red pixels encode the example's index; labels i mod C.

    The three colour planes hold distinct constants (10, 20, 30) elsewhere, so the channel
    order can be checked.
    """
    index = np.arange(offset, offset + n)
    data = np.zeros((n, 3, 1024), dtype=np.uint8)
    data[:, 0, :] = 10
    data[:, 1, :] = 20
    data[:, 2, :] = 30
    data[:, 0, 0] = index % 256
    data[:, 0, 1] = index // 256
    return data.reshape(n, 3072), [int(i % num_classes) for i in index]


def decode_index(x: torch.Tensor) -> torch.Tensor:
    """Invert fake_batch's index encoding from uint8 (n, 3, 32, 32) or float images in [0, 1]."""
    pixels = x[:, 0, 0, :2]
    pixels = pixels.long() if x.dtype == torch.uint8 else (pixels * 255).round().long()
    return pixels[:, 0] + 256 * pixels[:, 1]


def write_batch(path: Path, data: object, labels: object, labels_key: str = "labels", protocol: int = 2) -> Path:
    """A batch like the originals: a dict with byte-string keys, pickled."""
    batch = {b"batch_label": b"generated batch", labels_key.encode(): labels, b"data": data,
             b"filenames": [b"img_%d.png" % i for i in range(len(labels))]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    return path


def write_cifar(folder: Path, name: str = "cifar10", n: int = N) -> Path:
    """Write every batch (n images each) and the meta file of ``name`` into ``folder``."""
    source = SOURCES[name]
    for i, filename in enumerate(source.files):
        data, labels = fake_batch(n, 1000 * i, source.num_classes)
        write_batch(folder / filename, data, labels, source.labels_key)
    (folder / source.meta_file).write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2))
    return folder


def py2_pickle(batch: dict[bytes, object]) -> bytes:
    """Pickle ``batch`` the way Python 2's cPickle wrote the official files (protocol 2).

    Byte strings are Python 2 ``str`` (BINSTRING opcodes, no ``_codecs.encode``) and arrays
    reference ``numpy.core.multiarray._reconstruct`` (numpy 1's name).
    """
    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def integer(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    def array(a: np.ndarray) -> bytes:
        shape = b"(" + b"".join(integer(d) for d in a.shape) + b"t"
        dtype = (b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R"
                 + b"(" + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb")
        return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + integer(0) + b"\x85"
                + string(b"b") + b"\x87R" + b"(" + integer(1) + shape + dtype + b"\x89"
                + string(a.tobytes()) + b"tb")

    out = b"\x80\x02}("
    for key, value in batch.items():
        out += string(key)
        if isinstance(value, np.ndarray):
            out += array(value)
        elif isinstance(value, list):
            out += b"](" + b"".join(integer(v) for v in value) + b"e"
        else:
            out += string(value)
    return out + b"u."


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No inherited data root; no real download unless a test installs fake_torchvision."""
    monkeypatch.delenv("EPRUN_DATA", raising=False)
    monkeypatch.setenv("EPRUN_OFFLINE", "1")


@pytest.fixture
def fake_torchvision(monkeypatch):
    """torchvision.datasets.CIFAR10/100 that record the call, create root and fail like offline."""
    calls: list[tuple[str, str]] = []

    def make(class_name: str):
        class Offline:
            def __init__(self, root, train=True, download=False):
                calls.append((class_name, root))
                Path(root).mkdir(parents=True, exist_ok=True)
                raise RuntimeError("Error downloading cifar-10-python.tar.gz: Name or service not known")

        return Offline

    datasets = types.ModuleType("torchvision.datasets")
    datasets.CIFAR10 = make("CIFAR10")
    datasets.CIFAR100 = make("CIFAR100")
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    monkeypatch.delenv("EPRUN_OFFLINE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    return calls


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("layout", ["subfolder", "root"])
def test_round_trip(tmp_path, name, layout):
    source = SOURCES[name]
    write_cifar(tmp_path / source.folder if layout == "subfolder" else tmp_path, name)
    x_train, y_train, x_test, y_test = load_cifar(name, tmp_path)

    n_train = N * len(source.train_files)
    assert x_train.shape == (n_train, 3, 32, 32) and x_train.dtype == torch.uint8
    assert x_test.shape == (N, 3, 32, 32) and x_test.dtype == torch.uint8
    assert y_train.shape == (n_train,) and y_train.dtype == torch.int64
    assert y_test.dtype == torch.int64
    # Train batches concatenated in file order; test batch separate.
    expected = torch.cat([torch.arange(1000 * i, 1000 * i + N) for i in range(len(source.train_files))])
    assert torch.equal(decode_index(x_train), expected)
    test_offset = 1000 * len(source.train_files)
    assert torch.equal(decode_index(x_test), torch.arange(test_offset, test_offset + N))
    assert torch.equal(y_train, expected % source.num_classes)
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each 32×32 row-major.
    assert int(x_train[0, 0, 5, 7]) == 10 and int(x_train[0, 1, 31, 31]) == 20 and int(x_train[0, 2, 0, 0]) == 30


def test_cifar100_uses_fine_labels(tmp_path):
    folder = write_cifar(tmp_path / "cifar-100-python", "cifar100", n=150)
    _, y_train, _, _ = load_cifar("cifar100", tmp_path)
    assert int(y_train.max()) == 99
    data, labels = fake_batch(N, 0, 100)
    write_batch(folder / "train", data, labels, labels_key="labels")  # CIFAR-10's key
    with pytest.raises(DataError, match=r"train: missing key 'fine_labels'"):
        load_cifar("cifar100", tmp_path)


def test_env_root_and_subfolder_first(tmp_path, monkeypatch):
    write_cifar(tmp_path / "cifar-10-batches-py")
    monkeypatch.setenv("EPRUN_DATA", str(tmp_path))
    x_train, *_ = load_cifar("cifar10")
    assert len(x_train) == 5 * N
    assert candidate_dirs(SOURCES["cifar10"], tmp_path) == [tmp_path / "cifar-10-batches-py", tmp_path]


def test_python2_style_pickle_loads(tmp_path):
    """The official files: cPickle protocol 2, str keys as BINSTRING, numpy.core names."""
    data, labels = fake_batch(N, 7, 10)
    path = tmp_path / "data_batch_1"
    path.write_bytes(py2_pickle({b"batch_label": b"training batch 1 of 5", b"labels": labels, b"data": data}))
    images, got_labels = read_batch(path, "labels", 10)
    assert images.dtype == np.uint8 and np.array_equal(images, data)
    assert got_labels.tolist() == labels


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python3_pickle_protocols_load(tmp_path, protocol):
    data, labels = fake_batch(N, 0, 10)
    path = write_batch(tmp_path / "b", data, np.array(labels, dtype=np.int32), protocol=protocol)
    images, got_labels = read_batch(path, "labels", 10)
    assert np.array_equal(images, data) and got_labels.tolist() == labels


# --------------------------------------------------------------------------- missing files


def test_missing_files_named_with_folders(tmp_path):
    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(DataError) as err:
        load_cifar("cifar10", tmp_path)
    message = str(err.value)
    assert "missing data_batch_3, test_batch;" in message
    assert "data_batch_1" not in message
    assert str(folder) in message and "cifar-10-python.tar.gz" in message and "\n" not in message


def test_empty_root_names_every_file(tmp_path):
    with pytest.raises(DataError, match=r"cifar100: missing train, test; searched .*cifar-100-python"):
        load_cifar("cifar100", tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_offline_skips_download(tmp_path, fake_torchvision, monkeypatch):
    monkeypatch.setenv("EPRUN_OFFLINE", "1")
    with pytest.raises(DataError, match="missing"):
        load_cifar("cifar10", tmp_path / "data")
    assert fake_torchvision == []


def test_failed_download_tried_once_then_cleans_up(tmp_path, fake_torchvision):
    root = tmp_path / "data"
    with pytest.raises(DataError, match="cifar10: missing data_batch_1"):
        load_cifar("cifar10", root)
    assert fake_torchvision == [("CIFAR10", str(root))]
    assert not root.exists()


# --------------------------------------------------------------------------- unsafe or bad files


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _Open:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class _Codec:
    def __reduce__(self):
        return codecs.encode, ("payload", "rot13")


@pytest.mark.parametrize("evil, reference", [
    (_System, rf"pickle references {os.system.__module__}\.system"),
    (_Open, rf"pickle references {open.__module__}\.open"),
    (_Codec, r"pickle calls _codecs\.encode with codec 'rot13'; only latin1 is allowed"),
], ids=["os.system", "open", "codecs"])
def test_malicious_pickle_is_refused(tmp_path, evil, reference):
    marker = tmp_path / "pwned"
    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    data, labels = fake_batch(N, 0, 10)
    payload = evil(marker) if evil is not _Codec else _Codec()
    batch = {b"data": data, b"labels": labels, b"extra": payload}
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError) as err:
        load_cifar("cifar10", tmp_path)
    message = str(err.value)
    assert "refuses to load" in message and str(folder / "data_batch_2") in message
    assert re.search(reference, message)
    assert not marker.exists()


def test_truncated_file(tmp_path):
    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    path = folder / "data_batch_4"
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(DataError, match=r"data_batch_4: corrupt or truncated pickle"):
        load_cifar("cifar10", tmp_path)


def test_not_a_pickle(tmp_path):
    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    (folder / "test_batch").write_text("<html>404 not found</html>")
    with pytest.raises(DataError, match=r"test_batch: corrupt or truncated pickle"):
        load_cifar("cifar10", tmp_path)


def _bad(tmp_path, data, labels, **batch):
    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    path = write_batch(folder / "data_batch_5", data, labels)
    if batch:
        path.write_bytes(pickle.dumps(batch["raw"], protocol=2))
    with pytest.raises(DataError) as err:
        load_cifar("cifar10", tmp_path)
    assert "data_batch_5" in str(err.value) and "\n" not in str(err.value)
    return str(err.value)


def test_wrong_shape(tmp_path):
    data, labels = fake_batch(N, 0, 10)
    message = _bad(tmp_path, data.reshape(N * 3, 1024), labels * 3)
    assert "uint8 array of shape (60, 1024); expected a uint8 array of shape (n, 3072)" in message


def test_wrong_dtype(tmp_path):
    data, labels = fake_batch(N, 0, 10)
    assert "float32 array" in _bad(tmp_path, data.astype(np.float32), labels)


def test_label_out_of_range(tmp_path):
    data, labels = fake_batch(N, 0, 10)
    labels[3] = 10
    assert "label 10 out of range; expected 0..9" in _bad(tmp_path, data, labels)
    labels[3] = -1
    assert "label -1 out of range" in _bad(tmp_path, data, labels)


def test_count_mismatch(tmp_path):
    data, labels = fake_batch(N, 0, 10)
    assert "20 images but 19 'labels'" in _bad(tmp_path, data, labels[:-1])


def test_labels_not_integers(tmp_path):
    data, labels = fake_batch(N, 0, 10)
    assert "not a list of integer labels" in _bad(tmp_path, data, [float(v) for v in labels])


def test_not_a_dict(tmp_path):
    assert "holds a pickled list; expected a dict" in _bad(tmp_path, None, [], raw=[1, 2, 3])


# --------------------------------------------------------------------------- archive


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_archive(tmp_path: Path, root: Path, extra: list[tarfile.TarInfo] = (), skip: str | None = None) -> Path:
    """The official-style archive of generated batches, plus hostile members."""
    staging = write_cifar(tmp_path / "staging")
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        _add(tar, "../escaped", b"outside")
        _add(tar, "cifar-10-batches-py/../../escaped2", b"outside")
        _add(tar, "/tmp/absolute-escape-eprun-test", b"outside")
        _add(tar, "cifar-10-batches-py/readme.html", b"<html/>")
        for member in extra:
            tar.addfile(member)
        for path in sorted(staging.iterdir()):
            if path.name != skip:
                _add(tar, f"cifar-10-batches-py/{path.name}", path.read_bytes())
    return archive


def test_archive_extracted_safely(tmp_path):
    root = tmp_path / "a" / "data"
    write_archive(tmp_path, root)
    x_train, y_train, x_test, _ = load_cifar("cifar10", root)
    assert x_train.shape == (5 * N, 3, 32, 32) and x_test.shape == (N, 3, 32, 32)
    extracted = sorted(p.name for p in (root / "cifar-10-batches-py").iterdir())
    assert extracted == sorted([*SOURCES["cifar10"].files, "batches.meta"])
    assert not (tmp_path / "a" / "escaped").exists() and not (tmp_path / "escaped2").exists()
    assert not (tmp_path / "a" / "escaped2").exists()
    # Second load reads the extracted folder.
    (root / "cifar-10-python.tar.gz").unlink()
    assert torch.equal(load_cifar("cifar10", root)[1], y_train)


def test_archive_symlink_member_refused(tmp_path):
    link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    root = tmp_path / "data"
    write_archive(tmp_path, root, extra=[link], skip="data_batch_1")
    with pytest.raises(DataError, match=r"member cifar-10-batches-py/data_batch_1 is not a regular file"):
        load_cifar("cifar10", root)
    assert not (root / "cifar-10-batches-py" / "data_batch_1").is_symlink()


def test_archive_missing_member(tmp_path):
    root = tmp_path / "data"
    write_archive(tmp_path, root, skip="test_batch")
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz: lacks cifar-10-batches-py/test_batch"):
        load_cifar("cifar10", root)


def test_corrupt_archive(tmp_path):
    root = tmp_path / "data"
    archive = write_archive(tmp_path, root)
    archive.write_bytes(archive.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"cannot extract .*cifar-10-python.tar.gz.*extract it by hand"):
        load_cifar("cifar10", root)


# --------------------------------------------------------------------------- registry and splits


def test_registry_entries():
    assert DATASETS["cifar10"].input_shape == (3, 32, 32) and DATASETS["cifar10"].num_classes == 10
    assert DATASETS["cifar100"].input_shape == (3, 32, 32) and DATASETS["cifar100"].num_classes == 100


def test_load_splits_cifar10(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    splits = load_splits("cifar10", root=str(tmp_path), val_size=10, split_seed=3)
    assert splits.train.x.shape == (90, 3, 32, 32) and splits.train.x.dtype == torch.float32
    assert splits.val.x.shape == (10, 3, 32, 32) and splits.test.x.shape == (N, 3, 32, 32)
    assert splits.train.y.dtype == torch.int64 and splits.info.num_classes == 10
    assert 0.0 <= float(splits.train.x.min()) and float(splits.train.x.max()) <= 1.0
    # Validation carved from training, disjoint, nothing lost.
    seen = torch.cat([decode_index(splits.train.x), decode_index(splits.val.x)]).sort().values
    assert torch.equal(seen, torch.cat([torch.arange(1000 * i, 1000 * i + N) for i in range(5)]))
    assert torch.equal(decode_index(splits.test.x), torch.arange(5000, 5000 + N))


def test_normalize_standard_is_per_channel(tmp_path):
    rng = np.random.default_rng(0)
    for filename in SOURCES["cifar10"].files:
        scale = np.array([60, 120, 250], dtype=np.float64)[None, :, None]  # different σ per channel
        data = (rng.random((N, 3, 1024)) * scale).astype(np.uint8).reshape(N, 3072)
        write_batch(tmp_path / filename, data, [0] * N)
    splits = load_splits("cifar10", root=str(tmp_path), val_size=0, split_seed=0, normalize="standard")
    x = splits.train.x
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), correction=0)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4) and torch.allclose(std, torch.ones(3), atol=1e-4)


def test_normalize_cifar10_constants(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    plain = load_splits("cifar10", root=str(tmp_path), val_size=5, split_seed=0)
    fixed = load_splits("cifar10", root=str(tmp_path), val_size=5, split_seed=0, normalize="cifar10")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZE_CONSTANTS["cifar10"])
    assert mean.flatten().tolist() == pytest.approx([0.4914, 0.4822, 0.4465])
    assert std.flatten().tolist() == pytest.approx([0.2470, 0.2435, 0.2616])
    for a, b in [(plain.train, fixed.train), (plain.val, fixed.val), (plain.test, fixed.test)]:
        assert torch.allclose(b.x, (a.x - mean) / std)
        assert torch.equal(a.y, b.y)


def test_normalize_cifar10_needs_three_channels(tmp_path):
    # Checked before any file is read: the message is about channels, not missing files.
    with pytest.raises(DataError, match=r"'cifar10' has constants for 3 channels but mnist images have 1"):
        load_splits("mnist", root=str(tmp_path), val_size=0, split_seed=0, normalize="cifar10")


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_synthetic_like_cifar(name, classes):
    splits = synthetic_like(name, 6, seed=0)
    for split in (splits.train, splits.val, splits.test):
        assert split.x.shape == (6, 3, 32, 32) and split.x.dtype == torch.float32
        assert int(split.y.max()) < classes
    assert splits.info.input_shape == (3, 32, 32) and splits.info.num_classes == classes
