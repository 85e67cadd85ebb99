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
    start: tuple[torch.Tensor, list[float]] | None = None,
    on_checkpoint: Callable[[torch.Tensor, list[float]], None] | None = None,
    checkpoint_every: int = 0,
) -> Solution:
    """Sweeps V <- max_a [R_a + gamma P_a V] until the residual is below the threshold of
    epsilon-optimality. `start`: (V, residuals) of the sweeps done already (a resumed run)."""
    threshold = epsilon_optimal_threshold(tol, gamma)
    # Buffers reused by every sweep: V and V_next (S,) swap roles, Q is (A*S,).
    V, V_next, diff = (torch.zeros_like(model.R[: model.n_states]) for _ in range(3))
    Q = torch.empty_like(model.R)
    residuals: list[float] = []
    if start is not None:
        V.copy_(start[0])
        residuals = list(start[1])
    converged = False
    for it in range(len(residuals) + 1, max_iterations + 1):
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
        if on_checkpoint is not None and it % checkpoint_every == 0:
            on_checkpoint(V, residuals)
    policy = greedy(model.q_values(V, gamma))  # greedy with respect to V_{k+1}, as the bound needs
    if not converged and residuals:
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
    weights, residuals = resume_point(ctx, {"V": torch.zeros_like(model.R[: model.n_states])})
    solution = solve(
        model,
        config.gamma,
        config.tol,
        config.max_iterations,
        on_sweep=lambda it, r: ctx.log_metrics({"solver/bellman_residual": r}, step=it),
        should_stop=ctx.should_stop,
        start=(weights["V"], residuals),
        on_checkpoint=lambda V, res: checkpoint(
            ctx, V, greedy(model.q_values(V, config.gamma)), res
        ),
        checkpoint_every=config.checkpoint_every,
    )
    report(ctx, config, mdp, solution, clock.seconds(), "Value iteration")
