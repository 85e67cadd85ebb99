"""A spec's trials: its seeds, crossed with the sweep's grid points and random samples."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.spec import SpecBase, spec_hash
from service.trial import trial_label


@dataclass(frozen=True)
class Trial:
    seed: int
    overrides: dict[str, Any]  # swept params: dotted path -> value

    @property
    def label(self) -> str:
        return trial_label(self.seed, self.overrides)


def expand(spec: SpecBase) -> list[Trial]:
    """Every trial of a spec: its seeds, crossed with the sweep's grid points and samples.

    Random values are drawn here, once per grid point and sample, from a generator seeded by the
    spec's hash: the seeds of one configuration replicate it exactly (that is what the parent
    aggregates), and the same spec expands to the same trials in --local and Ray modes. Draws
    from `uniform`/`loguniform` keep 4 significant digits (what the labels show). A trial that
    repeats an earlier one exactly (a `choice` drawn the same way twice, a repeated grid value)
    runs once: trials are deterministic, and each one's label names its MLflow run.
    """
    if spec.sweep is None:
        return [Trial(seed, {}) for seed in spec.seeds]
    if spec.sweep.search is not None:  # a search proposes its trials as it goes
        return []
    rng = np.random.default_rng(int(spec_hash(spec), 16) % 2**63)
    space = spec.sweep.space()
    grid = {k: d.grid for k, d in space.items() if d.grid is not None}
    trials = []
    for _ in range(spec.sweep.num_samples):
        for point in itertools.product(*grid.values()):
            overrides = dict(zip(grid, point, strict=True))
            for path, dist in space.items():
                if dist.choice is not None:
                    overrides[path] = dist.choice[int(rng.integers(len(dist.choice)))]
                elif dist.uniform is not None:
                    overrides[path] = _round_within(rng.uniform(*dist.uniform), *dist.uniform)
                elif dist.loguniform is not None:
                    low, high = np.log(dist.loguniform)
                    value = np.exp(rng.uniform(low, high))
                    overrides[path] = _round_within(value, *dist.loguniform)
            trials += [Trial(seed, overrides) for seed in spec.seeds]
    unique = {t.label: t for t in reversed(trials)}  # the first of equal trials, in order
    return [t for t in trials if unique[t.label] is t]


def trial_count(spec: SpecBase) -> int:
    """How many trials the spec runs: its expansion's, or a search's configurations x seeds."""
    if spec.sweep is not None and spec.sweep.search is not None:
        return spec.sweep.num_samples * len(spec.seeds)
    return len(expand(spec))


def _round_within(value: float, low: float, high: float) -> float:
    """`value` to 4 significant digits, unless that leaves [low, high] (e.g. 0.99999 -> 1.0)."""
    rounded = float(f"{value:.4g}")
    return rounded if low <= rounded <= high else float(value)
