"""VAE maths (KL, reparameterisation, importance-weighted bound) and short learning runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from generative import data, vae
from runctx import RunContext


def test_kl_closed_form_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.5
    z = mu + torch.randn(200_000, 4, 3, generator=g, dtype=torch.float64) * torch.exp(0.5 * logvar)
    log_q = (-0.5 * ((z - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))).sum(-1)
    log_p = (-0.5 * (z**2 + math.log(2 * math.pi))).sum(-1)
    torch.testing.assert_close(
        vae.kl_divergence(mu, logvar), (log_q - log_p).mean(0), atol=0.02, rtol=0
    )


def test_reparameterisation_carries_gradients_and_is_seeded() -> None:
    mu = torch.zeros(5, 2, requires_grad=True)
    logvar = torch.zeros(5, 2, requires_grad=True)
    z = vae.VAE.reparameterize(mu, logvar, torch.Generator().manual_seed(1))
    z.sum().backward()
    assert mu.grad is not None and torch.equal(mu.grad, torch.ones(5, 2))
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0
    again = vae.VAE.reparameterize(mu, logvar, torch.Generator().manual_seed(1))
    assert torch.equal(z, again)


def trained(tmp_path: Path, **overrides: object) -> tuple[vae.VAE, RunContext, data.Dataset]:
    ds = data.load(data.DigitsDataset(), 0)
    config = vae.Config(
        **{
            "epochs": 15,
            "batch_size": 64,
            "latent_dim": 8,
            "hidden": [128],
            "iwae_k": 20,
            "iwae_examples": 200,
            **overrides,
        }
    )  # type: ignore[arg-type]
    ctx = RunContext.in_memory(workdir=tmp_path, seed=0)
    ctx.timer.start()
    model = vae.fit(config, ds, ctx)
    ctx.close()
    return model, ctx, ds


def test_iwae_bound_is_tighter_than_the_elbo(tmp_path: Path) -> None:
    model, _, ds = trained(tmp_path, figures=False)
    g = torch.Generator().manual_seed(0)
    x = ds.x_test[:200]
    with torch.no_grad():
        neg_elbo = float(
            sum((r + k).mean() for r, k in (vae.elbo_terms(model, x, g) for _ in range(20))) / 20
        )
    nll_1 = vae.nll_iwae(model, x, 1, g)
    nll_100 = vae.nll_iwae(model, x, 100, g)
    assert nll_1 == pytest.approx(neg_elbo, abs=0.5)  # k = 1 is the ELBO
    assert nll_100 < neg_elbo - 0.1  # more samples: a tighter bound on -log p(x)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"architecture": "conv", "channels": [16, 32]},
        {"likelihood": "gaussian", "learning_rate": 3e-3},
        {"beta": 4.0, "kl_warmup_epochs": 5, "learning_rate": 1e-3},
    ],
)
def test_vae_learns(tmp_path: Path, overrides: dict) -> None:
    _, ctx, _ = trained(tmp_path, **overrides)
    neg_elbo = [v for _, v in ctx.writer.metrics["eval/neg_elbo"]]
    assert all(math.isfinite(v) for v in neg_elbo)
    assert neg_elbo[-1] < neg_elbo[0] - 5  # nats per example
    assert {"eval/recon", "eval/kl", "eval/nll_iwae", "train/loss"} <= set(ctx.writer.metrics)
    series = {d for _, d in ctx.writer.artifacts}
    assert {"images/samples", "images/reconstructions", "images/latent"} <= series
    # Each series opens at step 0, the untrained model, so the UI's image card has a picture.
    first = min(p.name for p, d in ctx.writer.artifacts if d == "images/samples")
    assert first == "samples_step00000000.png"


def test_two_dimensional_latent_draws_the_manifold(tmp_path: Path) -> None:
    _, ctx, _ = trained(tmp_path, latent_dim=2, epochs=2)
    assert any(p.name.startswith("latent_step") for p, _ in ctx.writer.artifacts)


@pytest.mark.parametrize(("shape", "channels"), [((28, 28), [8, 8, 8]), ((5, 7), [4, 4])])
def test_conv_pads_sides_that_are_not_multiples_and_crops_back(
    shape: tuple[int, int], channels: list[int]
) -> None:
    """28x28 through three stride-2 layers (-> 32x32), 5x7 through two (-> 8x8)."""
    config = vae.Config(architecture="conv", channels=channels, latent_dim=3)
    model = vae.VAE(config, shape, torch.Generator().manual_seed(0))
    x = torch.rand(4, shape[0] * shape[1])
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (4, 3)
    out = model.decode(mu)
    assert out.shape == x.shape
    # Padding holds zeros, so the pixels of the image and only they reach the encoder.
    pad = data.padding_to_multiple(shape, 2 ** len(channels))
    assert (shape[0] + pad[2] + pad[3]) % 2 ** len(channels) == 0
    assert (shape[1] + pad[0] + pad[1]) % 2 ** len(channels) == 0
    assert data.padding_to_multiple((8, 16), 8) == (0, 0, 0, 0)


def test_conv_vae_learns_odd_sized_unlabelled_images(tmp_path: Path) -> None:
    """5x5 bars and stripes: padded to 8x8, no labels (so no FID), the ELBO still improves."""
    ds = data.load(data.BarsAndStripesDataset(size=5, samples=800), 0)
    config = vae.Config(architecture="conv", latent_dim=4, epochs=30)
    ctx = RunContext.in_memory(workdir=tmp_path, seed=0)
    ctx.timer.start()
    vae.fit(config, ds, ctx, data.BarsAndStripesDataset(size=5, samples=800))
    ctx.close()
    elbo = [v for _, v in ctx.writer.metrics["eval/neg_elbo"]]  # type: ignore[attr-defined]
    uniform = 25 * math.log(2)  # nats of 25 fair coins; the 62 patterns need log(62) = 4.1
    assert elbo[-1] < 0.85 * uniform < elbo[0]
    assert "eval/fid" not in ctx.writer.metrics  # type: ignore[attr-defined]


def test_vae_samples_get_the_same_fid_as_gans(tmp_path: Path) -> None:
    from generative import fid

    spec = data.DigitsDataset()
    config = vae.Config(
        epochs=3,
        hidden=[64],
        latent_dim=4,
        figures=False,
        iwae_k=2,
        fid=fid.FIDConfig(every=1, samples=200, cache=str(tmp_path / "cache")),
    )
    ctx = RunContext.in_memory(workdir=tmp_path, seed=0)
    ctx.timer.start()
    vae.fit(config, data.load(spec, 0), ctx, spec)
    ctx.close()
    fids = [v for _, v in ctx.writer.metrics["eval/fid"]]
    assert len(fids) == 3 and all(f > ctx.writer.metrics["eval/fid_floor"][0][1] for f in fids)
