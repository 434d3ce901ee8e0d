"""MNIST, Fashion-MNIST and the embedded ``mnist-mini`` subset, from IDX files.

Each dataset is four IDX files, raw or gzipped (``<name>`` or ``<name>.gz``)::

    train-images-idx3-ubyte   uint8 (n_train, 28, 28)
    train-labels-idx1-ubyte   uint8 (n_train,)          values 0..9
    t10k-images-idx3-ubyte    uint8 (n_test, 28, 28)
    t10k-labels-idx1-ubyte    uint8 (n_test,)

The data root is the ``root`` argument, else ``$EPRUN_DATA``, else ``./data``. Under it the
four files are looked for in ``<root>/``, then ``<root>/MNIST/raw/`` (torchvision's layout;
``FashionMNIST/raw`` for Fashion-MNIST), then ``<root>/mnist/`` (``fashion-mnist/``);
Fashion-MNIST also in ``/usr/share/datasets/fashion-mnist/`` (Debian's
``dataset-fashion-mnist``). When none of them holds all four files, torchvision's download
is tried once (skipped when ``$EPRUN_OFFLINE`` or ``$CI`` is set); then a :class:`DataError`
names the missing files and the folders searched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from eprun.data.download import try_torchvision_download
from eprun.data.idx import read_idx
from eprun.errors import DataError


#: The four IDX files, keyed by role.
FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

IMAGE_SIZE = (28, 28)
NUM_CLASSES = 10

#: Folder holding the embedded mnist-mini files (built by scripts/make_mnist_mini.py).
MNIST_MINI_DIR = Path(__file__).parent / "mnist_mini"



@dataclass(frozen=True)
class Source:
    """Where one IDX dataset may live and how torchvision downloads it."""

    name: str                       # as in the recipe: "mnist", "fashion-mnist"
    torchvision_class: str          # "MNIST", "FashionMNIST" (also its raw folder's parent)
    subdir: str                     # "<root>/<subdir>/" alternative layout
    system_dirs: tuple[Path, ...] = ()


SOURCES: dict[str, Source] = {
    "mnist": Source("mnist", "MNIST", "mnist"),
    "fashion-mnist": Source(
        "fashion-mnist", "FashionMNIST", "fashion-mnist",
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
    ),
}

MnistTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load_mnist(name: str, root: str | os.PathLike | None = None) -> MnistTensors:
    """Load ``name`` ("mnist" or "fashion-mnist") as (x_train, y_train, x_test, y_test).

    Images are uint8 (n, 28, 28), labels int64 (n,), all on the CPU.
    """
    source = SOURCES[name]
    folder = find_folder(source, resolve_root(root))
    return read_mnist_folder(folder, name)


def load_mnist_mini() -> MnistTensors:
    """The embedded subset: the first 10000 MNIST training and 2000 test images."""
    return read_mnist_folder(MNIST_MINI_DIR, "mnist-mini")


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The data root: ``root`` if given, else ``$EPRUN_DATA``, else ``./data``."""
    if root is not None and str(root) != "":
        return Path(root)
    return Path(os.environ.get("EPRUN_DATA") or "data")


def candidate_dirs(source: Source, root: Path) -> list[Path]:
    """Folders searched, in order, for the four IDX files."""
    return [
        root,
        root / source.torchvision_class / "raw",
        root / source.subdir,
        *source.system_dirs,
    ]


def find_folder(source: Source, root: Path) -> Path:
    """The first candidate folder with all four files; download once, else DataError."""
    dirs = candidate_dirs(source, root)
    folder = _first_complete(dirs)
    if folder is None and try_torchvision_download(source.name, source.torchvision_class, root,
                                                     root / source.torchvision_class / "raw"):
        folder = _first_complete(dirs)
    if folder is None:
        raise DataError(_missing_message(source.name, dirs))
    return folder


def read_mnist_folder(folder: Path, name: str) -> MnistTensors:
    """Read and check the four IDX files in ``folder`` (``name`` is used in messages)."""
    paths = {role: _existing(folder, filename) for role, filename in FILES.items()}
    missing = [FILES[role] + "(.gz)" for role, path in paths.items() if path is None]
    if missing:
        raise DataError(f"{name}: missing {', '.join(missing)} in {folder}")
    x_train, y_train = _read_pair(name, paths["train_images"], paths["train_labels"])
    x_test, y_test = _read_pair(name, paths["test_images"], paths["test_labels"])
    return x_train, y_train, x_test, y_test


def _read_pair(name: str, images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one images/labels pair and check dtype, shapes, counts and label range."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != IMAGE_SIZE:
        raise DataError(
            f"{name}: {images_path}: images are {images.dtype} of shape {tuple(images.shape)}; "
            f"expected uint8 of shape (n, 28, 28)"
        )
    if labels.dtype != torch.uint8 or labels.dim() != 1:
        raise DataError(
            f"{name}: {labels_path}: labels are {labels.dtype} of shape {tuple(labels.shape)}; "
            f"expected uint8 of shape (n,)"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{name}: {images_path} has {len(images)} images but {labels_path} has "
            f"{len(labels)} labels; expected the same count"
        )
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise DataError(
            f"{name}: {labels_path}: label {int(labels.max())} out of range; expected 0..{NUM_CLASSES - 1}"
        )
    return images, labels.long()


def _existing(folder: Path, filename: str) -> Path | None:
    """``folder/filename`` or ``folder/filename.gz``, whichever exists (raw first)."""
    for candidate in (folder / filename, folder / f"{filename}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _first_complete(dirs: list[Path]) -> Path | None:
    """The first folder holding all four files."""
    for folder in dirs:
        if all(_existing(folder, filename) for filename in FILES.values()):
            return folder
    return None


def _missing_message(name: str, dirs: list[Path]) -> str:
    """Name the files missing from the most complete folder, and every folder searched."""
    best = max(dirs, key=lambda d: sum(_existing(d, f) is not None for f in FILES.values()))
    missing = [f + "(.gz)" for f in FILES.values() if _existing(best, f) is None]
    searched = ", ".join(str(d) for d in dirs)
    return (
        f"{name}: missing {', '.join(missing)}; searched {searched}; put the four IDX files "
        f"in one of these folders or set data.root / $EPRUN_DATA"
    )
