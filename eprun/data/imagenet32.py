"""ImageNet 32×32 (downsampled ImageNet, Chrabaszcz et al. 2017) from the distributed files.

image-net.org distributes the dataset (behind a login, so eprun never downloads it) as
``Imagenet32_train`` / ``Imagenet32_val`` (pickle batches) or ``Imagenet32_train_npz`` /
``Imagenet32_val_npz`` (numpy ``.npz`` archives). Unzipped, they go in the folder
``<root>/imagenet32/``, where ``<root>`` is ``data.root``, else ``$EPRUN_DATA``, else
``./data``. Accepted layouts, searched in this order::

    <root>/imagenet32/Imagenet32_train/      train_data_batch_1 … train_data_batch_10
    <root>/imagenet32/Imagenet32_train_npz/  train_data_batch_1.npz … train_data_batch_10.npz
    <root>/imagenet32/                       either set of train files, directly

    <root>/imagenet32/Imagenet32_val/        val_data
    <root>/imagenet32/Imagenet32_val_npz/    val_data.npz
    <root>/imagenet32/                       val_data or val_data.npz, directly

The training and validation files are found independently (so one may be pickles and the
other npz); all ten training batches must be in one folder, in one format.

Every file holds the same three entries (a pickled dict, or the arrays of the npz archive):

* ``data``: uint8 array (n, 3072); a row is the 32×32 red plane, then green, then blue,
  each row-major (the CIFAR layout), so it reshapes to (3, 32, 32) as is;
* ``labels``: n class ids **1..1000** (one-based; a list of ints in the pickles, an integer
  array in the npz archives); eprun shifts them to 0..999;
* ``mean``: optional, the training-set mean image; not read (see ``data.normalize``).

The pickles are read with :class:`eprun.data.cifar.SafeUnpickler`, which builds numpy arrays
and plain data only and refuses anything else; the npz archives with
``np.load(allow_pickle=False)``.

:func:`load_imagenet32` returns (x_train, y_train, x_test, y_test): the 1 281 167 training
images and the 50 000 validation images, which eprun scores as its *test* split (ImageNet's
own test labels are not public). The validation split for model selection is carved out of
the training images by :mod:`eprun.data.splits` (``data.val_size``).

Memory: the training images are 1 281 167 × 3072 bytes ≈ 3.9 GB as uint8. The batches are
read one after the other, then copied into one preallocated array, each batch released as
soon as it is copied, so the peak is about the dataset plus one batch (≈ 0.4 GB), not twice
the dataset as with a plain concatenation.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from eprun.data.cifar import load_pickle
from eprun.data.mnist import resolve_root
from eprun.errors import DataError

NAME = "imagenet32"
FOLDER = "imagenet32"
NUM_CLASSES = 1000
IMAGE_SHAPE = (3, 32, 32)
PIXELS = 3 * 32 * 32

TRAIN_BATCHES = tuple(f"train_data_batch_{i}" for i in range(1, 11))
VAL_BATCHES = ("val_data",)
NPZ = ".npz"

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

#: A place a split's files may be: (folder, file names), every name needed.
Candidate = tuple[Path, tuple[str, ...]]


def load_imagenet32(root: str | os.PathLike | None = None) -> Tensors:
    """Load ImageNet32 as (x_train, y_train, x_test, y_test); the test split is ImageNet's val.

    Images are uint8 (n, 3, 32, 32), labels int64 (n,) in 0..999, all on the CPU.
    """
    train_paths, val_paths = find_imagenet32(resolve_root(root))
    x_train, y_train = read_batches(train_paths)
    x_test, y_test = read_batches(val_paths)
    return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------- finding the files


def candidates(root: Path) -> dict[str, list[Candidate]]:
    """Where the "train" and "val" files are looked for, in order (see the module doc)."""
    base = root / FOLDER

    def places(split: str, names: tuple[str, ...]) -> list[Candidate]:
        npz_names = tuple(name + NPZ for name in names)
        return [(base / f"Imagenet32_{split}", names), (base / f"Imagenet32_{split}_npz", npz_names),
                (base, names), (base, npz_names)]

    return {"train": places("train", TRAIN_BATCHES), "val": places("val", VAL_BATCHES)}


def find_imagenet32(root: Path) -> tuple[list[Path], list[Path]]:
    """(training batch paths, validation file paths); DataError saying what to put where."""
    found = {split: _first_complete(places) for split, places in candidates(root).items()}
    if found["train"] is None or found["val"] is None:
        raise DataError(_missing_message(root))
    return found["train"], found["val"]


def _first_complete(places: list[Candidate]) -> list[Path] | None:
    """The paths of the first candidate holding every one of its files."""
    for folder, names in places:
        paths = [folder / name for name in names]
        if all(path.is_file() for path in paths):
            return paths
    return None


def _missing_message(root: Path) -> str:
    """One line: the files missing from the most complete folders, where to get and put them."""
    base = root / FOLDER
    missing: list[str] = []
    searched: list[str] = []
    for places in candidates(root).values():
        if _first_complete(places) is not None:
            continue
        folder, names = max(places, key=lambda place: sum((place[0] / n).is_file() for n in place[1]))
        absent = [name for name in names if not (folder / name).is_file()]
        missing.append(f"{_names(absent, names)} in {folder}")
        searched.extend(str(f) for f, _ in places if str(f) not in searched)
    return (
        f"{NAME}: missing {'; '.join(missing)} (searched {', '.join(searched)}); ImageNet32 needs an "
        f"image-net.org login, so eprun cannot download it: get Imagenet32_train.zip and "
        f"Imagenet32_val.zip (or the _npz variants) from https://image-net.org/download-images and "
        f"unzip them into {base}, giving {base / 'Imagenet32_train'}/train_data_batch_1 … "
        f"train_data_batch_10 and {base / 'Imagenet32_val'}/val_data; or set data.root / $EPRUN_DATA "
        f"to the folder that holds imagenet32/"
    )


def _names(absent: list[str], expected: tuple[str, ...]) -> str:
    """The absent file names for a message; all ten training batches as "first … last"."""
    return f"{absent[0]} … {absent[-1]}" if len(absent) == len(expected) > 3 else ", ".join(absent)


# --------------------------------------------------------------------------- reading the files


def read_batches(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read, check and join batches: uint8 (n, 3, 32, 32) and int64 labels (n,) in 0..999.

    The batches are copied into one preallocated array, each released once copied.
    """
    batches = [read_batch(path) for path in paths]
    total = sum(len(labels) for _, labels in batches)
    images = np.empty((total, PIXELS), dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    start = 0
    batches.reverse()
    while batches:
        data, batch_labels = batches.pop()
        stop = start + len(batch_labels)
        images[start:stop] = data
        labels[start:stop] = batch_labels
        start = stop
        del data, batch_labels
    return torch.from_numpy(images.reshape(total, *IMAGE_SHAPE)), torch.from_numpy(labels)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One file (pickle, or npz when named ``*.npz``) → (uint8 (n, 3072), int64 labels 0..999)."""
    entries = _load_npz(path) if path.name.endswith(NPZ) else _load_pickled_batch(path)
    return check_batch(entries, path)


def _load_pickled_batch(path: Path) -> Mapping[str, object]:
    """A pickled batch as a dict with str keys; DataError when it is not a safe pickled dict."""
    batch = load_pickle(path, NAME, expected="an ImageNet32 pickle batch")
    if not isinstance(batch, dict):
        raise DataError(f"{NAME}: {path}: holds a pickled {type(batch).__name__}; "
                        f"expected a dict with 'data' and 'labels' (an ImageNet32 pickle batch)")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}


def _load_npz(path: Path) -> Mapping[str, object]:
    """The 'data' and 'labels' arrays of an npz archive, read without pickle support."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{NAME}: {path}: holds a single .npy array, not an .npz archive; "
                            f"expected numpy's savez format with 'data' and 'labels'")
        with archive:
            return {key: archive[key] for key in archive.files if key in ("data", "labels")}
    except DataError:
        raise
    except OSError as err:
        raise DataError(f"{NAME}: {path}: cannot read: {err.strerror or err}") from err
    except Exception as err:  # noqa: BLE001 - corrupt archives and pickled members fail in many ways
        raise DataError(f"{NAME}: {path}: not a readable .npz archive ({type(err).__name__}: {err}); "
                        f"expected numpy's savez format with uint8 'data' and integer 'labels'") from err


# --------------------------------------------------------------------------- checking the contents


def check_batch(batch: Mapping[str, object], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Check a batch's 'data' and 'labels'; return the images and the labels shifted to 0..999."""
    missing = [key for key in ("data", "labels") if key not in batch]
    if missing:
        found = ", ".join(repr(k) for k in batch) or "nothing"
        raise DataError(f"{NAME}: {path}: missing key {', '.join(map(repr, missing))} (found {found}); "
                        f"expected 'data' and 'labels' (and optionally 'mean')")
    data = _check_data(batch["data"], path)
    labels = _check_labels(batch["labels"], len(data), path)
    return data, labels - 1


def _check_data(data: object, path: Path) -> np.ndarray:
    """'data' must be a uint8 array (n, 3072)."""
    if not isinstance(data, np.ndarray):
        raise DataError(f"{NAME}: {path}: 'data' is a {type(data).__name__}; "
                        f"expected a uint8 array of shape (n, {PIXELS})")
    if data.ndim != 2:
        raise DataError(f"{NAME}: {path}: 'data' has shape {data.shape}; "
                        f"expected (n, {PIXELS}), one row of 3×32×32 values per image")
    if data.shape[1] != PIXELS:
        raise DataError(f"{NAME}: {path}: 'data' has {data.shape[1]} columns, expected {PIXELS} (3×32×32)"
                        f"{_size_hint(data.shape[1])}")
    if data.dtype != np.uint8:
        raise DataError(f"{NAME}: {path}: 'data' is a {data.dtype} array; expected uint8 pixels 0..255")
    return data


def _size_hint(columns: int) -> str:
    """Name the image size that ``columns`` values per row would be, when it is 3 × side²."""
    side = math.isqrt(columns // 3)
    return f"; these look like {side}×{side} images (ImageNet{side}?)" if 3 * side * side == columns else ""


def _check_labels(value: object, n: int, path: Path) -> np.ndarray:
    """'labels' must be n integers in 1..1000; returned as int64, still one-based."""
    if isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
        labels = np.asarray(value, dtype=np.int64).reshape(-1)
    elif isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        labels = value.astype(np.int64)
    else:
        desc = f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise DataError(f"{NAME}: {path}: 'labels' is a {desc}; "
                        f"expected n integer class ids 1..{NUM_CLASSES} (a list or 1-D integer array)")
    if len(labels) != n:
        raise DataError(f"{NAME}: {path}: {n} images in 'data' but {len(labels)} 'labels'; "
                        f"expected one label per image")
    bad = np.flatnonzero((labels < 1) | (labels > NUM_CLASSES))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{NAME}: {path}: label {int(labels[i])} (image {i}) out of range; "
                        f"expected 1..{NUM_CLASSES} (ImageNet32 class ids are one-based)")
    return labels
