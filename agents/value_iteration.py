"""Value iteration: repeated Bellman optimality backups on a tabular MDP (Bellman 1957).

    V_{k+1}(s) = max_a [ R(s, a) + gamma * sum_s' P(s' | s, a) V_k(s') ]

Each sweep is one sparse matrix-vector product over all (action, state) rows (see `agents.mdp`), on
CPU or GPU. The loop stops once the residual ||V_{k+1} - V_k||_inf falls below
epsilon (1 - gamma) / (2 gamma), which guarantees the greedy policy is epsilon-optimal.
"""

from __future__ import annotations

import torch
from pydantic import Field

from agents.dp import DPConfig, Stopwatch, greedy, load_mdp, report
from agents.mdp import epsilon_optimal_threshold, precision_floor
from service.context import RunContext


class Config(DPConfig):
    max_iterations: int = Field(
        100_000, gt=0, description="Upper bound on Bellman sweeps (a budget; reaching it is logged)."
    )


def train(config: Config, ctx: RunContext) -> None:
    mdp, model = load_mdp(ctx, config.dtype)
    gamma = config.gamma
    threshold = epsilon_optimal_threshold(config.tol, gamma)

    clock = Stopwatch(ctx.device)
    V = torch.zeros(mdp.n_states, dtype=model.R.dtype, device=ctx.device)  # (S,)
    residuals: list[float] = []
    converged = False
    for it in range(1, config.max_iterations + 1):
        V_next = model.q_values(V, gamma).amax(dim=0)  # (A, S) -> (S,)
        residual = float((V_next - V).abs().max())
        V = V_next
        residuals.append(residual)
        ctx.log_metrics({"solver/bellman_residual": residual}, step=it)
        if residual < threshold:
            converged = True
            break
        if residual <= precision_floor(V):
            # The threshold is below what this dtype can resolve: the values no longer change.
            ctx.log.warning("residual %.3g hit the %s precision floor above the threshold %.3g",
                            residual, config.dtype, threshold)
            converged = True
            break
        if ctx.should_stop():
            break
    policy = greedy(model.q_values(V, gamma))  # greedy with respect to V_{k+1}, as the bound needs
    solve_s = clock.seconds()
    if not converged:
        ctx.log.warning("value iteration stopped after %d sweeps, residual %.3g > %.3g",
                        len(residuals), residuals[-1], threshold)
    report(ctx, config, mdp, V, policy, residuals, threshold, solve_s, converged, "Value iteration")
