"""Mixed precision and compilation, the two speed options every algorithm with networks takes.

    precision: Precision = "fp32"          # Config fields, the same in every algorithm
    compile: Compile = False
    amp = MixedPrecision(config.precision, device)
    with amp.autocast():                   # forward passes in bf16/fp16 where the op allows
        loss = ...
    amp.step(loss, optimizer, params, max_norm)   # backward (scaled for fp16), clip, step
    compile_modules(config.compile, net, device=device)

Weights, optimizer state and losses stay float32 ("mixed" precision): autocast runs matrix
products and convolutions in the low-precision type and keeps reductions in float32. float16's
narrow exponent range makes small gradients underflow, so fp16 multiplies the loss by a scale
that `torch.amp.GradScaler` adapts, and skips steps whose gradients overflowed; bfloat16 has
float32's range and needs no scaler.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

log = logging.getLogger(__name__)

Precision = Annotated[
    Literal["fp32", "bf16-mixed", "fp16-mixed"],
    Field(
        description="Forward passes autocast to bfloat16 or float16 (fp16 with a gradient "
        "scaler); weights, optimizer and losses stay float32. bf16 speeds up large layers on "
        "GPUs and on CPUs with AVX-512 BF16 or AMX; small MLPs gain nothing."
    ),
]
Compile = Annotated[
    bool,
    Field(
        description="torch.compile the networks (kernel fusion; the first steps compile). "
        "Falls back to eager execution, with a warning, where compilation is not available."
    ),
]

_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


class MixedPrecision:
    """Autocast and, for fp16, a gradient scaler, for one run on one device."""

    def __init__(self, precision: str, device: torch.device):
        self.device_type = device.type
        self.dtype = _DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16-mixed")

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(
            self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        )

    def step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        params: Iterable[torch.Tensor] | None = None,
        max_norm: float | None = None,
    ) -> None:
        """One optimizer step on `loss`: backward (scaled for fp16), the gradients' global norm
        clipped to `max_norm` (after unscaling: the true gradients), the step."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if max_norm is not None:
            assert params is not None, "clipping needs the parameters"
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the fp16 loss scale (nothing for fp32 and bf16)."""
        return {"scaler": self.scaler} if self.scaler.is_enabled() else {}


def compile_modules(enabled: bool, *modules: nn.Module, device: torch.device) -> bool:
    """Compile each module in place (`nn.Module.compile`: parameters, state-dict keys and
    checkpoints stay those of the eager module). Returns whether they were compiled: where
    torch.compile cannot run (no C++ compiler for CPU kernels, an unsupported platform), a probe
    fails and the modules stay eager, with a warning."""
    if not enabled:
        return False
    try:
        # Compilation is lazy: without the probe, a missing compiler would surface at the first
        # forward pass, inside the training loop.
        probe = torch.compile(lambda x: torch.relu(x) * 2)
        probe(torch.ones(4, device=device))
    except Exception as e:
        log.warning("torch.compile is not available here (%s); running eagerly", e)
        return False
    for module in modules:
        module.compile()
    return True
