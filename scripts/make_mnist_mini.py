"""Build eprun/data/mnist_mini/: the embedded ``mnist-mini`` dataset.

The first 10000 MNIST training images and the first 2000 test images (with their labels),
written as gzipped IDX files under MNIST's four names. gzip uses mtime 0 and no file name,
so the same source files always give byte-identical output.

    python scripts/make_mnist_mini.py [--source data] [--out eprun/data/mnist_mini]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from eprun.data.idx import write_idx  # noqa: E402
from eprun.data.mnist import FILES, read_mnist_folder  # noqa: E402

N_TRAIN = 10_000
N_TEST = 2_000
MAX_TOTAL_BYTES = 3 * 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO / "data")
    parser.add_argument("--out", type=Path, default=REPO / "eprun" / "data" / "mnist_mini")
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = read_mnist_folder(args.source, "mnist")
    subset = {
        "train_images": x_train[:N_TRAIN],
        "train_labels": y_train[:N_TRAIN].to(torch.uint8),
        "test_images": x_test[:N_TEST],
        "test_labels": y_test[:N_TEST].to(torch.uint8),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for role, tensor in subset.items():
        path = args.out / f"{FILES[role]}.gz"
        write_idx(path, tensor, gzip=True)
        total += path.stat().st_size
        print(f"{path}  {tuple(tensor.shape)}  {path.stat().st_size} bytes")
    print(f"total {total} bytes")
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"mnist-mini is {total} bytes; the budget is {MAX_TOTAL_BYTES}")


if __name__ == "__main__":
    main()
