"""RBM maths on models small enough to enumerate, and a short training run."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from generative import data, rbm
from runctx import RunContext


def small_rbm(D: int, H: int, scale: float, seed: int = 0) -> rbm.RBM:
    g = torch.Generator().manual_seed(seed)
    model = rbm.RBM(D, H, "bernoulli", scale, g).double()
    model.b.copy_(torch.randn(D, generator=g, dtype=torch.float64) * 0.5)
    model.c.copy_(torch.randn(H, generator=g, dtype=torch.float64) * 0.5)
    return model


def all_states(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def exact_loglik(model: rbm.RBM, v: torch.Tensor) -> torch.Tensor:
    """Mean log p(v) = -F(v) - log Z, with Z summed over every (v, h): differentiable."""
    V = all_states(model.b.numel())
    log_z = torch.logsumexp(-model.free_energy(V), 0)
    return (-model.free_energy(v) - log_z).mean()


def test_free_energy_matches_its_closed_form() -> None:
    model = small_rbm(5, 4, 0.7)
    v = all_states(5)
    h = all_states(4)
    # F(v) = -log sum_h exp(-E(v, h)), E(v, h) = -b.v - c.h - v.W.h
    energy = -(v @ model.b)[:, None] - (h @ model.c)[None, :] - v @ model.W @ h.T
    expected = -torch.logsumexp(-energy, dim=1)
    torch.testing.assert_close(model.free_energy(v), expected)


def test_cd_gradient_matches_the_exact_gradient_and_has_its_sign() -> None:
    torch.manual_seed(0)
    model = small_rbm(6, 4, 0.5)
    g = torch.Generator().manual_seed(1)
    batch = rbm.bernoulli(torch.full((40, 6), 0.3, dtype=torch.float64), g)
    # The exact gradient of the mean log-likelihood, by autograd through the enumeration.
    params = [model.W, model.b, model.c]
    for p in params:
        p.requires_grad_(True)
    exact = dict(zip("Wbc", torch.autograd.grad(exact_loglik(model, batch), params), strict=True))
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        ph0 = model.p_h(batch)
        # Long chains from many replicas of the data: the model term becomes exact.
        chains = rbm.gibbs(model, batch.repeat(500, 1), 300, g)
        long_run = rbm.cd_gradients(model, batch, ph0, chains)
        for name in "Wbc":
            torch.testing.assert_close(long_run[name], exact[name], atol=0.02, rtol=0.0)
        # CD-1 is biased but points uphill.
        cd1 = rbm.cd_gradients(model, batch, ph0, rbm.gibbs(model, batch.repeat(200, 1), 1, g))
        dot = sum(float((cd1[n] * exact[n]).sum()) for n in "Wbc")
        assert dot > 0


def test_openblas_products_match_torchs() -> None:
    """The CPU fast path (numpy's OpenBLAS) computes what torch's products compute."""
    g = torch.Generator().manual_seed(0)
    model = rbm.RBM(50, 30, "bernoulli", 0.1, g)
    v = (torch.rand(16, 50, generator=g) < 0.4).float()
    h = (torch.rand(16, 30, generator=g) < 0.5).float()
    ph0 = model.p_h(v)
    vk = rbm.bernoulli(model.mean_v(h), g)
    expected = {
        "p_h": model.p_h(v),
        "mean_v": model.mean_v(h),
        "grads": rbm.cd_gradients(model, v, ph0, vk, weight_decay=0.01),
    }
    model.openblas = True
    torch.testing.assert_close(model.p_h(v), expected["p_h"])
    torch.testing.assert_close(model.mean_v(h), expected["mean_v"])
    for name, grad in rbm.cd_gradients(model, v, ph0, vk, weight_decay=0.01).items():
        torch.testing.assert_close(grad, expected["grads"][name])
    for beta in (0.0, 0.5, 1.0):  # c <- beta c + alpha v^T h, beta 0 ignoring what c held
        c = torch.full((50, 30), float("nan") if beta == 0.0 else 2.0)
        want = c.clone().addmm_(v.T, h, beta=beta, alpha=0.3)
        rbm.add_outer_(c, v, h, alpha=0.3, beta=beta, openblas=True)
        torch.testing.assert_close(c, want)


def test_blas_choice_and_threads(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    model = rbm.RBM(64, 32, "bernoulli", 0.1, g)
    v = torch.rand(8, 64, generator=g)
    assert rbm.pick_openblas("openblas", model, v) is True
    assert rbm.pick_openblas("torch", model, v) is False
    assert rbm.pick_openblas("openblas", model, v.double()) is False  # float32 only
    assert isinstance(rbm.pick_openblas("auto", model, v), bool)
    assert model.openblas is False  # timing leaves the model as it was
    threads = torch.get_num_threads()
    ctx = RunContext.in_memory(workdir=tmp_path, dataset=data.DigitsDataset(limit=300), seed=0)
    config = rbm.Config(n_hidden=16, epochs=1, batch_size=20, cpu_blas="openblas", figures=False)
    ctx.timer.start()
    rbm.train(config, ctx)
    ctx.close()
    assert torch.get_num_threads() == threads  # the loop's single torch thread is given back
    assert ctx.writer.metrics["train/recon_error"][-1][1] < 0.2


def test_ais_agrees_with_the_exact_partition_function() -> None:
    model = small_rbm(20, 12, 0.3, seed=3)
    exact = rbm.exact_log_z(model)
    # Cross-check the hidden-side enumeration against the visible-side one.
    assert exact == pytest.approx(
        float(torch.logsumexp(-model.free_energy(all_states(20)), 0)), abs=1e-9
    )
    g = torch.Generator().manual_seed(0)
    base_b = torch.zeros(20, dtype=torch.float64)
    estimate, stderr = rbm.ais_log_z(model, base_b, temperatures=3000, runs=200, g=g)
    assert abs(estimate - exact) < max(4 * stderr, 0.05), (estimate, exact, stderr)


def test_rbm_learns_bars_and_stripes(tmp_path: Path) -> None:
    """On bars and stripes the exact log-likelihood is computable: training must raise it a lot."""
    spec = data.BarsAndStripesDataset(size=3, samples=600)
    ctx = RunContext.in_memory(workdir=tmp_path, dataset=spec, seed=0)
    config = rbm.Config(
        n_hidden=16, epochs=60, batch_size=20, learning_rate=0.1, k=10, probe=False, figures=False
    )
    ctx.timer.start()
    rbm.train(config, ctx)
    ctx.close()
    state = ctx.checkpoints.latest()
    assert state is not None and state["epoch"] == 60
    model = rbm.RBM(9, 16, "bernoulli", 0.01, torch.Generator()).double()
    model.load_state_dict({k: v.double() for k, v in state["model"].items()})
    patterns = torch.from_numpy(data.bars_and_stripes_patterns(3).reshape(-1, 9))
    loglik = float(exact_loglik(model, patterns))
    uniform = -9 * math.log(2)  # an untrained model: -6.24 nats
    optimum = -math.log(len(patterns))  # the data distribution itself: -2.64 nats
    assert loglik > uniform + 0.6 * (optimum - uniform), loglik
    recon = ctx.writer.metrics["train/recon_error"]
    assert recon[-1][1] < recon[0][1]


def test_rbm_on_digits_logs_its_metrics_and_figures(tmp_path: Path) -> None:
    ctx = RunContext.in_memory(workdir=tmp_path, dataset=data.DigitsDataset(limit=600), seed=0)
    config = rbm.Config(
        n_hidden=32,
        epochs=2,
        batch_size=20,
        sample_steps=20,
        ais=rbm.AISConfig(enabled=True, temperatures=200, runs=10, examples=50),
    )
    ctx.timer.start()
    rbm.train(config, ctx)
    ctx.close()
    logged = set(ctx.writer.metrics)
    assert {
        "train/recon_error",
        "eval/pseudo_loglik",
        "eval/free_energy_gap",
        "eval/ais_loglik",
        "eval/ais_loglik_std",
        "eval/probe_accuracy",
        "time/samples_per_s",
    } <= logged
    assert 0.5 < ctx.writer.metrics["eval/probe_accuracy"][-1][1] <= 1.0
    names = {p.name for p, _ in ctx.writer.artifacts}
    assert {"samples_step00000001.png", "samples_step00000002.png", "filters.png"} <= names


def test_gaussian_visibles_train(tmp_path: Path) -> None:
    ctx = RunContext.in_memory(workdir=tmp_path, dataset=data.DigitsDataset(), seed=0)
    config = rbm.Config(
        n_hidden=64, visible="gaussian", epochs=6, batch_size=20, learning_rate=0.005, figures=False
    )
    ctx.timer.start()
    rbm.train(config, ctx)
    ctx.close()
    recon = [v for _, v in ctx.writer.metrics["train/recon_error"]]
    assert all(math.isfinite(r) for r in recon)
    assert recon[-1] < 0.85 * recon[0]  # standardised pixels: ~0.96 before any learning
    assert ctx.writer.metrics["eval/probe_accuracy"][-1][1] > 0.85
