"""SAC: the tanh-squashed log-probability, solving a continuous bandit, refusing discrete envs."""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents import sac
from agents.envs import EnvSpec
from runctx import RunContext

from .test_ppo import ContinuousBandit  # noqa: F401  (registers rlgen-test/ContinuousBandit-v0)


def test_the_squashed_log_probability_is_the_change_of_variables() -> None:
    """log p_A(a) = log p_U(u) - log |da/du| for a = tanh(u) s + c, against a numerical
    derivative, and the density integrates to 1 over the action range."""
    mean, log_std = torch.tensor([[0.3]]), torch.tensor([[-0.2]])
    scale, center = torch.tensor([2.0]), 0.5
    u = torch.linspace(-3, 3, 13).reshape(-1, 1).double()
    got = sac.squashed_log_prob(u, mean.double(), log_std.double(), scale.double())
    normal = torch.distributions.Normal(mean.double(), log_std.double().exp())
    h = 1e-6
    da_du = ((torch.tanh(u + h) - torch.tanh(u - h)) / (2 * h)) * 2.0
    expected = (normal.log_prob(u) - torch.log(da_du)).squeeze(1)
    assert torch.allclose(got, expected, atol=1e-6)
    # Integrate p_A over a in (c - s, c + s): u = atanh((a - c) / s).
    a = torch.linspace(center - 2.0 + 1e-6, center + 2.0 - 1e-6, 200_001).double()
    ua = torch.atanh((a - center) / 2.0).reshape(-1, 1)
    density = sac.squashed_log_prob(ua, mean.double(), log_std.double(), scale.double()).exp()
    assert math.isclose(float(torch.trapezoid(density, a)), 1.0, rel_tol=1e-3)


def test_sac_solves_a_continuous_bandit(tmp_path: Path) -> None:
    config = sac.Config(
        total_timesteps=1_500,
        learning_starts=200,
        batch_size=64,
        hidden_sizes=[32, 32],
        policy_lr=3e-3,
        q_lr=3e-3,
        eval_every=500,
        eval_episodes=4,
    )
    ctx = RunContext.in_memory(
        seed=0, workdir=tmp_path, env=EnvSpec(id="rlgen-test/ContinuousBandit-v0")
    )
    sac.train(config, ctx)
    ctx.close()
    m = ctx.writer.metrics  # type: ignore[attr-defined]
    assert m["eval/return_mean"][-1][1] > -0.01  # the deterministic action within 0.1 of 1
    assert np.isfinite([v for _, v in m["losses/qf1_loss"]]).all()
    assert m["losses/alpha"][-1][1] < 0.2  # tuned down from its start as the policy sharpens


def test_sac_refuses_discrete_actions_and_unbounded_ones() -> None:
    assert sac.check_env(gym.make("Pendulum-v1")) is None
    assert "continuous actions" in str(sac.check_env(gym.make("CartPole-v1")))
    unbounded = gym.make("Pendulum-v1")
    unbounded.action_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    assert "infinite" in str(sac.check_env(unbounded))


@pytest.mark.slow
def test_sac_swings_up_the_pendulum(tmp_path: Path) -> None:
    """rlgen's Pendulum example (experiments/sac_pendulum.yaml): a greedy return above -200
    within its 20k-step budget."""
    from service.spec import load_spec

    from .conftest import ROOT

    spec = load_spec(ROOT / "experiments" / "sac_pendulum.yaml", ["params.stop_at_return=-200"])
    ctx = RunContext.in_memory(seed=4, workdir=tmp_path, env=spec.env)  # type: ignore[attr-defined]
    sac.train(spec.params, ctx)  # type: ignore[arg-type]
    ctx.close()
    m = ctx.writer.metrics  # type: ignore[attr-defined]
    assert max(v for _, v in m["eval/return_mean"]) > -200
    assert m["losses/alpha"][-1][1] < 0.2  # tuned down as the policy sharpened
