"""Tabular Q-learning (Watkins 1989), SARSA and Expected SARSA (Sutton & Barto 2018, ch. 6).

    Q(s, a) <- Q(s, a) + alpha_t [ y - Q(s, a) ]
    y = r + gamma * max_a' Q(s', a')                 Q-learning (off-policy)
    y = r + gamma * Q(s', a'),  a' ~ eps-greedy      SARSA (on-policy)
    y = r + gamma * sum_a' pi(a' | s') Q(s', a')     Expected SARSA

with y = r at a termination; a time-limit truncation bootstraps. Step size and exploration decay
linearly. For convergence in stochastic envs the step size must decay (Robbins-Monro), hence the
default final step size well below the initial one.

When the env exposes its model (FrozenLake, Taxi, CliffWalking, rlgen/GridWorld), each evaluation
also logs `eval/value_gap`: E_{s0}[V*(s0) - V^pi(s0)], the expected discounted return lost from the
start by the greedy policy pi against the value-iteration optimum, both computed exactly.
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from agents import envstate
from agents.evaluation import evaluate_policy, length_metric
from agents.mdp import TabularMDP, unmodelled_dynamics
from agents.plots import learning_curve
from agents.policy_iteration import evaluate_exact
from agents.schedules import linear_schedule
from agents.value_iteration import solve
from runctx import RunContext
from runctx.checkpoints import capture


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    total_timesteps: int = Field(200_000, gt=0, description="Env steps to learn from.")
    update: Literal["q_learning", "sarsa", "expected_sarsa"] = Field(
        "q_learning", description="The TD target (see the module docstring)."
    )
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    learning_rate: float = Field(0.5, gt=0, le=1, description="Initial step size alpha.")
    final_learning_rate: float = Field(
        0.001,
        gt=0,
        le=1,
        # 0.01 left the greedy policy flipping between near-tied actions at the end (slippery
        # FrozenLake: 1 seed in 24 ended 0.12 below the optimum; 0.001: 0 in 30).
        description="Step size reached at the end (linear decay).",
    )
    exploration_initial_eps: float = Field(1.0, ge=0, le=1, description="Initial epsilon.")
    exploration_final_eps: float = Field(0.05, ge=0, le=1, description="Final epsilon.")
    exploration_fraction: float = Field(
        0.5, ge=0, le=1, description="Fraction of total_timesteps over which epsilon decays."
    )
    initial_q: float = Field(0.0, description="Initial Q values (optimistic when high).")
    eval_every: int = Field(10_000, gt=0, description="Timesteps between evaluations.")
    eval_episodes: int = Field(100, ge=1, description="Greedy episodes per evaluation.")
    eval_max_steps: int = Field(
        1_000,
        gt=0,
        description="Cap on an evaluation episode in envs without a time limit (CliffWalking), "
        "where a greedy policy that loops would never end.",
    )
    stop_at_return: float | None = Field(
        None, description="Stop once an evaluation's mean return reaches this."
    )
    checkpoint_every: int = Field(
        50_000, gt=0, description="Timesteps between checkpoints (and at the end)."
    )


# What a run logs (see the registry); eval/value_gap only on envs that expose their model.
METRICS = (
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/epsilon",
    "charts/learning_rate",
    "charts/episodes",
    "eval/return_mean",
    "eval/return_std",
    "eval/length_mean",
    "eval/value_gap",
    "time/train_s",
)
MAX_TABLE_ROWS = 10_000_000  # 10M states x a few actions of float64: ~0.3 GB a Q table


class StateIndex:
    """The Q table's row for an observation: Discrete(n, start) -> obs - start; MultiDiscrete(nvec,
    start) and Tuple(Discrete, ...) (Blackjack's (sum, dealer card, usable ace)) -> the mixed-radix
    index of the components (np.ravel_multi_index), in a table of prod(n_i) rows."""

    def __init__(self, space: gym.Space[Any]):
        if isinstance(space, gym.spaces.Discrete):
            sizes, starts = [space.n], [space.start]
        elif isinstance(space, gym.spaces.MultiDiscrete):
            sizes, starts = list(space.nvec.ravel()), list(space.start.ravel())
        elif isinstance(space, gym.spaces.Tuple) and all(
            isinstance(c, gym.spaces.Discrete) for c in space.spaces
        ):
            sizes = [c.n for c in space.spaces]  # type: ignore[attr-defined]
            starts = [c.start for c in space.spaces]  # type: ignore[attr-defined]
        else:
            raise ValueError(f"not a discrete observation space: {space}")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.n = int(np.prod(self.sizes, dtype=np.float64))  # float: no int64 overflow here
        self._start = int(self.starts[0])
        self._scalar = len(self.sizes) == 1
        # Python ints: the index is computed once per step, where numpy's call overhead dominates.
        strides = np.cumprod([1, *self.sizes[:0:-1]])[::-1]  # row-major, as ravel_multi_index
        self._terms = list(zip(self.starts.tolist(), strides.tolist(), strict=True))

    def __call__(self, obs: Any) -> int:
        """One observation -> its row; runs every step."""
        if self._scalar:  # Discrete (FrozenLake, Taxi)
            return int(obs) - self._start
        flat = obs if isinstance(obs, tuple) else np.ravel(obs).tolist()
        return sum((int(o) - s) * k for o, (s, k) in zip(flat, self._terms, strict=True))

    def batch(self, obs: Any) -> np.ndarray:
        """Observations (N,) or (N, k) -> rows (N,)."""
        o = np.asarray(obs, dtype=np.int64).reshape(len(obs), -1) - self.starts
        return np.ravel_multi_index(tuple(o.T), self.sizes)


def check_env(env: gym.Env, config: Config | None = None) -> str | None:
    """Why tabular Q-learning cannot run on `env` (whatever its `config`), or None."""
    if not isinstance(env.action_space, gym.spaces.Discrete):
        return f"tabular Q-learning needs a discrete action space, not {env.action_space}"
    try:
        rows = StateIndex(env.observation_space).n
    except ValueError:
        return (
            "tabular Q-learning needs a Discrete, MultiDiscrete or Tuple-of-Discrete observation "
            f"space, not {env.observation_space}"
        )
    if rows > MAX_TABLE_ROWS:
        return f"{env.observation_space} has {rows:,} states, too many for a Q table"
    return None


class ValueGap:
    """E_{s0 ~ rho}[V*(s0) - V^pi(s0)] on the env's exact model (None when it has none)."""

    def __init__(self, env: gym.Env, gamma: float):
        self.mdp = TabularMDP.from_env(env)
        self.gamma = gamma
        base: Any = env.unwrapped
        self.rho = np.asarray(base.initial_state_distrib, dtype=np.float64)
        model = self.mdp.to_torch(torch.device("cpu"), torch.float64)
        self.v_star = solve(model, gamma, 1e-8, 1_000_000).V.numpy()

    @classmethod
    def of(cls, env: gym.Env, gamma: float) -> ValueGap | None:
        base: Any = env.unwrapped
        has_model = hasattr(base, "transition_model") or hasattr(base, "P")
        if gamma >= 1.0 or not has_model or not hasattr(base, "initial_state_distrib"):
            return None  # undiscounted values of a policy that never ends are infinite
        if unmodelled_dynamics(env) is not None:
            return None  # the model's optimum is not this env's
        return cls(env, gamma)

    def __call__(self, policy: np.ndarray) -> float:
        v_pi = evaluate_exact(self.mdp, policy, self.gamma)
        return float(self.rho @ (self.v_star - v_pi))


def train(config: Config, ctx: RunContext) -> None:
    env, eval_env = ctx.make_env(), ctx.make_env(evaluation=True)
    index = StateIndex(env.observation_space)
    n_states, n_actions = index.n, int(env.action_space.n)  # type: ignore[attr-defined]
    a0 = int(env.action_space.start)  # type: ignore[attr-defined]  # table column a is action a0 + a
    Q = np.full((n_states, n_actions), config.initial_q, dtype=np.float64)
    gap = ValueGap.of(env, config.gamma)
    rng, gamma = ctx.rng("exploration"), config.gamma
    explore_steps = config.exploration_fraction * config.total_timesteps
    evals: list[tuple[int, float, float]] = []
    history: list[tuple[int, float]] = []

    def eps_greedy(s: int, eps: float) -> int:
        if rng.random() < eps:
            return int(rng.integers(n_actions))
        row = Q[s]  # ties broken at random, so an all-zero row does not always pick action 0
        return int(rng.choice(np.flatnonzero(row == row.max())))

    def evaluate(step: int) -> float:
        with ctx.timer.paused():
            policy = Q.argmax(axis=1)
            returns, lengths = evaluate_policy(
                eval_env,
                lambda s: int(policy[index(s)]) + a0,
                config.eval_episodes,
                ctx.seed + 10_000,
                max_steps=config.eval_max_steps,
            )
            metrics = {
                "eval/return_mean": returns.mean(),
                "eval/return_std": returns.std(),
                **length_metric("eval/length_mean", returns, lengths),
                "time/train_s": ctx.timer.elapsed(),
            }
            if gap is not None:
                metrics["eval/value_gap"] = gap(policy)
            ctx.log_metrics(metrics, step=step)
            evals.append((step, float(returns.mean()), float(returns.std())))
        return float(returns.mean())

    def checkpoint() -> None:
        with ctx.timer.paused():
            env_state = envstate.snapshot(env)
            ctx.checkpoints.save(
                {
                    **capture(state),
                    "step": step,
                    "episodes": episodes,
                    "evals": torch.tensor(evals, dtype=torch.float64).reshape(-1, 3),
                    "history": torch.tensor(history, dtype=torch.float64).reshape(-1, 2),
                    **(
                        {
                            "env": env_state,
                            "position": torch.tensor([s, a, ep_length]),
                            "ep_return": ep_return,
                        }
                        if env_state is not None
                        else {}
                    ),
                },
                step=step,
            )

    # The table and the exploration stream, then the counters and the env's state: a resumed
    # run goes on inside the episode it was in, with the same random draws.
    state = {"q_table": torch.from_numpy(Q), "exploration": rng}  # the tensor shares Q's memory
    step, episodes, ep_return, ep_length = 0, 0, 0.0, 0
    eps = config.exploration_initial_eps
    obs, _ = env.reset(seed=ctx.seed)
    s = index(obs)
    a = eps_greedy(s, eps)
    if (saved := ctx.checkpoints.restore(state)) is not None:
        step, episodes = int(saved["step"]), int(saved["episodes"])
        evals = [(int(t), m, sd) for t, m, sd in saved["evals"].tolist()]
        history = [(int(t), r) for t, r in saved["history"].tolist()]
        if "env" in saved:
            env.close()
            env = envstate.revive(saved["env"])
            s, a, ep_length = map(int, saved["position"].tolist())
            ep_return = float(saved["ep_return"])
        else:  # an env that does not pickle: a fresh episode
            obs, _ = env.reset(seed=ctx.seed + step)
            s = index(obs)
            a = eps_greedy(s, eps)
    next_ckpt = (step // config.checkpoint_every + 1) * config.checkpoint_every
    while step < config.total_timesteps and not ctx.should_stop():
        obs, r, terminated, truncated, _ = env.step(a + a0)
        s2, r = index(obs), float(r)
        step += 1
        eps = linear_schedule(
            config.exploration_initial_eps, config.exploration_final_eps, explore_steps, step
        )
        alpha = linear_schedule(
            config.learning_rate, config.final_learning_rate, config.total_timesteps, step
        )
        a2 = eps_greedy(s2, eps)  # the next action (SARSA's target uses it; it is taken next)
        if terminated:
            y = r
        elif config.update == "q_learning":
            y = r + gamma * Q[s2].max()
        elif config.update == "sarsa":
            y = r + gamma * Q[s2, a2]
        else:  # expected SARSA under the eps-greedy policy (greedy mass split over ties)
            row = Q[s2]
            best = row == row.max()
            probs = eps / n_actions + (1 - eps) * best / best.sum()
            y = r + gamma * float(probs @ row)
        Q[s, a] += alpha * (y - Q[s, a])
        s, a = s2, a2
        ep_return += r
        ep_length += 1
        if terminated or truncated:
            episodes += 1
            history.append((step, ep_return))
            ctx.log_metrics(
                {
                    "charts/episodic_return": ep_return,
                    **length_metric("charts/episodic_length", ep_return, ep_length),
                    "charts/epsilon": eps,
                    "charts/learning_rate": alpha,
                    "charts/episodes": episodes,  # a line over training, not one end point
                },
                step=step,
            )
            obs, _ = env.reset()
            s = index(obs)
            a = eps_greedy(s, eps)
            ep_return, ep_length = 0.0, 0
        if step % config.eval_every == 0:
            mean = evaluate(step)
            if config.stop_at_return is not None and mean >= config.stop_at_return:
                break
        if step >= next_ckpt:
            next_ckpt += config.checkpoint_every
            checkpoint()
    ctx.timer.stop()
    if not evals or evals[-1][0] != step:
        evaluate(step)
    checkpoint()
    title = f"{config.update} on {ctx.env.id if ctx.env else 'env'}, seed {ctx.seed}"
    ctx.log_figure(learning_curve(history, evals, config.stop_at_return, title), "learning_curve")
    env.close()
    eval_env.close()


def load_policy(config: Config, state: dict[str, Any], env: gym.Env) -> Any:
    """Greedy policy of a logged Q table, for `rlgen evaluate`: obs (N, ...) -> actions (N,)."""
    policy = state["q_table"].numpy().argmax(axis=1)
    index, a0 = StateIndex(env.observation_space), int(env.action_space.start)  # type: ignore[attr-defined]
    return lambda obs: policy[index.batch(obs)] + a0
