"""Network pieces the deep RL algorithms share."""

from __future__ import annotations

import math

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
