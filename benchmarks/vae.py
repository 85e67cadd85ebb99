"""VAE 784-400-20 on MNIST: rlgen's `vae` against a plain PyTorch training loop of the same model
(the PyTorch examples' vae/main.py, written out below), in the same run.

    python benchmarks/vae.py [--epochs 20]

Both: ReLU MLP 784-400-20, Bernoulli likelihood on grey-level pixels, Adam, batch 128, the
same split (first 8,000 train, last 2,000 held out). Reported: training seconds per epoch
(evaluation excluded), held-out negative ELBO (nats per example), and rlgen's IWAE bound.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import mnist
import torch
import torch.nn.functional as F

from generative import vae
from runctx import RunContext


class PlainVAE(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 400)
        self.fc21 = torch.nn.Linear(400, 20)
        self.fc22 = torch.nn.Linear(400, 20)
        self.fc3 = torch.nn.Linear(20, 400)
        self.fc4 = torch.nn.Linear(400, 784)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.fc4(F.relu(self.fc3(z))), mu, logvar


def plain_loss(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def plain_loop(ds: object, epochs: int, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    x_train, x_test = ds.x_train, ds.x_test  # type: ignore[attr-defined]
    model = PlainVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_s = 0.0
    for _ in range(epochs):
        t = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(x_train)).split(128):
            x = x_train[idx]
            logits, mu, logvar = model(x)
            loss = plain_loss(logits, x, mu, logvar) / len(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_s += time.perf_counter() - t
    model.eval()
    with torch.no_grad():
        logits, mu, logvar = model(x_test)
        neg_elbo = float(plain_loss(logits, x_test, mu, logvar)) / len(x_test)
    return train_s / epochs, neg_elbo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mnist.add_argument(parser)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--lr", type=float, default=None, help="rlgen's step size (default: its own)."
    )
    args = parser.parse_args()
    ds = mnist.load(args.data)
    rows = []
    for seed in args.seeds:
        config = vae.Config(
            hidden=[400],
            latent_dim=20,
            epochs=args.epochs,
            batch_size=128,
            **({"learning_rate": args.lr} if args.lr else {}),
            iwae_k=50,
            iwae_examples=2000,
            figures=False,
        )
        with tempfile.TemporaryDirectory() as d:
            ctx = RunContext.in_memory(workdir=d, seed=seed)
            ctx.timer.start()
            vae.fit(config, ds, ctx)
            ctx.close()
        m = ctx.writer.metrics
        rl_epoch = sum(v for _, v in m["time/epoch_s"]) / args.epochs
        plain_epoch, plain_elbo = plain_loop(ds, args.epochs, seed)
        rows.append(
            (
                seed,
                rl_epoch,
                plain_epoch,
                m["eval/neg_elbo"][-1][1],
                m["eval/nll_iwae"][-1][1],
                plain_elbo,
            )
        )

    print(
        f"MNIST 8,000 train / 2,000 held out; VAE 784-400-20, Bernoulli, batch 128, Adam "
        f"(rlgen {config.learning_rate:g}, its default unless --lr; the plain loop the "
        f"PyTorch example's 1e-3), "
        f"{args.epochs} epochs; torch threads {torch.get_num_threads()}\n"
    )
    print(
        "| seed | rlgen s / epoch | plain s / epoch | ratio | rlgen -ELBO | plain -ELBO | "
        "rlgen NLL (IWAE k=50) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for seed, rl, plain, elbo, iwae, plain_elbo in rows:
        print(
            f"| {seed} | {rl:.3f} | {plain:.3f} | {rl / plain:.2f}x | {elbo:.1f} | "
            f"{plain_elbo:.1f} | {iwae:.1f} |"
        )
    n = len(rows)
    mean = [sum(r[i] for r in rows) / n for i in range(1, 6)]
    print(
        f"| mean | {mean[0]:.3f} | {mean[1]:.3f} | {mean[0] / mean[1]:.2f}x | {mean[2]:.1f} | "
        f"{mean[4]:.1f} | {mean[3]:.1f} |"
    )


if __name__ == "__main__":
    main()
