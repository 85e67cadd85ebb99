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


class NatureCNN(nn.Module):
    """Mnih et al. (2015): (B, C, H, W) frames -> (B, 64 h w) features (3136 at 84x84).

    Pixels arrive as the env's bytes and are scaled by `scale` (1/255) here, so replay and the
    host-to-device copy move uint8, a quarter of float32's bytes.

    The frames enter the convolutions in the channels-last layout (N, H, W, C in memory; the
    shape stays NCHW), so every convolution runs on it: oneDNN on CPUs and cuDNN's tensor-core
    kernels are fastest there (a gradient step on 32 stacks is ~1.4x faster than NCHW in float32
    on a 2-core AVX-512 CPU). The weights keep their usual layout, so initialisers and
    checkpoints see ordinary tensors."""

    def __init__(self, shape: tuple[int, int, int], scale: float):
        super().__init__()
        self.scale = scale
        self.net = nn.Sequential(
            nn.Conv2d(shape[0], 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.out_dim = int(self.net(torch.zeros(1, *shape)).shape[1])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        # One pass over the bytes: cast, scaled and written in the channels-last layout (a
        # reorder, a cast and a multiply one after the other take ~1.25x as long).
        n, c, h, w = obs.shape
        x = torch.empty((n, h, w, c), device=obs.device).permute(0, 3, 1, 2)
        return self.net(torch.mul(obs, self.scale, out=x))


class MinAtarCNN(nn.Module):
    """Young & Tian (2019): (B, H, W, C) channel-last grids -> 16 3x3 filters, stride 1 ->
    (B, 16 (H-2) (W-2)) features (1024 on MinAtar's 10x10)."""

    def __init__(self, shape: tuple[int, int, int], scale: float):
        super().__init__()
        self.scale = scale
        h, w, c = shape
        self.net = nn.Sequential(nn.Conv2d(c, 16, 3, stride=1), nn.ReLU(), nn.Flatten())
        self.out_dim = 16 * (h - 2) * (w - 2)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.permute(0, 3, 1, 2).float() * self.scale)


def image_torso(network: str, space: Any) -> NatureCNN | MinAtarCNN | None:
    """The CNN for image observations (see `Config.network`), or None for an MLP.

    Channel-first stacks (C, H, W) (ALE's, C < H) get the Nature CNN; channel-last grids
    (H, W, C) (MinAtar's, gymnasium's RGB images) the MinAtar CNN when small. Pixels are
    scaled by 1/high (1/255 for bytes)."""
    image = isinstance(space, gym.spaces.Box) and len(space.shape) == 3
    if network == "mlp" or (network == "auto" and not image):
        return None
    if not image:
        raise ValueError(f"network {network} needs image observations, not {space}")
    shape = tuple(int(d) for d in space.shape)
    high = float(np.max(space.high))
    scale = 1.0 / high if np.isfinite(high) and high > 1 else 1.0
    channels_last = shape[2] <= shape[0]  # (10, 10, 4), (210, 160, 3); not (4, 84, 84)
    chw = (shape[2], shape[0], shape[1]) if channels_last else shape
    if network == "auto":
        network = "nature_cnn" if min(chw[1:]) >= 36 else "minatar_cnn"
    if network == "nature_cnn":
        if channels_last:
            raise ValueError(f"the Nature CNN takes channel-first stacks (C, H, W), not {shape}")
        return NatureCNN(shape, scale)  # type: ignore[arg-type]
    if not channels_last:
        raise ValueError(f"the MinAtar CNN takes channel-last grids (H, W, C), not {shape}")
    return MinAtarCNN(shape, scale)  # type: ignore[arg-type]
