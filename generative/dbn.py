"""Deep belief network (Hinton, Osindero & Teh 2006): greedy layer-wise RBM pretraining, then
supervised fine-tuning of the unrolled network by backpropagation (Hinton & Salakhutdinov 2006).

Layer i is an RBM trained by contrastive divergence on p(h | v) of the layer below; its weights
W_i (D_i, D_{i+1}) and hidden biases c_i then initialise a sigmoid layer
h_{i+1} = sigmoid(h_i W_i + c_i) of a feed-forward net, topped by a softmax classifier and
fine-tuned with cross-entropy. `pretrain: false` trains the same net from a random start, so the
benefit of pretraining is one sweep away.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from generative import data, rbm
from runctx import RunContext
from runctx.accel import Compile, MixedPrecision, Precision, compile_modules
from runctx.checkpoints import capture


class PretrainConfig(BaseModel):
    """Contrastive-divergence settings of one layer's RBM."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(10, gt=0, description="Passes over the data for this layer.")
    learning_rate: float = Field(0.05, gt=0, description="CD step size.")
    batch_size: int = Field(64, gt=0, description="Examples per CD update.")
    k: int = Field(1, gt=0, description="Gibbs steps per update.")
    persistent: bool = Field(False, description="Persistent CD.")
    weight_decay: float = Field(2e-4, ge=0, description="L2 penalty on W (Hinton 2006: 2e-4).")


# What a run logs (see the registry): each layer's RBM metrics under pretrain/layer{i}/, then
# fine-tuning's.
METRICS = (
    *(f"pretrain/layer*/{name}" for name in rbm.METRICS),
    "finetune/loss",
    "finetune/train_accuracy",
    "eval/loss",
    "eval/accuracy",
)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    layers: list[PositiveInt] = Field(
        default_factory=lambda: [500, 500, 2000],
        min_length=1,
        description="Hidden layer widths (Hinton 2006: 500-500-2000 for MNIST).",
    )
    pretrain: bool = Field(True, description="Greedy RBM pretraining (false: random start).")
    pretraining: PretrainConfig | list[PretrainConfig] = Field(
        default_factory=PretrainConfig,
        description="One config for every layer, or a list with one per layer.",
    )
    finetune_epochs: int = Field(30, gt=0, description="Epochs of supervised fine-tuning.")
    finetune_lr: float = Field(0.1, gt=0, description="SGD step size for fine-tuning.")
    finetune_momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    finetune_batch_size: int = Field(64, gt=0, description="Examples per fine-tuning step.")
    finetune_weight_decay: float = Field(0.0, ge=0, description="L2 penalty while fine-tuning.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="Fine-tuning learning-rate schedule."
    )
    checkpoint_every: int = Field(
        5,
        gt=0,
        description="Fine-tuning epochs between checkpoints (and after pretraining, and the "
        "end); each is kept as an MLflow artifact.",
    )
    precision: Precision = "fp32"
    compile: Compile = False

    @model_validator(mode="after")
    def _per_layer(self) -> Config:
        if isinstance(self.pretraining, list) and len(self.pretraining) != len(self.layers):
            raise ValueError(
                f"pretraining lists {len(self.pretraining)} configs for {len(self.layers)} layers"
            )
        return self

    def layer_config(self, i: int) -> PretrainConfig:
        return self.pretraining[i] if isinstance(self.pretraining, list) else self.pretraining


def build_network(sizes: list[int], n_classes: int, g: torch.Generator) -> torch.nn.Sequential:
    """Sigmoid layers sizes[0] -> ... -> sizes[-1], then a linear softmax head."""
    layers: list[torch.nn.Module] = []
    for d_in, d_out in itertools.pairwise(sizes):
        linear = torch.nn.Linear(d_in, d_out)
        torch.nn.init.xavier_uniform_(linear.weight, gain=4.0, generator=g)  # 4: sigmoid's slope
        torch.nn.init.zeros_(linear.bias)
        layers += [linear, torch.nn.Sigmoid()]
    head = torch.nn.Linear(sizes[-1], n_classes)
    torch.nn.init.normal_(head.weight, std=0.01, generator=g)
    torch.nn.init.zeros_(head.bias)
    return torch.nn.Sequential(*layers, head)


def pretrain(config: Config, ds: data.Dataset, net: torch.nn.Sequential, ctx: RunContext) -> None:
    """Train one RBM per layer on the codes of the layer below; copy it into `net`."""
    x = ds
    linears = [m for m in net if isinstance(m, torch.nn.Linear)][:-1]
    for i, (width, linear) in enumerate(zip(config.layers, linears, strict=True)):
        layer = config.layer_config(i)
        rbm_config = rbm.Config(
            n_hidden=width,
            epochs=layer.epochs,
            learning_rate=layer.learning_rate,
            batch_size=layer.batch_size,
            k=layer.k,
            persistent=layer.persistent,
            weight_decay=layer.weight_decay,
            sparsity_target=None,  # as in Hinton & Salakhutdinov (2006)
            probe=False,
            figures=False,
        )
        model, _ = rbm.fit(rbm_config, x, ctx, prefix=f"pretrain/layer{i}/", checkpoints=False)
        with torch.no_grad():
            linear.weight.copy_(model.W.T)  # (D_out, D_in)
            linear.bias.copy_(model.c)
            # The next RBM sees this layer's mean-field activations p(h | v).
            x = data.Dataset(
                model.p_h(x.x_train.to(ctx.device)),
                model.p_h(x.x_test.to(ctx.device)),
                x.y_train,
                x.y_test,
                x.image_shape,
            )
        if ctx.should_stop():
            return


def check_data(config: Config, dataset: data.DatasetSpec | None) -> str | None:
    """Why this DBN cannot model `dataset`, or None (checked when a spec is validated)."""
    if config.pretrain:
        reason = data.needs_unit_pixels(dataset, "pretraining's first RBM (Bernoulli visibles)")
        return reason and f"{reason} (use dataset.scale: unit, or pretrain: false)"
    return None


def train(config: Config, ctx: RunContext) -> None:
    fit(config, data.load(ctx.dataset or data.DigitsDataset(), ctx.seed), ctx)


def fit(config: Config, ds: data.Dataset, ctx: RunContext) -> torch.nn.Sequential:
    """Pretrain (optionally) and fine-tune on `ds`; returns the fine-tuned network."""
    if ds.y_train is None or ds.y_test is None:
        raise ValueError("dbn fine-tuning needs a labelled data set")
    dev = ctx.device
    order = ctx.torch_generator("finetune/batches")
    n_classes = int(max(ds.y_train.max(), ds.y_test.max())) + 1
    net = build_network(
        [ds.dim, *config.layers], n_classes, ctx.torch_generator("init", device="cpu")
    )
    net = net.to(dev)
    x_train, y_train = ds.x_train.to(dev), ds.y_train.to(dev)
    x_test, y_test = ds.x_test.to(dev), ds.y_test.to(dev)
    opt = torch.optim.SGD(
        net.parameters(),
        lr=config.finetune_lr,
        momentum=config.finetune_momentum,
        weight_decay=config.finetune_weight_decay,
    )
    n = len(x_train)
    steps = config.finetune_epochs * math.ceil(n / config.finetune_batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda t: (
            1.0 if config.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * t / steps))
        ),
    )
    # Everything the trajectory depends on. Checkpoints are taken after pretraining (epoch 0)
    # and at the ends of fine-tuning epochs; a run that dies while pretraining pretrains again.
    amp = MixedPrecision(config.precision, dev)
    compile_modules(config.compile, net, device=dev)
    state = {
        "network": net,
        "optimizer": opt,
        "schedule": schedule,
        "batches": order,
        **amp.state(),
    }
    start = 0
    if (saved := ctx.checkpoints.restore(state)) is not None:
        start = int(saved["epoch"])
        # The config's step size (a PBT mutation may change it) on the schedule's curve.
        schedule.base_lrs = [config.finetune_lr] * len(opt.param_groups)
        for group, factor in zip(opt.param_groups, schedule.lr_lambdas, strict=True):
            group["lr"] = config.finetune_lr * factor(schedule.last_epoch)
    elif config.pretrain and ctx.checkpoints.init is None:  # not when starting from a run's weights
        pretrain(config, ds, net, ctx)
        if ctx.should_stop():
            return net
        with ctx.timer.paused():
            ctx.checkpoints.save({**capture(state), "epoch": 0}, step=0)

    for epoch in range(start, config.finetune_epochs):
        net.train()
        perm = torch.randperm(n, generator=order, device=dev)
        # Summed on the device and read once an epoch: no host synchronisation per step.
        summed = torch.zeros((), device=dev)
        hits = torch.zeros((), dtype=torch.long, device=dev)
        for i in range(0, n, config.finetune_batch_size):
            idx = perm[i : i + config.finetune_batch_size]
            with amp.autocast():
                logits = net(x_train[idx]).float()  # (B, classes), the loss in float32
            loss = F.cross_entropy(logits, y_train[idx])
            amp.step(loss, opt)
            schedule.step()
            summed += loss.detach() * len(idx)
            hits += (logits.argmax(1) == y_train[idx]).sum()
        total_loss, correct = float(summed), int(hits)
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"fine-tuning loss diverged in epoch {epoch}")
        with ctx.timer.paused(), torch.no_grad():
            net.eval()
            logits = net(x_test)
            metrics = {
                "finetune/loss": total_loss / n,
                "finetune/train_accuracy": correct / n,
                "eval/loss": float(F.cross_entropy(logits, y_test)),
                "eval/accuracy": float((logits.argmax(1) == y_test).float().mean()),
            }
        ctx.log_metrics(metrics, step=epoch + 1)
        last = epoch + 1 == config.finetune_epochs or ctx.should_stop()
        if (epoch + 1) % config.checkpoint_every == 0 or last:
            with ctx.timer.paused():
                ctx.checkpoints.save({**capture(state), "epoch": epoch + 1}, step=epoch + 1)
        if ctx.should_stop():
            break
    return net
