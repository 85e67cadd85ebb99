"""RBM on MNIST: rlgen against scikit-learn's BernoulliRBM, same units, batch and epochs, CD-1.

    pip install -e ".[bench]"
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/rbm.py

Reports training throughput (samples per second, evaluation excluded), held-out pseudo-likelihood
(scikit-learn's stochastic estimator for both) and probe accuracy (the same standardised logistic
regression on each model's hidden probabilities; raw pixels for reference).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import mnist
import numpy as np
import torch

from generative import rbm
from generative.probe import probe_accuracy
from runctx import RunContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mnist.add_argument(parser)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="Alternating rounds.")
    parser.add_argument(
        "--probe-seeds", type=int, default=3, help="Seeds the probe accuracy is averaged over."
    )
    args = parser.parse_args()
    ds = mnist.load(args.data)

    # rlgen: the algorithm as the service runs it, in-process; both ways of taking CD's last
    # visible state (a sample, as scikit-learn does, or its probabilities).
    def fit_rlgen(mode: str, seed: int = args.seed) -> tuple[float, float, float]:
        config = rbm.Config(
            n_hidden=args.hidden,
            batch_size=args.batch,
            epochs=args.epochs,
            learning_rate=args.lr,
            k=1,
            figures=False,
            negative_visible=mode,
        )
        with tempfile.TemporaryDirectory() as d:
            ctx = RunContext.in_memory(workdir=d, seed=seed)
            ctx.timer.start()
            rbm.fit(config, ds, ctx, checkpoints=False)
            ctx.close()
        last = {k: v[-1][1] for k, v in ctx.writer.metrics.items()}
        sps = float(np.mean([v for _, v in ctx.writer.metrics["time/samples_per_s"]]))
        return sps, last["eval/pseudo_loglik"], last["eval/probe_accuracy"]

    # scikit-learn: same units, batch, epochs and learning rate (no momentum or weight decay there).
    from sklearn.neural_network import BernoulliRBM

    x_train = ds.x_train.numpy().astype(np.float64)

    def fit_sklearn(seed: int = args.seed) -> tuple[float, BernoulliRBM]:
        sk = BernoulliRBM(
            n_components=args.hidden,
            batch_size=args.batch,
            n_iter=args.epochs,
            learning_rate=args.lr,
            random_state=seed,
        )
        t = time.perf_counter()
        sk.fit(x_train)
        return len(x_train) * args.epochs / (time.perf_counter() - t), sk

    # The models take turns, `repeats` rounds: this machine's speed drifts by 10-20% over a minute,
    # so each round's ratio compares neighbours in time, and the table shows medians.
    modes = ("sample", "mean")
    speeds: dict[str, list[float]] = {m: [] for m in (*modes, "sklearn")}
    quality: dict[str, tuple[float, float]] = {}
    sk = None
    for _ in range(args.repeats):
        for mode in modes:
            sps, pl, probe = fit_rlgen(mode)
            speeds[mode].append(sps)
            quality[mode] = (pl, probe)
        sps, sk = fit_sklearn()
        speeds["sklearn"].append(sps)
    assert sk is not None

    def sk_probe(model: BernoulliRBM) -> float:
        acc = probe_accuracy(
            lambda x: torch.from_numpy(model.transform(x.numpy().astype(np.float64))), ds
        )
        assert acc is not None
        return acc

    # Probe accuracy moves by ~0.005 from one seed to the next: average it over seeds.
    probes = {m: [quality[m][1]] for m in modes} | {"sklearn": [sk_probe(sk)]}
    for seed in range(args.seed + 1, args.seed + args.probe_seeds):
        for mode in modes:
            probes[mode].append(fit_rlgen(mode, seed)[2])
        probes["sklearn"].append(sk_probe(fit_sklearn(seed)[1]))

    def shown(accs: list[float]) -> str:
        return f"{np.mean(accs):.3f} +- {np.std(accs):.3f}" if len(accs) > 1 else f"{accs[0]:.3f}"

    ratio = {m: float(np.median(np.divide(speeds[m], speeds["sklearn"]))) for m in modes}
    rows = [
        (
            f"rlgen `rbm`, negative_visible={m}",
            float(np.median(speeds[m])),
            ratio[m],
            quality[m][0],
            shown(probes[m]),
        )
        for m in modes
    ]
    sk_sps = float(np.median(speeds["sklearn"]))
    sk_pl = float(sk.score_samples(ds.x_test.numpy().astype(np.float64)).mean())
    raw_probe = probe_accuracy(lambda x: x, ds)

    print(
        f"MNIST 8,000 train / 2,000 held out; {args.hidden} hidden, batch {args.batch}, "
        f"{args.epochs} epochs, CD-1, lr {args.lr}; torch threads {torch.get_num_threads()}; "
        f"BLAS: {mnist.blas()}\n"
    )
    print(
        f"Medians over {args.repeats} alternating rounds; 'vs scikit-learn' is the median of "
        "the rounds' ratios.\n"
    )
    print(
        f"Probe accuracy: mean +- std over seeds {args.seed}..{args.seed + args.probe_seeds - 1}"
        f"; pseudo-likelihood: seed {args.seed}.\n"
    )
    print("| model | samples / s | vs scikit-learn | held-out pseudo-loglik | probe accuracy |")
    print("|---|---:|---:|---:|---:|")
    for name, sps, r, pl, accuracy in rows:
        print(f"| {name} | {sps:,.0f} | {r:.2f}x | {pl:.1f} | {accuracy} |")
    sk_row = f"{sk_sps:,.0f} | 1.0x | {sk_pl:.1f} | {shown(probes['sklearn'])}"
    print(f"| scikit-learn BernoulliRBM | {sk_row} |")
    print(f"| raw pixels | | | | {raw_probe:.3f} |")


if __name__ == "__main__":
    main()
