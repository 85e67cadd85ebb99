"""PPO: the maths (GAE, the clipped surrogate), learning a continuous bandit and CartPole."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents import ppo
from agents.envs import EnvSpec
from runctx import RunContext
from service.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "experiments"


def test_gae_on_a_hand_computed_sequence_with_truncation_and_termination() -> None:
    """Two envs, three steps, gamma 0.9, lambda 0.5. Env 0's episode is cut by a time limit at
    step 1 (its reward holds gamma V(final obs) = 0.9 * 2), env 1's terminates at step 1."""
    gamma, lam = 0.9, 0.5
    rewards = np.array([[1.0, 1.0], [1.0 + gamma * 2.0, 1.0], [1.0, 1.0]])
    values = np.array([[0.5, 0.5], [0.6, 0.6], [0.7, 0.7]])
    dones = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    last = np.array([0.8, 0.8])
    adv = ppo.gae(rewards, values, dones, last, gamma, lam)
    # t=2: 1 + 0.9 * 0.8 - 0.7 = 1.02 in both.
    # t=1: no bootstrap across the end: env 0, 2.8 - 0.6 = 2.2; env 1, 1 - 0.6 = 0.4.
    # t=0: delta 1 + 0.9 * 0.6 - 0.5 = 1.04, plus 0.9 * 0.5 * A_1.
    expected = np.array([[1.04 + 0.45 * 2.2, 1.04 + 0.45 * 0.4], [2.2, 0.4], [1.02, 1.02]])
    assert np.allclose(adv, expected)


@pytest.mark.parametrize(
    ("ratio", "advantage", "moves"),
    [
        (1.5, 1.0, False),  # above 1 + eps, and a larger ratio would only help: clipped
        (0.5, -1.0, False),  # below 1 - eps, and a smaller ratio would only help: clipped
        (1.1, 1.0, True),  # inside the range
        (1.5, -1.0, True),  # outside, but in the direction the advantage punishes: not clipped
        (0.5, 1.0, True),
    ],
)
def test_the_clipped_objective_has_no_gradient_outside_the_clip_range(
    ratio: float, advantage: float, moves: bool
) -> None:
    new = torch.tensor([float(np.log(ratio))], requires_grad=True)
    loss = ppo.clipped_surrogate(new, torch.zeros(1), torch.tensor([advantage]), eps=0.2)
    loss.backward()
    assert new.grad is not None
    assert (float(new.grad.abs()) > 0) == moves


@pytest.mark.parametrize(
    "action_space", [gym.spaces.Box(-1.0, 1.0, (3,), np.float32), gym.spaces.Discrete(4)]
)
def test_numpy_acting_is_the_torch_networks_forward_pass(action_space: gym.Space) -> None:
    """The rollout's NumPy network reads the parameters' memory: after optimizer steps and a
    checkpoint load it computes what the torch network computes; the draws follow the policy's
    distribution."""
    obs_space = gym.spaces.Box(-1.0, 1.0, (5,), np.float32)
    agent = ppo.ActorCritic(obs_space, action_space, [32, 16], torch.Generator().manual_seed(0))
    numpy_net = ppo.NumpyActorCritic(agent)
    optimizer = torch.optim.Adam(agent.parameters(), lr=0.05, fused=True)
    x = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)

    def check() -> None:
        with torch.no_grad():
            out, value = agent(torch.as_tensor(x))
        np_out, np_value = numpy_net(x)
        assert np.allclose(np_out, out.numpy(), atol=1e-5)
        assert np.allclose(np_value, value.numpy(), atol=1e-5)

    for _ in range(3):  # in-place optimizer steps that move every parameter
        out, value = agent(torch.as_tensor(x))
        loss = out.pow(2).sum() + value.sum()
        if agent.log_std is not None:
            loss = loss + agent.log_std.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        check()
    other = ppo.ActorCritic(obs_space, action_space, [32, 16], torch.Generator().manual_seed(7))
    agent.load_state_dict(other.state_dict())  # as a checkpoint's restore does
    check()

    # Draws: 40,000 actions for one observation.
    one = np.repeat(x[:1], 40_000, axis=0)
    out, _ = numpy_net(one)
    log_std = None if agent.log_std is None else agent.log_std.detach().numpy()
    actions = ppo.draw_actions(out, log_std, np.random.default_rng(0))
    if log_std is not None:
        z = (actions - out) / np.exp(log_std)
        assert np.allclose(z.mean(0), 0.0, atol=0.03) and np.allclose(z.std(0), 1.0, atol=0.03)
    else:
        probs = torch.softmax(torch.as_tensor(out[0]), -1).numpy()
        counts = np.bincount(actions, minlength=action_space.n) / len(actions)  # type: ignore[attr-defined]
        assert np.allclose(counts, probs, atol=0.01)


def test_numpy_acting_is_for_float32_mlps_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    mlp = ppo.ActorCritic(space, gym.spaces.Discrete(2), [8], torch.Generator())
    pixels = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    cnn = ppo.ActorCritic(pixels, gym.spaces.Discrete(2), [8], torch.Generator())
    assert ppo.NumpyActorCritic.applies(mlp, cpu, "fp32", compiled=False)
    assert not ppo.NumpyActorCritic.applies(mlp, cpu, "bf16-mixed", compiled=False)
    assert not ppo.NumpyActorCritic.applies(mlp, cpu, "fp32", compiled=True)
    assert not ppo.NumpyActorCritic.applies(mlp, torch.device("cuda"), "fp32", compiled=False)
    assert not ppo.NumpyActorCritic.applies(cnn, cpu, "fp32", compiled=False)


class ContinuousBandit(gym.Env):  # type: ignore[type-arg]
    """One-step episodes; the reward is -(a - 1)^2 for an action a in [-2, 2]."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)

    def reset(self, *, seed: int | None = None, options: object = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(1, np.float32), -float((action[0] - 1.0) ** 2), True, False, {}


gym.register("rlgen-test/ContinuousBandit-v0", entry_point=ContinuousBandit)


def test_ppo_solves_a_continuous_bandit(tmp_path: Path) -> None:
    config = ppo.Config(
        total_timesteps=20_000,
        num_envs=8,
        num_steps=16,
        learning_rate=3e-3,
        ent_coef=0.0,
        hidden_sizes=[16],
        eval_every=5_000,
        eval_episodes=4,
    )
    ctx = RunContext.in_memory(
        seed=0, workdir=tmp_path, env=EnvSpec(id="rlgen-test/ContinuousBandit-v0")
    )
    ppo.train(config, ctx)
    ctx.close()
    evals = [v for _, v in ctx.writer.metrics["eval/return_mean"]]  # type: ignore[attr-defined]
    assert evals[-1] > -0.01  # the mean action within 0.1 of the optimum 1
    # A deterministic policy on a constant observation: every evaluation episode is the same.
    assert ctx.writer.metrics["eval/return_std"][-1][1] == 0.0  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize("settings", ["rl-zoo3", "example"])
def test_ppo_solves_cartpole_and_logs_its_metrics(settings: str, tmp_path: Path) -> None:
    """RL-Zoo3's CartPole settings and budget (100k steps), and the example's (its 10 epochs at
    lr 5e-3), reach a greedy return of 475."""
    if settings == "example":
        spec = load_spec(EXAMPLES / "ppo_cartpole.yaml", ["params.stop_at_return=null"])
        config = ppo.Config.model_validate(spec.params.model_dump())  # type: ignore[attr-defined]
    else:
        config = ppo.Config(
            total_timesteps=100_000,
            num_envs=8,
            num_steps=32,
            gae_lambda=0.8,
            gamma=0.98,
            update_epochs=20,
            num_minibatches=1,
            learning_rate=1e-3,
            ent_coef=0.0,
            eval_every=10_000,
        )
    ctx = RunContext.in_memory(seed=0, workdir=tmp_path, env=EnvSpec(id="CartPole-v1"))
    ppo.train(config, ctx)
    ctx.close()
    m = ctx.writer.metrics  # type: ignore[attr-defined]
    for key in ("losses/approx_kl", "losses/clipfrac", "losses/entropy", "charts/episodic_return"):
        assert len(m[key]) >= 2, key
    assert max(v for _, v in m["eval/return_mean"]) >= 475
    assert "charts/episodic_length" not in m  # CartPole: the length is the return


def test_ppo_refuses_what_it_cannot_act_in() -> None:
    assert ppo.check_env(gym.make("CartPole-v1")) is None
    assert ppo.check_env(gym.make("Pendulum-v1")) is None
    assert "vector observations" in str(ppo.check_env(gym.make("Blackjack-v1")))  # a Tuple
    binary = SimpleNamespace(
        action_space=gym.spaces.MultiBinary(3), observation_space=gym.spaces.Box(0, 1, (2,))
    )
    assert "Discrete or Box" in str(ppo.check_env(binary))  # type: ignore[arg-type]


def test_ppo_sees_images_through_one_shared_cnn() -> None:
    """Atari stacks get the Nature CNN, MinAtar grids MinAtar's CNN, as one torso that the
    actor and critic heads share (one pass gives both); vectors keep separate MLPs."""
    from agents.nets import MinAtarCNN, NatureCNN

    g = torch.Generator().manual_seed(0)
    atari = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    agent = ppo.ActorCritic(atari, gym.spaces.Discrete(6), [64], g)
    assert isinstance(agent.torso[0], NatureCNN)  # type: ignore[index]
    obs = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8, generator=g)
    out, value = agent(obs)
    assert out.shape == (3, 6) and value.shape == (3,) and out.dtype == torch.float32
    assert torch.equal(value, agent.value(obs)) and torch.equal(out, agent.policy(obs))
    torso = {id(p) for p in agent.torso.parameters()}
    assert len(torso) == len(list(agent.torso.parameters())) > 0
    # Both heads' gradients reach the one torso.
    (out.sum() + value.sum()).backward()
    assert all(p.grad is not None for p in agent.torso.parameters())
    minatar = gym.spaces.Box(0, 1, (10, 10, 4), bool)
    small = ppo.ActorCritic(minatar, gym.spaces.Discrete(3), [64], g)
    assert isinstance(small.torso[0], MinAtarCNN)  # type: ignore[index]
    vector = ppo.ActorCritic(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), [8], g)
    assert isinstance(vector.torso, torch.nn.Identity)
    assert ppo.check_env(gym.make("CartPole-v1")) is None


def test_ppo_runs_from_pixels_and_refuses_normalising_them(tmp_path: Path) -> None:
    env = EnvSpec(id="MinAtar/Breakout-v1")
    config = ppo.Config(
        total_timesteps=1_024, num_envs=4, num_steps=64, eval_every=512, eval_episodes=2
    )
    ctx = RunContext.in_memory(seed=0, workdir=tmp_path / "a", env=env)
    ppo.train(config, ctx)
    ctx.close()
    m = ctx.writer.metrics  # type: ignore[attr-defined]
    assert len(m["losses/value_loss"]) >= 2
    assert all(np.isfinite(v) for _, v in m["losses/policy_loss"])
    bad = config.model_copy(update={"normalize_obs": True})
    with pytest.raises(ValueError, match="normalize_obs is for vector observations"):
        ppo.train(bad, RunContext.in_memory(seed=0, workdir=tmp_path / "b", env=env))


def test_the_clip_range_anneals_with_the_step_size(tmp_path: Path) -> None:
    """`anneal_clip`: epsilon falls linearly to 0 over the budget, as SB3's linear schedule."""
    budget = 4_000

    def clips(anneal: bool) -> list[tuple[int, float]]:
        config = ppo.Config(
            total_timesteps=budget,
            num_envs=4,
            num_steps=64,
            anneal_clip=anneal,
            clip_coef=0.3,
            hidden_sizes=[8],
            eval_every=budget,
            eval_episodes=1,
        )
        ctx = RunContext.in_memory(seed=0, workdir=tmp_path, env=EnvSpec(id="CartPole-v1"))
        ppo.train(config, ctx)
        ctx.close()
        return ctx.writer.metrics["charts/clip_coef"]  # type: ignore[attr-defined,no-any-return]

    annealed = clips(True)
    assert len(annealed) >= 10
    # Logged at the end of each update, with the epsilon its rollout started with.
    previous = [0] + [s for s, _ in annealed[:-1]]
    for (_, eps), start in zip(annealed, previous, strict=True):
        assert eps == pytest.approx(0.3 * (1 - start / budget))
    assert all(eps == 0.3 for _, eps in clips(False))
