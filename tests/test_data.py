"""Datasets: IDX files, the synthetic set, splits and binarisation."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from generative import data


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool) -> Path:
    payload = (
        struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 6, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, size=50, dtype=np.uint8)
    spec = data.IdxDataset(
        images=write_idx(tmp_path / "img", images, data.IDX_IMAGES, compress),
        labels=write_idx(tmp_path / "lbl", labels, data.IDX_LABELS, compress),
        holdout=0.2,
    )
    data.check(spec)
    ds = data.load(spec, seed=0)
    assert ds.image_shape == (6, 5) and ds.dim == 30
    assert len(ds.x_train) == 40 and len(ds.x_test) == 10
    assert float(ds.x_train.max()) <= 1.0 and float(ds.x_train.min()) >= 0.0
    # Every example lands in exactly one split, with its own label.
    x = np.concatenate([ds.x_train.numpy(), ds.x_test.numpy()])
    y = np.concatenate([ds.y_train.numpy(), ds.y_test.numpy()])  # type: ignore[union-attr]
    for row, label in zip(x, y, strict=True):
        i = int(np.flatnonzero((np.abs(images.reshape(50, -1) / 255.0 - row) < 1e-6).all(1))[0])
        assert labels[i] == label


def test_idx_errors(tmp_path: Path) -> None:
    images = np.zeros((4, 2, 2), np.uint8)
    img = write_idx(tmp_path / "img", images, data.IDX_IMAGES, True)
    with pytest.raises(data.DatasetError, match="no such file") as e:
        data.check(data.IdxDataset(images=tmp_path / "missing"))
    assert e.value.field == "images"
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(data.DatasetError, match="bad header"):
        data.check(data.IdxDataset(images=tmp_path / "junk"))
    with pytest.raises(data.DatasetError, match="not an IDX image file"):
        data.check(
            data.IdxDataset(
                images=write_idx(tmp_path / "l", np.zeros(4, np.uint8), data.IDX_LABELS, False)
            )
        )
    rgb = write_idx(tmp_path / "rgb", np.zeros((4, 2, 2, 3), np.uint8), 0x0804, False)
    with pytest.raises(data.DatasetError, match=r"shape \(4, 2, 2, 3\), not \(N, rows, columns\)"):
        data.check(data.IdxDataset(images=rgb))
    few = write_idx(tmp_path / "few", np.zeros(3, np.uint8), data.IDX_LABELS, False)
    with pytest.raises(data.DatasetError, match="3 labels for 4 images") as e:
        data.check(data.IdxDataset(images=img, labels=few))
    assert e.value.field == "labels"


def test_a_split_that_leaves_nothing_to_train_on_is_refused(tmp_path: Path) -> None:
    """One example, or a holdout that rounds to all of them, would leave the train split empty
    (and a model diverging on no data); refused before any trial starts, naming the field."""
    one = write_idx(tmp_path / "one", np.zeros((1, 2, 2), np.uint8), data.IDX_IMAGES, False)
    cases: list[tuple[data.DatasetSpec, str, str]] = [
        (data.IdxDataset(images=one), "images", "1 example: holding out 1"),
        (data.DigitsDataset(limit=1), "limit", "1 example: holding out 1"),
        (data.DigitsDataset(holdout=0.9999), "holdout", "1797 examples: holding out 1797"),
        (data.BarsAndStripesDataset(samples=1), "samples", "1 example"),
    ]
    for spec, field, message in cases:
        with pytest.raises(data.DatasetError, match=message) as e:
            data.check(spec)
        assert e.value.field == field and "leaves none to train on" in str(e.value)
    with pytest.raises(data.DatasetError, match="none to train on"):  # load defends as well
        data.load(data.DigitsDataset(limit=1), seed=0)
    two = data.load(data.DigitsDataset(limit=2), seed=0)
    assert len(two.x_train) == len(two.x_test) == 1


@pytest.mark.parametrize("compress", [True, False])
def test_idx_whose_data_disagrees_with_its_header_fails_validation(
    tmp_path: Path, compress: bool
) -> None:
    """A truncated download validated (only the header was read) and failed in the trial."""
    images = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    good = write_idx(tmp_path / "good", images, data.IDX_IMAGES, compress)
    data.check(data.IdxDataset(images=good))
    payload = gzip.decompress(good.read_bytes()) if compress else good.read_bytes()
    for name, body in (("short", payload[:-5]), ("long", payload + b"xy")):
        bad = tmp_path / name
        bad.write_bytes(gzip.compress(body) if compress else body)
        with pytest.raises(data.DatasetError, match="header says") as e:
            data.check(data.IdxDataset(images=bad))
        assert e.value.field == "images"
    cut = tmp_path / "cut"  # a gzip stream cut off mid-way, as by an interrupted download
    cut.write_bytes(gzip.compress(payload)[:-12])
    with pytest.raises(data.DatasetError, match="truncated"):
        data.check(data.IdxDataset(images=cut))


def test_bars_and_stripes_patterns() -> None:
    for n in (2, 3, 4):
        patterns = data.bars_and_stripes_patterns(n)
        assert len(patterns) == 2 ** (n + 1) - 2
        for p in patterns:  # constant rows, or constant columns
            assert (p == p[:, :1]).all() or (p == p[:1, :]).all()


def test_split_is_seeded_and_binarisation() -> None:
    a = data.load(data.DigitsDataset(), seed=1)
    b = data.load(data.DigitsDataset(), seed=1)
    c = data.load(data.DigitsDataset(), seed=2)
    assert (a.x_test == b.x_test).all() and not (
        a.x_test.shape == c.x_test.shape and (a.x_test == c.x_test).all()
    )
    t = data.load(data.DigitsDataset(binarize="threshold"), seed=0)
    assert set(t.x_train.unique().tolist()) <= {0.0, 1.0}
    s = data.load(data.DigitsDataset(binarize="stochastic", limit=100), seed=0)
    assert set(s.x_train.unique().tolist()) <= {0.0, 1.0} and len(s.x_train) + len(s.x_test) == 100


def test_standardize_uses_train_statistics_only() -> None:
    ds = data.load(data.DigitsDataset(scale="standardize"), seed=0)
    mean = ds.x_train.mean(0)
    assert float(mean.abs().max()) < 1e-4  # zero mean on train...
    assert float(ds.x_test.mean(0).abs().max()) > 1e-3  # ...not forced on held-out
