"""Greedy evaluation rollouts shared by the RL algorithms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

# A safety net for envs without a time limit (a policy that never terminates would hang).
DEFAULT_MAX_STEPS = 100_000


def evaluate_policy(
    env: gym.Env, act: Callable[[Any], Any], episodes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Roll `act` out for `episodes` episodes; returns (returns, lengths), each (episodes,).

    The env is seeded once with `seed` at the first reset, so the whole sequence of episodes is
    reproducible and independent of the training env's random stream.
    """
    limit = env.spec.max_episode_steps if env.spec and env.spec.max_episode_steps else None
    limit = limit or DEFAULT_MAX_STEPS
    returns = np.zeros(episodes)
    lengths = np.zeros(episodes, dtype=np.int64)
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed if ep == 0 else None)
        done, total, steps = False, 0.0, 0
        while not done and steps < limit:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += float(reward)
            steps += 1
            done = terminated or truncated
        returns[ep], lengths[ep] = total, steps
    return returns, lengths
