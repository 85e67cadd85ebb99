"""DQN on MinAtar Breakout: rlgen's `experiments/dqn_minatar_breakout.yaml` (the MinAtar paper's
settings, Young & Tian 2019) on 3 seeds at a CPU budget, against the paper's DQN curve and a
uniform random policy.

    python benchmarks/minatar_dqn.py [--steps 200000] [--seeds 0 1 2] [--workers 3]
                                     [--set params.optimizer=rmsprop ...]

Each seed trains in its own process (one torch thread each) through the in-memory run context,
evaluating 20 greedy episodes every `--eval-every` steps; epsilon anneals over the paper's first
100k steps whatever the budget. Reported:
- the paper's measure, the mean return of the last 100 training episodes (epsilon-greedy), for
  each seed and averaged over seeds, beside the paper's DQN curve for Breakout at the same step
  (`PAPER_DQN_BREAKOUT`);
- each seed's greedy evaluation, with the median and interquartile mean over seeds;
- the random policy's mean return over 1,000 episodes (MinAtar's README gives 0.5 +- 0.02 for
  random play on Breakout).
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
EXPLORATION_STEPS = 100_000  # the paper's epsilon schedule: 1 -> 0.1 over the first 100k frames

# The paper's DQN on Breakout: the moving average of returns over 100 training episodes, the
# mean of 30 runs, read off the published learning curves (Young & Tian 2019, v2, the DQN curve
# of the Breakout panel; MinAtar's README shows the same figure) to about +-0.2, at these frames
# (a MinAtar frame is one env step).
PAPER_DQN_BREAKOUT = {
    100_000: 4.4,
    200_000: 6.1,
    300_000: 7.2,
    400_000: 8.2,
    500_000: 8.3,
    1_000_000: 9.2,
    2_000_000: 9.7,
    5_000_000: 10.0,
}


Curve = list[tuple[int, float]]


def run_seed(seed: int, steps: int, eval_every: int, extra: list[str]) -> tuple[Curve, Curve]:
    """(greedy evaluations, training-episode returns) of one seed, as (step, return) pairs."""
    import torch

    from agents import dqn
    from runctx import RunContext
    from service.spec import load_spec

    torch.set_num_threads(1)
    overrides = [
        f"params.total_timesteps={steps}",
        f"params.eval_every={eval_every}",
        f"params.exploration_fraction={min(1.0, EXPLORATION_STEPS / steps)}",
        *extra,
    ]
    spec = load_spec(SPEC, overrides)
    config = dqn.Config.model_validate(spec.params.model_dump())  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as d:
        ctx = RunContext.in_memory(seed=seed, workdir=d, env=spec.env)  # type: ignore[attr-defined]
        ctx.timer.start()
        dqn.train(config, ctx)
        ctx.close()
    metrics = ctx.writer.metrics  # type: ignore[attr-defined]
    evals = [(int(s), float(v)) for s, v in metrics["eval/return_mean"]]
    episodes = [(int(s), float(v)) for s, v in metrics["charts/episodic_return"]]
    return evals, episodes


def moving_average(episodes: Curve, step: int, window: int = 100) -> float:
    """The mean return of the last `window` training episodes that ended by `step`."""
    done = [v for s, v in episodes if s <= step][-window:]
    return float(np.mean(done)) if done else float("nan")


def random_return(env_id: str, episodes: int = 1_000) -> float:
    from agents.envs import EnvSpec
    from agents.evaluation import evaluate_policy

    env = EnvSpec(id=env_id).make()
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
    parser.add_argument(
        "--set", nargs="*", default=[], help="Spec overrides, e.g. params.optimizer=rmsprop."
    )
    args = parser.parse_args()
    from service.spec import load_spec

    env_id = load_spec(SPEC, args.set).env.id  # type: ignore[attr-defined]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [
            pool.submit(run_seed, s, args.steps, args.eval_every, args.set) for s in args.seeds
        ]
        results = [f.result() for f in futures]
    curves = [evals for evals, _ in results]
    steps = [s for s, _ in curves[0]]
    out = sys.stdout
    paper_steps = sorted(PAPER_DQN_BREAKOUT)
    out.write(
        f"\n{env_id}, DQN with the MinAtar paper's settings, {args.steps:,} steps, "
        f"seeds {args.seeds}{''.join(' ' + o for o in args.set)}; mean return of the last 100 "
        "training episodes (the paper's "
        "measure) against the paper's DQN curve (30 runs, read off its figure)\n"
    )
    out.write("| step | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | paper |\n")
    out.write("|---:|" + "---:|" * (len(args.seeds) + 2) + "\n")
    for step in steps:
        values = [moving_average(episodes, step) for _, episodes in results]
        paper = float(np.interp(step, paper_steps, [PAPER_DQN_BREAKOUT[s] for s in paper_steps]))
        # Before the paper's first read point the curve is not interpolated from zero.
        cell = f"{paper:.1f}" if step >= paper_steps[0] else ""
        row = " | ".join(f"{v:.1f}" for v in values)
        out.write(f"| {step:,} | {row} | {np.mean(values):.1f} | {cell} |\n")
    out.write(
        f"\n{env_id}, DQN with the MinAtar paper's settings, {args.steps:,} steps, "
        f"seeds {args.seeds}; greedy return over 20 episodes\n"
    )
    out.write("| step | " + " | ".join(f"seed {s}" for s in args.seeds) + " | median | IQM |\n")
    out.write("|---:|" + "---:|" * (len(args.seeds) + 2) + "\n")
    for i, step in enumerate(steps):
        values = [c[i][1] for c in curves]
        row = " | ".join(f"{v:.1f}" for v in values)
        out.write(f"| {step:,} | {row} | {statistics.median(values):.1f} | {iqm(values):.1f} |\n")
    out.write(f"\nuniform random policy, 1,000 episodes: {random_return(env_id):.2f}\n")


if __name__ == "__main__":
    main()
