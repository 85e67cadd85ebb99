"""What the benchmarks share when they run a peer library (Stable-Baselines3, an extra: `pip install
-e ".[bench]"`) in the same process as rlgen: an SB3 callback that evaluates exactly as rlgen does
and stops at a goal, and a warm-up that keeps torch's one-time costs out of both clocks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym

from agents.evaluation import evaluate_vector


def warm_up_torch() -> None:
    """Build an optimizer once before any timed run: the first one built in a process imports
    torch's compiler stack (~1 s on a 2-core host), which would otherwise land in the clock of
    whichever run comes first."""
    import torch

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def sb3_goal_callback(
    env_id: str, episodes: int, every: int, seed: int, reached: Callable[[float], bool]
) -> Any:
    """An SB3 callback that, every `every` timesteps, runs `episodes` deterministic episodes
    through `agents.evaluation.evaluate_vector` (seeded `seed + 10_000`, as rlgen's benchmarks
    seed theirs) and stops training once `reached(mean return)`. Its `result` holds the last
    evaluation: `seed`, `steps`, `train_s` (wall seconds since `start()`, evaluations excluded),
    `mean` and `ok`. `evaluate()` evaluates now (at the end of a budget); `close()` frees the
    evaluation envs."""
    from stable_baselines3.common.callbacks import BaseCallback

    class Evaluate(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.envs = gym.make_vec(env_id, num_envs=episodes)
            self.t0, self.paused, self.last = time.perf_counter(), 0.0, 0
            self.result: dict[str, Any] = {}

        def start(self) -> None:
            self.t0, self.paused = time.perf_counter(), 0.0

        def _on_step(self) -> bool:
            if self.num_timesteps - self.last < every:
                return True
            return not self.evaluate()

        def evaluate(self) -> bool:
            """Evaluates now; whether the goal is reached."""
            self.last = self.num_timesteps
            begin = time.perf_counter()
            returns, _ = evaluate_vector(
                self.envs,
                lambda obs: self.model.predict(obs, deterministic=True)[0],
                episodes,
                seed + 10_000,
            )
            self.paused += time.perf_counter() - begin
            mean = float(returns.mean())
            self.result = {
                "seed": seed,
                "steps": self.num_timesteps,
                "train_s": time.perf_counter() - self.t0 - self.paused,
                "mean": mean,
                "ok": reached(mean),
            }
            return bool(self.result["ok"])

        def close(self) -> None:
            self.envs.close()

    return Evaluate()
