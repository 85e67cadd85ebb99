"""What value iteration and policy iteration share: loading the model, the common config fields,
and the report (greedy rollouts in the real env, figures, final metrics)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from agents.evaluation import evaluate_policy, length_metric
from agents.mdp import TabularMDP, TorchMDP, unmodelled_dynamics
from agents.plots import residual_curve, value_heatmap
from runctx import RunContext
from runctx.checkpoints import capture


class DPConfig(BaseModel):
    """Fields every dynamic-programming solver takes."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    gamma: float = Field(0.99, ge=0.0, lt=1.0, description="Discount factor, in [0, 1).")
    tol: float = Field(
        1e-6,
        gt=0.0,
        description="epsilon: the returned greedy policy is epsilon-optimal (sup-norm of values).",
    )
    dtype: Literal["float64", "float32"] = Field(
        "float64",
        description="Floating point type of values and transitions (float32 is faster, "
        "but cannot resolve residuals below ~1e-7 of the values' scale).",
    )
    eval_episodes: int = Field(
        100, ge=1, description="Greedy rollouts of the final policy in the real env."
    )
    figures: bool = Field(True, description="Log the value heatmap and residual curve.")
    checkpoint_every: int = Field(
        1_000, gt=0, description="Iterations between checkpoints (and at the end)."
    )


def resume_point(
    ctx: RunContext, weights: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Where a solver starts: `weights` (V, and the policy for policy iteration) filled from the
    run's checkpoint (a restart, `rlgen continue`) or from another run's (`--init-from`: a warm
    start), and the residuals of the iterations done so far."""
    saved = ctx.checkpoints.restore(weights)
    return weights, (saved["residuals"].tolist() if saved is not None else [])


def checkpoint(
    ctx: RunContext, V: torch.Tensor, policy: torch.Tensor, residuals: list[float]
) -> None:
    """The values, the greedy policy (what `rlgen evaluate` runs) and the residuals so far."""
    with ctx.timer.paused():
        ctx.checkpoints.save(
            {
                **capture({"V": V, "policy": policy}),
                "residuals": torch.tensor(residuals, dtype=torch.float64),
                "step": len(residuals),
            },
            len(residuals),
        )


@dataclass
class Solution:
    V: torch.Tensor  # (S,) state values
    policy: torch.Tensor  # (S,) greedy action per state
    residuals: list[float]  # per iteration
    threshold: float  # residual that guarantees epsilon-optimality
    converged: bool


# What `report` logs, for value and policy iteration alike (the registry's list of metrics a sweep
# may rank trials by or a parent run may aggregate).
METRICS = (
    "solver/iterations",
    "solver/converged",
    "solver/value_max",
    "solver/value_mean",
    "time/solve_s",
    "eval/return_mean",
    "eval/return_std",
    "eval/length_mean",
)


def check_env(env: Any, config: Any = None) -> str | None:
    """Why dynamic programming cannot run on `env` (it needs the transition model), or None,
    whatever the `config` (value or policy iteration's)."""
    base = env.unwrapped
    if hasattr(base, "transition_model") or hasattr(base, "P"):
        return unmodelled_dynamics(env)
    return (
        "exposes no transition model; dynamic programming needs a tabular env "
        "(FrozenLake-v1, Taxi-v4, CliffWalking-v1, rlgen/GridWorld-v0)"
    )


def load_policy(config: Any, state: dict[str, Any], env: Any) -> Callable[[Any], Any]:
    """The solved policy of a checkpoint, for `rlgen evaluate`: states (N,) -> actions (N,)."""
    policy = state["policy"].numpy()
    return lambda obs: policy[np.asarray(obs, dtype=np.int64)]


def load_mdp(ctx: RunContext, dtype: str) -> tuple[TabularMDP, TorchMDP]:
    env = ctx.make_env()
    try:
        mdp = TabularMDP.from_env(env)
    finally:
        env.close()
    ctx.log.info(
        "MDP with %d states, %d actions, %d transitions", mdp.n_states, mdp.n_actions, mdp.P.nnz
    )
    return mdp, mdp.to_torch(ctx.device, getattr(torch, dtype))


def report(
    ctx: RunContext,
    config: DPConfig,
    mdp: TabularMDP,
    solution: Solution,
    solve_s: float,
    title: str,
) -> None:
    """Final metrics, greedy rollouts in the real env, and figures (all off the training clock)."""
    iterations = len(solution.residuals)
    V_np, pi_np = solution.V.double().cpu().numpy(), solution.policy.cpu().numpy()
    metrics = {
        "solver/iterations": iterations,
        "solver/converged": float(solution.converged),
        "solver/value_max": float(V_np.max()),
        "solver/value_mean": float(V_np.mean()),
        "time/solve_s": solve_s,
    }
    # The policy and values, for `rlgen evaluate`, reuse, and going on from here.
    checkpoint(ctx, solution.V, solution.policy, solution.residuals)
    if ctx.should_stop():  # interrupted: record how far the solver got, skip the rollouts
        ctx.log_summary(metrics)
        return
    with ctx.timer.paused():
        env = ctx.make_env()
        try:
            returns, lengths = evaluate_policy(
                env,
                lambda s: int(pi_np[int(s)]),
                config.eval_episodes,
                seed=int(ctx.rng("evaluation").integers(2**31)),
            )
        finally:
            env.close()
        metrics |= {
            "eval/return_mean": float(returns.mean()),
            "eval/return_std": float(returns.std()),
            **length_metric("eval/length_mean", returns, lengths),
        }
        ctx.log_summary(metrics)
        if config.figures:
            ctx.log_figure(
                residual_curve(
                    solution.residuals, solution.threshold, f"{title}: Bellman residual"
                ),
                "bellman_residual",
            )
            if mdp.grid_shape is not None:
                ctx.log_figure(
                    value_heatmap(mdp, V_np, pi_np, f"{title}: V* and greedy policy"),
                    "value_heatmap",
                )


class Stopwatch:
    """perf_counter seconds, synchronising CUDA so GPU time is counted where it is spent."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def seconds(self) -> float:
        return self._now() - self.t0


def greedy(Q: torch.Tensor) -> torch.Tensor:
    """Greedy policy (S,) from Q (A, S); ties go to the lowest action index."""
    return Q.argmax(dim=0)
