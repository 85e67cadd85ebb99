"""Generative adversarial networks (Goodfellow et al. 2014): MLP or DCGAN (Radford et al. 2016)
networks, the non-saturating loss or WGAN-GP (Gulrajani et al. 2017).

Each step has two phases:
  (1) discriminator: real images against a detached fake batch, so no gradient reaches G;
      non-saturating: -log D(x) - log(1 - D(G(z)));  WGAN-GP: D(G(z)) - D(x) + lambda * GP;
  (2) generator: non-saturating -log D(G(z)) (strong gradients early, section 3 of the paper);
      WGAN-GP: -D(G(z)), once every `n_critic` critic steps.
Fixed noise gives sample grids comparable across epochs. NaN or exploding losses end the trial
with a FloatingPointError (the service marks it FAILED with that reason).
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

EXPLODED = 1e6  # |loss| beyond this is divergence, not training


# What a run logs (see the registry); FID's with a labelled data set.
METRICS = ("losses/d", "losses/g", "charts/d_real", "charts/d_fake", "time/epoch_s", *fid.METRICS)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    architecture: Literal["mlp", "dcgan"] = Field("mlp", description="Generator/discriminator.")
    latent_dim: int = Field(64, gt=0, description="Dimensions of the noise z ~ N(0, I).")
    hidden: list[PositiveInt] = Field(
        default_factory=lambda: [256, 256], min_length=1, description="mlp: hidden widths."
    )
    channels: int = Field(64, gt=0, description="dcgan: channels of the widest conv layer.")
    loss: Literal["non_saturating", "wgan_gp"] = Field(
        "non_saturating", description="GAN objective."
    )
    gp_weight: float = Field(10.0, ge=0, description="wgan_gp: gradient-penalty lambda.")
    n_critic: int = Field(5, gt=0, description="wgan_gp: critic steps per generator step.")
    epochs: int = Field(50, gt=0, description="Passes over the training split.")
    batch_size: int = Field(64, ge=2, description="Images per step (batch norm needs 2).")
    learning_rate: float = Field(2e-4, gt=0, description="Adam step size (DCGAN: 2e-4).")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1 (DCGAN: 0.5).")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    fid: FIDConfig = Field(default_factory=FIDConfig, description="Sample quality.")
    figures: bool = Field(True, description="Per-epoch sample grids from fixed noise.")
    checkpoint_every: int = Field(
        5,
        gt=0,
        description="Epochs between checkpoints (and the end). Every checkpoint is kept as an "
        "MLflow artifact; fewer cost less storage, more lose less work to a restart.",
    )
    precision: Precision = "fp32"
    compile: Compile = False


def _init(module: torch.nn.Module, g: torch.Generator) -> None:
    """N(0, 0.02) weights, BatchNorm scale N(1, 0.02), zero biases (DCGAN, section 4)."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.normal_(m.weight, 0.0, 0.02, generator=g)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            torch.nn.init.normal_(m.weight, 1.0, 0.02, generator=g)
            torch.nn.init.zeros_(m.bias)


def build(
    config: Config, shape: tuple[int, int], g: torch.Generator
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Generator z (B, Z) -> images (B, H*W) in [0, 1]; discriminator images -> logits (B,)."""
    h, w = shape
    D, Z = h * w, config.latent_dim
    if config.architecture == "mlp":
        gen_layers: list[torch.nn.Module] = []
        widths = [Z, *config.hidden]
        for a, b in itertools.pairwise(widths):
            # BatchNorm and LeakyReLU in G: without them the MLP GAN collapses to one mode here.
            gen_layers += [torch.nn.Linear(a, b), torch.nn.BatchNorm1d(b), torch.nn.LeakyReLU(0.2)]
        gen = torch.nn.Sequential(*gen_layers, torch.nn.Linear(widths[-1], D), torch.nn.Sigmoid())
        disc_layers: list[torch.nn.Module] = []
        widths = [D, *reversed(config.hidden)]
        for a, b in itertools.pairwise(widths):
            disc_layers += [torch.nn.Linear(a, b), torch.nn.LeakyReLU(0.2)]
        disc = torch.nn.Sequential(*disc_layers, torch.nn.Linear(widths[-1], 1))
    else:
        # Two stride-2 layers: sides that are not multiples of 4 are zero-padded up to one on the
        # way into D, and G's output is cropped back to h x w.
        pad = data.padding_to_multiple(shape, 4)
        crop = [torch.nn.ZeroPad2d((-pad[0], -pad[1], -pad[2], -pad[3]))] if any(pad) else []
        h, w = h + pad[2] + pad[3], w + pad[0] + pad[1]
        c = config.channels
        # The critic of WGAN-GP penalises per-example gradients: no BatchNorm there (section 4).
        norm = torch.nn.Identity() if config.loss == "wgan_gp" else torch.nn.BatchNorm2d(c)
        gen = torch.nn.Sequential(
            torch.nn.Linear(Z, c * (h // 4) * (w // 4)),
            torch.nn.ReLU(),
            torch.nn.Unflatten(1, (c, h // 4, w // 4)),  # (B, c, h/4, w/4)
            torch.nn.ConvTranspose2d(c, c // 2, 4, 2, 1),
            torch.nn.BatchNorm2d(c // 2),
            torch.nn.ReLU(),  # (B, c/2, h/2, w/2)
            torch.nn.ConvTranspose2d(c // 2, 1, 4, 2, 1),
            torch.nn.Sigmoid(),  # (B, 1, h, w)
            *crop,  # (B, 1, *shape)
            torch.nn.Flatten(),
        )
        disc = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, *shape)),
            *([torch.nn.ZeroPad2d(pad)] if any(pad) else []),  # (B, 1, h, w)
            torch.nn.Conv2d(1, c // 2, 4, 2, 1),
            torch.nn.LeakyReLU(0.2),  # (B, c/2, h/2, w/2)
            torch.nn.Conv2d(c // 2, c, 4, 2, 1),
            norm,
            torch.nn.LeakyReLU(0.2),  # (B, c, h/4, w/4)
            torch.nn.Flatten(),
            torch.nn.Linear(c * (h // 4) * (w // 4), 1),
        )
    _init(gen, g)
    _init(disc, g)
    return gen, disc


def gradient_penalty(
    disc: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """E[(||grad_x D(x_hat)||_2 - 1)^2] at random interpolates x_hat of real and fake."""
    eps = torch.rand(len(real), 1, generator=g, device=real.device)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.norm(2, dim=1) - 1) ** 2).mean()


def check_data(config: Config, dataset: data.DatasetSpec | None) -> str | None:
    """Why the GAN cannot model `dataset`, or None (checked when a spec is validated)."""
    return data.needs_unit_pixels(dataset, "the generator's sigmoid output")


def train(config: Config, ctx: RunContext) -> None:
    spec = ctx.dataset or data.DigitsDataset()
    fit(config, data.load(spec, ctx.seed), ctx, spec)


def fit(config: Config, ds: data.Dataset, ctx: RunContext, spec: BaseModel) -> torch.nn.Module:
    """Train on `ds` (`spec` identifies the data set for the FID classifier's cache)."""
    dev = ctx.device
    # Independent streams: batch order, and the noise of training (samples, corruption).
    order, g = ctx.torch_generator("batches"), ctx.torch_generator("noise")
    gen, disc = build(config, ds.image_shape, ctx.torch_generator("init", device="cpu"))
    gen, disc = gen.to(dev), disc.to(dev)
    betas = (config.beta1, config.beta2)
    opt_g = torch.optim.Adam(gen.parameters(), lr=config.learning_rate, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.learning_rate, betas=betas)
    amp = MixedPrecision(config.precision, dev)
    compile_modules(config.compile, gen, disc, device=dev)
    # Everything the trajectory depends on; an epoch's end is the point it resumes from.
    state = {
        "generator": gen,
        "discriminator": disc,
        "opt_g": opt_g,
        "opt_d": opt_d,
        "batches": order,
        "noise": g,
        **amp.state(),
    }
    start, step = 0, 0  # epochs done, discriminator steps taken (n_critic counts them)
    if (saved := ctx.checkpoints.restore(state)) is not None:
        start, step = int(saved["epoch"]), int(saved["d_steps"])
        for group in (*opt_g.param_groups, *opt_d.param_groups):  # a PBT mutation's value
            group["lr"] = config.learning_rate
    with ctx.timer.paused():  # the FID classifier is evaluation machinery, not GAN training
        score = fid.setup(config.fid, ds, spec, ctx)
    x_train = ds.x_train.to(dev)
    fixed_z = torch.randn(
        64, config.latent_dim, generator=ctx.torch_generator("fixed_noise", device="cpu")
    )
    wgan = config.loss == "wgan_gp"
    if config.figures and start == 0:  # the untrained generator: the series starts at step 0
        with ctx.timer.paused(), torch.no_grad():
            gen.eval()
            log_samples(gen, fixed_z.to(dev), ds.image_shape, 0, ctx)
            gen.train()
    for epoch in range(start, config.epochs):
        t0 = ctx.timer.elapsed()
        # Summed on the device and read once an epoch: no host synchronisation per step.
        keys = ("losses/d", "losses/g", "charts/d_real", "charts/d_fake")
        sums = {k: torch.zeros((), device=dev) for k in keys}
        batches = g_steps = 0
        for idx in torch.randperm(len(x_train), generator=order, device=dev).split(
            config.batch_size
        ):
            if len(idx) < 2:  # a last batch of one: BatchNorm1d cannot normalise a single row
                continue
            real = x_train[idx]
            z = torch.randn(len(real), config.latent_dim, generator=g, device=dev)
            # (1) Discriminator / critic: the fake batch is detached, G gets no gradient here.
            # D's outputs in float32: the losses are computed in full precision.
            with amp.autocast():
                fake = gen(z).detach()
                d_real, d_fake = disc(real).float().squeeze(1), disc(fake).float().squeeze(1)
            if wgan:
                d_loss = d_fake.mean() - d_real.mean()
                # The penalty's double backward runs in float32 (outside autocast).
                d_loss = d_loss + config.gp_weight * gradient_penalty(disc, real, fake.float(), g)
            else:
                d_loss = F.binary_cross_entropy_with_logits(
                    d_real, torch.ones_like(d_real)
                ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            amp.step(d_loss, opt_d)
            step += 1
            # (2) Generator, on a fresh batch of noise.
            if not wgan or step % config.n_critic == 0:
                z = torch.randn(len(real), config.latent_dim, generator=g, device=dev)
                with amp.autocast():
                    out = disc(gen(z)).float().squeeze(1)
                g_loss = (
                    -out.mean()
                    if wgan
                    else F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
                )  # non-saturating: maximise log D(G(z))
                amp.step(g_loss, opt_g)
                sums["losses/g"] += g_loss.detach()
                g_steps += 1
            batches += 1
            sums["losses/d"] += d_loss.detach()
            # D's outputs: probabilities for the non-saturating loss, raw critic values for WGAN.
            to_chart = (lambda t: t.mean()) if wgan else (lambda t: torch.sigmoid(t).mean())
            sums["charts/d_real"] += to_chart(d_real.detach())
            sums["charts/d_fake"] += to_chart(d_fake.detach())
        metrics = {
            k: float(v) / (g_steps if k == "losses/g" else batches)
            for k, v in sums.items()
            if k != "losses/g" or g_steps
        }
        metrics["time/epoch_s"] = ctx.timer.elapsed() - t0
        bad = [
            k
            for k in ("losses/d", "losses/g")
            if k in metrics and (not math.isfinite(metrics[k]) or abs(metrics[k]) > EXPLODED)
        ]
        if bad:
            raise FloatingPointError(
                f"GAN diverged in epoch {epoch + 1}: {bad[0]} = "
                f"{metrics[bad[0]]:.3g}; lower learning_rate or try wgan_gp"
            )
        # A score computed once in the run is a one-off result (`log_summary`), not a curve.
        summary: dict[str, float] = {}
        with ctx.timer.paused(), torch.no_grad():
            gen.eval()
            if score is not None and config.fid.due(epoch, config.epochs):
                # Its own stream: scoring never draws from the training noise.
                ev = ctx.torch_generator("eval")
                samples = generate(gen, config.fid.samples, config.latent_dim, ev, dev)
                into = summary if scheduled_once(config.fid.every, config.epochs) else metrics
                into["eval/fid"] = score.fid(samples)
                into["eval/classifier_score"] = score.classifier_score(samples)
            if config.figures:
                log_samples(gen, fixed_z.to(dev), ds.image_shape, epoch + 1, ctx)
            gen.train()
        ctx.log_metrics(metrics, step=epoch + 1)
        if summary:
            ctx.log_summary(summary)
        done = epoch + 1 == config.epochs or ctx.should_stop()
        if (epoch + 1) % config.checkpoint_every == 0 or done:
            with ctx.timer.paused():
                ctx.checkpoints.save(
                    {**capture(state), "epoch": epoch + 1, "d_steps": step}, step=epoch + 1
                )
        if ctx.should_stop():
            break
    return gen


def log_samples(
    gen: torch.nn.Module, fixed_z: torch.Tensor, shape: tuple[int, int], step: int, ctx: RunContext
) -> None:
    """The grid of samples from the fixed noise: the same z every epoch, so the image series
    shows one set of samples improving."""
    ctx.log_figure(image_grid(gen(fixed_z), shape, f"Samples, epoch {step}"), "samples", step=step)


def generate(
    gen: torch.nn.Module, n: int, latent_dim: int, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    z = torch.randn(n, latent_dim, generator=g, device=device)
    return torch.cat([gen(chunk) for chunk in z.split(500)])
