"""DQN on CartPole-v1: rlgen's `experiments/dqn_cartpole.yaml` against Stable-Baselines3's DQN
with the RL-Zoo3 hyperparameters, in the same run, on the same CPU, one torch thread each.

    python benchmarks/dqn_cartpole.py [--seeds 0 1 2 3 4] [--no-others]

Both are evaluated the same way (`agents.evaluation.evaluate_vector`): 10 greedy episodes every
2,500 steps, the same evaluation seeds; "solved" is a mean of at least 475, and both stop there.
Reported per seed and as the median: env steps and training wall seconds to solve (evaluation
excluded) and steps per second. rlgen runs through the service (`launch(..., mode="local")`, an
MLflow SQLite store in a temporary folder) and its times are the `time/train_s` it logged.
Then rlgen's dqn_acrobot.yaml and dqn_mountaincar.yaml report their final evaluation returns.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import sb3_goal_callback  # noqa: E402
from service.execution import launch  # noqa: E402
from service.spec import load_spec  # noqa: E402

SOLVED = 475.0
EVAL_EVERY, EVAL_EPISODES = 2_500, 10

# RL-Zoo3 hyperparams/dqn.yml, CartPole-v1.
RL_ZOO: dict[str, Any] = {
    "learning_rate": 2.3e-3,
    "batch_size": 64,
    "buffer_size": 100_000,
    "learning_starts": 1_000,
    "gamma": 0.99,
    "target_update_interval": 10,
    "train_freq": 256,
    "gradient_steps": 128,
    "exploration_fraction": 0.16,
    "exploration_final_eps": 0.04,
    "policy_kwargs": {"net_arch": [256, 256]},
}


def run_sb3(seed: int, total: int) -> dict[str, Any]:
    from stable_baselines3 import DQN

    callback = sb3_goal_callback(
        "CartPole-v1", EVAL_EPISODES, EVAL_EVERY, seed, lambda mean: mean >= SOLVED
    )
    model = DQN("MlpPolicy", gym.make("CartPole-v1"), seed=seed, device="cpu", **RL_ZOO)
    callback.start()
    model.learn(total, callback=callback)
    callback.close()
    return dict(callback.result)


def run_rlgen(
    spec_file: Path, seeds: list[int], overrides: list[str], store: Path
) -> list[dict[str, Any]]:
    uri = f"sqlite:///{store / 'mlflow.db'}"
    spec = load_spec(spec_file, [f"seeds={seeds}", *overrides])
    report = launch(spec, mode="local", tracking_uri=uri)
    client = MlflowClient(uri)
    rows = []
    for trial in report.trials:
        assert trial.status == "FINISHED", trial.error
        evals = client.get_metric_history(trial.run_id, "eval/return_mean")
        train_s = {m.step: m.value for m in client.get_metric_history(trial.run_id, "time/train_s")}
        evals.sort(key=lambda m: m.step)
        solved = next((m for m in evals if m.value >= SOLVED), None)
        last = solved or evals[-1]
        rows.append(
            {
                "seed": trial.seed,
                "steps": last.step,
                "train_s": train_s[last.step],
                "mean": last.value,
                "ok": solved is not None,
            }
        )
    return rows


def fmt(row: dict[str, Any]) -> str:
    mark = "" if row["ok"] else " (not solved)"
    return f"{row['steps']:,}{mark} | {row['train_s']:.1f} | {row['steps'] / row['train_s']:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--timesteps", type=int, default=50_000, help="Budget of each run.")
    parser.add_argument("--no-others", action="store_true", help="Skip Acrobot and MountainCar.")
    parser.add_argument("--others-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--others-timesteps", type=int, default=None, help="Smoke tests only.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # rlgen's trial sets 1 thread per CPU it holds (num_cpus: 1)

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        budget = [f"params.total_timesteps={args.timesteps}"]
        ours = run_rlgen(ROOT / "experiments" / "dqn_cartpole.yaml", args.seeds, budget, store)
        theirs = [run_sb3(seed, args.timesteps) for seed in args.seeds]

        print("\nCartPole-v1, solved = 10-episode greedy mean >= 475, evaluated every 2,500 steps")
        print(
            "| seed | rlgen steps | rlgen train s | rlgen steps/s | SB3 steps | SB3 train s | SB3 steps/s |"
        )
        print("|---|---|---|---|---|---|---|")
        for a, b in zip(ours, theirs, strict=True):
            print(f"| {a['seed']} | {fmt(a)} | {fmt(b)} |")
        med = {
            k: (statistics.median(r[k] for r in ours), statistics.median(r[k] for r in theirs))
            for k in ("steps", "train_s")
        }
        sps = (
            statistics.median(r["steps"] / r["train_s"] for r in ours),
            statistics.median(r["steps"] / r["train_s"] for r in theirs),
        )
        print(
            f"| median | {med['steps'][0]:,.0f} | {med['train_s'][0]:.1f} | {sps[0]:,.0f} "
            f"| {med['steps'][1]:,.0f} | {med['train_s'][1]:.1f} | {sps[1]:,.0f} |"
        )
        solved = sum(r["ok"] for r in ours), sum(r["ok"] for r in theirs)
        print(
            f"\nsolved: rlgen {solved[0]}/{len(ours)}, SB3 {solved[1]}/{len(theirs)}; "
            f"median time to solve, rlgen / SB3: {med['train_s'][0] / med['train_s'][1]:.2f}"
        )

        if args.no_others:
            return
        print("\nFinal greedy evaluation (10 episodes) of rlgen's examples")
        print("| env | goal | seed | final return | steps | train s |")
        print("|---|---|---|---|---|---|")
        for name, env, goal in (
            ("dqn_acrobot.yaml", "Acrobot-v1", -100.0),
            ("dqn_mountaincar.yaml", "MountainCar-v0", -110.0),
        ):
            extra = (
                [f"params.total_timesteps={args.others_timesteps}"] if args.others_timesteps else []
            )
            rows = run_rlgen(ROOT / "experiments" / name, args.others_seeds, extra, store)
            for r in rows:
                print(
                    f"| {env} | > {goal:.0f} | {r['seed']} | {r['mean']:.1f} | {r['steps']:,} | {r['train_s']:.1f} |"
                )
            mean = float(np.mean([r["mean"] for r in rows]))
            print(f"| {env} | > {goal:.0f} | mean | {mean:.1f} | | |")


if __name__ == "__main__":
    main()
