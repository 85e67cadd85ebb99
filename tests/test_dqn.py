"""DQN: the maths on hand-built cases, the replay buffers, episode handling, checkpoints, learning."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents import dqn
from agents.envs import EnvSpec
from agents.replay import NStep, PrioritizedReplayBuffer, ReplayBuffer, SumTree, Transitions
from runctx import RunContext

GAMMA = 0.9


def obs(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32).reshape(len(values), 1)


# -- n-step returns ---------------------------------------------------------------------------
def push_episode(nstep: NStep, rewards: list[float], terminated_at_end: bool) -> list[Transitions]:
    """One env; states 0, 1, 2, ... with the given rewards; the last step ends the episode."""
    out = []
    T = len(rewards)
    for t, r in enumerate(rewards):
        last = t == T - 1
        out.append(
            nstep.push(
                obs(t),
                np.array([t % 2]),
                np.array([r]),
                obs(t + 1),
                np.array([last and terminated_at_end]),
                np.array([last]),
                np.array([True]),
            )
        )
    return out


def collect(parts: list[Transitions]) -> Transitions:
    return Transitions(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in Transitions.__dataclass_fields__)
    )


def test_n_step_targets_on_a_hand_built_trajectory() -> None:
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0]
    t = collect(push_episode(NStep(3, 1, GAMMA), rewards, terminated_at_end=True))
    # Starts 0, 1, 2 have full 3-step windows; 3 and 4 are flushed at the termination.
    assert t.obs[:, 0].tolist() == [0, 1, 2, 3, 4]
    expected_returns = [
        1 + GAMMA * 2 + GAMMA**2 * 3,
        2 + GAMMA * 3 + GAMMA**2 * 4,
        3 + GAMMA * 4 + GAMMA**2 * 5,
        4 + GAMMA * 5,
        5.0,
    ]
    np.testing.assert_allclose(t.returns, expected_returns, rtol=1e-6)
    # Bootstrap from the state n steps later, discounted gamma^n; nothing after the termination.
    assert t.next_obs[:, 0].tolist() == [3, 4, 5, 5, 5]
    np.testing.assert_allclose(t.discounts, [GAMMA**3, GAMMA**3, 0.0, 0.0, 0.0], rtol=1e-6)
    assert t.actions.tolist() == [0, 1, 0, 1, 0]


def test_truncation_bootstraps_and_termination_does_not() -> None:
    for n in (1, 3):
        truncated = collect(push_episode(NStep(n, 1, GAMMA), [1.0, 1.0, 1.0], False))
        terminated = collect(push_episode(NStep(n, 1, GAMMA), [1.0, 1.0, 1.0], True))
        np.testing.assert_allclose(truncated.returns, terminated.returns)
        # The last transition: truncated keeps gamma^k on Q(s_T), terminated zeroes it.
        assert truncated.discounts[-1] == pytest.approx(GAMMA)
        assert terminated.discounts[-1] == 0.0
        assert (truncated.discounts > 0).all()


def test_n_step_skips_invalid_steps_and_keeps_envs_apart() -> None:
    nstep = NStep(2, 2, GAMMA)
    a = np.array([0, 1])
    t1 = nstep.push(
        obs(0, 10),
        a,
        np.array([1.0, 10.0]),
        obs(1, 11),
        np.zeros(2, bool),
        np.zeros(2, bool),
        np.array([True, True]),
    )
    assert len(t1) == 0  # windows not full yet
    # Env 1's step is a reset step (invalid): it must not enter its window.
    t2 = nstep.push(
        obs(1, 99),
        a,
        np.array([2.0, 99.0]),
        obs(2, 12),
        np.zeros(2, bool),
        np.zeros(2, bool),
        np.array([True, False]),
    )
    assert t2.obs[:, 0].tolist() == [0]
    assert t2.returns.tolist() == pytest.approx([1 + GAMMA * 2])
    t3 = nstep.push(
        obs(2, 12),
        a,
        np.array([3.0, 20.0]),
        obs(3, 13),
        np.zeros(2, bool),
        np.zeros(2, bool),
        np.array([True, True]),
    )
    assert sorted(t3.obs[:, 0].tolist()) == [1, 10]
    assert sorted(t3.returns.tolist()) == pytest.approx(sorted([2 + GAMMA * 3, 10 + GAMMA * 20]))


def test_one_step_fast_path_matches_the_general_definition() -> None:
    t = collect(push_episode(NStep(1, 1, GAMMA), [1.0, 2.0, 3.0], True))
    assert t.returns.tolist() == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(t.discounts, [GAMMA, GAMMA, 0.0], rtol=1e-6)
    assert t.next_obs[:, 0].tolist() == [1, 2, 3]


# -- targets and network heads ------------------------------------------------------------------
def test_double_dqn_picks_the_online_argmax_and_evaluates_it_with_the_target() -> None:
    returns = torch.tensor([1.0, 0.0])
    discounts = torch.tensor([0.5, 0.0])
    next_q_target = torch.tensor([[10.0, 2.0, 4.0], [7.0, 8.0, 9.0]])
    next_q_online = torch.tensor([[0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    double = dqn.td_targets(returns, discounts, next_q_target, next_q_online)
    plain = dqn.td_targets(returns, discounts, next_q_target, None)
    # Online argmax of row 0 is action 1, worth 2 to the target net; plain DQN takes max = 10.
    assert double.tolist() == [1.0 + 0.5 * 2.0, 0.0]
    assert plain.tolist() == [1.0 + 0.5 * 10.0, 0.0]


def test_dueling_aggregation() -> None:
    net = dqn.QNetwork(3, 4, [5], dueling=True, generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    h = torch.relu(net.hidden[0](x))
    value, adv = net.value(h), net.head(h)  # type: ignore[misc]
    q = net(x)
    torch.testing.assert_close(q, value + adv - adv.mean(dim=1, keepdim=True))
    # Identifiable: the mean over actions of Q is the value stream.
    torch.testing.assert_close(q.mean(dim=1, keepdim=True), value)


def test_network_init_is_seeded_and_matches_the_default_scale() -> None:
    a = dqn.QNetwork(4, 2, [64, 64], False, torch.Generator().manual_seed(3))
    b = dqn.QNetwork(4, 2, [64, 64], False, torch.Generator().manual_seed(3))
    c = dqn.QNetwork(4, 2, [64, 64], False, torch.Generator().manual_seed(4))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    w = a.hidden[1].weight  # type: ignore[union-attr]
    assert w.abs().max() <= 1 / math.sqrt(64) + 1e-6  # kaiming_uniform(a=sqrt 5) bound


def test_polyak_and_hard_target_updates() -> None:
    online = torch.nn.Linear(2, 2)
    target = torch.nn.Linear(2, 2)
    before = target.weight.detach().clone()
    dqn.update_target(target, online, 0.25)
    torch.testing.assert_close(target.weight, 0.75 * before + 0.25 * online.weight.detach())
    dqn.update_target(target, online, 1.0)
    assert torch.equal(target.weight, online.weight)


# -- replay buffers -----------------------------------------------------------------------------
def transitions(start: int, k: int) -> Transitions:
    ids = np.arange(start, start + k, dtype=np.float32)
    return Transitions(
        ids[:, None], np.arange(k) % 2, ids, ids[:, None] + 0.5, np.full(k, 0.9, np.float32)
    )


def test_replay_buffer_wraps_around() -> None:
    buf = ReplayBuffer(
        5, (1,), torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    rows = buf.add(transitions(0, 3))
    assert rows.tolist() == [0, 1, 2] and buf.size == 3 and buf.pos == 3
    rows = buf.add(transitions(3, 4))  # 3, 4 fill the end; 5, 6 overwrite rows 0, 1
    assert rows.tolist() == [3, 4, 0, 1]
    assert buf.size == 5 and buf.pos == 2
    assert buf.returns.tolist() == [5, 6, 2, 3, 4]
    assert buf.next_obs[:, 0].tolist() == [5.5, 6.5, 2.5, 3.5, 4.5]
    buf.add(transitions(100, 12))  # more than the capacity: the newest five survive
    assert sorted(buf.returns.tolist()) == [107, 108, 109, 110, 111]
    batch = buf.sample(64)
    assert set(batch.returns.tolist()) <= {107.0, 108.0, 109.0, 110.0, 111.0}
    torch.testing.assert_close(batch.obs[:, 0], batch.returns)  # rows stay aligned


def test_replay_sampling_is_reproducible_from_the_generator() -> None:
    def draw(seed: int) -> list[float]:
        buf = ReplayBuffer(
            50, (1,), torch.float32, torch.device("cpu"), torch.Generator().manual_seed(seed)
        )
        buf.add(transitions(0, 50))
        return buf.sample(16).returns.tolist()

    assert draw(1) == draw(1) and draw(1) != draw(2)


def test_replay_state_round_trip() -> None:
    buf = ReplayBuffer(8, (1,), torch.float32, torch.device("cpu"), torch.Generator())
    buf.add(transitions(0, 11))
    other = ReplayBuffer(8, (1,), torch.float32, torch.device("cpu"), torch.Generator())
    other.load_state_dict(buf.state_dict())
    assert other.pos == buf.pos and other.size == buf.size
    assert torch.equal(other.returns, buf.returns) and torch.equal(other.obs, buf.obs)


def test_sum_tree_prefix_search_and_min() -> None:
    tree = SumTree(5, "sum")  # padded to 8 leaves
    mins = SumTree(5, "min")
    values = np.array([1.0, 0.0, 3.0, 2.0, 4.0])
    tree.update(np.arange(5), values)
    mins.update(np.arange(5), values)
    assert tree.root == 10.0 and mins.root == 0.0
    # Leaf i covers [sum(<i), sum(<=i)): 0:[0,1) 1:empty 2:[1,4) 3:[4,6) 4:[6,10)
    mass = np.array([0.0, 0.999, 1.0, 3.99, 4.0, 5.5, 6.0, 9.99])
    assert tree.find(mass).tolist() == [0, 0, 2, 2, 3, 3, 4, 4]
    tree.update(np.array([4, 4]), np.array([9.0, 1.0]))  # last write wins, parents follow
    assert tree.root == 7.0


def test_prioritized_sampling_probabilities_and_weights() -> None:
    alpha, beta = 0.5, 0.7
    buf = PrioritizedReplayBuffer(
        4,
        (1,),
        torch.float32,
        torch.device("cpu"),
        torch.Generator().manual_seed(0),
        alpha=alpha,
        eps=0.0,
    )
    buf.add(transitions(0, 4))
    td = torch.tensor([1.0, 4.0, 9.0, 16.0])
    buf.update_priorities(torch.arange(4), td)
    buf.beta = beta
    p = td.double().numpy() ** alpha  # 1, 2, 3, 4
    P = p / p.sum()
    counts = np.zeros(4)
    for _ in range(500):
        batch = buf.sample(32)
        counts += np.bincount(batch.indices.numpy(), minlength=4)
        # w_i = (N P(i))^-beta / max_j (N P(j))^-beta, the max belonging to the rarest item.
        expected = (4 * P[batch.indices.numpy()]) ** -beta / (4 * P.min()) ** -beta
        np.testing.assert_allclose(batch.weights.numpy(), expected, rtol=1e-5)  # type: ignore[union-attr]
    np.testing.assert_allclose(counts / counts.sum(), P, atol=0.01)
    # New transitions enter with the largest priority so far.
    buf.add(transitions(10, 1))
    assert buf.sums.nodes[buf.sums.capacity + 0] == pytest.approx(p.max())


# -- whole runs -----------------------------------------------------------------------------------
def small_config(**overrides: object) -> dqn.Config:
    base: dict[str, object] = {
        "total_timesteps": 1_200,
        "learning_starts": 200,
        "train_freq": 50,
        "gradient_steps": 10,
        "hidden_sizes": [16],
        "batch_size": 32,
        "buffer_size": 1_000,
        "eval_every": 500,
        "eval_episodes": 3,
        "checkpoint_every": 600,
        "log_every": 10,
    }
    return dqn.Config(**{**base, **overrides})


def bandit_config(**overrides: object) -> dqn.Config:
    """For one-step test envs whose every episode is a single choice."""
    base: dict[str, object] = {
        "gamma": 0.0,
        "learning_starts": 200,
        "train_freq": 20,
        "gradient_steps": 10,
        "hidden_sizes": [32],
        "exploration_fraction": 0.3,
    }
    return small_config(**{**base, **overrides})


@contextmanager
def registered(env_id: str, entry_point: type[gym.Env]) -> Iterator[str]:  # type: ignore[type-arg]
    gym.register(env_id, entry_point=entry_point)
    try:
        yield env_id
    finally:
        gym.registry.pop(env_id, None)


def run(config: dqn.Config, tmp: Path, seed: int = 0, env: str = "CartPole-v1") -> RunContext:
    ctx = RunContext.in_memory(seed=seed, workdir=tmp, env=EnvSpec(id=env))
    dqn.train(config, ctx)
    ctx.close()
    return ctx


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "double_dqn": True,
            "dueling": True,
            "n_step": 3,
            "prioritized_replay": True,
            "num_envs": 3,
        },
        {"tau": 0.05, "target_update_interval": 1, "loss": "mse", "max_grad_norm": None},
    ],
    ids=["plain", "rainbowish", "polyak-mse"],
)
def test_runs_log_the_named_metrics(options: dict[str, object], tmp_path: Path) -> None:
    ctx = run(small_config(**options), tmp_path)
    m = ctx.writer.metrics  # type: ignore[attr-defined]
    for key in (
        "charts/episodic_return",
        "charts/epsilon",
        "losses/td_loss",
        "losses/q_values",
        "time/sps",
        "eval/return_mean",
        "eval/return_std",
    ):
        assert m[key], key
    # Evaluations at the first timestep past each `eval_every` and at the end; with several envs
    # a batch of steps may overshoot by up to num_envs - 1.
    n = int(options.get("num_envs", 1))  # type: ignore[call-overload]
    steps = [s for s, _ in m["eval/return_mean"]]
    assert len(steps) == 3 and all(
        t <= s < t + n for s, t in zip(steps, [500, 1000, 1200], strict=True)
    )
    # CartPole pays 1 a step: every length equals its return, so lengths are not logged twice.
    assert "charts/episodic_length" not in m and "eval/length_mean" not in m
    assert all(math.isfinite(v) for _, v in m["losses/td_loss"])
    names = {p.name for p, _ in ctx.writer.artifacts}  # type: ignore[attr-defined]
    assert "learning_curve.png" in names and any(n.startswith("step_") for n in names)


def test_rmsprop_is_the_papers_centred_variant(tmp_path: Path) -> None:
    """`optimizer: rmsprop` trains with centred RMSprop at the DQN papers' settings and its state
    goes into checkpoints; it is not Adam under another name."""
    ctx = run(small_config(optimizer="rmsprop"), tmp_path)
    saved = ctx.checkpoints.latest()
    assert saved is not None
    opt = saved["optimizer"]
    group = opt["param_groups"][0]
    assert (group["alpha"], group["eps"], group["centered"]) == (0.95, 0.01, True)
    state = next(iter(opt["state"].values()))
    assert {"square_avg", "grad_avg"} <= set(state) and "exp_avg" not in state
    assert all(math.isfinite(v) for _, v in ctx.writer.metrics["losses/td_loss"])  # type: ignore[attr-defined]
    adam = run(small_config(), tmp_path / "adam")
    assert adam.writer.metrics["losses/td_loss"] != ctx.writer.metrics["losses/td_loss"]  # type: ignore[attr-defined]


def test_same_seed_same_run(tmp_path: Path) -> None:
    a = run(small_config(), tmp_path / "a").writer.metrics  # type: ignore[attr-defined]
    b = run(small_config(), tmp_path / "b").writer.metrics  # type: ignore[attr-defined]
    c = run(small_config(), tmp_path / "c", seed=1).writer.metrics  # type: ignore[attr-defined]
    assert a["losses/td_loss"] == b["losses/td_loss"]
    assert a["losses/td_loss"] != c["losses/td_loss"]


def test_timesteps_count_transitions_not_reset_steps(tmp_path: Path) -> None:
    """Next-step autoreset spends one env.step per episode on the reset; it is not a timestep."""
    config = small_config(num_envs=2, total_timesteps=600, learning_starts=10_000, eval_every=600)
    ctx = run(config, tmp_path)
    m = ctx.writer.metrics  # type: ignore[attr-defined]
    lengths = sum(v for _, v in m["charts/episodic_return"])  # CartPole: length = return
    last = m["eval/return_mean"][-1][0]
    assert 600 <= last <= 601  # two envs: the budget is met to within one batch
    assert lengths <= last  # every counted timestep belongs to an episode; no reset steps


def test_stop_at_return_ends_early(tmp_path: Path) -> None:
    ctx = run(small_config(stop_at_return=-1.0, total_timesteps=5_000), tmp_path)
    m = ctx.writer.metrics  # type: ignore[attr-defined]
    assert [s for s, _ in m["eval/return_mean"]] == [500]


def test_resume_from_checkpoint_continues_where_it_stopped(tmp_path: Path) -> None:
    config = small_config(total_timesteps=1_200, checkpoint_every=600, checkpoint_buffer=True)
    ctx = RunContext.in_memory(seed=0, workdir=tmp_path, env=EnvSpec(id="CartPole-v1"))
    original_save = ctx.checkpoints.save

    def save_then_stop(state: dict[str, object], step: int) -> Path:
        path = original_save(state, step)
        if step >= 600:
            ctx.request_stop()
        return path

    ctx.checkpoints.save = save_then_stop  # type: ignore[method-assign]
    dqn.train(config, ctx)
    ctx.close()
    first = ctx.writer.metrics  # type: ignore[attr-defined]
    stopped_at = max(s for s, _ in first["losses/td_loss"])
    assert stopped_at < 1_200
    saved = ctx.checkpoints.latest()
    assert saved is not None and saved["step"] >= 600 and "buffer" in saved

    resumed = RunContext.in_memory(seed=0, workdir=tmp_path, env=EnvSpec(id="CartPole-v1"))
    dqn.train(config, resumed)
    resumed.close()
    second = resumed.writer.metrics  # type: ignore[attr-defined]
    steps = [s for s, _ in second["losses/td_loss"]]
    assert min(steps) > saved["step"]  # no step logged twice
    assert max(s for s, _ in second["eval/return_mean"]) == 1_200
    final = resumed.checkpoints.latest()
    assert final is not None and final["updates"] > saved["updates"]


def test_refuses_envs_it_cannot_run_on() -> None:
    assert dqn.check_env(gym.make("CartPole-v1")) is None
    assert "discrete action" in (dqn.check_env(gym.make("Pendulum-v1")) or "")
    assert dqn.check_env(gym.make("FrozenLake-v1")) is None  # one-hot inside the network
    assert dqn.check_env(gym.make("Blackjack-v1")) is None  # a Tuple of Discretes, flattened
    text = gym.make("Blackjack-v1")
    text.observation_space = gym.spaces.Tuple([gym.spaces.Discrete(2), gym.spaces.Text(5)])
    assert "Tuple/Dict of them" in (dqn.check_env(text) or "")
    text.observation_space = gym.spaces.Dict({})
    assert "observation space" in (dqn.check_env(text) or "")


def test_config_rejects_inconsistent_fields() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        dqn.Config(batch_size=128, buffer_size=64)
    with pytest.raises(ValueError, match="exploration_final_eps"):
        dqn.Config(exploration_initial_eps=0.1, exploration_final_eps=0.5)


def test_cartpole_is_solved_within_budget(tmp_path: Path) -> None:
    """The example's settings solve CartPole (evaluation mean >= 475) on seed 0, in ~5-10 s."""
    from service.spec import load_spec

    from .conftest import ROOT

    spec = load_spec(ROOT / "experiments" / "dqn_cartpole.yaml")
    ctx = RunContext.in_memory(seed=0, workdir=tmp_path, env=spec.env)  # type: ignore[attr-defined]
    dqn.train(spec.params, ctx)  # type: ignore[attr-defined]
    ctx.close()
    evals = ctx.writer.metrics["eval/return_mean"]  # type: ignore[attr-defined]
    assert max(v for _, v in evals) >= 475
    assert evals[-1][0] <= 50_000


def test_observation_bounds_map_to_unit_range_and_travel_with_the_weights() -> None:
    config = dqn.Config(normalize_obs=True, hidden_sizes=[8])
    env = gym.make("MountainCar-v0")
    q = dqn.build_network(config, env, torch.Generator().manual_seed(0))
    low, high = env.observation_space.low, env.observation_space.high  # type: ignore[attr-defined]
    x = torch.tensor(np.stack([low, high, (low + high) / 2]))
    scaled = (x - q.obs_center) * q.obs_scale  # type: ignore[operator]
    torch.testing.assert_close(scaled, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]))
    # Infinite bounds (CartPole's velocities) pass through unchanged.
    cart = dqn.build_network(config, gym.make("CartPole-v1"))
    assert cart.obs_scale is not None and cart.obs_scale[1] == 1.0 and cart.obs_center[1] == 0.0  # type: ignore[index]
    # A checkpoint's state dict carries them, so `rlgen evaluate` acts as the trained net did.
    policy = dqn.load_policy(config, {"q": q.state_dict()}, env)
    obs = np.stack([low, high]).astype(np.float32)
    assert (policy(obs) == q(torch.from_numpy(obs)).argmax(1).numpy()).all()


def test_integer_observations_enter_as_concatenated_one_hot_codes() -> None:
    """Discrete(n, start) and MultiDiscrete(nvec, start): each component sets one input unit."""

    class Grid(gym.Env[np.ndarray, np.int64]):
        observation_space = gym.spaces.MultiDiscrete([3, 4], start=[1, -2])
        action_space = gym.spaces.Discrete(2)

    q = dqn.build_network(dqn.Config(hidden_sizes=[5]), Grid())
    assert q.in_dim == 7 and q.hidden[0].in_features == 7  # type: ignore[union-attr]
    obs = torch.tensor([[1, -2], [3, 1], [2, 0]], dtype=torch.float32)
    idx = obs.long() + q.onehot_shift  # type: ignore[operator]
    code = torch.zeros(3, 7).scatter_(1, idx, 1.0)
    expected = torch.tensor(
        [[1, 0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 1], [0, 1, 0, 0, 0, 1, 0]], dtype=torch.float32
    )
    torch.testing.assert_close(code, expected)
    w, b = q.hidden[0].weight, q.hidden[0].bias  # type: ignore[union-attr]
    h = torch.relu(expected @ w.T + b)
    torch.testing.assert_close(q(obs), h @ q.head.weight.T + q.head.bias)
    # Discrete(16): a batch of indices (B,) -> (B, 16); the policy of a checkpoint acts the same.
    env = gym.make("FrozenLake-v1")
    lake = dqn.build_network(dqn.Config(hidden_sizes=[8]), env, torch.Generator().manual_seed(0))
    states = np.arange(16)
    direct = lake.head(torch.relu(lake.hidden[0](torch.eye(16)))).argmax(1).numpy()  # type: ignore[operator]
    policy = dqn.load_policy(dqn.Config(hidden_sizes=[8]), {"q": lake.state_dict()}, env)
    assert (policy(states) == direct).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "fp16-mixed"])
def test_learns_a_deterministic_frozen_lake(precision: str, tmp_path: Path) -> None:
    """Integer observations end to end: buffer, one-hot network, evaluation, reaching the goal;
    in float32 and with mixed-precision forward passes (which run on the CPU too)."""
    # gamma 0.9: with 0.99 the values of states 1 and 6 steps from the goal differ by 5%, less
    # than the net's early errors, and the greedy path wanders (seeds 0-7 solve it either way).
    config = small_config(
        gamma=0.9,
        total_timesteps=10_000,
        learning_starts=500,
        train_freq=4,
        gradient_steps=1,
        target_update_interval=100,
        buffer_size=10_000,
        hidden_sizes=[32],
        learning_rate=1e-3,
        exploration_fraction=0.5,
        eval_every=1_000,
        eval_episodes=5,
        log_every=100,
        precision=precision,
    )
    ctx = RunContext.in_memory(
        seed=0, workdir=tmp_path, env=EnvSpec(id="FrozenLake-v1", kwargs={"is_slippery": False})
    )
    dqn.train(config, ctx)
    ctx.close()
    evals = [v for _, v in ctx.writer.metrics["eval/return_mean"]]  # type: ignore[attr-defined]
    assert evals[-3:] == [1.0, 1.0, 1.0]  # every evaluation episode reaches the goal, and stays
    state = ctx.checkpoints.latest()
    assert state is not None and state["q"]["onehot_shift"].tolist() == [0]
    assert ("scaler" in state) == (precision == "fp16-mixed")  # its loss scale resumes


class ShiftedBandit(gym.Env):  # type: ignore[type-arg]
    """One-step episodes; actions Discrete(3, start=-1), i.e. -1, 0, 1; only action 1 pays."""

    observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(3, start=-1)

    def reset(self, *, seed: int | None = None, options: object = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action: object) -> tuple[np.ndarray, float, bool, bool, dict]:
        assert self.action_space.contains(action), action
        return np.zeros(1, np.float32), float(action == 1), True, False, {}


def test_actions_of_a_discrete_space_with_a_start_offset(tmp_path: Path) -> None:
    """Network column i is action start + i: the env only ever gets actions of its space, the
    buffer column indices, and the greedy policy of a checkpoint picks the paying action."""
    with registered("RLGenTest/ShiftedBandit-v0", ShiftedBandit) as env_id:
        config = bandit_config(
            total_timesteps=600,
            learning_starts=100,
            train_freq=10,
            gradient_steps=10,
            hidden_sizes=[16],
            eval_every=300,
            checkpoint_every=300,
        )
        ctx = run(config, tmp_path, env=env_id)
        evals = [v for _, v in ctx.writer.metrics["eval/return_mean"]]  # type: ignore[attr-defined]
        assert evals[-1] == 1.0
        state = ctx.checkpoints.latest()
        assert state is not None
        policy = dqn.load_policy(config, state, gym.make(env_id))
        assert policy(np.zeros((2, 1), np.float32)).tolist() == [1, 1]


def test_evaluation_episodes_are_capped_in_envs_without_a_time_limit(tmp_path: Path) -> None:
    """CliffWalking has no time limit; an untrained greedy policy walks in circles."""
    config = small_config(total_timesteps=400, eval_every=200, eval_max_steps=50)
    ctx = RunContext.in_memory(seed=0, workdir=tmp_path, env=EnvSpec(id="CliffWalking-v1"))
    ctx.timer.start()
    dqn.train(config, ctx)
    ctx.close()
    metrics = ctx.writer.metrics  # type: ignore[attr-defined]
    lengths = [v for _, v in metrics["eval/length_mean"]]
    assert len(lengths) == 2 and max(lengths) <= 50
    assert metrics["time/train_s"][-1][1] > 0  # the final evaluation is not subtracted


# -- observation storage --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("space", "dtype"),
    [
        (gym.spaces.Box(0, 255, (84, 84, 4), np.uint8), torch.uint8),
        (gym.spaces.Box(-5, 5, (3,), np.int16), torch.int16),
        (gym.spaces.Box(0, 9, (2,), np.uint16), torch.int32),  # torch has no full uint16
        (gym.spaces.Box(0, 9, (2,), np.uint64), torch.float32),  # beyond int64
        (gym.spaces.Box(-1.0, 1.0, (4,), np.float64), torch.float32),
        (gym.spaces.Discrete(16), torch.uint8),
        (gym.spaces.Discrete(3, start=-1), torch.int8),
        (gym.spaces.Discrete(300), torch.int16),
        (gym.spaces.MultiDiscrete([2, 70_000]), torch.int32),
        (gym.spaces.MultiBinary(5), torch.uint8),
        # Tuple/Dict: flattened, Discrete parts one-hot
        (gym.make("Blackjack-v1").observation_space, torch.uint8),
        (
            gym.spaces.Dict(
                {
                    "frame": gym.spaces.Box(0, 255, (4, 4), np.uint8),
                    "more": gym.spaces.Tuple([gym.spaces.Discrete(300), gym.spaces.MultiBinary(2)]),
                }
            ),
            torch.uint8,
        ),
        (gym.spaces.Tuple([gym.spaces.Box(-1, 1, (2,)), gym.spaces.Discrete(3)]), torch.float32),
    ],
)
def test_the_buffer_stores_observations_in_the_smallest_type_that_holds_them(
    space: gym.Space, dtype: torch.dtype
) -> None:
    assert dqn.buffer_obs_dtype(space) == dtype
    if dtype != torch.float32:  # every value the space can hold fits
        if isinstance(space, gym.spaces.Box):
            low, high = space.low.min(), space.high.max()
        elif isinstance(space, gym.spaces.Discrete):
            low, high = space.start, space.start + space.n - 1
        elif isinstance(space, gym.spaces.MultiDiscrete):
            low, high = 0, space.nvec.max() - 1
        else:
            low, high = 0, 1
        assert torch.iinfo(dtype).min <= low and high <= torch.iinfo(dtype).max


class PixelBandit(gym.Env):  # type: ignore[type-arg]
    """One-step episodes on a 6x6 uint8 image, dark but for one bright pixel: action 0 pays
    when it lies in the left half, action 1 when in the right."""

    observation_space = gym.spaces.Box(0, 255, (6, 6), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: object = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.pixel = self.np_random.integers(6, size=2)
        image = np.zeros((6, 6), np.uint8)
        image[tuple(self.pixel)] = 255
        return image, {}

    def step(self, action: object) -> tuple[np.ndarray, float, bool, bool, dict]:
        paid = int(action) == int(self.pixel[1] >= 3)  # type: ignore[call-overload]
        return np.zeros((6, 6), np.uint8), float(paid), True, False, {}


def test_learns_from_uint8_images_kept_as_uint8_in_the_buffer(tmp_path: Path) -> None:
    """The buffer holds the images as uint8 (a quarter of float32's memory), the network sees
    the same values as floats, and the greedy policy learns to look at the pixel."""
    with registered("RLGenTest/PixelBandit-v0", PixelBandit) as env_id:
        config = bandit_config(
            total_timesteps=3_000,
            eval_every=1_000,
            eval_episodes=20,
            checkpoint_every=3_000,
            checkpoint_buffer=True,
        )
        ctx = run(config, tmp_path, env=env_id)
        evals = [v for _, v in ctx.writer.metrics["eval/return_mean"]]  # type: ignore[attr-defined]
        assert evals[-1] >= 0.95, evals
        state = ctx.checkpoints.latest()
        assert state is not None
        stored = state["buffer"]["obs"]
        assert stored.dtype == torch.uint8 and stored.shape[1:] == (6, 6)
        assert set(torch.unique(stored).tolist()) == {0, 255}  # pixels kept exactly
        q = dqn.build_network(config, gym.make(env_id))
        q.load_state_dict(state["q"])
        batch = stored[:8]
        assert torch.equal(q(batch), q(batch.float()))


class DictBandit(gym.Env):  # type: ignore[type-arg]
    """One-step episodes; a Dict observation with a Box part and a (nested) Tuple of Discretes:
    the paying action is 1 when `flag` XOR (`pos[0] > 0`), else 0: the net needs both parts."""

    observation_space = gym.spaces.Dict(
        {
            "pos": gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
            "parts": gym.spaces.Tuple([gym.spaces.Discrete(2), gym.spaces.Discrete(3, start=-1)]),
        }
    )
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: object = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self.obs = self.observation_space.sample()
        return self.obs, {}

    def right_action(self, obs: dict) -> int:
        return int(obs["parts"][0]) ^ int(obs["pos"][0] > 0)

    def step(self, action: object) -> tuple[dict, float, bool, bool, dict]:
        paid = int(action) == self.right_action(self.obs)  # type: ignore[call-overload]
        final = {"pos": self.obs["pos"].copy(), "parts": self.obs["parts"]}
        return final, float(paid), True, False, {}


def test_learns_from_dict_and_tuple_observations_flattened(tmp_path: Path) -> None:
    """Dict/Tuple observations enter as gymnasium's flat vector (Discrete parts one-hot); the
    checkpoint's greedy policy, as `rlgen evaluate` runs it on the raw env, takes them too."""
    from agents.evaluation import evaluate_policy
    from service.evaluate import one_at_a_time

    with registered("RLGenTest/DictBandit-v0", DictBandit) as env_id:
        config = bandit_config(
            total_timesteps=4_000,
            eval_every=2_000,
            eval_episodes=50,
            checkpoint_every=4_000,
            num_envs=2,
        )
        ctx = run(config, tmp_path, env=env_id)
        evals = [v for _, v in ctx.writer.metrics["eval/return_mean"]]  # type: ignore[attr-defined]
        assert evals[-1] >= 0.9, evals
        state = ctx.checkpoints.latest()
        assert state is not None
        env = gym.make(env_id)
        assert state["q"]["hidden.0.weight"].shape[1] == 2 + 2 + 3  # pos, one-hot flag and part
        policy = dqn.load_policy(config, state, env)
        returns, _ = evaluate_policy(env, one_at_a_time(policy), episodes=200, seed=1)
        assert returns.mean() >= 0.9


def test_blackjack_trains_and_its_policy_evaluates(tmp_path: Path) -> None:
    """Blackjack-v1's Tuple(Discrete(32), Discrete(11), Discrete(2)), through the vector env and
    `rlgen evaluate`'s rollouts."""
    from agents.evaluation import evaluate_policy
    from service.evaluate import one_at_a_time

    config = small_config(
        total_timesteps=1_000, eval_every=500, checkpoint_every=1_000, checkpoint_buffer=True
    )
    ctx = run(config, tmp_path, env="Blackjack-v1")
    assert len(ctx.writer.metrics["eval/return_mean"]) == 2  # type: ignore[attr-defined]
    state = ctx.checkpoints.latest()
    assert state is not None and state["q"]["hidden.0.weight"].shape[1] == 32 + 11 + 2
    stored = state["buffer"]["obs"]  # one-hot codes, one byte each
    assert stored.dtype == torch.uint8 and stored.shape[1] == 45
    assert (stored.sum(dim=1) == 3).all()  # one hot unit per part
    env = gym.make("Blackjack-v1")
    returns, lengths = evaluate_policy(
        env, one_at_a_time(dqn.load_policy(config, state, env)), episodes=20, seed=0
    )
    assert set(returns) <= {-1.0, 0.0, 1.0, 1.5} and lengths.min() >= 1


# -- Rainbow's remaining parts: C51 and noisy nets ------------------------------------------------


def test_c51_projection_on_a_hand_computed_case() -> None:
    z = torch.tensor([-1.0, 0.0, 1.0])
    p = torch.tensor([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3], [0.2, 0.5, 0.3]])
    returns = torch.tensor([0.5, 2.0, -0.25])
    discounts = torch.tensor([0.5, 0.0, 0.0])  # the last two terminated
    m = dqn.project_distribution(p, returns, discounts, z)
    # Row 0: Tz = 0.5 + 0.5 z = [0, 0.5, 1]: atom 0 lands on z_1, atom 1 halfway between z_1
    # and z_2, atom 2 on z_2. Row 1: every atom at 2, clipped to z_2. Row 2: every atom at
    # -0.25, a quarter of the way from z_0 to z_1.
    expected = torch.tensor([[0.0, 0.45, 0.55], [0.0, 0.0, 1.0], [0.25, 0.75, 0.0]])
    assert torch.allclose(m, expected)
    assert torch.allclose(m.sum(dim=1), torch.ones(3))


def test_c51_q_values_are_the_distributions_means() -> None:
    g = torch.Generator().manual_seed(0)
    q = dqn.QNetwork(4, 3, [8], dueling=True, generator=g, atoms=11, support=(-5.0, 5.0))
    x = torch.randn(6, 4, generator=g)
    probs = q.logits(x).softmax(dim=2)
    assert probs.shape == (6, 3, 11)
    assert torch.allclose(q(x), (probs * torch.linspace(-5, 5, 11)).sum(dim=2))


def test_noisy_layers_noise_statistics_and_evaluation_mode() -> None:
    p, out, sigma0 = 64, 32, 0.5
    layer = dqn.NoisyLinear(p, out, sigma0, torch.Generator().manual_seed(0))
    assert torch.allclose(layer.sigma_w, torch.full((out, p), sigma0 / p**0.5))
    noise = torch.Generator().manual_seed(1)
    x = torch.eye(p)  # row i reads column i of the weight
    samples = []
    for _ in range(2_000):
        layer.reset_noise(noise)
        samples.append(
            (
                layer(x).T
                - layer.mu_b[:, None]
                - layer.sigma_b[:, None] * layer.e_out[:, None]
                - layer.mu_w
            )
            / layer.sigma_w
        )
    eps = torch.stack(samples).detach()  # (draws, out, p): f(e_out) f(e_in)
    # f(e) = sign(e) sqrt|e|: E f(e) = 0 and E f(e)^2 = E|e| = sqrt(2/pi), so each weight's
    # noise has mean 0 and variance (E|e|)^2 = 2/pi.
    assert abs(float(eps.mean())) < 0.01
    assert abs(float(eps.var(dim=0).mean()) - 2 / math.pi) < 0.02
    # Evaluation: the mean weights alone, whatever the noise.
    layer.eval()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.mu_w, layer.mu_b))
    layer.reset_noise(noise)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.mu_w, layer.mu_b))


def test_rainbow_runs_and_resumes_exactly(tmp_path: Path) -> None:
    """Double, dueling, 3-step, prioritized, distributional and noisy together; killed after a
    checkpoint and resumed, it ends with the uninterrupted run's metrics."""
    from runctx import InMemoryWriter

    from .test_resume import Died, DyingWriter, points

    config = small_config(
        double_dqn=True,
        dueling=True,
        n_step=3,
        prioritized_replay=True,
        distributional=True,
        atoms=21,
        v_min=0.0,
        v_max=200.0,
        noisy=True,
        exploration_initial_eps=0.0,
        exploration_final_eps=0.0,
        checkpoint_every=500,
        checkpoint_buffer=True,
    )
    env = EnvSpec(id="CartPole-v1")
    whole = RunContext(seed=3, writer=InMemoryWriter(), workdir=tmp_path / "whole", env=env)
    dqn.train(config, whole)
    whole.close()
    assert np.isfinite([v for _, v in whole.writer.metrics["losses/td_loss"]]).all()
    dying = DyingWriter(1)
    with pytest.raises(Died):
        dqn.train(config, RunContext(seed=3, writer=dying, workdir=tmp_path / "r", env=env))
    logged = {k: max(s for s, _ in v) for k, v in dying.metrics.items()}
    second = RunContext(seed=3, writer=InMemoryWriter(), workdir=tmp_path / "r", env=env)
    dqn.train(config, second)
    second.close()
    joined = {k: list(v) for k, v in points(dying).items()}
    for key, values in points(second.writer).items():
        joined.setdefault(key, []).extend(p for p in values if p[0] > logged.get(key, -1))
    assert joined == points(whole.writer)
