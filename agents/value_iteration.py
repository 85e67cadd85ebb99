"""Value iteration: repeated Bellman optimality backups on a tabular MDP (Bellman 1957).

    V_{k+1}(s) = max_a [ R(s, a) + gamma * sum_s' P(s' | s, a) V_k(s') ]

Each sweep is one sparse matrix-vector product over all (action, state) rows (see `agents.mdp`), on
CPU or GPU. The loop stops once the residual ||V_{k+1} - V_k||_inf falls below
epsilon (1 - gamma) / (2 gamma), which guarantees the greedy policy is epsilon-optimal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from pydantic import Field

from agents.dp import METRICS as DP_METRICS
from agents.dp import DPConfig, Solution, Stopwatch, greedy, load_mdp, report
from agents.mdp import TorchMDP, epsilon_optimal_threshold, precision_floor
from runctx import RunContext

log = logging.getLogger(__name__)


class Config(DPConfig):
    max_iterations: int = Field(
        100_000,
        gt=0,
        description="Upper bound on Bellman sweeps (a budget; reaching it is logged).",
    )


METRICS = (*DP_METRICS, "solver/bellman_residual")  # what a run logs (see the registry)


def solve(
    model: TorchMDP,
    gamma: float,
    tol: float,
    max_iterations: int,
    on_sweep: Callable[[int, float], None] = lambda it, residual: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Solution:
    threshold = epsilon_optimal_threshold(tol, gamma)
    # Buffers reused by every sweep: V and V_next (S,) swap roles, Q is (A*S,).
    V, V_next, diff = (torch.zeros_like(model.R[: model.n_states]) for _ in range(3))
    Q = torch.empty_like(model.R)
    residuals: list[float] = []
    converged = False
    for it in range(1, max_iterations + 1):
        torch.amax(model.q_values(V, gamma, out=Q), dim=0, out=V_next)  # (A, S) -> (S,)
        residual = float(torch.sub(V_next, V, out=diff).abs_().max())
        V, V_next = V_next, V
        residuals.append(residual)
        on_sweep(it, residual)
        if residual < threshold:
            converged = True
            break
        if residual <= precision_floor(V):
            # The threshold is below what this dtype can resolve: the values no longer change.
            log.warning(
                "residual %.3g hit the precision floor above the threshold %.3g",
                residual,
                threshold,
            )
            converged = True
            break
        if should_stop():
            break
    policy = greedy(model.q_values(V, gamma))  # greedy with respect to V_{k+1}, as the bound needs
    if not converged:
        log.warning(
            "value iteration stopped after %d sweeps, residual %.3g > %.3g",
            len(residuals),
            residuals[-1],
            threshold,
        )
    return Solution(V, policy, residuals, threshold, converged)


def train(config: Config, ctx: RunContext) -> None:
    mdp, model = load_mdp(ctx, config.dtype)
    clock = Stopwatch(ctx.device)
    solution = solve(
        model,
        config.gamma,
        config.tol,
        config.max_iterations,
        on_sweep=lambda it, r: ctx.log_metrics({"solver/bellman_residual": r}, step=it),
        should_stop=ctx.should_stop,
    )
    report(ctx, config, mdp, solution, clock.seconds(), "Value iteration")
