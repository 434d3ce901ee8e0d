"""Train / validation / test splits as whole tensors on the device.

The validation split is carved from the training set, never from the test set: a random
permutation π of the n training indices from ``torch.Generator().manual_seed(split_seed)``;
π[:val_size] is validation, π[val_size:] is training (optionally only its first
``train_subset`` entries). The same seed always gives the same split, on any device.

Images become float32 in [0, 1] (uint8 / 255), shaped (n, *input_shape), and move to the
device once. ``normalize="standard"`` then maps x ↦ (x − μ_c) / σ_c with μ_c, σ_c the mean
and (population) standard deviation of channel c over the *training* split only, applied to
every split. ``normalize="cifar10"`` uses fixed constants instead: the well-known CIFAR-10
training-set per-channel mean (0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616), for
any 3-channel dataset (:data:`NORMALIZE_CONSTANTS`); ``normalize="imagenet32"`` the usual
ImageNet constants, mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from eprun.data.datasets import LOADERS, DatasetInfo, dataset_info
from eprun.data.synthetic import make_synthetic
from eprun.errors import DataError

#: Fixed per-channel (mean, std) by ``data.normalize`` value; x ↦ (x − mean_c) / std_c.
NORMALIZE_CONSTANTS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # Laborieux et al. 2021's code: the usual means, three times the (per-pixel) stds it quotes
    "cifar10-laborieux2021": ((0.4914, 0.4822, 0.4465), (3 * 0.2023, 3 * 0.1994, 3 * 0.2010)),
    # The commonly used ImageNet per-channel values (those of the full-resolution training set,
    # as torchvision's models use them), not recomputed on the 32×32 images.
    "imagenet32": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

NORMALIZE_MODES = ("none", "standard", *NORMALIZE_CONSTANTS)


@dataclass
class Split:
    """One split: images float32 (n, *input_shape), labels int64 (n,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Splits:
    """The three splits of a dataset; ``val`` is None when ``val_size`` is 0."""

    train: Split
    val: Split | None
    test: Split
    info: DatasetInfo


def load_splits(
    dataset: str,
    *,
    root: str | None,
    val_size: int,
    split_seed: int,
    normalize: str = "none",
    device: str | torch.device = "cpu",
    train_subset: int | None = None,
    synthetic_sizes: tuple[int, int] = (2000, 500),
) -> Splits:
    """Load ``dataset`` whole, carve the validation split, convert, normalise, move to ``device``."""
    info = dataset_info(dataset)
    _check_normalize(normalize, info)
    x_train, y_train, x_test, y_test = LOADERS[dataset](root, split_seed, synthetic_sizes)
    train_idx, val_idx = split_indices(len(y_train), val_size, split_seed, train_subset, dataset)

    device = torch.device(device)
    train = _to_split(x_train[train_idx], y_train[train_idx], info, device)
    val = _to_split(x_train[val_idx], y_train[val_idx], info, device) if val_size > 0 else None
    test = _to_split(x_test, y_test, info, device)
    train, val, test = _normalize(normalize, train, val, test)
    return Splits(train=train, val=val, test=test, info=info)


def synthetic_like(dataset: str, n: int, seed: int, device: str | torch.device = "cpu") -> Splits:
    """A tiny synthetic stand-in shaped exactly like ``dataset``: n examples per split.

    Used by ``eprun train --fast-dev-run``; needs no data files.
    """
    info = dataset_info(dataset)
    if n < 1:
        raise DataError(f"synthetic_like: n = {n}; expected at least 1 example per split")
    x, y, x_test, y_test = make_synthetic(2 * n, n, info.input_shape, info.num_classes, seed)
    device = torch.device(device)
    return Splits(
        train=_to_split(x[:n], y[:n], info, device),
        val=_to_split(x[n:], y[n:], info, device),
        test=_to_split(x_test, y_test, info, device),
        info=replace(info, description=f"synthetic stand-in shaped like {dataset} ({n} per split)"),
    )


def split_indices(
    n: int, val_size: int, split_seed: int, train_subset: int | None = None, dataset: str = "dataset"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices) from a seeded permutation of range(n); see module doc."""
    if not _is_int(val_size) or not 0 <= val_size < n:
        raise DataError(
            f"data.val_size = {val_size} is out of range for {dataset}'s {n} training examples; "
            f"expected 0 to {n - 1}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_subset is not None:
        if not _is_int(train_subset) or not 1 <= train_subset <= len(train_idx):
            raise DataError(
                f"data.train_subset = {train_subset} is out of range: {dataset} has {len(train_idx)} "
                f"training examples after data.val_size = {val_size}; expected 1 to {len(train_idx)}"
            )
        train_idx = train_idx[:train_subset]
    return train_idx, val_idx


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean μ_c and population std σ_c of x (n, C, …), each shaped (1, C, 1, …)."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, correction=0)
    return mean, std


def _normalize(normalize: str, train: Split, val: Split | None, test: Split) -> tuple[Split, Split | None, Split]:
    """Apply ``data.normalize`` to every split: "none", "standard" or a :data:`NORMALIZE_CONSTANTS` key."""
    if normalize == "standard":
        return _standardize(train, val, test)
    if normalize in NORMALIZE_CONSTANTS:
        mean, std = (
            torch.tensor(values, device=train.x.device).view(1, -1, 1, 1)
            for values in NORMALIZE_CONSTANTS[normalize]
        )

        def apply(split: Split | None) -> Split | None:
            return None if split is None else Split((split.x - mean).div_(std), split.y)

        return apply(train), apply(val), apply(test)
    return train, val, test


def _standardize(train: Split, val: Split | None, test: Split) -> tuple[Split, Split | None, Split]:
    """(x − μ_c) / σ_c on every split, with μ, σ from the training split."""
    mean, std = channel_stats(train.x)
    if bool((std == 0).any()):
        raise DataError("data.normalize = 'standard': a channel is constant on the training split (std 0)")

    def apply(split: Split | None) -> Split | None:
        return None if split is None else Split((split.x - mean).div_(std), split.y)

    return apply(train), apply(val), apply(test)


def _to_split(x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, device: torch.device) -> Split:
    """Move to ``device`` once, then uint8 → float32 / 255 and reshape to (n, *input_shape)."""
    x = x.to(device)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return Split(x.reshape(len(x), *info.input_shape), y.to(device=device, dtype=torch.int64))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_normalize(normalize: str, info: DatasetInfo) -> None:
    if normalize not in NORMALIZE_MODES:
        raise DataError(f"data.normalize: unknown value {normalize!r}; allowed: {', '.join(NORMALIZE_MODES)}")
    if normalize in NORMALIZE_CONSTANTS:
        channels = len(NORMALIZE_CONSTANTS[normalize][0])
        if info.input_shape[0] != channels:
            raise DataError(
                f"data.normalize = {normalize!r} has constants for {channels} channels but {info.name} "
                f"images have {info.input_shape[0]} (shape {info.input_shape}); use 'standard' or 'none'"
            )
