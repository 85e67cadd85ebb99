"""GANs on MNIST: eval/fid against eval/fid_floor per epoch for the MLP and DCGAN models, and the
training time per epoch. FID is in the features of a small classifier trained on the same split
(see generative/fid.py): comparable between these models, not with Inception-FID.

    python benchmarks/gan.py [--epochs 20] [--grid docs/dcgan_mnist.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mnist
import torch

from generative import data, gan
from generative.fid import FIDConfig
from generative.plots import image_grid
from runctx import RunContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mnist.add_argument(parser)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--grid",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs" / "dcgan_mnist.png",
        help="where to save the DCGAN's final samples",
    )
    args = parser.parse_args()
    ds = mnist.load(args.data)
    spec = data.IdxDataset(images=args.data / "t10k-images-idx3-ubyte.gz")  # the cache key
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for arch in ("mlp", "dcgan"):
            config = gan.Config(
                architecture=arch,
                epochs=args.epochs,
                latent_dim=100,
                hidden=[512, 512],
                figures=False,
                fid=FIDConfig(every=5, samples=2000, cache=f"{d}/fid"),
            )
            ctx = RunContext.in_memory(workdir=Path(d) / arch, seed=args.seed)
            ctx.timer.start()
            gen = gan.fit(config, ds, ctx, spec)
            ctx.close()
            results[arch] = ctx.writer.metrics
            if arch == "dcgan":
                z = torch.randn(64, 100, generator=torch.Generator().manual_seed(1))
                with torch.no_grad():
                    gen.eval()
                    fig = image_grid(gen(z), (28, 28), f"DCGAN, MNIST, {args.epochs} epochs")
                args.grid.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(args.grid, dpi=80, bbox_inches="tight")

    floor = results["dcgan"]["eval/fid_floor"][0][1]
    print(
        f"MNIST 8,000 train / 2,000 held out; {args.epochs} epochs, batch 64, Adam 2e-4 "
        f"(beta1 0.5), non-saturating loss, z of 100; FID on 2,000 samples; "
        f"fid_floor (train vs held-out) = {floor:.2f}\n"
    )
    print("| epoch | MLP eval/fid | DCGAN eval/fid |")
    print("|---:|---:|---:|")
    mlp = dict(results["mlp"]["eval/fid"])
    dc = dict(results["dcgan"]["eval/fid"])
    for epoch in sorted(dc):
        print(f"| {epoch} | {mlp.get(epoch, float('nan')):.1f} | {dc[epoch]:.1f} |")
    print("\n| model | s / epoch | final classifier score |")
    print("|---|---:|---:|")
    for arch in ("mlp", "dcgan"):
        m = results[arch]
        seconds = sum(v for _, v in m["time/epoch_s"]) / len(m["time/epoch_s"])
        print(f"| {arch} | {seconds:.1f} | {m['eval/classifier_score'][-1][1]:.2f} |")


if __name__ == "__main__":
    main()
