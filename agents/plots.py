"""Figures for tabular solvers. matplotlib is imported when a figure is drawn, without pyplot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from agents.mdp import TabularMDP

MAX_ARROW_GRID = 32  # beyond this many cells a side, arrows are unreadable: heatmap only


def _figure(**kwargs: object) -> Figure:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    return Figure(**kwargs)  # type: ignore[arg-type]


def value_heatmap(mdp: TabularMDP, V: np.ndarray, policy: np.ndarray, title: str) -> Figure:
    """State values on the grid, with the greedy action of each live cell drawn as an arrow."""
    assert mdp.grid_shape is not None
    rows, cols = mdp.grid_shape
    values = np.ma.masked_array(V.reshape(rows, cols), mask=_mask(mdp).reshape(rows, cols))
    side = min(8.0, 1.0 + 0.5 * max(rows, cols)) if max(rows, cols) <= MAX_ARROW_GRID else 8.0
    fig = _figure(figsize=(side * cols / max(rows, cols) + 1.5, side * rows / max(rows, cols)))
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="0.3")  # obstacles and terminals in grey
    image = ax.imshow(values, cmap=cmap, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="V(s)")
    if mdp.moves is not None and max(rows, cols) <= MAX_ARROW_GRID:
        moves = np.asarray(mdp.moves, dtype=float)[policy]  # (S, 2) as (d_row, d_col)
        live = ~_mask(mdp)
        r, c = np.divmod(np.arange(rows * cols), cols)
        ax.quiver(
            c[live],
            r[live],
            moves[live, 1],
            -moves[live, 0],
            color="white",
            pivot="middle",
            scale=1.6 * max(rows, cols),
            width=0.006,
        )
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _mask(mdp: TabularMDP) -> np.ndarray:
    mask = mdp.terminal.copy()
    if mdp.blocked is not None:
        mask |= mdp.blocked
    return mask


def residual_curve(residuals: Sequence[float], threshold: float, title: str) -> Figure:
    """Bellman residual per iteration on a log scale, with the stopping threshold."""
    fig = _figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.semilogy(np.arange(1, len(residuals) + 1), np.maximum(residuals, 1e-300), lw=1.5)
    if np.isfinite(threshold) and threshold > 0:
        ax.axhline(threshold, color="tab:red", ls="--", lw=1, label="epsilon-optimal threshold")
        legend_outside(ax)
    ax.set_xlabel("iteration")
    ax.set_ylabel("||V_{k+1} - V_k||_inf")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def learning_curve(
    episodes: Sequence[tuple[int, float]],
    evals: Sequence[tuple[int, float, float]],
    target: float | None,
    title: str,
) -> Figure:
    """Training episode returns (dots, with a running mean) and evaluation mean +- std."""
    fig = _figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if episodes:
        steps, returns = np.asarray(episodes, dtype=float).T
        ax.plot(steps, returns, ".", ms=2, alpha=0.3, color="C0", label="training episodes")
        window = max(1, len(returns) // 50)
        smooth = np.convolve(returns, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="C0", label=f"running mean ({window})")
    if evals:
        steps, mean, std = np.asarray(evals, dtype=float).T
        ax.fill_between(steps, mean - std, mean + std, color="C1", alpha=0.2)
        ax.plot(steps, mean, "o-", color="C1", label="evaluation (greedy)")
    if target is not None:
        ax.axhline(target, color="0.5", ls="--", lw=1, label="stop_at_return")
    ax.set(xlabel="timestep", ylabel="episode return", title=title)
    legend_outside(ax)
    return fig


def legend_outside(ax: Axes) -> None:
    """The legend right of the axes, where it cannot cover the data (figures are saved with
    `bbox_inches="tight"`, which widens them to fit it)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def observation_frames(obs: np.ndarray, channels_first: bool, title: str) -> Figure:
    """One image observation as panels, one per channel: the frames of an Atari stack (S, H, W),
    oldest first, or the object channels of a MinAtar grid (H, W, C)."""
    planes = obs if channels_first else np.moveaxis(obs, -1, 0)
    n = len(planes)
    fig = _figure(figsize=(2.2 * n, 2.6))
    for i, plane in enumerate(planes):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(plane.astype(float), cmap="gray", interpolation="nearest")
        ax.set_title(f"{'frame' if channels_first else 'channel'} {i}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return fig
