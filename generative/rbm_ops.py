"""The RBM's speed-only mechanics: where its matrix products run, and its CPU random source.

None of this changes what `generative.rbm` computes, only how fast: on a CPU, numpy's OpenBLAS
runs the RBM's float32 products faster than torch's own BLAS on some machines (`pick_openblas`
times both on the first batch), and numpy's PCG64 fills uniforms faster than torch's Mersenne
Twister. The algorithm calls `addmm`, `add_outer_`, `bernoulli` and `normal` and reads the same
either way.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

# The training loop's random source: torch's generator, or on the CPU numpy's PCG64, which fills
# float32 uniforms faster than torch's Mersenne Twister. Both come from the trial's named streams.
RNG = torch.Generator | np.random.Generator


def bernoulli(p: torch.Tensor, g: RNG) -> torch.Tensor:
    """Binary samples with probabilities p; u < p computed in place in u's buffer (one pass)."""
    if isinstance(g, np.random.Generator):  # CPU float32 only (see `loop_rng`)
        return torch.from_numpy(g.random(p.shape, dtype=np.float32)).lt_(p)
    return torch.rand(p.shape, generator=g, device=p.device, dtype=p.dtype).lt_(p)


def loop_rng(device: torch.device, g: torch.Generator, numpy_rng: np.random.Generator) -> RNG:
    return numpy_rng if device.type == "cpu" else g


def add_outer_(
    c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float, openblas: bool
) -> None:
    """c <- beta c + alpha a^T b, in place: c (D, H), a (B, D), b (B, H).

    torch: one GEMM straight into c. OpenBLAS: numpy's matmul, then one pass to accumulate (the
    in-place GEMM is scipy's, whose separate OpenBLAS would bring a second thread pool).
    """
    if not openblas:
        c.addmm_(a.T, b, beta=beta, alpha=alpha)
        return
    outer = torch.from_numpy(np.matmul(a.numpy().T, b.numpy()))  # (D, H)
    if beta == 0.0:  # as BLAS: c's old values (even NaN) do not matter
        c.copy_(outer).mul_(alpha)
    else:
        (c if beta == 1.0 else c.mul_(beta)).add_(outer, alpha=alpha)


@contextlib.contextmanager
def blas_threads(model: Any) -> Iterator[None]:
    """OpenBLAS gets the trial's threads (torch's count) and torch runs its elementwise ops on one:
    two thread pools spinning for the same cores in turn would run ~50x slower."""
    if not model.openblas:
        yield
        return
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(threads, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)


def pick_openblas(choice: str, model: Any, v: torch.Tensor) -> bool:
    """Whether the training loop's products go through OpenBLAS: `choice`, or for `auto` the
    faster way on this machine, timed on the batch `v` (B, D) with an update's three kinds of
    product, each way under the thread settings the loop would use."""
    if v.device.type != "cpu" or v.dtype != torch.float32 or choice == "torch":
        return False
    if choice == "openblas":
        return True
    scratch = torch.empty_like(model.W)
    best: dict[bool, float] = {}
    for flag in (False, True, False, True):  # alternating: the machine's speed drifts
        model.openblas = flag
        with blas_threads(model):
            for _ in range(10):
                t = time.perf_counter()
                ph = model.p_h(v)
                model.mean_v(ph)
                add_outer_(scratch, v, ph, alpha=1.0, beta=0.0, openblas=flag)
                best[flag] = min(best.get(flag, math.inf), time.perf_counter() - t)
    model.openblas = False
    return best[True] < best[False]


def normal(like: torch.Tensor, g: RNG) -> torch.Tensor:
    """Standard normal noise of `like`'s shape (Gaussian visibles)."""
    if isinstance(g, np.random.Generator):
        return torch.from_numpy(g.standard_normal(like.shape, dtype=np.float32))
    return torch.randn(like.shape, generator=g, device=like.device, dtype=like.dtype)


def addmm(bias: torch.Tensor, x: torch.Tensor, w: torch.Tensor, openblas: bool) -> torch.Tensor:
    """bias + x @ w: (B, K) @ (K, N) -> (B, N), through OpenBLAS or torch."""
    if openblas:
        return torch.from_numpy(np.matmul(x.numpy(), w.numpy())).add_(bias)
    return torch.addmm(bias, x, w)
