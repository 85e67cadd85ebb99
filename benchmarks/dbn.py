"""DBN 784-500-500-2000 on MNIST: greedy RBM pretraining plus fine-tuning, against the same
network trained from a random start.

    python benchmarks/dbn.py [--pretrain-epochs 10] [--finetune-epochs 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import mnist

from generative import dbn
from runctx import RunContext


def run(config: dbn.Config, ds: object, seed: int) -> tuple[dict[str, float], float]:
    with tempfile.TemporaryDirectory() as d:
        ctx = RunContext.in_memory(workdir=d, seed=seed)
        t = time.perf_counter()
        ctx.timer.start()
        dbn.fit(config, ds, ctx)  # type: ignore[arg-type]
        ctx.close()
        seconds = time.perf_counter() - t
    return {k: v[-1][1] for k, v in ctx.writer.metrics.items()}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mnist.add_argument(parser)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ds = mnist.load(args.data)
    rows = []
    for pretrain in (True, False):
        config = dbn.Config(
            layers=[500, 500, 2000],
            pretrain=pretrain,
            finetune_epochs=args.finetune_epochs,
            pretraining=dbn.PretrainConfig(
                epochs=args.pretrain_epochs, batch_size=100, learning_rate=0.05
            ),
        )
        metrics, seconds = run(config, ds, args.seed)
        rows.append(("pretrained (DBN)" if pretrain else "random init", metrics, seconds))
    print(
        f"MNIST 8,000 train / 2,000 held out; 784-500-500-2000-10; pretraining "
        f"{args.pretrain_epochs} epochs a layer (CD-1, batch 100), fine-tuning "
        f"{args.finetune_epochs} epochs (SGD momentum 0.9, cosine)\n"
    )
    print("| network | held-out accuracy | held-out loss | train accuracy | wall s |")
    print("|---|---:|---:|---:|---:|")
    for name, m, seconds in rows:
        print(
            f"| {name} | {m['eval/accuracy']:.4f} | {m['eval/loss']:.3f} | "
            f"{m['finetune/train_accuracy']:.4f} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
