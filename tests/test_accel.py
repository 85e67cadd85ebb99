"""Mixed precision and compilation: every algorithm with networks takes both (the autoencoder,
whose layers are hand-written tensors, takes precision only), and both run on the CPU."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from runctx import RunContext
from runctx.accel import MixedPrecision, compile_modules
from runctx.writers import InMemoryWriter
from service.registry import ALGORITHMS

from .test_resume import CASES

WITH_PRECISION = sorted(n for n, a in ALGORITHMS.items() if "precision" in a.config.model_fields)
WITH_COMPILE = sorted(n for n, a in ALGORITHMS.items() if "compile" in a.config.model_fields)
# A loss each algorithm logs, which mixed precision must change (autocast is in effect).
LOSS = {
    "dqn": "losses/td_loss",
    "ppo": "losses/value_loss",
    "sac": "losses/qf1_loss",
    "vae": "train/loss",
    "gan": "losses/d",
    "dbn": "finetune/loss",
    "autoencoder": "train/loss",
}


def test_the_algorithms_with_networks_take_the_options() -> None:
    assert sorted(LOSS) == WITH_PRECISION
    assert set(WITH_COMPILE) == set(LOSS) - {"autoencoder"}


def run(algorithm: str, tmp_path: Path, **options: object) -> RunContext:
    env, params, _ = CASES[algorithm]
    config = ALGORITHMS[algorithm].config.model_validate({**params, **options})
    torch.set_num_threads(1)
    ctx = RunContext(seed=1, writer=InMemoryWriter(), workdir=tmp_path, env=env)
    ALGORITHMS[algorithm].train(config, ctx)
    ctx.close()
    return ctx


@pytest.mark.parametrize("algorithm", WITH_PRECISION)
def test_mixed_precision_runs_and_changes_the_arithmetic(algorithm: str, tmp_path: Path) -> None:
    runs = {p: run(algorithm, tmp_path / p, precision=p) for p in ("fp32", "bf16-mixed")}
    curves = {p: [v for _, v in r.writer.metrics[LOSS[algorithm]]] for p, r in runs.items()}  # type: ignore[attr-defined]
    assert all(math.isfinite(v) for c in curves.values() for v in c)
    assert curves["bf16-mixed"] != curves["fp32"]  # bfloat16 rounding reached the losses
    # Within bfloat16's precision of the float32 run at the first logged point.
    first = curves["fp32"][0], curves["bf16-mixed"][0]
    assert math.isclose(*first, rel_tol=0.1, abs_tol=0.05), first


@pytest.mark.parametrize("algorithm", ["sac", "vae"])
def test_fp16_keeps_its_loss_scale_in_checkpoints(algorithm: str, tmp_path: Path) -> None:
    ctx = run(algorithm, tmp_path, precision="fp16-mixed")
    saved = ctx.checkpoints.latest()
    assert saved is not None and "scaler" in saved
    assert saved["scaler"]["scale"] > 0


def test_a_compiled_run_matches_the_eager_one(tmp_path: Path) -> None:
    """Compilation fuses kernels but computes the same function: the same losses (to float
    tolerance) and checkpoints with the eager module's keys."""
    eager, compiled = run("ppo", tmp_path / "eager"), run("ppo", tmp_path / "c", compile=True)
    a = [v for _, v in eager.writer.metrics["losses/value_loss"]]  # type: ignore[attr-defined]
    b = [v for _, v in compiled.writer.metrics["losses/value_loss"]]  # type: ignore[attr-defined]
    assert len(a) == len(b) and a[0] == pytest.approx(b[0], rel=1e-4)
    saved_eager, saved_compiled = eager.checkpoints.latest(), compiled.checkpoints.latest()
    assert saved_eager is not None and saved_compiled is not None
    assert set(saved_eager["agent"]) == set(saved_compiled["agent"])


def test_compile_falls_back_to_eager_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", unavailable)
    net = torch.nn.Linear(3, 2)
    with caplog.at_level(logging.WARNING):
        assert not compile_modules(True, net, device=torch.device("cpu"))
    assert "no C++ compiler" in caplog.text and "eagerly" in caplog.text
    assert net(torch.ones(1, 3)).shape == (1, 2)


def test_fp16_skips_a_step_whose_gradients_overflowed() -> None:
    """The scaler's contract: an overflowing step leaves the weights alone and halves the scale
    (on CPU the scaler runs too, so this holds on every device)."""
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    amp = MixedPrecision("fp16-mixed", torch.device("cpu"))
    before, scale = net.weight.detach().clone(), amp.scaler.get_scale()
    amp.step(net(torch.full((1, 2), float("inf"))).sum(), opt)
    assert torch.equal(net.weight, before) and amp.scaler.get_scale() == scale / 2
    amp.step(net(torch.ones(1, 2)).sum(), opt)
    assert not torch.equal(net.weight, before)
