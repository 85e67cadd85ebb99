"""Tabular Q-learning, SARSA and Expected SARSA against value iteration's optimum."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents import q_learning
from agents.dp import greedy
from agents.envs import EnvSpec
from agents.mdp import TabularMDP
from agents.policy_iteration import evaluate_exact
from runctx import RunContext


def run(config: q_learning.Config, tmp: Path, env: EnvSpec, seed: int = 0) -> RunContext:
    ctx = RunContext.in_memory(seed=seed, workdir=tmp, env=env)
    q_learning.train(config, ctx)
    ctx.close()
    return ctx


@pytest.mark.parametrize("seed", [0, 1])
def test_frozenlake_approaches_the_value_iteration_policy(seed: int, tmp_path: Path) -> None:
    env = EnvSpec(id="FrozenLake-v1", kwargs={"is_slippery": True})
    ctx = run(q_learning.Config(total_timesteps=150_000, eval_every=25_000), tmp_path, env, seed)
    m = ctx.writer.metrics  # type: ignore[attr-defined]
    gaps = [v for _, v in m["eval/value_gap"]]
    # From the start, the learned greedy policy loses < 0.02 of the optimal discounted value
    # (V*(s0) ~ 0.54 at gamma 0.99).
    assert gaps[-1] < 0.02
    q_table = ctx.checkpoints.latest()["q_table"].numpy()  # type: ignore[index]
    mdp = TabularMDP.from_env(gym.make("FrozenLake-v1", is_slippery=True))
    v = evaluate_exact(mdp, q_table.argmax(axis=1), 0.99)
    assert v[0] > 0.52
    assert m["eval/return_mean"][-1][1] > 0.6  # success rate of greedy rollouts


def test_value_gap_is_zero_for_the_optimal_policy_and_positive_otherwise() -> None:
    env = gym.make("FrozenLake-v1", is_slippery=True)
    gap = q_learning.ValueGap.of(env, 0.99)
    assert gap is not None
    model = TabularMDP.from_env(env).to_torch(torch.device("cpu"), torch.float64)
    optimal = greedy(model.q_values(torch.from_numpy(gap.v_star), 0.99)).numpy()
    assert abs(gap(optimal)) < 1e-6
    assert gap(np.zeros(16, dtype=np.int64)) > 0.1  # always "left"


def test_cliffwalking_q_learning_takes_the_edge_and_sarsa_the_safe_path(tmp_path: Path) -> None:
    """Sutton & Barto's example 6.6: the on-policy method learns the safer, longer path."""
    env = EnvSpec(id="CliffWalking-v1")
    config = dict(
        total_timesteps=60_000,
        eval_every=60_000,
        eval_episodes=1,
        exploration_final_eps=0.1,
        exploration_fraction=0.1,
        learning_rate=0.5,
        final_learning_rate=0.5,
    )
    q = run(q_learning.Config(**config), tmp_path / "q", env).writer.metrics  # type: ignore[attr-defined, arg-type]
    assert q["eval/return_mean"][-1][1] == -13  # the optimal path along the cliff
    assert q["eval/value_gap"][-1][1] < 1e-6
    # SARSA's greedy policy at a constant step size of 0.5 still moves with every update: on some
    # seeds it ends in a loop (the rollout's -1000 cap). Most seeds show the detour.
    finals = [
        run(
            q_learning.Config(update="sarsa", **config), tmp_path / f"s{seed}", env, seed=seed
        ).writer.metrics["eval/return_mean"][-1][1]  # type: ignore[arg-type]  # type: ignore[attr-defined]
        for seed in range(3)
    ]
    assert -25 < float(np.median(finals)) < -13, finals  # a detour away from the cliff


def test_expected_sarsa_and_taxi(tmp_path: Path) -> None:
    ctx = run(
        q_learning.Config(
            update="expected_sarsa", total_timesteps=100_000, eval_every=50_000, eval_episodes=50
        ),
        tmp_path,
        EnvSpec(id="Taxi-v4"),
    )
    m = ctx.writer.metrics  # type: ignore[attr-defined]
    assert m["eval/return_mean"][-1][1] > 5  # optimal is ~8; random play ~-770
    assert m["eval/value_gap"][-1][1] < m["eval/value_gap"][0][1]


def test_same_seed_same_table(tmp_path: Path) -> None:
    env = EnvSpec(id="FrozenLake-v1")
    config = q_learning.Config(total_timesteps=3_000, eval_every=1_000, eval_episodes=5)
    a = run(config, tmp_path / "a", env).checkpoints.latest()
    b = run(config, tmp_path / "b", env).checkpoints.latest()
    c = run(config, tmp_path / "c", env, seed=1).checkpoints.latest()
    assert a is not None and b is not None and c is not None
    assert (a["q_table"] == b["q_table"]).all() and not (a["q_table"] == c["q_table"]).all()


def test_refuses_continuous_envs() -> None:
    assert q_learning.check_env(gym.make("FrozenLake-v1")) is None
    assert "Discrete, MultiDiscrete or Tuple-of-Discrete observation" in (
        q_learning.check_env(gym.make("CartPole-v1")) or ""
    )
    assert "discrete action space" in (q_learning.check_env(gym.make("Pendulum-v1")) or "")
    assert q_learning.check_env(gym.make("Blackjack-v1")) is None


class Huge(gym.Env[np.ndarray, np.int64]):
    observation_space = gym.spaces.MultiDiscrete([1000, 1000, 1000])
    action_space = gym.spaces.Discrete(2)


def test_refuses_tables_too_large_to_hold() -> None:
    assert "too many for a Q table" in (q_learning.check_env(Huge()) or "")


@pytest.mark.parametrize(
    "space",
    [
        gym.spaces.Discrete(7, start=3),
        gym.spaces.MultiDiscrete([[3, 4], [2, 5]], start=[[1, 0], [-1, 2]]),
        gym.spaces.Tuple([gym.spaces.Discrete(4), gym.spaces.Discrete(3, start=1)]),
    ],
    ids=["discrete-start", "multidiscrete-2d", "tuple"],
)
def test_state_index_is_a_bijection_onto_the_table_rows(space: gym.Space) -> None:
    index = q_learning.StateIndex(space)
    if isinstance(space, gym.spaces.Discrete):
        every = [np.int64(space.start + i) for i in range(space.n)]
    elif isinstance(space, gym.spaces.Tuple):
        every = [(a, b) for a in range(4) for b in range(1, 4)]
    else:
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in space.nvec.ravel()], indexing="ij"))
        every = list(grid.reshape(4, -1).T.reshape(-1, 2, 2) + space.start)
    rows = [index(o) for o in every]
    assert sorted(rows) == list(range(index.n)) == list(range(len(every)))
    batch = np.array([np.ravel(np.asarray(o)) for o in every]).reshape(len(every), -1)
    assert index.batch(batch).tolist() == rows  # the batched form (`rlgen evaluate`) agrees


def test_blackjack_tuple_observations_learn_near_optimal_play(tmp_path: Path) -> None:
    """Blackjack-v1's (player sum, dealer card, usable ace): with the state index, Q-learning
    plays near the optimum (about -0.05 a hand); always sticking gets -0.18, random -0.40."""
    config = q_learning.Config(
        total_timesteps=60_000,
        gamma=1.0,
        learning_rate=0.1,
        final_learning_rate=0.01,
        eval_every=60_000,
        eval_episodes=2_000,
    )
    ctx = run(config, tmp_path, EnvSpec(id="Blackjack-v1"))
    assert ctx.writer.metrics["eval/return_mean"][-1][1] > -0.13  # type: ignore[attr-defined]
    state = ctx.checkpoints.latest()
    assert state is not None
    env = gym.make("Blackjack-v1")
    policy = q_learning.load_policy(config, state, env)
    table = state["q_table"].numpy()
    assert table.shape == (32 * 11 * 2, 2)
    # 20 against a dealer's 6, no usable ace: stick (action 0); 8 against a 10: hit.
    assert policy(np.array([[20, 6, 0], [8, 10, 0]])).tolist() == [0, 1]
