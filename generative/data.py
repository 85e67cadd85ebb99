"""Datasets for the generative models, selected by `dataset:` in a spec.

- `digits`: scikit-learn's 8x8 digits (1,797 images), the default; nothing to download.
- `idx`: any MNIST-format IDX image file (and optional label file), gzip or raw, from local paths:
  MNIST, Fashion-MNIST, EMNIST and KMNIST all work offline.
- `mnist` / `fashion_mnist`: through torchvision, with a `root` and a `download` flag.
- `bars_and_stripes`: the synthetic binary set of MacKay (2003): every image whose rows, or whose
  columns, are all on or all off; uniform over its 2^(n+1) - 2 distinct patterns, small enough for
  exact likelihoods.

Every set is returned as float32 rows (N, H*W), in [0, 1] or standardised (`scale`), split into
train and held-out parts by a seeded permutation. Paths are checked (existence and IDX headers)
before any trial starts.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers: 0x00000803 (ubyte, 3 dims), 0x00000801


class _DatasetBase(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    holdout: float = Field(0.2, gt=0.0, lt=1.0, description="Fraction held out (seeded split).")
    binarize: Literal["none", "threshold", "stochastic"] = Field(
        "none", description="Binarize pixels: no, at `threshold`, or by sampling Bernoulli(p) once."
    )
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Cut-off for binarize=threshold.")
    limit: int | None = Field(
        None, gt=0, description="Use only the first `limit` examples (quick experiments)."
    )
    scale: Literal["unit", "standardize"] = Field(
        "unit",
        description="Pixels in [0, 1], or standardised per pixel with the train split's "
        "mean and std (for Gaussian models; Bernoulli models need `unit`).",
    )


class DigitsDataset(_DatasetBase):
    name: Literal["digits"] = "digits"


class BarsAndStripesDataset(_DatasetBase):
    name: Literal["bars_and_stripes"] = "bars_and_stripes"
    size: int = Field(4, ge=2, le=6, description="Image side n: n x n pixels.")
    samples: int = Field(2000, gt=0, description="Examples drawn uniformly from the patterns.")


class IdxDataset(_DatasetBase):
    name: Literal["idx"] = "idx"
    images: Path = Field(description="IDX image file (.gz or raw), e.g. t10k-images-idx3-ubyte.gz.")
    labels: Path | None = Field(None, description="IDX label file matching `images`.")

    @field_validator("images", "labels")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        # Absolute, so trials find the files whatever their working directory.
        return None if path is None else path.expanduser().resolve()


class TorchvisionDataset(_DatasetBase):
    name: Literal["mnist", "fashion_mnist"]
    root: Path = Field(Path("~/.cache/rlgen/torchvision"), description="torchvision data root.")
    download: bool = Field(False, description="Let torchvision download the files if missing.")


DatasetSpec = Annotated[
    Union[DigitsDataset, BarsAndStripesDataset, IdxDataset, TorchvisionDataset],  # noqa: UP007
    Field(discriminator="name"),
]


@dataclass
class Dataset:
    x_train: torch.Tensor  # (N_train, D) float32 in [0, 1]
    x_test: torch.Tensor  # (N_test, D)
    y_train: torch.Tensor | None  # (N_train,) int64 labels, when the set has them
    y_test: torch.Tensor | None
    image_shape: tuple[int, int]  # (H, W) with H * W = D

    @property
    def dim(self) -> int:
        return int(self.x_train.shape[1])


class DatasetError(ValueError):
    """A dataset that cannot be used, with the spec field it concerns (e.g. "images")."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


# -- reading ------------------------------------------------------------------------------------
def _open(path: Path) -> gzip.GzipFile | object:
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def idx_header(path: Path) -> tuple[int, tuple[int, ...]]:
    """(magic, dims) of an IDX file; raises ValueError on anything that is not IDX ubyte data."""
    try:
        with _open(path) as f:  # type: ignore[attr-defined]
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08:
                raise ValueError(f"{path}: not an IDX file of unsigned bytes (bad header)")
            ndim = head[3]
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    except (OSError, EOFError, struct.error) as e:
        raise ValueError(f"{path}: cannot read an IDX header ({e})") from None
    return struct.unpack(">I", head)[0], dims


def idx_data_size(path: Path, header: int, expected: int) -> int:
    """Bytes of data after the `header` bytes of an IDX file, which should be `expected`, without
    reading a raw file. A gzip file's trailer holds its uncompressed size (mod 2^32, last member
    only); only when that disagrees is the whole stream decompressed and counted."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        if not gzipped:
            return path.stat().st_size - header
        f.seek(-4, os.SEEK_END)
        (trailer,) = struct.unpack("<I", f.read(4))
    if trailer == (header + expected) % 2**32:
        return expected
    size = 0
    try:
        with gzip.open(path, "rb") as g:
            while chunk := g.read(1 << 20):
                size += len(chunk)
    except (OSError, EOFError):  # a truncated or corrupt stream: count what it yields
        pass
    return size - header


def read_idx(path: Path) -> np.ndarray:
    _, dims = idx_header(path)
    with _open(path) as f:  # type: ignore[attr-defined]
        f.read(4 + 4 * len(dims))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data, header says {dims}")
    return data.reshape(dims)


DIGITS_SIZE = 1797  # scikit-learn's digits


def split(n: int, holdout: float) -> tuple[int, int]:
    """(train, test) sizes of `n` examples with a `holdout` fraction held out (at least one)."""
    n_test = max(1, round(holdout * n))
    return n - n_test, n_test


def check(spec: DatasetSpec) -> None:
    """Cheap checks before any trial starts: files exist and look right, and the split leaves
    examples to train on. Raises DatasetError."""
    size: int | None = None  # examples in the set, where known without loading it
    if isinstance(spec, DigitsDataset):
        size, field = DIGITS_SIZE, "name"
    elif isinstance(spec, BarsAndStripesDataset):
        size, field = spec.samples, "samples"
    elif isinstance(spec, IdxDataset):
        images = _check_idx("images", spec.images, IDX_IMAGES)
        if spec.labels is not None:
            labels = _check_idx("labels", spec.labels, IDX_LABELS)
            if labels[0] != images[0]:
                raise DatasetError("labels", f"{labels[0]} labels for {images[0]} images")
        size, field = images[0], "images"
    if size is not None:
        if spec.limit is not None and spec.limit < size:
            size, field = spec.limit, "limit"
        n_train, n_test = split(size, spec.holdout)
        if n_train < 1:  # one example, or a holdout that rounds to all of them
            raise DatasetError(
                field if size < 2 else "holdout",
                f"{size} example{'s' * (size != 1)}: holding out {n_test} (holdout "
                f"{spec.holdout}) leaves none to train on",
            )
    if isinstance(spec, TorchvisionDataset):
        try:
            import torchvision  # noqa: F401
        except ImportError:
            raise DatasetError(
                "name",
                f"'{spec.name}' needs torchvision (pip install "
                "torchvision); or use name: idx with local IDX files",
            ) from None


def needs_unit_pixels(spec: DatasetSpec | None, model: str) -> str | None:
    """Why `spec` does not suit a model of pixels in [0, 1] (`model` says which part of it), or
    None: a Bernoulli likelihood or a sigmoid output cannot fit standardised pixels, which lie
    outside [0, 1] (the loss is unbounded below, samples never match the data)."""
    if spec is None or spec.scale != "standardize":
        return None
    return f"{model} models pixels in [0, 1]; dataset.scale: standardize moves them outside"


def has_labels(spec: DatasetSpec) -> bool:
    return not isinstance(spec, BarsAndStripesDataset) and not (
        isinstance(spec, IdxDataset) and spec.labels is None
    )


def _check_idx(field: str, path: Path, magic: int) -> tuple[int, ...]:
    if not path.is_file():
        raise DatasetError(field, f"no such file: {path}")
    try:
        found, dims = idx_header(path)
    except ValueError as e:
        raise DatasetError(field, str(e)) from None
    if found != magic:
        kind, form = ("image", "(N, rows, columns)") if magic == IDX_IMAGES else ("label", "(N,)")
        raise DatasetError(
            field,
            f"{path} is not an IDX {kind} file: it holds an array of shape {dims}, not {form} "
            f"(magic number {found}, not {magic})",
        )
    expected = int(np.prod(dims))
    size = idx_data_size(path, 4 + 4 * len(dims), expected)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise DatasetError(field, f"{path}: {what}: {size} bytes of data, header says {dims}")
    return dims


def _raw(spec: DatasetSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Images as float rows in [0, 1] (N, H, W), and labels (N,) if any."""
    if isinstance(spec, DigitsDataset):
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images / 16.0, digits.target
    if isinstance(spec, BarsAndStripesDataset):
        patterns = bars_and_stripes_patterns(spec.size)
        return patterns[rng.integers(len(patterns), size=spec.samples)], None
    if isinstance(spec, IdxDataset):
        check(spec)
        images = read_idx(spec.images) / 255.0
        labels = read_idx(spec.labels) if spec.labels is not None else None
        return images, labels
    import torchvision

    cls = torchvision.datasets.MNIST if spec.name == "mnist" else torchvision.datasets.FashionMNIST
    root = str(spec.root.expanduser())
    parts = [cls(root, train=t, download=spec.download) for t in (True, False)]
    images = np.concatenate([p.data.numpy() for p in parts]) / 255.0
    return images, np.concatenate([p.targets.numpy() for p in parts])


def bars_and_stripes_patterns(n: int) -> np.ndarray:
    """All distinct n x n bars-and-stripes images, (2^(n+1) - 2, n, n)."""
    codes = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # (2^n, n) every on/off choice
    rows = np.repeat(codes[:, :, None], n, axis=2)  # horizontal stripes
    cols = rows.transpose(0, 2, 1)  # vertical bars
    both = np.concatenate([rows, cols]).astype(np.float64)
    return np.unique(both, axis=0)  # all-off and all-on appear in both


def load(spec: DatasetSpec, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    images, labels = _raw(spec, rng)
    if spec.limit is not None:
        images, labels = images[: spec.limit], None if labels is None else labels[: spec.limit]
    n, h, w = images.shape
    x = images.reshape(n, h * w)
    if spec.binarize == "threshold":
        x = (x > spec.threshold).astype(np.float64)
    elif spec.binarize == "stochastic":
        x = (rng.random(x.shape) < x).astype(np.float64)
    n_train, n_test = split(n, spec.holdout)
    if n_train < 1:
        raise DatasetError("limit", f"{n} examples leave none to train on after the holdout")
    order = rng.permutation(n)
    test, train = order[:n_test], order[n_test:]

    if spec.scale == "standardize":  # statistics of the train split only: no leak from held-out
        mean, std = x[train].mean(0), x[train].std(0)
        x = (x - mean) / np.maximum(std, 1e-3)

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    return Dataset(
        x_train=t(x[train], torch.float32),
        x_test=t(x[test], torch.float32),
        y_train=None if labels is None else t(labels[train], torch.int64),
        y_test=None if labels is None else t(labels[test], torch.int64),
        image_shape=(h, w),
    )


def padding_to_multiple(shape: tuple[int, int], scale: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that makes both sides multiples of `scale`, split
    evenly between the two edges (the extra pixel, if any, on the right/bottom)."""
    h, w = shape
    dh, dw = -h % scale, -w % scale
    return dw // 2, dw - dw // 2, dh // 2, dh - dh // 2
