"""Restricted Boltzmann machine trained with contrastive divergence (Hinton 2002) or persistent CD
(Tieleman 2008), following Hinton's "A Practical Guide to Training RBMs" (2010).

Energy with visible v (D,), hidden h (H,), weights W (D, H), biases b (D,), c (H,):
    Bernoulli visibles:  E(v, h) = -b.v - c.h - v.W.h
    Gaussian visibles:   E(v, h) = |v - b|^2 / 2 - c.h - v.W.h          (unit variance)
Free energy, summing the hidden units out:
    F(v) = -b.v - sum_j softplus(c_j + v.W_j)     (Bernoulli; Gaussian: |v - b|^2 / 2 - ...)
The log-likelihood gradient is <v h>_data - <v h>_model; CD-k estimates the model term with k
Gibbs steps from the data, PCD with chains that persist across updates.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from generative import data
from generative.plots import image_grid
from generative.probe import probe_accuracy
from generative.rbm_ops import (
    RNG,
    add_outer_,
    addmm,
    bernoulli,
    blas_threads,
    loop_rng,
    normal,
    pick_openblas,
)
from runctx import RunContext, scheduled_once
from runctx.checkpoints import capture


class AISConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(False, description="Estimate held-out log-likelihood by AIS.")
    temperatures: int = Field(
        10_000, gt=1, description="Intermediate distributions (Salakhutdinov & Murray use 14,500)."
    )
    runs: int = Field(100, gt=1, description="Independent AIS chains.")
    examples: int = Field(1000, gt=0, description="Held-out examples scored.")
    every: int = Field(0, ge=0, description="Also every N epochs (0: at the end only).")


# What a run logs (see the registry): eval/ais_* with `ais.enabled`, eval/probe_accuracy with
# labels.
METRICS = (
    "train/recon_error",
    "time/samples_per_s",
    "eval/free_energy_gap",
    "eval/pseudo_loglik",
    "eval/ais_loglik",
    "eval/ais_loglik_std",
    "eval/probe_accuracy",
)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_hidden: int = Field(256, gt=0, description="Hidden units.")
    visible: Literal["bernoulli", "gaussian"] = Field(
        "bernoulli",
        description="Visible units: Bernoulli (data in [0, 1]) or unit-variance "
        "Gaussian (the data are standardised per pixel first).",
    )
    epochs: int = Field(10, gt=0, description="Passes over the training split.")
    batch_size: int = Field(64, gt=0, description="Examples per update.")
    learning_rate: float = Field(0.05, gt=0, description="Step size (Hinton's guide: 0.01-0.1).")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning-rate decay to zero over the run, or none."
    )
    k: int = Field(1, gt=0, description="Gibbs steps per update (CD-k / PCD-k).")
    persistent: bool = Field(False, description="Persistent CD: chains carry over updates.")
    cpu_blas: Literal["auto", "torch", "openblas"] = Field(
        "auto",
        description="Matrix products on the CPU: torch's BLAS (MKL), numpy's OpenBLAS, or the "
        "faster of the two on this machine, timed at the start (MKL is ~2x slower on AMD CPUs).",
    )
    negative_visible: Literal["sample", "mean"] = Field(
        "sample",
        description="CD's last visible state: a sample, or its probabilities "
        "(less noisy statistics, one random draw fewer per update; better pseudo-likelihood).",
    )
    momentum: float = Field(0.5, ge=0, lt=1, description="Momentum for the first epochs.")
    final_momentum: float = Field(0.9, ge=0, lt=1, description="Momentum after `momentum_epochs`.")
    momentum_epochs: int = Field(5, ge=0, description="Epochs at the initial momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="L2 penalty on W (Hinton: 1e-4).")
    sparsity_target: float | None = Field(
        0.1,
        gt=0,
        lt=1,
        description="Target mean hidden activation (Hinton's guide, section 11: 0.01-0.1); "
        "None: no penalty. On MNIST 0.1 lifts the probe from 0.948 to 0.956 and the "
        "pseudo-likelihood with it.",
    )
    sparsity_cost: float = Field(0.1, ge=0, description="Weight of the sparsity penalty.")
    init_std: float = Field(0.01, gt=0, description="Std of the initial weights.")
    ais: AISConfig = Field(default_factory=AISConfig, description="Annealed importance sampling.")
    probe: bool = Field(True, description="Score logistic regression on hidden activations.")
    sample_chains: int = Field(16, ge=0, description="Gibbs chains drawn for the samples figure.")
    sample_steps: int = Field(1000, gt=0, description="Gibbs steps per sample chain.")
    figures: bool = Field(True, description="Log filters and samples figures.")
    checkpoint_every: int = Field(
        5,
        gt=0,
        description="Epochs between checkpoints (and the end). Every checkpoint is kept as an "
        "MLflow artifact; fewer cost less storage, more lose less work to a restart.",
    )


class RBM(torch.nn.Module):
    def __init__(
        self,
        n_visible: int,
        n_hidden: int,
        visible: str,
        init_std: float,
        generator: torch.Generator,
    ):
        super().__init__()
        self.gaussian = visible == "gaussian"
        self.W = torch.nn.Parameter(
            torch.randn(n_visible, n_hidden, generator=generator) * init_std, requires_grad=False
        )
        self.b = torch.nn.Parameter(torch.zeros(n_visible), requires_grad=False)
        self.c = torch.nn.Parameter(torch.zeros(n_hidden), requires_grad=False)
        self.openblas = False  # products through numpy's OpenBLAS (see `rbm_ops`)

    def affine(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """bias + x @ w: (B, K) @ (K, N) -> (B, N)."""
        return addmm(bias, x, w, self.openblas)

    def p_h(self, v: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """p(h_j = 1 | v) = sigmoid(beta (c_j + v.W_j)): (B, D) -> (B, H)."""
        a = self.affine(v, self.W, self.c)
        return (a if beta == 1.0 else a.mul_(beta)).sigmoid_()  # in place: no temporaries

    def mean_v(self, h: torch.Tensor) -> torch.Tensor:
        """E[v | h]: sigmoid(b + W h) (Bernoulli) or b + W h (Gaussian): (B, H) -> (B, D)."""
        a = self.affine(h, self.W.T, self.b)
        return a if self.gaussian else a.sigmoid_()

    def sample_v(self, h: torch.Tensor, g: RNG) -> torch.Tensor:
        return self.sample_from_mean(self.mean_v(h), g)

    def sample_from_mean(self, mean: torch.Tensor, g: RNG) -> torch.Tensor:
        """A visible sample given E[v | h]."""
        return mean + normal(mean, g) if self.gaussian else bernoulli(mean, g)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v), (B, D) -> (B,)."""
        hidden = F.softplus(torch.addmm(self.c, v, self.W)).sum(1)
        if self.gaussian:
            return 0.5 * ((v - self.b) ** 2).sum(1) - hidden
        return -(v @ self.b) - hidden


def gibbs(model: RBM, v: torch.Tensor, steps: int, g: RNG) -> torch.Tensor:
    for _ in range(steps):
        v = model.sample_v(bernoulli(model.p_h(v), g), g)
    return v


def cd_step_(
    velocity: dict[str, torch.Tensor],
    model: RBM,
    v0: torch.Tensor,
    ph0: torch.Tensor,
    vk: torch.Tensor,
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
    c_penalty: torch.Tensor | None = None,
) -> None:
    """velocity <- momentum * velocity + lr * grad, grad the CD estimate of the log-likelihood
    gradient, <v h>_data - <v h>_model - decay W, the model term from samples vk.

    Hidden units enter through their probabilities (Rao-Blackwellised), as in Hinton's guide.
    v0: (B, D) data, ph0 = p(h | v0): (B, H), vk: (B', D) negative samples. The W term is two
    in-place matrix products into the velocity (BLAS applies the momentum as its beta): no
    gradient tensor, no extra passes over the (D, H) weights.
    """
    phk = model.p_h(vk)
    vw = velocity["W"]
    add_outer_(vw, v0, ph0, alpha=lr / len(v0), beta=momentum, openblas=model.openblas)
    add_outer_(vw, vk, phk, alpha=-lr / len(vk), beta=1.0, openblas=model.openblas)
    if weight_decay:
        vw.add_(model.W, alpha=-lr * weight_decay)
    velocity["b"].mul_(momentum).add_(v0.mean(0) - vk.mean(0), alpha=lr)
    grad_c = ph0.mean(0) - phk.mean(0)
    if c_penalty is not None:
        grad_c -= c_penalty
    velocity["c"].mul_(momentum).add_(grad_c, alpha=lr)


def cd_gradients(
    model: RBM, v0: torch.Tensor, ph0: torch.Tensor, vk: torch.Tensor, weight_decay: float = 0.0
) -> dict[str, torch.Tensor]:
    """The CD gradient estimate itself (see `cd_step_`): {W: (D, H), b: (D,), c: (H,)}."""
    grads = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    cd_step_(grads, model, v0, ph0, vk, lr=1.0, momentum=0.0, weight_decay=weight_decay)
    return grads


def pseudo_loglik(model: RBM, v: torch.Tensor, g: torch.Generator) -> float:
    """Stochastic pseudo-log-likelihood per example, as scikit-learn's BernoulliRBM scores it:
    D * log sigmoid(F(v~) - F(v)), with v~ the example with one random pixel flipped."""
    idx = torch.randint(v.shape[1], (v.shape[0],), generator=g, device=v.device)
    flipped = v.clone()
    rows = torch.arange(v.shape[0], device=v.device)
    flipped[rows, idx] = 1 - flipped[rows, idx]
    return float(
        (v.shape[1] * F.logsigmoid(model.free_energy(flipped) - model.free_energy(v))).mean()
    )


def ais_log_z(
    model: RBM, base_b: torch.Tensor, temperatures: int, runs: int, g: torch.Generator
) -> tuple[float, float]:
    """log Z of a Bernoulli RBM by annealed importance sampling (Salakhutdinov & Murray 2008).

    The base model has the data's visible biases `base_b` and no weights, so
    log Z_A = sum_i softplus(base_b_i) + H log 2 and it is sampled exactly. Distribution k mixes
    the two:
        log p*_k(v) = (1 - beta_k) base_b.v + beta_k b.v + sum_j softplus(beta_k (c_j + v.W_j)).
    Returns (log Z estimate, its standard error by the delta method).
    """
    betas = torch.linspace(0, 1, temperatures, dtype=torch.float64).tolist()
    H = model.c.numel()

    def log_p_star(v: torch.Tensor, beta: float) -> torch.Tensor:
        return (
            (1 - beta) * (v @ base_b)
            + beta * (v @ model.b)
            + F.softplus(beta * torch.addmm(model.c, v, model.W)).sum(1)
        )

    v = bernoulli(torch.sigmoid(base_b).expand(runs, -1).contiguous(), g)  # exact draws from p_A
    log_w = torch.zeros(runs, dtype=torch.float64, device=v.device)
    for prev, beta in itertools.pairwise(betas):
        log_w += (log_p_star(v, beta) - log_p_star(v, prev)).double()
        # One Gibbs transition that leaves p_k invariant.
        h = bernoulli(model.p_h(v, beta), g)
        v = bernoulli(
            torch.sigmoid((1 - beta) * base_b + beta * torch.addmm(model.b, h, model.W.T)), g
        )
    log_z_a = float(F.softplus(base_b).sum()) + H * math.log(2)
    log_mean_w = float(torch.logsumexp(log_w, 0)) - math.log(runs)
    w = torch.exp(log_w - log_w.max())
    stderr = float(w.std() / (math.sqrt(runs) * w.mean()))  # se of log(mean w)
    return log_z_a + log_mean_w, stderr


def exact_log_z(model: RBM) -> float:
    """log Z by summing over every hidden configuration: for tests, H <= ~20 (Bernoulli)."""
    H = model.c.numel()
    h = ((torch.arange(2**H)[:, None] >> torch.arange(H)) & 1).to(model.W.dtype)  # (2^H, H)
    log_terms = h @ model.c + F.softplus(torch.addmm(model.b, h, model.W.T)).sum(1)
    return float(torch.logsumexp(log_terms.double(), 0))


def learning_rate(config: Config, progress: float) -> float:
    """The step size after a fraction `progress` in [0, 1) of all updates."""
    if config.lr_schedule == "linear":
        return config.learning_rate * (1 - progress)
    if config.lr_schedule == "cosine":
        return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
    return config.learning_rate


def check_data(config: Config, dataset: data.DatasetSpec | None) -> str | None:
    """Why this RBM cannot model `dataset`, or None (checked when a spec is validated)."""
    if config.visible == "bernoulli":
        reason = data.needs_unit_pixels(dataset, "visible: bernoulli")
        return reason and f"{reason} (use visible: gaussian, which standardises itself)"
    return None


def train(config: Config, ctx: RunContext) -> None:
    ds = data.load(ctx.dataset or data.DigitsDataset(), ctx.seed)
    model, _ = fit(config, ds, ctx)
    if config.figures:
        with ctx.timer.paused():
            filters = model.W.T[: min(100, config.n_hidden)]  # (<=100, D): an image per unit
            ctx.log_figure(
                image_grid(filters, ds.image_shape, "Filters (W columns)", normalise=True),
                "filters",
            )


def fit(
    config: Config, ds: data.Dataset, ctx: RunContext, prefix: str = "", checkpoints: bool = True
) -> tuple[RBM, Callable[[torch.Tensor], torch.Tensor]]:
    """Train an RBM on `ds.x_train`, logging `{prefix}train/...` and `{prefix}eval/...` per epoch.

    Returns the model and the input transform it was trained on (identity, or the per-pixel
    standardisation of Gaussian visibles), so callers can compute features of new data.
    """
    dev = ctx.device
    # Independent streams: the initial weights, the order of the batches, and Gibbs sampling.
    g, order_g = ctx.torch_generator(f"{prefix}gibbs"), ctx.torch_generator(f"{prefix}batches")
    x_train, x_test = ds.x_train.to(dev), ds.x_test.to(dev)
    gaussian = config.visible == "gaussian"
    mean = x_train.mean(0) if gaussian else None
    std = x_train.std(0).clamp_min(1e-3) if gaussian else None

    def standardise(x: torch.Tensor) -> torch.Tensor:
        # Gaussian visibles have unit variance: standardise with the train statistics.
        return (x.to(dev) - mean) / std if mean is not None and std is not None else x.to(dev)

    x_train, x_test = standardise(x_train), standardise(x_test)
    n, D = x_train.shape
    init = ctx.torch_generator(f"{prefix}init", device="cpu")
    model = RBM(D, config.n_hidden, config.visible, config.init_std, init).to(dev)
    # Visible biases log(p / (1 - p)) from the pixel marginals (Hinton's guide, section 8).
    p = x_train.mean(0).clamp(1e-3, 1 - 1e-3)
    base_b = torch.log(p / (1 - p)) if config.visible == "bernoulli" else torch.zeros(D, device=dev)
    model.b.copy_(base_b if config.visible == "bernoulli" else x_train.mean(0))
    velocity = {name: torch.zeros_like(t) for name, t in model.named_parameters()}
    chains = bernoulli(torch.full((config.batch_size, config.n_hidden), 0.5, device=dev), g)
    chains = model.sample_v(chains, g)  # persistent fantasy particles (PCD)
    q = torch.full((config.n_hidden,), config.sparsity_target or 0.0, device=dev)
    np_gibbs = ctx.rng(f"{prefix}gibbs")  # the Gibbs draws on the CPU (`loop_rng`)
    # Everything the trajectory depends on; an epoch's end is the point it resumes from.
    state = {"model": model, "gibbs": g, "gibbs_cpu": np_gibbs, "batches": order_g}
    start_epoch = 0
    if checkpoints and (saved := ctx.checkpoints.restore(state)) is not None:
        velocity = {k: v.to(dev) for k, v in saved["velocity"].items()}
        chains, q = saved["chains"].to(dev), saved["q"].to(dev)
        start_epoch = int(saved["epoch"])

    batches_per_epoch = math.ceil(n / config.batch_size)
    total_updates = config.epochs * batches_per_epoch
    subset = x_train[: len(x_test)]  # for the free-energy gap
    draw = loop_rng(dev, g, np_gibbs)
    # Only the training loop runs its products through OpenBLAS, under `blas_threads`: elsewhere
    # (evaluation, figures' long Gibbs chains) torch's own thread pool does the elementwise work.
    openblas = pick_openblas(config.cpu_blas, model, x_train[: config.batch_size])
    for epoch in range(start_epoch, config.epochs):
        t0, samples = ctx.timer.elapsed(), 0
        momentum = config.momentum if epoch < config.momentum_epochs else config.final_momentum
        order = torch.randperm(n, generator=order_g, device=dev)
        recon = torch.zeros((), device=dev)  # summed on the device: no sync per batch
        model.openblas = openblas
        with blas_threads(model):
            for i in range(batches_per_epoch):
                lr = learning_rate(config, (epoch * batches_per_epoch + i) / total_updates)
                v0 = x_train[order[i * config.batch_size : (i + 1) * config.batch_size]]  # (B, D)
                ph0 = model.p_h(v0)  # (B, H): positive phase
                v1_mean = model.mean_v(bernoulli(ph0, draw))  # E[v1 | h0]: one-step reconstruction
                recon += ((v0 - v1_mean) ** 2).mean()
                # Negative phase: k Gibbs steps from the persistent chains (PCD), or from the data
                # (CD), whose first step is the reconstruction above: 5 matrix products for CD-1.
                if config.persistent:
                    vk = chains = gibbs(model, chains, config.k, draw)
                elif config.negative_visible == "mean":
                    # v_k as probabilities, not a sample: less noise in the negative statistics
                    # (Hinton's guide, section 3.2). Persistent chains must stay sampled.
                    vk = v1_mean
                    if config.k > 1:
                        v = gibbs(model, model.sample_from_mean(v1_mean, draw), config.k - 2, draw)
                        vk = model.mean_v(bernoulli(model.p_h(v), draw))
                else:
                    vk = gibbs(model, model.sample_from_mean(v1_mean, draw), config.k - 1, draw)
                penalty = None
                if config.sparsity_target is not None:
                    # Running mean activation q; the penalty pulls hidden biases towards the target.
                    q.mul_(0.9).add_(ph0.mean(0), alpha=0.1)
                    penalty = (q - config.sparsity_target).mul_(config.sparsity_cost)
                cd_step_(velocity, model, v0, ph0, vk, lr, momentum, config.weight_decay, penalty)
                for name, param in model.named_parameters():
                    param.add_(velocity[name])
                samples += len(v0)
        model.openblas = False
        if not torch.isfinite(model.W).all():
            raise FloatingPointError(f"RBM weights diverged in epoch {epoch}; lower learning_rate")
        seconds = ctx.timer.elapsed() - t0
        metrics = {
            "train/recon_error": float(recon) / batches_per_epoch,
            "time/samples_per_s": samples / max(seconds, 1e-9),
        }
        with ctx.timer.paused(), torch.no_grad():
            scores, summary = evaluate(
                config, model, ds, x_test, subset, base_b, epoch, standardise, ctx
            )
        ctx.log_metrics({f"{prefix}{k}": v for k, v in (metrics | scores).items()}, step=epoch + 1)
        if summary:
            ctx.log_summary({f"{prefix}{k}": v for k, v in summary.items()})
        last = epoch + 1 == config.epochs or ctx.should_stop()
        if checkpoints and ((epoch + 1) % config.checkpoint_every == 0 or last):
            with ctx.timer.paused():
                ctx.checkpoints.save(
                    {
                        **capture(state),
                        "velocity": velocity,
                        "chains": chains,
                        "q": q,
                        "epoch": epoch + 1,
                    },
                    step=epoch + 1,
                )
        if ctx.should_stop():
            break
    return model, standardise


def evaluate(
    config: Config,
    model: RBM,
    ds: data.Dataset,
    x_test: torch.Tensor,
    subset: torch.Tensor,
    base_b: torch.Tensor,
    epoch: int,
    standardise: Callable[[torch.Tensor], torch.Tensor],
    ctx: RunContext,
) -> tuple[dict[str, float], dict[str, float]]:
    """Held-out metrics of an epoch: (per-epoch scores, one-off results for `log_summary`);
    figures on the last epoch of each `ais.every` cycle."""
    # A fresh generator each epoch: every epoch is scored with the same random draws, so the
    # differences between epochs are the model's.
    g = ctx.torch_generator("eval")
    metrics = {
        # Train subset minus held-out: it drifts negative as the model overfits.
        "eval/free_energy_gap": float(
            model.free_energy(subset).mean() - model.free_energy(x_test).mean()
        )
    }
    bernoulli_v = config.visible == "bernoulli"
    if bernoulli_v:
        metrics["eval/pseudo_loglik"] = pseudo_loglik(model, x_test, g)
    last = epoch == config.epochs - 1
    every = config.ais.every and (epoch + 1) % config.ais.every == 0
    # A score computed once in the run is a one-off result (`log_summary`), not a curve.
    summary: dict[str, float] = {}
    if config.ais.enabled and bernoulli_v and (last or every):
        log_z, stderr = ais_log_z(model, base_b, config.ais.temperatures, config.ais.runs, g)
        scored = x_test[: config.ais.examples]
        ais = summary if scheduled_once(config.ais.every, config.epochs) else metrics
        ais["eval/ais_loglik"] = float(-model.free_energy(scored).mean()) - log_z
        ais["eval/ais_loglik_std"] = stderr
    if last and config.probe:
        acc = probe_accuracy(lambda x: model.p_h(standardise(x)), ds)
        if acc is not None:
            summary["eval/probe_accuracy"] = acc
    if config.figures and config.sample_chains and bernoulli_v:
        start = bernoulli(
            torch.full((config.sample_chains, x_test.shape[1]), 0.5, device=x_test.device), g
        )
        fantasies = model.mean_v(model.p_h(gibbs(model, start, config.sample_steps, g)))
        title = f"Gibbs samples, epoch {epoch + 1}"
        ctx.log_figure(image_grid(fantasies, ds.image_shape, title), "samples", step=epoch + 1)
    return metrics, summary


__all__ = ["RBM", "Config", "ais_log_z", "exact_log_z", "fit", "train"]
