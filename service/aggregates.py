"""What the parent run of a launch shows: aggregates across seeds and learning curves with bands.

Trials that differ only by seed form a group (a sweep has one group per point of its grid and
samples). For each metric in the spec's `report` list, the parent run gets each group's final
values (a seed that stopped early counts with its last value) in `report.csv`: n, mean, std,
Student's t interval (mean +- t_{0.975, n-1} s / sqrt(n)), and the aggregates Agarwal et al.
(2021, "Deep RL at the Edge of the Statistical Precipice") recommend for few seeds: the
interquartile mean (IQM, the mean of the middle 50%) and percentile-bootstrap 95% intervals of the
mean and of the IQM, resampling seeds (the stratified bootstrap of one task). Bootstrap intervals
never leave the range of the values (a return of 500 at most stays at most 500), which a t
interval can. The parent's own metrics `{metric}/mean`, `/std`, `/n`, `/iqm`, `/ci95_low`,
`/ci95_high` (bootstrap, of the mean) and `/iqm_ci95_low`, `/iqm_ci95_high` are the best group's
(or the only one's), its tag `rlgen.best_group` names it, and a figure per metric draws every
group's IQM learning curve with its bootstrap band (`learning_curves`).
"""

from __future__ import annotations

import csv
import functools
import io
import math
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlflow.entities import Metric, Run, RunTag
from mlflow.tracking import MlflowClient

from service.tracking import TAG_TRIAL, with_retries

# The headline result of a trial, the first of these it logged (progress table, default report).
HEADLINE = (
    "eval/return_mean",
    "eval/accuracy",
    "eval/fid",
    "eval/neg_elbo",
    "eval/ais_loglik",
    "eval/probe_accuracy",
    "eval/recon_loss",
)
LOWER_IS_BETTER = ("eval/fid", "eval/neg_elbo", "eval/recon_loss", "eval/nll_iwae", "loss")


@dataclass
class Aggregate:
    group: str  # the swept values, "" without a sweep
    metric: str
    n: int
    mean: float
    std: float
    ci95: tuple[float, float]  # percentile bootstrap of the mean
    t_ci95: tuple[float, float]  # Student's t (NaN for one seed)
    iqm: float
    iqm_ci95: tuple[float, float]  # percentile bootstrap of the IQM


def group_of(run: Run) -> str:
    label = run.data.tags.get(TAG_TRIAL, "")
    return label.split(" ", 1)[1] if " " in label else ""


def default_metrics(runs: Sequence[Run]) -> list[str]:
    logged = {k for r in runs for k in r.data.metrics}
    return [next((m for m in HEADLINE if m in logged), "")] if logged else []


def iqm(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Interquartile mean along `axis`: the mean of the values left after cutting
    floor(n / 4) from each end (as scipy.stats.trim_mean(values, 0.25), which rliable uses)."""
    n = values.shape[axis]
    cut = n // 4
    ordered = np.sort(values, axis=axis)
    return np.take(ordered, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


BOOTSTRAP_SAMPLES = 2000


def bootstrap_ci(
    values: np.ndarray, statistic: Any, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile-bootstrap interval of `statistic` over seeds: `values` (n_seeds, ...),
    the seeds resampled with replacement; returns (low, high), each of shape values.shape[1:]."""
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    picks = rng.integers(n, size=(BOOTSTRAP_SAMPLES, n))  # (B, n)
    stats = statistic(values[picks], axis=1)  # (B, ...)
    low, high = np.percentile(stats, [2.5, 97.5], axis=0)
    return low, high


def aggregate(runs: Sequence[Run], metrics: Sequence[str]) -> list[Aggregate]:
    """Final values of FINISHED trials, grouped by swept values."""
    from scipy.special import stdtrit  # Student's t quantile; scipy.stats costs 0.5 s to import

    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.info.status == "FINISHED":
            groups[group_of(run)].append(run)
    out = []
    for group, members in sorted(groups.items()):
        for metric in metrics:
            values = np.array([r.data.metrics[metric] for r in members if metric in r.data.metrics])
            if len(values) == 0:
                continue
            mean = float(values.mean())
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            half = (
                float(stdtrit(len(values) - 1, 0.975)) * std / math.sqrt(len(values))
                if len(values) > 1
                else math.nan
            )
            low, high = bootstrap_ci(values, np.mean)
            iqm_low, iqm_high = bootstrap_ci(values, iqm)
            out.append(
                Aggregate(
                    group,
                    metric,
                    len(values),
                    mean,
                    std,
                    (float(low), float(high)),
                    (mean - half, mean + half),
                    float(iqm(values)),
                    (float(iqm_low), float(iqm_high)),
                )
            )
    return out


def best_group(aggregates: Sequence[Aggregate], metric: str, mode: str | None) -> str | None:
    rows = [a for a in aggregates if a.metric == metric]
    if not rows:
        return None
    lower = mode == "min" if mode else any(k in metric for k in LOWER_IS_BETTER)
    return (min if lower else max)(rows, key=lambda a: a.mean).group


def write_parent(
    client: MlflowClient,
    parent_run_id: str,
    runs: Sequence[Run],
    metrics: Sequence[str],
    mode: str | None = None,
) -> list[Aggregate]:
    metrics = [m for m in metrics if m] or default_metrics(runs)
    aggregates = aggregate(runs, metrics)
    if not aggregates:
        return aggregates
    best = best_group(aggregates, metrics[0], mode)
    now = int(time.time() * 1000)
    points = []
    for a in aggregates:
        if a.group != best:
            continue
        points += [
            Metric(f"{a.metric}/{name}", value, now, 0)
            for name, value in (
                ("mean", a.mean),
                ("std", a.std),
                ("n", a.n),
                ("iqm", a.iqm),
                ("ci95_low", a.ci95[0]),
                ("ci95_high", a.ci95[1]),
                ("iqm_ci95_low", a.iqm_ci95[0]),
                ("iqm_ci95_high", a.iqm_ci95[1]),
            )
        ]
    tags = {"rlgen.best_group": best} if best else {}
    with_retries(
        lambda: client.log_batch(
            parent_run_id,
            metrics=points,
            tags=[RunTag(k, v) for k, v in tags.items()],
        ),
        "log aggregates",
    )
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(
        [
            "group",
            "metric",
            "n",
            "mean",
            "std",
            "ci95_low",
            "ci95_high",
            "t_ci95_low",
            "t_ci95_high",
            "iqm",
            "iqm_ci95_low",
            "iqm_ci95_high",
        ]
    )
    for a in aggregates:
        writer.writerow(
            [
                a.group or "(all)",
                a.metric,
                a.n,
                a.mean,
                a.std,
                *a.ci95,
                *a.t_ci95,
                a.iqm,
                *a.iqm_ci95,
            ]
        )
    with_retries(lambda: client.log_text(parent_run_id, table.getvalue(), "report.csv"), "report")
    for metric in metrics:
        groups = seed_curves(client, runs, metric)
        if not groups:
            continue
        path = f"figures/curves_{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png"
        client.log_figure(parent_run_id, learning_curves(groups, metric), path)
        if best in groups:
            # The best configuration's IQM curve as the parent's own `metric`: in the UI's
            # chart view the parent (shown folded over its trials) draws the seeds' aggregate.
            grid, values = on_common_steps(groups[best])
            log_curve(client, parent_run_id, metric, grid, iqm(values), now)
    return aggregates


def log_curve(
    client: MlflowClient,
    run_id: str,
    metric: str,
    steps: np.ndarray,
    values: np.ndarray,
    timestamp_ms: int,
) -> None:
    points = [
        Metric(metric, float(v), timestamp_ms, int(t)) for t, v in zip(steps, values, strict=True)
    ]
    for i in range(0, len(points), 1000):  # MLflow takes at most 1,000 metrics a batch
        write = functools.partial(client.log_batch, run_id, metrics=points[i : i + 1000])
        with_retries(write, f"curve of {metric}")


def on_common_steps(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Seeds' curves, (steps, values) each, on one grid: (grid (G,), values (n_seeds, G)).

    Seeds evaluate at slightly different steps (vector envs end an interval at 2501, 2502 or
    2503), so averaging by exact step would mix different sets of seeds from point to point. The
    grid is every step any seed logged, from the last of the seeds' first steps (where every
    seed has begun) to the last step of any; each seed is interpolated linearly within its own
    steps and, after its last step (it stopped early, e.g. at `stop_at_return`), holds its last
    value, so every point averages all n seeds."""
    start = max(s[0] for s, _ in curves)
    grid = np.unique(np.concatenate([s for s, _ in curves]))
    grid = grid[grid >= start]
    values = np.array([np.interp(grid, s, v) for s, v in curves])  # holds the ends (np.interp)
    return grid, values


def seed_curves(
    client: MlflowClient, runs: Sequence[Run], metric: str
) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Each group's seeds' histories of `metric`, as (steps, values) sorted by step."""
    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for run in runs:
        history = client.get_metric_history(run.info.run_id, metric)
        if history:
            steps = np.array([m.step for m in history], dtype=float)
            values = np.array([m.value for m in history], dtype=float)
            order = np.argsort(steps, kind="stable")
            groups[group_of(run)].append((steps[order], values[order]))
    return dict(groups)


def learning_curves(groups: dict[str, list[tuple[np.ndarray, np.ndarray]]], metric: str) -> Any:
    """Each group's IQM curve across seeds with its 95% bootstrap band (the band stays within
    the seeds' values)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for i, (group, curves) in enumerate(sorted(groups.items())):
        grid, values = on_common_steps(curves)
        center = iqm(values)
        low, high = bootstrap_ci(values, iqm)
        label = f"{group or 'all seeds'} (n={len(curves)})"
        ax.plot(grid, center, color=f"C{i % 10}", label=label)
        ax.fill_between(grid, low, high, color=f"C{i % 10}", alpha=0.2)
    ax.set(
        xlabel="step",
        ylabel=metric,
        title=f"{metric}: IQM across seeds, 95% bootstrap CI",
    )
    # Outside the axes: a legend never covers the curves.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.subplots_adjust(right=0.72)
    return fig
