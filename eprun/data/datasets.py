"""The dataset registry: recipe name (``data.dataset``) → what it is and how to load it.

A loader returns the whole dataset as CPU tensors ``(x_train, y_train, x_test, y_test)``:
images uint8 in 0..255 or float32 in [0, 1], any shape with ``prod(input_shape)`` values
per example; labels int64 in 0..num_classes−1. :func:`eprun.data.splits.load_splits` does
the rest (validation split, float conversion, normalisation, device).

Adding a dataset (CIFAR-10, ImageNet32 …) is one loader file plus one entry in
``_ENTRIES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from eprun.data.cifar import load_cifar
from eprun.data.imagenet32 import load_imagenet32
from eprun.data.mnist import load_mnist, load_mnist_mini
from eprun.data.synthetic import make_synthetic
from eprun.errors import DataError

RawData = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DatasetInfo:
    """What the network needs to know about a dataset."""

    name: str
    input_shape: tuple[int, ...]   # (channels, height, width); (1, 28, 28) for MNIST-like
    num_classes: int
    description: str


#: A loader: ``loader(root, seed, synthetic_sizes) -> RawData``. ``root`` is the data root
#: (``None``: ``$EPRUN_DATA`` or ``./data``); ``seed`` and ``synthetic_sizes`` matter only to
#: generated datasets.
Loader = Callable[[str | None, int, tuple[int, int]], RawData]


def _mnist(root: str | None, seed: int, synthetic_sizes: tuple[int, int]) -> RawData:
    return load_mnist("mnist", root)


def _fashion_mnist(root: str | None, seed: int, synthetic_sizes: tuple[int, int]) -> RawData:
    return load_mnist("fashion-mnist", root)


def _mnist_mini(root: str | None, seed: int, synthetic_sizes: tuple[int, int]) -> RawData:
    return load_mnist_mini()


def _cifar10(root: str | None, seed: int, synthetic_sizes: tuple[int, int]) -> RawData:
    return load_cifar("cifar10", root)


def _cifar100(root: str | None, seed: int, synthetic_sizes: tuple[int, int]) -> RawData:
    return load_cifar("cifar100", root)


def _imagenet32(root: str | None, seed: int, synthetic_sizes: tuple[int, int]) -> RawData:
    return load_imagenet32(root)


def _synthetic(root: str | None, seed: int, synthetic_sizes: tuple[int, int]) -> RawData:
    n_train, n_test = synthetic_sizes
    return make_synthetic(n_train, n_test, (1, 28, 28), 10, seed)


def _toy_random(root: str | None, seed: int, synthetic_sizes: tuple[int, int]) -> RawData:
    """The toy task of Ernoult et al. 2019 (Fig. 2): x ~ U[0, 1]^5, a random class of 10."""
    g = torch.Generator().manual_seed(seed)
    n_train, n_test = synthetic_sizes
    x = torch.rand(n_train + n_test, 5, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


_ENTRIES: dict[str, tuple[DatasetInfo, Loader]] = {
    "mnist": (
        DatasetInfo("mnist", (1, 28, 28), 10,
                    "MNIST handwritten digits: 60000 train / 10000 test, IDX files"),
        _mnist,
    ),
    "fashion-mnist": (
        DatasetInfo("fashion-mnist", (1, 28, 28), 10,
                    "Fashion-MNIST clothing: 60000 train / 10000 test, IDX files"),
        _fashion_mnist,
    ),
    "mnist-mini": (
        DatasetInfo("mnist-mini", (1, 28, 28), 10,
                    "embedded MNIST subset: first 10000 train / 2000 test images"),
        _mnist_mini,
    ),
    "cifar10": (
        DatasetInfo("cifar10", (3, 32, 32), 10,
                    "CIFAR-10 colour images: 50000 train / 10000 test, python pickle batches"),
        _cifar10,
    ),
    "cifar100": (
        DatasetInfo("cifar100", (3, 32, 32), 100,
                    "CIFAR-100 colour images (fine labels): 50000 train / 10000 test, python pickle batches"),
        _cifar100,
    ),
    "imagenet32": (
        DatasetInfo("imagenet32", (3, 32, 32), 1000,
                    "ImageNet 32x32 (Chrabaszcz et al. 2017): 1281167 train / 50000 val (scored as test), "
                    "pickle or npz batches in <root>/imagenet32/, no download"),
        _imagenet32,
    ),
    "toy-random": (
        DatasetInfo("toy-random", (5,), 10,
                    "random inputs in [0,1]^5 with random labels (the GDU toy task of Ernoult et al. 2019)"),
        _toy_random,
    ),
    "synthetic": (
        DatasetInfo("synthetic", (1, 28, 28), 10,
                    "generated class prototypes plus noise; sizes from synthetic_sizes"),
        _synthetic,
    ),
}

#: Registry keyed by the recipe's ``data.dataset`` string.
DATASETS: dict[str, DatasetInfo] = {name: info for name, (info, _) in _ENTRIES.items()}

#: The loader of each registered dataset.
LOADERS: dict[str, Loader] = {name: loader for name, (_, loader) in _ENTRIES.items()}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry for ``name``; DataError listing the allowed names otherwise."""
    if name not in DATASETS:
        allowed = ", ".join(sorted(DATASETS))
        raise DataError(f"data.dataset: unknown dataset {name!r}; allowed: {allowed}")
    return DATASETS[name]
