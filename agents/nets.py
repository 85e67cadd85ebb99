"""Network pieces the deep RL algorithms share: initialisation, target updates, the CNNs for
image observations."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn


def default_init_(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default initialisation of every linear and conv layer in `module`, drawn from
    `generator` (the trial's "init" stream) instead of the global RNG: weights Kaiming-uniform
    with a = sqrt(5), biases uniform in +-1/sqrt(fan_in)."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            bound = 1 / math.sqrt(m.weight[0].numel())  # 1 / sqrt(fan_in)
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)


def update_target(target: nn.Module, online: nn.Module, tau: float) -> None:
    """theta' <- tau theta + (1 - tau) theta' (tau = 1: a copy)."""
    with torch.no_grad():
        for t, p in zip(target.parameters(), online.parameters(), strict=True):
            if tau == 1.0:
                t.copy_(p)
            else:
                t.lerp_(p, tau)


NATURE_MIN_SIDE = 36  # its 8x8/4, 4x4/2 and 3x3/1 convolutions leave 1x1 of a 36x36 image
MINATAR_MIN_SIDE = 3  # its one 3x3 convolution


class NatureCNN(nn.Module):
    """Mnih et al. (2015): (B, C, H, W) frames -> (B, 64 h w) features (3136 at 84x84), or
    (B, H, W, C) images with `channels_last` (gymnasium's RGB frames: (210, 160, 3) for ALE games
    without preprocessing).

    Pixels arrive as the env's bytes and are scaled by `scale` (1/255) here, so replay and the
    host-to-device copy move uint8, a quarter of float32's bytes.

    The frames enter the convolutions in the channels-last layout (N, H, W, C in memory; the
    shape stays NCHW), so every convolution runs on it: oneDNN on CPUs and cuDNN's tensor-core
    kernels are fastest there (a gradient step on 32 stacks is ~1.4x faster than NCHW in float32
    on a 2-core AVX-512 CPU). The weights keep their usual layout, so initialisers and
    checkpoints see ordinary tensors."""

    def __init__(self, chw: tuple[int, int, int], scale: float, channels_last: bool = False):
        super().__init__()
        self.scale = scale
        self.channels_last = channels_last
        self.net = nn.Sequential(
            nn.Conv2d(chw[0], 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.out_dim = int(self.net(torch.zeros(1, *chw)).shape[1])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            obs = obs.permute(0, 3, 1, 2)  # a view: (B, C, H, W) over the (B, H, W, C) bytes
        # One pass over the bytes: cast, scaled and written in the channels-last layout (a
        # reorder, a cast and a multiply one after the other take ~1.25x as long).
        n, c, h, w = obs.shape
        x = torch.empty((n, h, w, c), device=obs.device).permute(0, 3, 1, 2)
        return self.net(torch.mul(obs, self.scale, out=x))


class MinAtarCNN(nn.Module):
    """Young & Tian (2019): (B, H, W, C) channel-last grids (MinAtar's), or (B, C, H, W) with
    `channels_last` False -> 16 3x3 filters, stride 1 -> (B, 16 (H-2) (W-2)) features (1024 on
    MinAtar's 10x10)."""

    def __init__(self, chw: tuple[int, int, int], scale: float, channels_last: bool = True):
        super().__init__()
        self.scale = scale
        self.channels_last = channels_last
        c, h, w = chw
        self.net = nn.Sequential(nn.Conv2d(c, 16, 3, stride=1), nn.ReLU(), nn.Flatten())
        self.out_dim = 16 * (h - 2) * (w - 2)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.permute(0, 3, 1, 2) if self.channels_last else obs
        return self.net(x.float() * self.scale)


def image_layout(space: Any) -> tuple[tuple[int, int, int], bool] | None:
    """(C, H, W) of a 3-dimensional Box of images and whether they are channel-last (H, W, C),
    or None for any other space. Channel-first stacks have fewer channels than rows (ALE's
    (4, 84, 84)); channel-last images fewer channels than columns (MinAtar's (10, 10, 4),
    RGB frames' (210, 160, 3))."""
    if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 3):
        return None
    shape = tuple(int(d) for d in space.shape)
    channels_last = shape[2] <= shape[0]
    chw = (shape[2], shape[0], shape[1]) if channels_last else shape
    return chw, channels_last  # type: ignore[return-value]


def network_problem(network: str, space: Any) -> str | None:
    """Why `network` (the algorithms' `Config.network`) cannot take observations from `space`,
    or None. `image_torso` raises it; the algorithms' `check_env` reports it at validation."""
    layout = image_layout(space)
    if network == "mlp" or (network == "auto" and layout is None):
        return None
    if layout is None:
        return f"network {network} needs image observations (a 3-dimensional Box), not {space}"
    _, h, w = layout[0]
    if network == "nature_cnn" and min(h, w) < NATURE_MIN_SIDE:
        return (
            f"the Nature CNN needs images of at least {NATURE_MIN_SIDE}x{NATURE_MIN_SIDE} "
            f"pixels, not {h}x{w}: use network minatar_cnn (or auto)"
        )
    if min(h, w) < MINATAR_MIN_SIDE:
        return f"images of {h}x{w} pixels are too small for a CNN: use network mlp"
    return None


def image_torso(network: str, space: Any) -> NatureCNN | MinAtarCNN | None:
    """The CNN for image observations (see `Config.network`), or None for an MLP.

    auto: the Nature CNN for images of 36+ pixels a side (ALE's frame stacks, RGB frames), the
    MinAtar CNN for smaller grids, in either layout (`image_layout`). Pixels are scaled by
    1/high (1/255 for bytes)."""
    if (problem := network_problem(network, space)) is not None:
        raise ValueError(problem)
    layout = image_layout(space)
    if network == "mlp" or layout is None:
        return None
    chw, channels_last = layout
    high = float(np.max(space.high))
    scale = 1.0 / high if np.isfinite(high) and high > 1 else 1.0
    if network == "auto":
        network = "nature_cnn" if min(chw[1:]) >= NATURE_MIN_SIDE else "minatar_cnn"
    if network == "nature_cnn":
        return NatureCNN(chw, scale, channels_last)
    return MinAtarCNN(chw, scale, channels_last)
