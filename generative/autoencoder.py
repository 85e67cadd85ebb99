"""Deep autoencoders with sigmoid layers: plain, sparse, denoising and contractive.

Encoder h_l = sigmoid(h_{l-1} W_l + c_l), l = 1..L (W_l: (D_{l-1}, D_l)); the decoder mirrors it,
with its own weights or the transposes W_l^T (`tied`), and ends in logits for a Bernoulli
(cross-entropy) reconstruction of x in [0, 1]. The variants add to the reconstruction loss:

- sparse: beta * sum_j KL(rho || rho_hat_j), rho_hat_j the batch-mean activation of code unit j
  (Ng, "Sparse autoencoder" notes);
- denoising: the input is corrupted by masking noise (a fraction `noise` of pixels set to 0) and
  the clean x is reconstructed (Vincent et al. 2008);
- contractive: lambda * sum_l ||d h_l / d h_{l-1}||_F^2, which for a sigmoid layer has the closed
  form sum_j (h_j (1 - h_j))^2 sum_i W_ij^2 (Rifai et al. 2011), summed over the encoder layers.

`pretrain: true` first trains each layer greedily as a one-layer autoencoder of the same variant
on the codes of the layer below (Bengio et al. 2007), then fine-tunes the whole stack.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from generative import data
from generative.plots import image_grid
from generative.probe import probe_accuracy
from runctx import RunContext
from runctx.accel import MixedPrecision, Precision
from runctx.checkpoints import capture

# What a run logs (see the registry).
METRICS = ("pretrain/layer*/loss", "train/loss", "eval/recon_loss", "eval/probe_accuracy")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    layers: list[PositiveInt] = Field(
        default_factory=lambda: [256, 64],
        min_length=1,
        description="Encoder widths; the last is the code. The decoder mirrors them.",
    )
    variant: Literal["plain", "sparse", "denoising", "contractive"] = Field(
        "plain", description="Regulariser added to the reconstruction loss."
    )
    tied: bool = Field(False, description="Decoder weights are the encoder's transposes.")
    pretrain: bool = Field(False, description="Greedy layer-wise pretraining before fine-tuning.")
    pretrain_epochs: int = Field(10, gt=0, description="Epochs per layer when pretraining.")
    epochs: int = Field(30, gt=0, description="Epochs of (fine-)tuning the whole autoencoder.")
    batch_size: int = Field(64, gt=0, description="Examples per step.")
    learning_rate: float = Field(1e-3, gt=0, description="Adam step size.")
    noise: float = Field(0.3, gt=0, lt=1, description="denoising: fraction of pixels zeroed.")
    sparsity_target: float = Field(0.05, gt=0, lt=1, description="sparse: target activation rho.")
    sparsity_weight: float = Field(1.0, ge=0, description="sparse: beta, the KL penalty weight.")
    contractive_weight: float = Field(0.1, ge=0, description="contractive: lambda.")
    probe: bool = Field(True, description="Score logistic regression on the codes.")
    figures: bool = Field(True, description="Log inputs vs reconstructions.")
    checkpoint_every: int = Field(
        5,
        gt=0,
        description="Epochs between checkpoints (and after pretraining, and the end); each is "
        "kept as an MLflow artifact.",
    )
    precision: Precision = "fp32"


class AutoEncoder(torch.nn.Module):
    def __init__(self, sizes: list[int], tied: bool, g: torch.Generator):
        super().__init__()
        self.tied = tied
        pairs = list(itertools.pairwise(sizes))
        self.enc_w = torch.nn.ParameterList([_init(d_in, d_out, g) for d_in, d_out in pairs])
        self.enc_b = torch.nn.ParameterList([torch.zeros(d_out) for _, d_out in pairs])
        # Decoder layer l maps D_l back to D_{l-1}; stored in encoder order.
        self.dec_w = torch.nn.ParameterList(
            [] if tied else [_init(d_out, d_in, g) for d_in, d_out in pairs]
        )
        self.dec_b = torch.nn.ParameterList([torch.zeros(d_in) for d_in, _ in pairs])

    def encode(self, x: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """Activations of the first `depth` encoder layers (all by default): [(B, D_1), ...]."""
        hs = []
        for w, b in list(zip(self.enc_w, self.enc_b, strict=True))[:depth]:
            x = torch.sigmoid(torch.addmm(b, x, w))
            hs.append(x)
        return hs

    def decode_layer(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Pre-activation of decoder layer `layer` (D_layer -> D_{layer-1})."""
        w = self.enc_w[layer].T if self.tied else self.dec_w[layer]
        return torch.addmm(self.dec_b[layer], h, w)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Logits of the reconstruction (B, D_0)."""
        h = code
        for layer in reversed(range(len(self.enc_w))):
            a = self.decode_layer(h, layer)
            h = a if layer == 0 else torch.sigmoid(a)
        return h


def _init(d_in: int, d_out: int, g: torch.Generator) -> torch.nn.Parameter:
    bound = 4 * math.sqrt(6 / (d_in + d_out))  # Glorot & Bengio (2010) for sigmoid units
    return torch.nn.Parameter((torch.rand(d_in, d_out, generator=g) * 2 - 1) * bound)


def penalty(config: Config, weights: list[torch.Tensor], hs: list[torch.Tensor]) -> torch.Tensor:
    """The variant's regulariser, given encoder weights and their activations hs (per example)."""
    if config.variant == "sparse":
        rho, rho_hat = config.sparsity_target, hs[-1].mean(0).clamp(1e-6, 1 - 1e-6)
        kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
        return config.sparsity_weight * kl.sum()
    if config.variant == "contractive":
        total = hs[0].new_zeros(())
        for h, w in zip(hs, weights, strict=True):
            # ||J||_F^2 = sum_j (h_j (1 - h_j))^2 sum_i W_ij^2, averaged over the batch.
            total = total + ((h * (1 - h)) ** 2 @ (w**2).sum(0)).mean()
        return config.contractive_weight * total
    return hs[0].new_zeros(())


def corrupt(config: Config, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if config.variant != "denoising":
        return x
    keep = torch.rand(x.shape, generator=g, device=x.device) >= config.noise
    return x * keep


def recon_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood in nats per example: (B, D) -> ()."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)


def fit_layer(
    config: Config, model: AutoEncoder, layer: int, x: torch.Tensor, ctx: RunContext
) -> None:
    """Greedy pretraining of encoder/decoder pair `layer` as a one-layer autoencoder on x."""
    params = [model.enc_w[layer], model.enc_b[layer], model.dec_b[layer]]
    params += [] if model.tied else [model.dec_w[layer]]
    opt = torch.optim.Adam(params, lr=config.learning_rate)
    # Streams of their own per layer: pretraining one layer longer never shifts the next.
    order = ctx.torch_generator(f"pretrain{layer}/batches")
    g = ctx.torch_generator(f"pretrain{layer}/noise")
    for epoch in range(config.pretrain_epochs):
        total = torch.zeros((), device=x.device)
        for idx in torch.randperm(len(x), generator=order, device=x.device).split(
            config.batch_size
        ):
            batch = x[idx]
            h = torch.sigmoid(
                torch.addmm(model.enc_b[layer], corrupt(config, batch, g), model.enc_w[layer])
            )
            a = model.decode_layer(h, layer)
            # The first layer reconstructs pixels (Bernoulli); deeper ones reconstruct codes.
            loss = recon_loss(a, batch) + penalty(config, [model.enc_w[layer]], [h])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        ctx.log_metrics({f"pretrain/layer{layer}/loss": float(total) / len(x)}, step=epoch + 1)


def check_data(config: Config, dataset: data.DatasetSpec | None) -> str | None:
    """Why the autoencoder cannot model `dataset`, or None (checked when a spec is validated)."""
    return data.needs_unit_pixels(dataset, "the reconstruction loss (Bernoulli likelihood)")


def train(config: Config, ctx: RunContext) -> None:
    ds = data.load(ctx.dataset or data.DigitsDataset(), ctx.seed)
    dev = ctx.device
    # Independent streams: batch order, and the noise of training (samples, corruption).
    order, g = ctx.torch_generator("batches"), ctx.torch_generator("noise")
    x_train, x_test = ds.x_train.to(dev), ds.x_test.to(dev)
    model = AutoEncoder(
        [ds.dim, *config.layers], config.tied, ctx.torch_generator("init", device="cpu")
    ).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    # Everything the trajectory depends on. Checkpoints are taken after pretraining (epoch 0)
    # and at the ends of epochs; a run that dies while pretraining pretrains again, the same.
    amp = MixedPrecision(config.precision, dev)
    state = {"model": model, "optimizer": opt, "batches": order, "noise": g, **amp.state()}
    start = 0
    if (saved := ctx.checkpoints.restore(state)) is not None:
        start = int(saved["epoch"])
        for group in opt.param_groups:  # a PBT mutation's value
            group["lr"] = config.learning_rate
    elif config.pretrain and ctx.checkpoints.init is None:  # not when starting from a run's weights
        codes = x_train
        for layer in range(len(config.layers)):
            fit_layer(config, model, layer, codes, ctx)
            with torch.no_grad():
                codes = model.encode(x_train, depth=layer + 1)[-1]
        with ctx.timer.paused():
            ctx.checkpoints.save({**capture(state), "epoch": 0}, step=0)

    for epoch in range(start, config.epochs):
        # Summed on the device and read once an epoch: no host synchronisation per step.
        summed = torch.zeros((), device=dev)
        for idx in torch.randperm(len(x_train), generator=order, device=dev).split(
            config.batch_size
        ):
            x = x_train[idx]
            with amp.autocast():
                hs = model.encode(corrupt(config, x, g))
                out = model.decode(hs[-1])
            # The loss and penalty in float32, outside autocast (which refuses binary
            # cross-entropy on probabilities).
            hs = [h.float() for h in hs]
            loss = recon_loss(out.float(), x) + penalty(config, list(model.enc_w), hs)
            amp.step(loss, opt)
            summed += loss.detach() * len(idx)
        total = float(summed)
        if not math.isfinite(total):
            raise FloatingPointError(f"autoencoder loss diverged in epoch {epoch}")
        last = epoch == config.epochs - 1
        with ctx.timer.paused(), torch.no_grad():
            metrics = {
                "train/loss": total / len(x_train),
                "eval/recon_loss": float(
                    recon_loss(model.decode(model.encode(x_test)[-1]), x_test)
                ),
            }
            if last and config.probe:
                acc = probe_accuracy(lambda x: model.encode(x.to(dev))[-1], ds)
                if acc is not None:
                    ctx.log_summary({"eval/probe_accuracy": acc})
            if last and config.figures:
                shown = x_test[:10]
                recon = torch.sigmoid(model.decode(model.encode(shown)[-1]))
                pairs = torch.stack([shown, recon], 1).reshape(-1, ds.dim)  # input, output, ...
                ctx.log_figure(
                    image_grid(pairs, ds.image_shape, "Inputs and reconstructions"),
                    "reconstructions",
                )
        ctx.log_metrics(metrics, step=epoch + 1)
        if (epoch + 1) % config.checkpoint_every == 0 or last or ctx.should_stop():
            with ctx.timer.paused():
                ctx.checkpoints.save({**capture(state), "epoch": epoch + 1}, step=epoch + 1)
        if ctx.should_stop():
            break
