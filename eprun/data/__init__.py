"""Datasets as whole tensors: the registry, splits and the file formats behind them.

The runner needs only::

    from eprun.data import DATASETS, load_splits, synthetic_like

Files: ``datasets.py`` (registry), ``splits.py`` (train/val/test, normalisation),
``idx.py`` (IDX format), ``mnist.py`` (MNIST, Fashion-MNIST, embedded mnist-mini),
``cifar.py`` (CIFAR-10/100 python batches, safe unpickling), ``imagenet32.py`` (ImageNet
32×32 pickle or npz batches), ``augment.py`` (per-batch random crop and flip on the device:
``from eprun.data.augment import augment``; the function is not re-exported here, where it
would hide the module), ``synthetic.py`` (generated data for tests and ``--fast-dev-run``).
"""

from eprun.data.augment import AugmentConfig
from eprun.data.cifar import load_cifar
from eprun.data.datasets import DATASETS, DatasetInfo, dataset_info
from eprun.data.idx import read_idx, write_idx
from eprun.data.imagenet32 import load_imagenet32
from eprun.data.splits import Split, Splits, load_splits, synthetic_like
from eprun.data.synthetic import make_synthetic

__all__ = [
    "AugmentConfig",
    "DATASETS",
    "DatasetInfo",
    "Split",
    "Splits",
    "dataset_info",
    "load_cifar",
    "load_imagenet32",
    "load_splits",
    "make_synthetic",
    "read_idx",
    "synthetic_like",
    "write_idx",
]
