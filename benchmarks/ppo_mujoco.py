"""PPO on a MuJoCo task: rlgen against Stable-Baselines3 with RL-Zoo3's MuJoCo settings, the same
budget and seeds, one torch thread each.

    pip install -e ".[bench,mujoco]"
    python benchmarks/ppo_mujoco.py [--env HalfCheetah-v5] [--steps 1000000] [--seeds 0 1 2]
                                    [--jobs 2]

RL-Zoo3's PPO for the MuJoCo envs (hyperparams/ppo.yml, `mujoco-defaults`) is SB3's PPO defaults
with `normalize: true`: 1 env, 2048 steps a rollout, 10 epochs of 64-sample minibatches, lr 3e-4
(constant), gamma 0.99, GAE lambda 0.95, clip 0.2, no value clipping, no entropy bonus, value
coefficient 0.5, gradient norm 0.5, Adam eps 1e-5, 64x64 tanh MLPs with orthogonal
initialisation, observation and reward normalisation (VecNormalize, clipped to +-10). rlgen runs
`experiments/ppo_halfcheetah.yaml` set to the same: its CleanRL defaults differ in `anneal_lr`
and `clip_vloss` (both switched off here), and CleanRL's value loss is half the squared error
where SB3's is the whole (`F.mse_loss`), so SB3's `vf_coef` 0.5 is rlgen's 1.0. (The actor and
critic are separate networks, so with Adam the factor matters mostly through the global
gradient-norm clipping, which sees both.)

Reported per seed: training steps per second (evaluation excluded) and the final greedy return
(10 episodes from the same seeds for both, through `agents.evaluation.evaluate_vector`, with each
library's own observation normalisation). `--jobs 2` runs two trainings at a time, one per core,
each library's run beside the other's: both see the same contention, and the ratio stays fair.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents import ppo  # noqa: E402
from agents.evaluation import evaluate_vector  # noqa: E402
from runctx import RunContext  # noqa: E402
from service.spec import load_spec  # noqa: E402

EPISODES = 10


def run_rlgen(env_id: str, seed: int, steps: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    spec = load_spec(
        ROOT / "experiments" / "ppo_halfcheetah.yaml",
        [
            f"env.id={env_id}",
            f"params.total_timesteps={steps}",
            "params.anneal_lr=false",
            "params.clip_vloss=false",
            "params.vf_coef=1.0",  # SB3's 0.5 x its unhalved squared error
            f"params.eval_every={steps}",  # one evaluation, at the end
            f"params.eval_episodes={EPISODES}",
            f"params.checkpoint_every={steps}",
        ],
    )
    with tempfile.TemporaryDirectory() as d:
        ctx = RunContext.in_memory(seed=seed, workdir=d, env=spec.env)  # type: ignore[attr-defined]
        ctx.timer.start()
        ppo.train(spec.params, ctx)  # type: ignore[arg-type]
        ctx.close()
        final = ctx.checkpoints.latest()
    assert final is not None
    train_s = ctx.writer.metrics["time/train_s"][-1][1]  # type: ignore[attr-defined]
    # The final policy (with its observation statistics), evaluated as SB3's is below.
    act = ppo.load_policy(spec.params, final, gym.make(env_id))  # type: ignore[arg-type]
    return {"seed": seed, "sps": steps / train_s, "return": evaluate(env_id, act, seed)}


def evaluate(env_id: str, act: Any, seed: int) -> float:
    """Mean greedy return of `EPISODES` episodes, the same seeds for both libraries."""
    envs = gym.make_vec(env_id, num_envs=EPISODES)
    returns, _ = evaluate_vector(envs, act, EPISODES, seed + 10_000)
    envs.close()
    return float(np.mean(returns))


def run_sb3(env_id: str, seed: int, steps: int) -> dict[str, Any]:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(1)
    venv = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed))
    model = PPO("MlpPolicy", venv, seed=seed, device="cpu")
    t = time.perf_counter()
    model.learn(steps)
    train_s = time.perf_counter() - t
    act = lambda obs: model.predict(venv.normalize_obs(obs), deterministic=True)[0]  # noqa: E731
    return {"seed": seed, "sps": steps / train_s, "return": evaluate(env_id, act, seed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time (processes)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Alternate which library goes first; with --jobs 2 each pair runs side by side.
    runs = []
    for i, seed in enumerate(args.seeds):
        pair = [("rlgen", run_rlgen, seed), ("sb3", run_sb3, seed)]
        runs += pair if i % 2 == 0 else pair[::-1]
    results: dict[tuple[str, int], dict[str, Any]] = {}
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {
            pool.submit(fn, args.env, seed, args.steps): (who, seed) for who, fn, seed in runs
        }
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
    ours = [results[("rlgen", s)] for s in args.seeds]
    theirs = [results[("sb3", s)] for s in args.seeds]
    out = sys.stdout
    out.write(
        f"\nPPO on {args.env}, {args.steps:,} steps, RL-Zoo3 MuJoCo settings, {args.jobs} "
        f"training(s) at a time ({time.perf_counter() - start:.0f} s in all)\n"
        "| seed | rlgen steps/s | rlgen return | SB3 steps/s | SB3 return |\n"
        "|---|---:|---:|---:|---:|\n"
    )
    for a, b in zip(ours, theirs, strict=True):
        out.write(
            f"| {a['seed']} | {a['sps']:.0f} | {a['return']:.1f} | {b['sps']:.0f} "
            f"| {b['return']:.1f} |\n"
        )
    mine, peer = [r["return"] for r in ours], [r["return"] for r in theirs]
    sd = statistics.stdev(peer) if len(peer) > 1 else 0.0
    ratio = statistics.median(a["sps"] / b["sps"] for a, b in zip(ours, theirs, strict=True))
    out.write(
        f"final return: rlgen {statistics.mean(mine):.1f} +- "
        f"{statistics.stdev(mine) if len(mine) > 1 else 0.0:.1f}, SB3 "
        f"{statistics.mean(peer):.1f} +- {sd:.1f} (rlgen >= SB3 mean - std: "
        f"{statistics.mean(mine) >= statistics.mean(peer) - sd}); "
        f"steps/s ratio (median of seeds) {ratio:.2f}\n"
    )


if __name__ == "__main__":
    main()
