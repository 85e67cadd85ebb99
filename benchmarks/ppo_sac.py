"""PPO on CartPole-v1 and SAC on Pendulum-v1: rlgen's examples against Stable-Baselines3 with
RL-Zoo3's hyperparameters, in the same run, on the same CPU, one torch thread each.

    python benchmarks/ppo_sac.py [--ppo-seeds 0 1 2 3 4] [--sac-seeds 0 1 2] [--only ppo|sac]

Both libraries are evaluated by the same function (`agents.evaluation.evaluate_vector`, 10
deterministic episodes from the same seeds) every 10,000 steps (PPO) or 2,000 steps (SAC), and
stop at the goal: a mean of at least 475 on CartPole, above -200 on Pendulum. Reported per seed
and as the median: steps and training seconds (evaluation excluded) to the goal. rlgen runs
`experiments/ppo_cartpole.yaml` and `experiments/sac_pendulum.yaml` in-process (the in-memory run
context; its seconds are the `time/train_s` it logged with the evaluation that reached the goal).

Each task also has rows at equal settings where rlgen's example differs from RL-Zoo3's: SAC's
example uses 64x64 networks (RL-Zoo3: SB3's 256x256), so rlgen also runs with 256x256 and SB3
also with 64x64; PPO's example has RL-Zoo3's settings and SB3's losses but 10 epochs at lr 5e-3
(RL-Zoo3: 20 at 1e-3), so rlgen also runs RL-Zoo3's and SB3 also rlgen's. Every pair of equal
settings has its own ratio.
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents import ppo, sac  # noqa: E402
from benchmarks.peers import sb3_goal_callback, warm_up_torch  # noqa: E402
from runctx import RunContext  # noqa: E402
from service.spec import load_spec  # noqa: E402

EPISODES = 10
TASKS: dict[str, dict[str, Any]] = {
    "ppo": {
        "env": "CartPole-v1",
        "spec": ROOT / "experiments" / "ppo_cartpole.yaml",
        "module": ppo,
        "goal": 475.0,
        "every": 10_000,
        "budget": 100_000,
        # label -> spec overrides (rlgen) or keyword arguments (SB3); the first of each is the
        # headline pair: rlgen's example against RL-Zoo3's settings.
        "rlgen": {
            "rlgen": [],
            "rlgen, RL-Zoo3's settings": ["params.update_epochs=20", "params.learning_rate=1e-3"],
        },
        "sb3": {
            "SB3": {},
            "SB3, rlgen's settings": {
                "n_epochs": 10,
                "learning_rate": lambda f: 5e-3 * f,
            },
        },
        "pairs": [
            ("rlgen", "SB3"),
            ("rlgen, RL-Zoo3's settings", "SB3"),
            ("rlgen", "SB3, rlgen's settings"),
        ],
    },
    "sac": {
        "env": "Pendulum-v1",
        "spec": ROOT / "experiments" / "sac_pendulum.yaml",
        "module": sac,
        "goal": -200.0,
        "every": 2_000,
        "budget": 20_000,
        "rlgen": {"rlgen": [], "rlgen 256x256": ["params.hidden_sizes=[256,256]"]},
        "sb3": {"SB3": {}, "SB3 64x64": {"policy_kwargs": {"net_arch": [64, 64]}}},
        "pairs": [("rlgen", "SB3"), ("rlgen 256x256", "SB3"), ("rlgen", "SB3 64x64")],
    },
}


def reached(value: float, goal: float, task: str) -> bool:
    return value >= goal if task == "ppo" else value > goal


def run_rlgen(task: str, seed: int, budget: int, overrides: list[str]) -> dict[str, Any]:
    t = TASKS[task]
    spec = load_spec(
        t["spec"],
        [
            f"params.total_timesteps={budget}",
            f"params.eval_every={t['every']}",
            f"params.eval_episodes={EPISODES}",
            f"params.stop_at_return={t['goal'] + (0.0 if task == 'ppo' else 1e-6)}",
            *overrides,
        ],
    )
    config = t["module"].Config.model_validate(spec.params.model_dump())  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as d:
        ctx = RunContext.in_memory(seed=seed, workdir=d, env=spec.env)  # type: ignore[attr-defined]
        ctx.timer.start()
        t["module"].train(config, ctx)
        ctx.close()
    m = ctx.writer.metrics  # type: ignore[attr-defined]
    train_s = dict(m["time/train_s"])
    evals = m["eval/return_mean"]
    hit = next(((s, v) for s, v in evals if reached(v, t["goal"], task)), None)
    step, value = hit or evals[-1]
    return {"seed": seed, "steps": step, "train_s": train_s[step], "mean": value, "ok": bool(hit)}


def run_sb3(task: str, seed: int, budget: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.env_util import make_vec_env

    t = TASKS[task]
    callback = sb3_goal_callback(
        t["env"], EPISODES, t["every"], seed, lambda mean: reached(mean, t["goal"], task)
    )
    if task == "ppo":  # RL-Zoo3 hyperparams/ppo.yml, CartPole-v1
        model: Any = PPO(
            "MlpPolicy",
            make_vec_env(t["env"], n_envs=8, seed=seed),
            n_steps=32,
            batch_size=256,
            gae_lambda=0.8,
            gamma=0.98,
            ent_coef=0.0,
            clip_range=lambda f: 0.2 * f,
            seed=seed,
            device="cpu",
            **{"n_epochs": 20, "learning_rate": lambda f: 1e-3 * f, **kwargs},
        )
    else:  # RL-Zoo3 hyperparams/sac.yml, Pendulum-v1
        model = SAC(
            "MlpPolicy",
            gym.make(t["env"]),
            learning_rate=1e-3,
            seed=seed,
            device="cpu",
            **kwargs,
        )
    callback.start()
    model.learn(budget, callback=callback)
    if not callback.result.get("ok") and callback.last < model.num_timesteps:
        callback.evaluate()  # at the end, as rlgen does
    callback.close()
    return dict(callback.result)


def fmt(row: dict[str, Any]) -> str:
    mark = "" if row["ok"] else " (not reached)"
    return f"{row['steps']:,}{mark} | {row['train_s']:.1f} | {row['mean']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ppo-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--sac-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", choices=["ppo", "sac"], default=None)
    parser.add_argument("--budget-scale", type=float, default=1.0, help="Smoke tests only.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    warm_up_torch()
    out = sys.stdout
    for task, seeds in (("ppo", args.ppo_seeds), ("sac", args.sac_seeds)):
        if args.only not in (None, task):
            continue
        t = TASKS[task]
        budget = int(t["budget"] * args.budget_scale)
        runs = [("rlgen", label, arg) for label, arg in t["rlgen"].items()]
        runs += [("sb3", label, arg) for label, arg in t["sb3"].items()]
        results: dict[str, list[dict[str, Any]]] = {label: [] for _, label, _ in runs}
        for i, seed in enumerate(seeds):  # alternate the order of the runs from seed to seed
            for who, label, arg in runs if i % 2 == 0 else runs[::-1]:
                run = run_rlgen if who == "rlgen" else run_sb3
                results[label].append(run(task, seed, budget, arg))
        out.write(
            f"\n{task.upper()} on {t['env']}, goal: 10-episode mean "
            f"{'>=' if task == 'ppo' else '>'} {t['goal']:.0f}, evaluated every {t['every']:,} "
            f"steps, budget {budget:,}\n"
            "| run | seed | steps | train s | return |\n|---|---:|---:|---:|---:|\n"
        )
        for label, rows in results.items():
            for row in sorted(rows, key=lambda r: r["seed"]):
                out.write(f"| {label} | {row['seed']} | {fmt(row)} |\n")
        median = {k: statistics.median(r["train_s"] for r in v) for k, v in results.items()}
        for label, rows in results.items():
            out.write(
                f"{label}: reached {sum(r['ok'] for r in rows)}/{len(rows)}, "
                f"median train s {median[label]:.1f}\n"
            )
        for ours, theirs in t["pairs"]:
            ratio = median[ours] / median[theirs]
            out.write(f"ratio {ours} / {theirs}: {ratio:.2f}\n")


if __name__ == "__main__":
    main()
