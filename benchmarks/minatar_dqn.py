"""DQN on MinAtar Breakout: rlgen's `experiments/dqn_minatar_breakout.yaml` (the MinAtar paper's
settings, Young & Tian 2019) on 3 seeds at a CPU budget, against a uniform random policy.

    python benchmarks/minatar_dqn.py [--steps 200000] [--seeds 0 1 2] [--workers 3]

Each seed trains in its own process (one torch thread each) through the in-memory run context,
evaluating 20 greedy episodes every `--eval-every` steps. Reported: each seed's evaluation
curve, the median and interquartile mean over seeds at each point, and the random policy's mean
return over 1,000 episodes (the figure MinAtar's README gives for random play on Breakout,
0.5 +- 0.02).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = ROOT / "experiments" / "dqn_minatar_breakout.yaml"


def run_seed(seed: int, steps: int, eval_every: int) -> list[tuple[int, float]]:
    import torch

    from agents import dqn
    from runctx import RunContext
    from service.spec import load_spec

    torch.set_num_threads(1)
    spec = load_spec(SPEC, [f"params.total_timesteps={steps}", f"params.eval_every={eval_every}"])
    config = dqn.Config.model_validate(spec.params.model_dump())
    with tempfile.TemporaryDirectory() as d:
        ctx = RunContext.in_memory(seed=seed, workdir=d, env=spec.env)  # type: ignore[attr-defined]
        ctx.timer.start()
        dqn.train(config, ctx)
        ctx.close()
    return [(int(s), float(v)) for s, v in ctx.writer.metrics["eval/return_mean"]]  # type: ignore[attr-defined]


def random_return(episodes: int = 1_000) -> float:
    from agents.envs import EnvSpec
    from agents.evaluation import evaluate_policy

    env = EnvSpec(id="MinAtar/Breakout-v1").make()
    rng = np.random.default_rng(0)
    n = int(env.action_space.n)  # type: ignore[attr-defined]
    returns, _ = evaluate_policy(env, lambda _: int(rng.integers(n)), episodes, seed=0)
    return float(returns.mean())


def iqm(values: list[float]) -> float:
    v = np.sort(values)
    k = len(v) // 4
    return float(v[k : len(v) - k].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--eval-every", type=int, default=25_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_seed, s, args.steps, args.eval_every) for s in args.seeds]
        curves = [f.result() for f in futures]
    steps = [s for s, _ in curves[0]]
    out = sys.stdout
    out.write(
        f"\nMinAtar/Breakout-v1, DQN with the MinAtar paper's settings, {args.steps:,} steps, "
        f"seeds {args.seeds}; greedy return over 20 episodes\n"
    )
    out.write("| step | " + " | ".join(f"seed {s}" for s in args.seeds) + " | median | IQM |\n")
    out.write("|---:|" + "---:|" * (len(args.seeds) + 2) + "\n")
    for i, step in enumerate(steps):
        values = [c[i][1] for c in curves]
        row = " | ".join(f"{v:.1f}" for v in values)
        out.write(f"| {step:,} | {row} | {statistics.median(values):.1f} | {iqm(values):.1f} |\n")
    out.write(f"\nuniform random policy, 1,000 episodes: {random_return():.2f}\n")


if __name__ == "__main__":
    main()
