"""Image grids for generative models (matplotlib without pyplot, imported lazily)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def image_grid(
    images: torch.Tensor,
    shape: tuple[int, int],
    title: str,
    normalise: bool = False,
    cols: int | None = None,
) -> Figure:
    """Rows of `images` (N, H*W) drawn as a grid (`cols` wide, default square-ish);
    `normalise` scales each image to [0, 1]."""
    from matplotlib.figure import Figure

    x = images.detach().float().cpu().reshape(-1, *shape)
    if normalise:  # filters: each to its own range
        lo = x.amin(dim=(1, 2), keepdim=True)
        hi = x.amax(dim=(1, 2), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    n = x.shape[0]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = shape
    canvas = torch.ones(rows * (h + 1) + 1, cols * (w + 1) + 1)  # 1-pixel white gutters
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = x[i]
    fig = Figure(figsize=(max(3.0, cols * 0.5), max(3.0, rows * 0.5) + 0.4))
    ax = fig.add_subplot()
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    return fig
