"""The benchmarks' MNIST: the shared test split, first 8,000 images for training, last 2,000 held
out, pixels scaled to [0, 1] (the fixed rule of ../shared/data/mnist/README.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from generative.data import Dataset, read_idx

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT,
        help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz",
    )


def load(folder: Path) -> Dataset:
    images = torch.from_numpy(read_idx(folder / "t10k-images-idx3-ubyte.gz").copy()).float() / 255
    labels = torch.from_numpy(read_idx(folder / "t10k-labels-idx1-ubyte.gz").copy()).long()
    x = images.reshape(len(images), -1)
    return Dataset(x[:8000], x[8000:], labels[:8000], labels[8000:], (28, 28))


def blas() -> str:
    from threadpoolctl import threadpool_info

    return ", ".join(
        f"{d['internal_api']} {d.get('architecture', '')} x{d['num_threads']}"
        for d in threadpool_info()
    )
