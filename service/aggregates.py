"""What the parent run of a launch shows: aggregates across seeds and learning curves with bands.

Trials that differ only by seed form a group (a sweep has one group per point of its grid and
samples). For each metric in the spec's `report` list, the parent run gets each group's final
values as n, mean, std and a 95% confidence interval (Student's t:
mean +- t_{0.975, n-1} s / sqrt(n)) in `report.csv`. The parent's own metrics `{metric}/mean`,
`/std`, `/ci95_low` and `/ci95_high` are the best group's (or the only one's), its tag
`rlgen.best_group` names it, and a figure per metric draws every group's mean learning curve with
a +-1 std band across its seeds.
"""

from __future__ import annotations

import csv
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
    ci95: tuple[float, float]


def group_of(run: Run) -> str:
    label = run.data.tags.get(TAG_TRIAL, "")
    return label.split(" ", 1)[1] if " " in label else ""


def default_metrics(runs: Sequence[Run]) -> list[str]:
    logged = {k for r in runs for k in r.data.metrics}
    return [next((m for m in HEADLINE if m in logged), "")] if logged else []


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
            out.append(Aggregate(group, metric, len(values), mean, std, (mean - half, mean + half)))
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
            Metric(f"{a.metric}/mean", a.mean, now, 0),
            Metric(f"{a.metric}/std", a.std, now, 0),
            Metric(f"{a.metric}/n", a.n, now, 0),
        ]
        if not math.isnan(a.ci95[0]):
            points += [
                Metric(f"{a.metric}/ci95_low", a.ci95[0], now, 0),
                Metric(f"{a.metric}/ci95_high", a.ci95[1], now, 0),
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
    writer.writerow(["group", "metric", "n", "mean", "std", "ci95_low", "ci95_high"])
    for a in aggregates:
        writer.writerow([a.group or "(all)", a.metric, a.n, a.mean, a.std, *a.ci95])
    with_retries(lambda: client.log_text(parent_run_id, table.getvalue(), "report.csv"), "report")
    for metric in metrics:
        fig = learning_curves(client, runs, metric)
        if fig is not None:
            path = f"figures/curves_{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png"
            client.log_figure(parent_run_id, fig, path)
    return aggregates


def learning_curves(client: MlflowClient, runs: Sequence[Run], metric: str) -> Any:
    """Mean curve and +-1 std band across seeds, one colour per group; None without data."""
    from matplotlib.figure import Figure

    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for run in runs:
        history = client.get_metric_history(run.info.run_id, metric)
        if history:
            steps = np.array([m.step for m in history], dtype=float)
            values = np.array([m.value for m in history], dtype=float)
            order = np.argsort(steps, kind="stable")
            groups[group_of(run)].append((steps[order], values[order]))
    if not groups:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for i, (group, curves) in enumerate(sorted(groups.items())):
        grid = np.unique(np.concatenate([s for s, _ in curves]))
        # Each seed's curve on the common steps, within its own range (NaN outside).
        stacked = np.array(
            [
                np.where((grid >= s[0]) & (grid <= s[-1]), np.interp(grid, s, v), np.nan)
                for s, v in curves
            ]
        )
        with np.errstate(all="ignore"):
            mean = np.nanmean(stacked, axis=0)
            std = np.nanstd(stacked, axis=0)
        label = f"{group or 'all seeds'} (n={len(curves)})"
        ax.plot(grid, mean, color=f"C{i % 10}", label=label)
        ax.fill_between(grid, mean - std, mean + std, color=f"C{i % 10}", alpha=0.2)
    ax.set(xlabel="step", ylabel=metric, title=f"{metric}: mean +- std across seeds")
    ax.legend(loc="best", fontsize=7)
    return fig
