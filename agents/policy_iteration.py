"""Policy iteration (Howard 1960): alternate policy evaluation and greedy improvement.

Evaluation solves V_pi = R_pi + gamma P_pi V_pi either exactly, as the sparse linear system
(I - gamma P_pi) V = R_pi, or iteratively by repeated backups under pi (warm-started from the last
V). Improvement takes the greedy policy, keeping the current action on ties so that the loop ends
when no action strictly improves: then pi is optimal (exact evaluation) or epsilon-optimal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from pydantic import Field

from agents.dp import METRICS as DP_METRICS
from agents.dp import (
    DPConfig,
    Solution,
    Stopwatch,
    checkpoint,
    greedy,
    load_mdp,
    report,
    resume_point,
)
from agents.mdp import TabularMDP, TorchMDP, epsilon_optimal_threshold, precision_floor
from runctx import RunContext


class Config(DPConfig):
    evaluation: Literal["exact", "iterative"] = Field(
        "exact", description="Policy evaluation by a sparse linear solve (exact) or by backups."
    )
    max_iterations: int = Field(1_000, gt=0, description="Upper bound on improvement steps.")
    checkpoint_every: int = Field(
        10, gt=0, description="Improvement steps between checkpoints (and at the end)."
    )
    max_eval_sweeps: int = Field(
        10_000, gt=0, description="Upper bound on backups per iterative evaluation."
    )


# What a run logs (see the registry).
METRICS = (*DP_METRICS, "solver/bellman_residual", "solver/policy_changes")


def evaluate_exact(mdp: TabularMDP, policy: np.ndarray, gamma: float) -> np.ndarray:
    """Solve (I - gamma P_pi) V = R_pi, with P_pi (S, S) the rows of P the policy picks."""
    S = mdp.n_states
    P_pi = mdp.P[policy * S + np.arange(S)]
    A = sp.identity(S, format="csc") - gamma * P_pi.tocsc()
    return np.asarray(spla.spsolve(A, mdp.R[policy, np.arange(S)]))


def evaluate_iterative(
    model: TorchMDP,
    policy: torch.Tensor,
    V: torch.Tensor,
    gamma: float,
    threshold: float,
    max_sweeps: int,
) -> torch.Tensor:
    """Backups under pi, V <- R_pi + gamma P_pi V, until the change is below the threshold."""
    index = policy.unsqueeze(0)  # (1, S): picks Q(s, pi(s)) out of the (A, S) backup
    for _ in range(max_sweeps):
        V_next = model.q_values(V, gamma).gather(0, index).squeeze(0)
        delta = float((V_next - V).abs().max())
        V = V_next
        if delta < threshold or delta <= precision_floor(V):
            break
    return V


def solve(
    mdp: TabularMDP,
    model: TorchMDP,
    gamma: float,
    tol: float,
    evaluation: Literal["exact", "iterative"] = "exact",
    max_iterations: int = 1_000,
    max_eval_sweeps: int = 10_000,
    on_iteration: Callable[[int, float, int], None] = lambda it, residual, changes: None,
    should_stop: Callable[[], bool] = lambda: False,
    start: tuple[torch.Tensor, torch.Tensor, list[float]] | None = None,
    on_checkpoint: Callable[[torch.Tensor, torch.Tensor, list[float]], None] | None = None,
    checkpoint_every: int = 0,
) -> Solution:
    """Evaluate the policy, improve it greedily, until no state changes its action. `start`:
    (V, policy, residuals) of the iterations done already (a resumed run)."""
    threshold = epsilon_optimal_threshold(tol, gamma)
    device, dtype = model.R.device, model.R.dtype
    policy = greedy(model.R.view(mdp.n_actions, mdp.n_states))  # start greedy in the reward
    V = torch.zeros(mdp.n_states, dtype=dtype, device=device)
    residuals: list[float] = []
    if start is not None:
        V, policy, residuals = start[0].to(device, dtype), start[1].to(device), list(start[2])
    converged = False
    for it in range(len(residuals) + 1, max_iterations + 1):
        if evaluation == "exact":
            V = torch.from_numpy(evaluate_exact(mdp, policy.cpu().numpy(), gamma)).to(device, dtype)
        else:
            V = evaluate_iterative(model, policy, V, gamma, threshold, max_eval_sweeps)
        Q = model.q_values(V, gamma)  # (A, S)
        best = Q.amax(dim=0)
        residual = float((best - V).abs().max())  # ||T V_pi - V_pi||_inf
        # Keep the current action unless another is strictly better (beyond rounding noise):
        # switching between equally good actions would never terminate.
        improves = best > Q.gather(0, policy.unsqueeze(0)).squeeze(0) + precision_floor(V)
        changes = int(improves.sum())
        policy = torch.where(improves, greedy(Q), policy)
        residuals.append(residual)
        on_iteration(it, residual, changes)
        if changes == 0:
            converged = True
            break
        if should_stop():
            break
        if on_checkpoint is not None and it % checkpoint_every == 0:
            on_checkpoint(V, policy, residuals)
    return Solution(V, policy, residuals, threshold, converged)


def train(config: Config, ctx: RunContext) -> None:
    mdp, model = load_mdp(ctx, config.dtype)
    clock = Stopwatch(ctx.device)
    weights, residuals = resume_point(
        ctx,
        {
            "V": torch.zeros(mdp.n_states, dtype=model.R.dtype, device=model.R.device),
            "policy": greedy(model.R.view(mdp.n_actions, mdp.n_states)),
        },
    )
    solution = solve(
        mdp,
        model,
        config.gamma,
        config.tol,
        config.evaluation,
        config.max_iterations,
        config.max_eval_sweeps,
        on_iteration=lambda it, r, n: ctx.log_metrics(
            {"solver/bellman_residual": r, "solver/policy_changes": n}, step=it
        ),
        should_stop=ctx.should_stop,
        start=(weights["V"], weights["policy"], residuals),
        on_checkpoint=lambda V, policy, res: checkpoint(ctx, V, policy, res),
        checkpoint_every=config.checkpoint_every,
    )
    report(ctx, config, mdp, solution, clock.seconds(), "Policy iteration")
