"""Dynamic programming on cases with known answers."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import agents  # noqa: F401  (registers rlgen/GridWorld-v0)
from agents import policy_iteration, value_iteration
from agents.gridworld import GridWorldEnv
from agents.mdp import TabularMDP, epsilon_optimal_threshold

F64 = torch.float64


def two_state_mdp() -> TabularMDP:
    """Action 0 stays, action 1 switches. Rewards: r(0, stay)=0, r(0, switch)=1, r(1, stay)=2,
    r(1, switch)=0. With gamma=0.9 the optimum stays in state 1 forever: V(1) = 2 / (1 - 0.9) = 20,
    and from state 0 switches: V(0) = 1 + 0.9 * 20 = 19."""
    s = np.array([0, 0, 1, 1])
    a = np.array([0, 1, 0, 1])
    nxt = np.array([0, 1, 1, 0])
    return TabularMDP.from_arrays(
        2, 2, s, a, nxt, prob=np.ones(4), reward=np.array([0, 1, 2, 0.0]), done=np.zeros(4, bool)
    )


def dense_optimal_values(env_id: str, gamma: float, **kwargs: object) -> np.ndarray:
    """An independent solve from gymnasium's own P dict: dense matrices and exact policy iteration."""
    env = gym.make(env_id, **kwargs)
    base = env.unwrapped
    S, A = base.observation_space.n, base.action_space.n
    P = np.zeros((A, S, S))
    R = np.zeros((A, S))
    for s in range(S):
        for a in range(A):
            for p, s2, r, done in base.P[s][a]:
                R[a, s] += p * r
                if not done:
                    P[a, s, s2] += p
    pi = np.zeros(S, dtype=int)
    for _ in range(1000):
        V = np.linalg.solve(np.eye(S) - gamma * P[pi, np.arange(S)], R[pi, np.arange(S)])
        Q = R + gamma * P @ V
        new = np.where(Q.max(0) > Q[pi, np.arange(S)] + 1e-12, Q.argmax(0), pi)
        if (new == pi).all():
            return V
        pi = new
    raise AssertionError("dense policy iteration did not converge")


def test_two_state_mdp_by_hand() -> None:
    model = two_state_mdp().to_torch(torch.device("cpu"), F64)
    vi = value_iteration.solve(model, gamma=0.9, tol=1e-10, max_iterations=10_000)
    assert vi.converged
    np.testing.assert_allclose(vi.V.numpy(), [19.0, 20.0], atol=1e-9)
    assert vi.policy.tolist() == [1, 0]
    pi = policy_iteration.solve(two_state_mdp(), model, gamma=0.9, tol=1e-10)
    np.testing.assert_allclose(pi.V.numpy(), [19.0, 20.0], atol=1e-9)
    assert pi.policy.tolist() == [1, 0]


def test_bellman_backup_is_r_plus_gamma_pv() -> None:
    model = two_state_mdp().to_torch(torch.device("cpu"), F64)
    Q = model.q_values(torch.tensor([1.0, 2.0], dtype=F64), 0.5)
    # Q[a, s]: stay in 0 -> 0 + .5*1; stay in 1 -> 2 + .5*2; switch 0->1 -> 1 + .5*2; 1->0 -> 0 + .5*1
    np.testing.assert_allclose(Q.numpy(), [[0.5, 3.0], [2.0, 0.5]])


@pytest.mark.parametrize("gamma", [0.9, 0.99])
@pytest.mark.parametrize(
    ("env_id", "kwargs"),
    [
        ("FrozenLake-v1", {"is_slippery": True}),
        ("FrozenLake-v1", {"is_slippery": True, "map_name": "8x8"}),
        ("CliffWalking-v1", {}),
    ],
)
def test_matches_independent_dense_solve(env_id: str, kwargs: dict, gamma: float) -> None:
    expected = dense_optimal_values(env_id, gamma, **kwargs)
    mdp = TabularMDP.from_env(gym.make(env_id, **kwargs))
    model = mdp.to_torch(torch.device("cpu"), F64)
    tol = 1e-8
    vi = value_iteration.solve(model, gamma, tol, max_iterations=100_000)
    # The residual bound gives ||V_{k+1} - V*|| <= tol / 2.
    assert np.abs(vi.V.numpy() - expected).max() <= tol
    for evaluation in ("exact", "iterative"):
        pi = policy_iteration.solve(mdp, model, gamma, tol, evaluation=evaluation)
        assert pi.converged
        assert np.abs(pi.V.numpy() - expected).max() <= 1e-6
        # VI and PI agree on the policy wherever the optimal action is unique.
        Q = model.q_values(torch.from_numpy(expected), gamma).numpy()
        top2 = np.sort(Q, axis=0)[-2:]
        unique = top2[1] - top2[0] > 1e-6
        assert (pi.policy.numpy()[unique] == vi.policy.numpy()[unique]).all()


def test_frozenlake_known_optimum() -> None:
    # The optimal slippery-4x4 start value with gamma=0.99 is ~0.542 (a long-standing reference).
    mdp = TabularMDP.from_env(gym.make("FrozenLake-v1", is_slippery=True))
    vi = value_iteration.solve(mdp.to_torch(torch.device("cpu"), F64), 0.99, 1e-10, 100_000)
    assert vi.V[0].item() == pytest.approx(0.542, abs=2e-3)
    assert mdp.terminal.sum() == 5  # four holes and the goal


def test_epsilon_optimal_threshold() -> None:
    assert epsilon_optimal_threshold(1e-3, 0.9) == pytest.approx(1e-3 * 0.1 / 1.8)
    assert epsilon_optimal_threshold(1.0, 0.0) == float("inf")


def test_float32_stops_at_precision_floor() -> None:
    mdp = GridWorldEnv(size=12, slip=0.2, seed=0).transition_model()
    sol = value_iteration.solve(
        mdp.to_torch(torch.device("cpu"), torch.float32), 0.99, 1e-12, 50_000
    )
    assert sol.converged and len(sol.residuals) < 50_000


# -- the generated gridworld ----------------------------------------------------------------------
def test_gridworld_model_matches_env_dynamics() -> None:
    env = GridWorldEnv(size=6, slip=0.3, obstacle_density=0.25, seed=3)
    mdp = env.transition_model()
    P = mdp.P.toarray().reshape(4, 36, 36)
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    free = np.flatnonzero(~env.blocked.ravel())
    for s in rng.choice(free[free != env.goal], size=4, replace=False):
        for a in range(4):
            counts = np.zeros(36)
            for _ in range(3000):
                env._state = int(s)
                nxt, reward, _, _, _ = env.step(a)
                assert reward == -1.0
                counts[nxt] += 1
            expected = P[a, s].copy()
            expected[env.goal] = (
                1 - P[a, s].sum() + P[a, s, env.goal]
            )  # done mass lands on the goal
            np.testing.assert_allclose(counts / 3000, expected, atol=0.035)


def test_gridworld_layout_keeps_goal_reachable() -> None:
    for seed in range(20):
        env = GridWorldEnv(size=15, obstacle_density=0.6, seed=seed, slip=0.0)
        sol = value_iteration.solve(
            env.transition_model().to_torch(torch.device("cpu"), F64), 0.99, 1e-6, 10_000
        )
        assert sol.V[0].item() > -99.0  # -1/(1-gamma) = -100 would mean the goal is unreachable


def test_gridworld_sizes_beyond_memory_are_refused_before_anything_is_built() -> None:
    """size 100000 would draw 10^10 random numbers just for the layout, at validation."""
    from agents.gridworld import MAX_SIZE

    for size in (1, MAX_SIZE + 1, 100_000, 2.5):
        with pytest.raises(ValueError, match=r"size must be an integer in \[2, 4096\]"):
            GridWorldEnv(size=size)  # type: ignore[arg-type]


def test_gridworld_deterministic_optimum_is_shortest_path() -> None:
    env = GridWorldEnv(size=10, slip=0.0, obstacle_density=0.0, seed=0)
    sol = value_iteration.solve(
        env.transition_model().to_torch(torch.device("cpu"), F64), 0.9, 1e-10, 10_000
    )
    steps = 18  # Manhattan distance from (0, 0) to (9, 9)
    assert sol.V[0].item() == pytest.approx(-(1 - 0.9**steps) / (1 - 0.9), abs=1e-8)


def test_gridworld_builds_a_million_states_vectorised() -> None:
    import time

    t = time.perf_counter()
    mdp = GridWorldEnv(size=1000, slip=0.2, obstacle_density=0.1, seed=0).transition_model()
    assert mdp.n_states == 10**6
    assert time.perf_counter() - t < 30
    assert mdp.P.shape == (4 * 10**6, 10**6)


@pytest.mark.parametrize("kwargs", [{"size": 1}, {"slip": 1.5}, {"obstacle_density": 1.0}])
def test_gridworld_rejects_bad_kwargs(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        GridWorldEnv(**kwargs)


def test_gridworld_is_a_registered_gymnasium_env() -> None:
    env = gym.make("rlgen/GridWorld-v0", size=5, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert obs == 0
    assert env.render().shape[2] == 3


@pytest.mark.slow
def test_epsilon_bound_holds_at_scale() -> None:
    """90,000 states: VI's values are within tol of exact policy iteration's (the optimum)."""
    mdp = GridWorldEnv(size=300, slip=0.2, obstacle_density=0.2, seed=5).transition_model()
    model = mdp.to_torch(torch.device("cpu"), F64)
    tol = 1e-6
    vi = value_iteration.solve(model, 0.99, tol, 100_000)
    pi = policy_iteration.solve(mdp, model, 0.99, tol, evaluation="exact")
    assert vi.converged and pi.converged
    assert float((vi.V - pi.V).abs().max()) <= tol


def test_dynamics_outside_the_model_are_refused() -> None:
    """Taxi's fickle passenger changes destination in step(), not in P: dynamic programming would
    solve another MDP, and Q-learning's value gap would measure against the wrong optimum."""
    from agents import dp
    from agents.q_learning import ValueGap

    fickle = gym.make("Taxi-v4", fickle_passenger=True)
    assert "fickle_passenger" in (dp.check_env(fickle) or "")
    with pytest.raises(ValueError, match="fickle"):
        TabularMDP.from_env(fickle)
    assert ValueGap.of(fickle, 0.99) is None
    plain = gym.make("Taxi-v4", is_rainy=True)  # rain is in P
    assert dp.check_env(plain) is None and ValueGap.of(plain, 0.99) is not None
