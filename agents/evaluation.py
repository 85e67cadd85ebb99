"""Greedy evaluation rollouts shared by the RL algorithms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from runctx import RunContext

# A safety net for envs without a time limit (a policy that never terminates would hang).
DEFAULT_MAX_STEPS = 100_000


def length_metric(key: str, returns: Any, lengths: Any) -> dict[str, float]:
    """`{key: mean episode length}`, or nothing where every episode's length equals its return:
    on an env that pays 1 per step (CartPole) a length chart would repeat the return chart
    exactly. `returns` and `lengths`: one episode's numbers or arrays of them."""
    returns, lengths = np.asarray(returns, dtype=float), np.asarray(lengths, dtype=float)
    if np.array_equal(returns, lengths):
        return {}
    return {key: float(lengths.mean())}


def evaluate_policy(
    env: gym.Env,
    act: Callable[[Any], Any],
    episodes: int,
    seed: int,
    max_steps: int = DEFAULT_MAX_STEPS,
    frames: list[np.ndarray] | None = None,
    max_frames: int = 1_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Roll `act` (one observation -> one action) out for `episodes` episodes; returns
    (returns, lengths), each (episodes,). Training's evaluations and `rlgen evaluate` both use it.

    The env is seeded once with `seed` at the first reset, so the whole sequence of episodes is
    reproducible and independent of the training env's random stream. With `frames`, the first
    episode's rendered frames (at most `max_frames`) are appended to it (`render_mode="rgb_array"`).
    """
    limit = env.spec.max_episode_steps if env.spec and env.spec.max_episode_steps else None
    limit = limit or max_steps
    returns = np.zeros(episodes)
    lengths = np.zeros(episodes, dtype=np.int64)
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed if ep == 0 else None)
        record = frames is not None and ep == 0
        if record:
            frames.append(env.render())  # type: ignore[union-attr,arg-type]
        done, total, steps = False, 0.0, 0
        while not done and steps < limit:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += float(reward)
            steps += 1
            done = terminated or truncated
            if record and len(frames) < max_frames:  # type: ignore[arg-type]
                frames.append(env.render())  # type: ignore[union-attr,arg-type]
        returns[ep], lengths[ep] = total, steps
    return returns, lengths


def evaluate_and_log(
    ctx: RunContext,
    envs: gym.vector.VectorEnv,
    act: Callable[[np.ndarray], np.ndarray],
    episodes: int,
    max_steps: int,
    step: int,
) -> tuple[float, float]:
    """Training's evaluation: `episodes` greedy episodes (`evaluate_vector`) from the trial's
    evaluation seed, off the training clock, logged as eval/* at `step`; their mean and std."""
    with ctx.timer.paused():
        returns, lengths = evaluate_vector(envs, act, episodes, ctx.seed + 10_000, max_steps)
        ctx.log_metrics(
            {
                "eval/return_mean": returns.mean(),
                "eval/return_std": returns.std(),
                **length_metric("eval/length_mean", returns, lengths),
                "time/train_s": ctx.timer.elapsed(),
            },
            step=step,
        )
    return float(returns.mean()), float(returns.std())


def evaluate_vector(
    envs: gym.vector.VectorEnv,
    act: Callable[[np.ndarray], np.ndarray],
    episodes: int,
    seed: int,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> tuple[np.ndarray, np.ndarray]:
    """One episode in each of `envs.num_envs == episodes` envs, stepped as a batch.

    `act` maps observations (N, ...) to actions (N,). Every call with the same seed replays the
    same start states, so successive evaluations differ only by the policy. Each env's first
    episode counts (never "the first `episodes` to finish", which would favour short episodes);
    an env that is done keeps being stepped by the vector env, but its rewards are ignored.
    Episodes end at the env's time limit, or after `max_steps` in envs without one.
    """
    if envs.num_envs != episodes:
        raise ValueError(f"need one env per episode: {envs.num_envs} envs, {episodes} episodes")
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(episodes)
    lengths = np.zeros(episodes, dtype=np.int64)
    running = np.ones(episodes, dtype=bool)
    limit = envs.spec.max_episode_steps if envs.spec and envs.spec.max_episode_steps else None
    for _ in range(limit or max_steps):
        obs, reward, terminated, truncated, _ = envs.step(act(obs))
        returns += reward * running
        lengths += running
        running &= ~(terminated | truncated)
        if not running.any():
            break
    return returns, lengths
