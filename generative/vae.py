"""Variational autoencoder (Kingma & Welling 2014), with the importance-weighted bound of
Burda, Grosse & Salakhutdinov (2016) as the held-out likelihood estimate.

Encoder q(z | x) = N(mu(x), diag(exp(logvar(x)))), prior p(z) = N(0, I), decoder p(x | z):
Bernoulli (x in [0, 1]; logits out) or Gaussian (mean out, a learned log-variance per pixel).
Training maximises the ELBO

    log p(x) >= E_q[log p(x | z)] - beta * KL(q(z | x) || p(z)),

with z = mu + sigma * eps, eps ~ N(0, I) (the reparameterisation trick, section 2.4), the KL term
in closed form (appendix B), and beta warmed up linearly over `kl_warmup_epochs`. Everything is
reported in nats per example.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from generative import data, fid
from generative.fid import FIDConfig
from generative.plots import image_grid
from runctx import RunContext, scheduled_once
from runctx.accel import Compile, MixedPrecision, Precision, compile_modules
from runctx.checkpoints import capture

# What a run logs (see the registry); FID's with a labelled data set.
METRICS = (
    "time/epoch_s",
    "train/loss",
    "eval/neg_elbo",
    "eval/recon",
    "eval/kl",
    "eval/nll_iwae",
    *fid.METRICS,
)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    architecture: Literal["mlp", "conv"] = Field("mlp", description="Encoder/decoder networks.")
    latent_dim: int = Field(20, gt=0, description="Dimensions of z.")
    hidden: list[PositiveInt] = Field(
        default_factory=lambda: [400],
        min_length=1,
        description="MLP hidden widths (Kingma & Welling: one layer of 400 for MNIST).",
    )
    channels: list[PositiveInt] = Field(
        default_factory=lambda: [32, 64],
        min_length=1,
        description="conv: channels of the stride-2 convolutions (each halves H and W).",
    )
    likelihood: Literal["bernoulli", "gaussian"] = Field(
        "bernoulli", description="p(x | z): Bernoulli on [0, 1] pixels, or Gaussian."
    )
    beta: float = Field(1.0, ge=0, description="Weight of the KL term (1: the ELBO).")
    kl_warmup_epochs: int = Field(0, ge=0, description="Epochs over which beta rises from 0.")
    epochs: int = Field(20, gt=0, description="Passes over the training split.")
    batch_size: int = Field(128, gt=0, description="Examples per step.")
    learning_rate: float = Field(
        2e-3,
        gt=0,
        description="Adam step size. 2e-3, twice the PyTorch example's: on MNIST's 784-400-20 "
        "model it ends 20 epochs ~2 nats lower in held-out -ELBO (benchmarks/vae.py).",
    )
    iwae_k: int = Field(50, gt=0, description="Importance samples for eval/nll_iwae.")
    iwae_examples: int = Field(1000, gt=0, description="Held-out examples scored by IWAE.")
    iwae_every: int = Field(0, ge=0, description="Also every N epochs (0: at the end only).")
    fid: FIDConfig = Field(default_factory=FIDConfig, description="Sample quality.")
    figures: bool = Field(True, description="Per-epoch samples and reconstructions.")
    checkpoint_every: int = Field(
        5,
        gt=0,
        description="Epochs between checkpoints (and the end). Every checkpoint is kept as an "
        "MLflow artifact; fewer cost less storage, more lose less work to a restart.",
    )
    precision: Precision = "fp32"
    compile: Compile = False


class VAE(torch.nn.Module):
    def __init__(self, config: Config, image_shape: tuple[int, int], g: torch.Generator):
        super().__init__()
        self.config, self.image_shape = config, image_shape
        D, Z = image_shape[0] * image_shape[1], config.latent_dim
        if config.architecture == "mlp":
            widths = [D, *config.hidden]
            self.encoder: torch.nn.Module = _mlp(widths)
            self.decoder: torch.nn.Module = torch.nn.Sequential(
                _mlp([Z, *reversed(config.hidden)]), torch.nn.Linear(config.hidden[0], D)
            )
            feat = config.hidden[-1]
        else:
            self.encoder, self.decoder, feat = _conv(config.channels, image_shape, Z)
        self.to_stats = torch.nn.Linear(feat, 2 * Z)  # -> (mu, logvar)
        self.log_sigma = torch.nn.Parameter(torch.zeros(D))  # Gaussian decoder only
        for m in self.modules():  # seeded init: no global RNG
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                torch.nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=g)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) -> mu, logvar, each (B, Z)."""
        # float32 out of mixed-precision forward passes: the ELBO is computed in full precision
        return self.to_stats(self.encoder(self._images(x))).float().chunk(2, dim=1)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        eps = torch.randn(mu.shape, generator=g, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, Z) -> logits (Bernoulli) or means (Gaussian), (B, D)."""
        return self.decoder(z).float().flatten(1)

    def log_px(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """log p(x | z) summed over pixels: (B, D), (B, D) -> (B,)."""
        if self.config.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
        var = torch.exp(2 * self.log_sigma)
        return -0.5 * (((x - out) ** 2) / var + 2 * self.log_sigma + math.log(2 * math.pi)).sum(1)

    def mean_image(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out) if self.config.likelihood == "bernoulli" else out

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.config.architecture == "mlp" else x.view(-1, 1, *self.image_shape)


def _mlp(widths: list[int]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for d_in, d_out in itertools.pairwise(widths):
        layers += [torch.nn.Linear(d_in, d_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def _conv(
    channels: list[int], shape: tuple[int, int], Z: int
) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """Stride-2 convolutions (each halves H, W) and the mirrored transposed convolutions.

    Images whose sides are not multiples of 2^L (L layers; 28x28 with three) are zero-padded to the
    next multiple on the way in, and the decoder's output is cropped back to h x w.
    """
    h, w = shape
    scale = 2 ** len(channels)
    pad = data.padding_to_multiple(shape, scale)
    enc: list[torch.nn.Module] = [torch.nn.ZeroPad2d(pad)] if any(pad) else []
    h, w = h + pad[2] + pad[3], w + pad[0] + pad[1]
    c_in = 1
    for c in channels:  # (B, c_in, h, w) -> (B, c, h/2, w/2)
        enc += [torch.nn.Conv2d(c_in, c, 4, stride=2, padding=1), torch.nn.ReLU()]
        c_in = c
    hs, ws = h // scale, w // scale
    feat = channels[-1] * hs * ws
    dec: list[torch.nn.Module] = [
        torch.nn.Linear(Z, feat),
        torch.nn.ReLU(),
        torch.nn.Unflatten(1, (channels[-1], hs, ws)),
    ]
    for c_out in [*reversed(channels[:-1]), 1]:  # each doubles h, w
        dec += [torch.nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), torch.nn.ReLU()]
        c_in = c_out
    dec.pop()  # no ReLU on the output (logits or means)
    if any(pad):
        dec.append(
            torch.nn.ZeroPad2d((-pad[0], -pad[1], -pad[2], -pad[3]))
        )  # negative padding crops
    return torch.nn.Sequential(*enc, torch.nn.Flatten()), torch.nn.Sequential(*dec), feat


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per example (appendix B):
    -1/2 sum(1 + logvar - mu^2 - sigma^2)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)


def elbo_terms(
    model: VAE, x: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction -log p(x | z), KL) per example, one z sample each: (B,), (B,)."""
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar, g)
    return -model.log_px(x, model.decode(z)), kl_divergence(mu, logvar)


@torch.no_grad()
def nll_iwae(model: VAE, x: torch.Tensor, k: int, g: torch.Generator, chunk: int = 100) -> float:
    """-log p(x) by the k-sample importance-weighted bound, mean over x (nats per example):

    log p(x) ~ logsumexp_i [log p(x | z_i) + log p(z_i) - log q(z_i | x)] - log k.
    """
    total = 0.0
    for xb in x.split(chunk):
        mu, logvar = model.encode(xb)  # (B, Z)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn((k, *mu.shape), generator=g, device=mu.device)  # (k, B, Z)
        z = mu + eps * std
        log_q = (-0.5 * (eps**2 + logvar + math.log(2 * math.pi))).sum(-1)  # (k, B)
        log_prior = (-0.5 * (z**2 + math.log(2 * math.pi))).sum(-1)
        out = model.decode(z.flatten(0, 1))  # (k*B, D)
        log_px = model.log_px(xb.repeat(k, 1), out).view(k, -1)
        log_w = log_px + log_prior - log_q
        total += float((torch.logsumexp(log_w, 0) - math.log(k)).sum())
    return -total / len(x)


def check_data(config: Config, dataset: data.DatasetSpec | None) -> str | None:
    """Why this VAE cannot model `dataset`, or None (checked when a spec is validated)."""
    if config.likelihood == "bernoulli":
        reason = data.needs_unit_pixels(dataset, "likelihood: bernoulli")
        return reason and f"{reason} (use likelihood: gaussian)"
    return None


def train(config: Config, ctx: RunContext) -> None:
    spec = ctx.dataset or data.DigitsDataset()
    fit(config, data.load(spec, ctx.seed), ctx, spec)


def fit(config: Config, ds: data.Dataset, ctx: RunContext, spec: BaseModel | None = None) -> VAE:
    """Train on `ds`; with the data set's `spec` (its cache key) samples are also scored by FID."""
    dev = ctx.device
    # Independent streams: batch order, and the noise of training (samples, corruption).
    order, g = ctx.torch_generator("batches"), ctx.torch_generator("noise")
    x_train, x_test = ds.x_train.to(dev), ds.x_test.to(dev)
    model = VAE(config, ds.image_shape, ctx.torch_generator("init", device="cpu")).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    amp = MixedPrecision(config.precision, dev)
    compile_modules(config.compile, *model.children(), device=dev)
    # Everything the trajectory depends on; an epoch's end is the point it resumes from.
    state = {"model": model, "optimizer": opt, "batches": order, "noise": g, **amp.state()}
    start = 0
    if (saved := ctx.checkpoints.restore(state)) is not None:
        start = int(saved["epoch"])
        for group in opt.param_groups:  # the config's, should it differ (a PBT mutation)
            group["lr"] = config.learning_rate
    score = None
    if spec is not None:
        with ctx.timer.paused():
            score = fid.setup(config.fid, ds, spec, ctx)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    fixed_z = torch.randn(
        64, config.latent_dim, generator=ctx.torch_generator("fixed_noise", device="cpu")
    )
    if config.figures and start == 0:  # the untrained model: each image series starts at step 0
        with ctx.timer.paused(), torch.no_grad():
            model.eval()
            log_figures(model, x_test, fixed_z.to(dev), ds.image_shape, 0, ctx)
    for epoch in range(start, config.epochs):
        model.train()
        # Summed on the device and read once an epoch: no host synchronisation per step.
        summed, t0 = torch.zeros((), device=dev), ctx.timer.elapsed()
        for i, idx in enumerate(
            torch.randperm(len(x_train), generator=order, device=dev).split(config.batch_size)
        ):
            progress = (epoch * steps_per_epoch + i) / max(
                1, config.kl_warmup_epochs * steps_per_epoch
            )
            beta = config.beta * min(1.0, progress) if config.kl_warmup_epochs else config.beta
            with amp.autocast():
                recon, kl = elbo_terms(model, x_train[idx], g)
                loss = (recon + beta * kl).mean()
            amp.step(loss, opt)
            summed += loss.detach() * len(idx)
        total = float(summed)
        if not math.isfinite(total):
            raise FloatingPointError(f"VAE loss diverged in epoch {epoch}")
        epoch_s = ctx.timer.elapsed() - t0
        last = epoch == config.epochs - 1
        with ctx.timer.paused(), torch.no_grad():
            model.eval()
            # A fresh evaluation stream each epoch: scoring never draws from the training noise,
            # so the trajectory does not depend on when the budget says to score.
            ev = ctx.torch_generator("eval")
            recon, kl = elbo_terms(model, x_test, ev)
            metrics = {
                "time/epoch_s": epoch_s,
                "train/loss": total / len(x_train),
                "eval/neg_elbo": float((recon + kl).mean()),
                "eval/recon": float(recon.mean()),
                "eval/kl": float(kl.mean()),
            }
            # A score computed once in the run is a one-off result (`log_summary`), not a curve.
            summary: dict[str, float] = {}
            if last or (config.iwae_every and (epoch + 1) % config.iwae_every == 0):
                into = summary if scheduled_once(config.iwae_every, config.epochs) else metrics
                into["eval/nll_iwae"] = nll_iwae(
                    model, x_test[: config.iwae_examples], config.iwae_k, ev
                )
            if score is not None and config.fid.due(epoch, config.epochs):
                samples = model.mean_image(
                    model.decode(
                        torch.randn(config.fid.samples, config.latent_dim, generator=ev, device=dev)
                    )
                )
                into = summary if scheduled_once(config.fid.every, config.epochs) else metrics
                into["eval/fid"] = score.fid(samples)
                into["eval/classifier_score"] = score.classifier_score(samples)
            if config.figures:
                log_figures(model, x_test, fixed_z.to(dev), ds.image_shape, epoch + 1, ctx)
        ctx.log_metrics(metrics, step=epoch + 1)
        if summary:
            ctx.log_summary(summary)
        if (epoch + 1) % config.checkpoint_every == 0 or last or ctx.should_stop():
            with ctx.timer.paused():
                ctx.checkpoints.save({**capture(state), "epoch": epoch + 1}, step=epoch + 1)
        if ctx.should_stop():
            break
    return model


def log_figures(
    model: VAE,
    x_test: torch.Tensor,
    fixed_z: torch.Tensor,
    shape: tuple[int, int],
    step: int,
    ctx: RunContext,
) -> None:
    """Prior samples (fixed z, comparable across epochs), reconstructions, and the latent space:
    the manifold for a 2-D latent, else traversals of the most active dimensions."""
    samples = model.mean_image(model.decode(fixed_z))
    ctx.log_figure(
        image_grid(samples, shape, f"Samples from the prior, epoch {step}"), "samples", step=step
    )
    shown = x_test[:16]
    mu, _ = model.encode(shown)
    recon = model.mean_image(model.decode(mu))
    pairs = torch.stack([shown, recon], 1).reshape(-1, shown.shape[1])
    ctx.log_figure(
        image_grid(pairs, shape, f"Inputs and reconstructions, epoch {step}"),
        "reconstructions",
        step=step,
    )
    Z = fixed_z.shape[1]
    grid = torch.linspace(-2.5, 2.5, 10, device=fixed_z.device)
    if Z == 2:
        # z on a grid of the prior's quantiles: the learned manifold.
        quantiles = torch.special.ndtri(torch.linspace(0.05, 0.95, 10, device=fixed_z.device))
        z = torch.cartesian_prod(quantiles, quantiles)
        title = f"Latent manifold, epoch {step}"
    else:
        # The 5 dimensions with the largest KL (the ones in use), each swept from -2.5 to 2.5.
        mu_all, logvar_all = model.encode(x_test[:500])
        active = kl_per_dim(mu_all, logvar_all).topk(min(5, Z)).indices
        z = torch.zeros(len(active) * 10, Z, device=fixed_z.device)
        for row, dim in enumerate(active):
            z[row * 10 : (row + 1) * 10, dim] = grid
        title = f"Traversals of the {len(active)} most active latents, epoch {step}"
    images = model.mean_image(model.decode(z))
    ctx.log_figure(image_grid(images, shape, title, cols=10), "latent", step=step)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean KL per latent dimension over a batch: (B, Z) -> (Z,)."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean(0)
