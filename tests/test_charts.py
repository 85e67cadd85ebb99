"""Metrics that chart well in the MLflow UI.

MLflow's chart view draws a metric as a line when a run has it at a step >= 1, and as bars (one
per run) when it has it only at step 0. So every metric a run logs is either a curve of at least
two points at steps >= 1, or a one-off result at step 0 (`RunContext.log_summary`): never a
one-dot line chart. And no metric repeats another exactly (CartPole's lengths are its returns).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agents import dqn
from agents.envs import EnvSpec
from agents.evaluation import length_metric
from runctx import InMemoryWriter, RunContext, scheduled_once
from service.registry import ALGORITHMS

from .test_resume import CASES

# The resume cases, with the one-off results they leave off switched on, and two epochs for
# every phase (a phase of one epoch draws a one-point curve whatever is logged).
OVERRIDES = {
    "rbm": {"probe": True, "ais": {"enabled": True, "every": 0, "runs": 4, "temperatures": 50}},
    "autoencoder": {"probe": True, "pretrain_epochs": 2},
    "dbn": {"pretraining": {"epochs": 2}},
    "vae": {"iwae_every": 0},
}


def shapes(metrics: dict[str, list[tuple[int, float]]]) -> dict[str, str]:
    """Each metric's chart: "bars" (step 0 only), "line" (>= 2 points at steps >= 1) or what
    is wrong with it."""
    out = {}
    for key, points in metrics.items():
        steps = [s for s, _ in points]
        if steps == [0]:
            out[key] = "bars"
        elif 0 in steps:
            out[key] = f"a curve with a point at step 0 among {steps[:5]}"
        elif len(steps) >= 2:
            out[key] = "line"
        else:
            out[key] = f"one dot at step {steps}"
    return out


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_metric_is_a_line_or_a_one_off_result(algorithm: str, tmp_path: Path) -> None:
    env, params, _ = CASES[algorithm]
    params = params | OVERRIDES.get(algorithm, {})
    algo = ALGORITHMS[algorithm]
    torch.set_num_threads(1)
    ctx = RunContext(seed=0, writer=InMemoryWriter(), workdir=tmp_path, env=env)
    ctx.timer.start()
    algo.train(algo.config.model_validate(params), ctx)
    ctx.timer.stop()
    ctx.close()
    got = shapes(ctx.writer.metrics)  # type: ignore[attr-defined]
    wrong = {k: v for k, v in got.items() if v not in ("bars", "line")}
    assert not wrong, wrong
    expected_bars = {
        "value_iteration": {"eval/return_mean", "solver/iterations", "solver/converged"},
        "policy_iteration": {"eval/return_mean", "solver/iterations"},
        "rbm": {"eval/probe_accuracy", "eval/ais_loglik"},
        "autoencoder": {"eval/probe_accuracy"},
        "vae": {"eval/nll_iwae"},
    }.get(algorithm, set())
    assert {k for k, v in got.items() if v == "bars"} >= expected_bars


def test_a_score_due_every_n_epochs_is_a_curve_only_when_it_comes_twice() -> None:
    assert scheduled_once(0, 10)  # at the end only
    assert scheduled_once(5, 5) and scheduled_once(8, 5)
    assert not scheduled_once(2, 3)  # epochs 2 and 3
    assert not scheduled_once(1, 2)


def test_lengths_are_logged_only_where_they_differ_from_returns() -> None:
    assert length_metric("eval/length_mean", [10.0, 20.0], [10, 20]) == {}
    assert length_metric("eval/length_mean", [-10.0, -20.0], [10, 20]) == {"eval/length_mean": 15.0}
    assert length_metric("charts/episodic_length", 0.0, 7) == {"charts/episodic_length": 7.0}


def test_dqn_logs_lengths_on_an_env_that_does_not_pay_one_per_step(tmp_path: Path) -> None:
    config = dqn.Config(
        total_timesteps=1_200,
        learning_starts=200,
        train_freq=50,
        gradient_steps=2,
        hidden_sizes=[16],
        eval_every=600,
        eval_episodes=2,
        eval_max_steps=200,
    )
    ctx = RunContext.in_memory(seed=0, workdir=tmp_path, env=EnvSpec(id="MountainCar-v0"))
    ctx.timer.start()
    dqn.train(config, ctx)
    ctx.close()
    m = ctx.writer.metrics  # type: ignore[attr-defined]
    # MountainCar pays -1 a step: the return is minus the length, a different chart.
    assert [v for _, v in m["charts/episodic_length"]] == [
        -v for _, v in m["charts/episodic_return"]
    ]
    assert [v for _, v in m["eval/length_mean"]] == [-v for _, v in m["eval/return_mean"]]
