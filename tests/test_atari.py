"""DQN from pixels: Atari and MinAtar envs, their preprocessing, the frame store, the CNNs."""

from __future__ import annotations

import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents import dqn, nets, replay
from agents.envs import EnvSpec
from agents.replay import FrameStore, NStep, ReplayBuffer
from runctx import RunContext

from .conftest import validate_without

PONG = "PongNoFrameskip-v4"


def raw_and_interned(
    spec: EnvSpec, steps: int, n_envs: int, n_step: int, store_capacity: int, seed: int = 0
) -> tuple[ReplayBuffer, list[np.ndarray], list[np.ndarray]]:
    """Steps `spec`'s vector env with random actions, storing each transition twice: as frame
    ids in a buffer with a `FrameStore`, and as the raw stacks the env returned."""
    envs = spec.make_vec(n_envs)
    shape = envs.single_observation_space.shape
    device = torch.device("cpu")
    frames = FrameStore(store_capacity, shape[1:], n_envs, device)
    buffer = ReplayBuffer(
        10 * steps, (shape[0],), torch.int64, device, torch.Generator().manual_seed(0), frames
    )
    ids_nstep, raw_nstep = NStep(n_step, n_envs, 0.99), NStep(n_step, n_envs, 0.99)
    raw_obs: list[np.ndarray] = []
    raw_next: list[np.ndarray] = []
    obs, _ = envs.reset(seed=seed)
    valid = np.ones(n_envs, dtype=bool)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        actions = rng.integers(envs.single_action_space.n, size=n_envs)
        next_obs, rewards, terminated, truncated, _ = envs.step(actions)
        done = terminated | truncated
        args = (actions, rewards, terminated, done, valid)
        buffer.add(
            ids_nstep.push(frames.intern(obs), *args[:2], frames.intern(next_obs), *args[2:])
        )
        raw = raw_nstep.push(obs, *args[:2], next_obs, *args[2:])
        raw_obs.extend(raw.obs)
        raw_next.extend(raw.next_obs)
        valid = ~done  # next-step autoreset: the step after an episode's last is its reset
        obs = next_obs
    envs.close()
    return buffer, raw_obs, raw_next


def test_the_frame_store_rebuilds_every_stack_the_env_returned() -> None:
    """Across episode boundaries (episodes of 50 steps) and 3-step returns, in 2 envs."""
    spec = EnvSpec(id=PONG, kwargs={"max_num_frames_per_episode": 200}, preprocessing={})
    buffer, raw_obs, raw_next = raw_and_interned(spec, 240, 2, 3, store_capacity=2_000)
    assert buffer.size == len(raw_obs) > 400
    rows = torch.arange(buffer.size)
    assert not buffer.dead(rows).any()
    assert torch.equal(buffer.frames.stack(buffer.obs[rows]), torch.as_tensor(np.stack(raw_obs)))
    assert torch.equal(
        buffer.frames.stack(buffer.next_obs[rows]), torch.as_tensor(np.stack(raw_next))
    )
    # One frame a step and env, plus the first of each episode: far fewer than 8 a transition.
    assert buffer.frames.written <= 2 * 240 + 2 * 6


def test_overwritten_frames_are_never_sampled() -> None:
    """A frame store smaller than the buffer: the oldest transitions lose their frames, and
    sampling redraws them; every sampled stack is one the env returned."""
    spec = EnvSpec(id=PONG, kwargs={"max_num_frames_per_episode": 200}, preprocessing={})
    buffer, raw_obs, raw_next = raw_and_interned(spec, 200, 1, 1, store_capacity=120)
    dead = buffer.dead(torch.arange(buffer.size))
    assert 0 < int(dead.sum()) < buffer.size
    batch = buffer.sample(64)
    assert not dead[batch.indices].any()
    for row, obs, next_obs in zip(batch.indices.tolist(), batch.obs, batch.next_obs, strict=True):
        assert np.array_equal(obs.numpy(), raw_obs[row])
        assert np.array_equal(next_obs.numpy(), raw_next[row])


def test_the_zero_frame_pads_stacks_in_a_fresh_store() -> None:
    """The ring of a new store is left uninitialised (see `FrameStore`), its zero frame is not:
    built in memory just freed full of 255s, the padding of a reset stack still reads 0."""
    for _ in range(3):
        dirty = torch.full((9, 84, 84), 255, dtype=torch.uint8)
        del dirty
        store = FrameStore(8, (84, 84), 1, torch.device("cpu"))
        padded = store.intern(
            np.stack([np.zeros((84, 84), np.uint8)] * 3 + [np.ones((84, 84), np.uint8)])[None]
        )
        stack = store.stack(torch.as_tensor(padded))
        assert stack.shape == (1, 4, 84, 84)
        assert not stack[0, :3].any() and bool((stack[0, 3] == 1).all())


def test_a_replay_larger_than_the_machine_is_refused_before_it_is_allocated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Buffers fill as a run goes: one the machine cannot hold would end the run hours in."""
    cpu = torch.device("cpu")
    with pytest.raises(MemoryError, match=r"10,000,000,000 transitions of \(210, 160, 3\).*GiB"):
        ReplayBuffer(10**10, (210, 160, 3), torch.uint8, cpu, torch.Generator())  # ~2 PB
    monkeypatch.setattr(replay, "device_memory", lambda device: 2**30)  # a 1 GiB machine
    with pytest.raises(MemoryError, match=r"frame store of 100,000,000 frames.*buffer size"):
        FrameStore(10**8, (8, 8), 1, cpu)
    frames = FrameStore(10**7, (8, 8), 1, cpu)  # 0.7 GB: fits, but not with the buffer's rows
    with pytest.raises(
        MemoryError, match=r"of \(4,\) observations \(frame ids\) and its frames.*than the 1.0 GiB"
    ):
        ReplayBuffer(10**7, (4,), torch.int64, cpu, torch.Generator(), frames)
    frames = FrameStore(10**5, (84, 84), 1, cpu)  # 0.7 GB with its 8 MB of rows: fits
    ReplayBuffer(10**5, (4,), torch.int64, cpu, torch.Generator(), frames)


def test_a_transition_costs_about_one_84x84_frame() -> None:
    """At most 7.5 KB a transition (SB3's buffer: 56 KB, 28 KB with optimize_memory_usage),
    counting the frame store, the ids and every other field of the buffer."""
    capacity, stack = 10_000, 4
    slack = stack * (stack + 1 + 2)  # what dqn.train adds for 1 env and 1-step returns
    frames = FrameStore(capacity + slack, (84, 84), 1, torch.device("cpu"))
    buffer = ReplayBuffer(
        capacity, (stack,), torch.int64, torch.device("cpu"), torch.Generator(), frames
    )
    total = frames.nbytes() + sum(t.nbytes for t in buffer.fields().values())
    assert total / capacity <= 7_500, total / capacity


def test_the_state_of_a_frame_store_round_trips() -> None:
    spec = EnvSpec(id=PONG, preprocessing={})
    envs = spec.make_vec(2)
    obs, _ = envs.reset(seed=1)
    a = FrameStore(50, (84, 84), 2, torch.device("cpu"))
    for _ in range(30):
        a.intern(obs)
        obs, *_ = envs.step(np.zeros(2, dtype=np.int64))
    b = FrameStore(50, (84, 84), 2, torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.intern(obs), b.intern(obs))  # both continue the same stacks
    assert a.written == b.written and torch.equal(a.ids, b.ids)
    held = torch.cat([a.ids[a.ids >= 0], torch.tensor([FrameStore.ZERO])]).view(-1, 1)
    assert len(held) > 40 and torch.equal(a.stack(held), b.stack(held))  # every readable frame
    envs.close()


@pytest.mark.parametrize(
    ("game", "fire_reset"),
    [
        (PONG, False),
        (PONG, True),
        ("BreakoutNoFrameskip-v4", True),
        ("FreewayNoFrameskip-v4", True),
    ],
)
def test_both_preprocessing_paths_see_the_same_frames(game: str, fire_reset: bool) -> None:
    """ALE's vector env (training, evaluation) and gymnasium's wrappers (`rlgen evaluate`) give
    identical observations for the same actions, with and without FIRE on reset (Freeway has no
    FIRE: nothing is pressed), without no-op starts (each path draws their number itself)."""
    spec = EnvSpec(id=game, preprocessing={"noop_max": 0, "fire_reset": fire_reset})
    vec, single = spec.make_vec(1), spec.make()
    a, _ = vec.reset(seed=0)
    b, _ = single.reset(seed=0)
    rng = np.random.default_rng(0)
    n = int(vec.single_action_space.n)
    # Breakout's ball is served by FIRE and not by the other actions: the policy keeps off it
    # here, so frames that agree show that the reset served it in both paths.
    actions = [k for k in range(n) if k != 1] if "Breakout" in game else list(range(n))
    for _ in range(200):
        assert np.array_equal(a[0], b)
        action = int(rng.choice(actions))
        a, *_ = vec.step(np.array([action]))
        b, *_ = single.step(action)
    vec.close()
    single.close()


def test_fire_on_reset_serves_breakouts_ball() -> None:
    """Without FIRE, Breakout's ball is never served: NOOPs leave the screen still. With it the
    ball flies, so the frames change (and, above, equal ALE's own FIRE reset)."""
    frames = {}
    for fire in (False, True):
        env = EnvSpec(
            id="BreakoutNoFrameskip-v4", preprocessing={"noop_max": 0, "fire_reset": fire}
        ).make()
        obs, _ = env.reset(seed=0)
        frames[fire] = [obs[-1]] + [env.step(0)[0][-1] for _ in range(30)]
        env.close()
    assert all(np.array_equal(f, frames[False][0]) for f in frames[False])
    assert not all(np.array_equal(f, frames[True][0]) for f in frames[True])


def test_observations_match_sb3s_atari_wrapper() -> None:
    """rlgen's Atari observations against SB3's `AtariWrapper` + `VecFrameStack`, same seed and
    actions, on a game without FIRE (Freeway). The reset stack is identical; later stacks agree
    on >= 97% of pixels. The differences, all known:
    - max-pooling: SB3 takes the max of the last two frames in RGB and then converts to grey
      (as the DQN paper describes); ALE and gymnasium convert each frame to grey and take the
      max of the grey frames. Where a sprite moves between the two frames the pixels differ;
    - FIRE on reset: SB3 presses FIRE, then action 2, in every game that has FIRE; rlgen's
      `fire_reset` presses FIRE (ALE's own reset), so games with FIRE drift apart in time;
    - no-op starts draw their count from different generators (this test uses none).
    """
    pytest.importorskip("stable_baselines3")  # the dev extra installs it
    from stable_baselines3.common.atari_wrappers import AtariWrapper
    from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack

    def sb3_env() -> gym.Env:
        env = gym.make("FreewayNoFrameskip-v4")
        return AtariWrapper(env, noop_max=0, terminal_on_life_loss=False, clip_reward=False)

    # SB3 stacks (84, 84, 1) frames along the last axis: (1, 84, 84, 4), rlgen's (1, 4, 84, 84).
    theirs = VecFrameStack(DummyVecEnv([sb3_env]), 4, channels_order="last")
    ours = EnvSpec(
        id="FreewayNoFrameskip-v4", preprocessing={"noop_max": 0, "fire_reset": False}
    ).make_vec(1)
    theirs.seed(0)
    t = np.moveaxis(theirs.reset(), -1, 1)
    o, _ = ours.reset(seed=0)
    assert np.array_equal(t, o)
    rng = np.random.default_rng(0)
    for _ in range(300):
        action = rng.integers(3, size=1)
        t = np.moveaxis(theirs.step(action)[0], -1, 1)
        o, *_ = ours.step(action)
        assert (t == o).mean() >= 0.97
    theirs.close()
    ours.close()


def test_cnns_take_the_envs_bytes() -> None:
    atari = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    minatar = gym.spaces.Box(0, 1, (10, 10, 4), bool)
    nature = nets.image_torso("auto", atari)
    small = nets.image_torso("auto", minatar)
    assert isinstance(nature, nets.NatureCNN) and nature.out_dim == 3136
    assert isinstance(small, nets.MinAtarCNN) and small.out_dim == 1024
    assert nets.image_torso("auto", gym.spaces.Box(-1, 1, (4,))) is None
    x = torch.full((2, 4, 84, 84), 255, dtype=torch.uint8)
    assert torch.equal(nature(x), nature(torch.ones(2, 4, 84, 84) * 255))  # scaled inside
    with pytest.raises(ValueError, match="at least 36x36 pixels, not 10x10"):
        nets.image_torso("nature_cnn", minatar)


def test_the_cnns_take_either_layout_and_compute_the_same() -> None:
    """RGB frames (H, W, C) (an ALE game without preprocessing) get the Nature CNN; small
    channel-first stacks (84x84 preprocessing shrunk to 20x20) the MinAtar CNN. Each computes
    what it computes on the other layout with the same weights."""
    rgb = gym.spaces.Box(0, 255, (210, 160, 3), np.uint8)
    stacks = gym.spaces.Box(0, 255, (4, 20, 20), np.uint8)
    nature, small = nets.image_torso("auto", rgb), nets.image_torso("auto", stacks)
    assert isinstance(nature, nets.NatureCNN) and nature.channels_last
    assert isinstance(small, nets.MinAtarCNN) and not small.channels_last
    assert nature.out_dim == 64 * 22 * 16 and small.out_dim == 16 * 18 * 18
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 210, 160, 3), dtype=torch.uint8, generator=g)
    chw = nets.NatureCNN((3, 210, 160), 1 / 255)
    chw.load_state_dict(nature.state_dict())
    torch.testing.assert_close(nature(frames), chw(frames.permute(0, 3, 1, 2).contiguous()))
    grids = torch.randint(0, 256, (2, 4, 20, 20), dtype=torch.uint8, generator=g)
    hwc = nets.MinAtarCNN((4, 20, 20), 1 / 255, channels_last=True)
    hwc.load_state_dict(small.state_dict())
    torch.testing.assert_close(small(grids), hwc(grids.permute(0, 2, 3, 1)))


@pytest.mark.parametrize(
    ("network", "space", "problem"),
    [
        ("nature_cnn", gym.spaces.Box(0, 1, (10, 10, 4), bool), "at least 36x36 pixels, not 10x10"),
        ("nature_cnn", gym.spaces.Box(0, 255, (4, 35, 84), np.uint8), "not 35x84"),
        ("minatar_cnn", gym.spaces.Box(-1, 1, (4,)), "needs image observations"),
        ("nature_cnn", gym.spaces.Discrete(3), "needs image observations"),
        ("auto", gym.spaces.Box(0, 1, (2, 2, 1)), "too small for a CNN: use network mlp"),
        ("minatar_cnn", gym.spaces.Box(0, 1, (4, 2, 9)), "too small for a CNN"),
    ],
)
def test_a_network_that_cannot_take_the_observations_is_named(
    network: str, space: gym.Space, problem: str
) -> None:
    found = nets.network_problem(network, space)
    assert found is not None and problem in found
    with pytest.raises(ValueError, match=problem):
        nets.image_torso(network, space)


@pytest.mark.parametrize(
    ("network", "space"),
    [
        ("auto", gym.spaces.Box(0, 255, (4, 36, 36), np.uint8)),
        ("nature_cnn", gym.spaces.Box(0, 255, (210, 160, 3), np.uint8)),
        ("minatar_cnn", gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)),
        ("mlp", gym.spaces.Box(0, 1, (10, 10, 4), bool)),
        ("auto", gym.spaces.Box(-1, 1, (3,))),
        ("auto", gym.spaces.Box(0, 1, (3, 3, 1))),
    ],
)
def test_a_network_that_takes_the_observations_builds(network: str, space: gym.Space) -> None:
    assert nets.network_problem(network, space) is None
    torso = nets.image_torso(network, space)
    if torso is not None:
        x = torch.as_tensor(space.sample()).unsqueeze(0)
        assert torso(x).shape == (1, torso.out_dim)


def test_validation_refuses_a_network_the_env_cannot_feed(tmp_path: Path) -> None:
    """Set in params or swept, a CNN that cannot take the env's observations is refused with
    the file, line and field, before any trial starts."""
    from service.spec import SpecError, load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: t\nalgorithm: dqn\nenv: {id: MinAtar/Breakout-v1}\nparams: {network: nature_cnn}\n"
    )
    with pytest.raises(
        SpecError,
        match=re.escape("spec.yaml:4: params.network: 'nature_cnn' on 'MinAtar/Breakout-v1': the"),
    ):
        load_spec(spec)
    spec.write_text(
        "name: t\nalgorithm: ppo\nenv: {id: MinAtar/Breakout-v1}\nsweep:\n  params:\n"
        "    network: {choice: [minatar_cnn, mlp, nature_cnn]}\n"
    )
    with pytest.raises(
        SpecError, match=re.escape("spec.yaml:6: sweep.params.network: 'nature_cnn' on")
    ):
        load_spec(spec)
    spec.write_text(spec.read_text().replace(", nature_cnn]", ", auto]"))
    assert load_spec(spec).sweep is not None


def test_an_ale_game_without_preprocessing_gives_its_own_frames() -> None:
    """No `preprocessing`: the game's RGB frames, in training's vector env as in `make` (ALE's
    registered vector env would preprocess them)."""
    env = EnvSpec(id="ALE/Pong-v5")
    envs, one = env.make_vec(2), env.make()
    assert envs.single_observation_space == one.observation_space
    assert one.observation_space.shape == (210, 160, 3)
    envs.close()
    one.close()


def test_the_nature_cnn_convolves_channels_last_and_computes_the_nchw_result() -> None:
    torch.manual_seed(0)
    cnn = nets.NatureCNN((4, 84, 84), 1 / 255)
    layouts = []
    for layer in cnn.net:
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_pre_hook(
                lambda _, args: layouts.append(
                    args[0].is_contiguous(memory_format=torch.channels_last)
                )
            )
    frames = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    got = cnn(frames)
    assert layouts == [True, True, True]
    x = frames.float() / 255  # the textbook NCHW computation with the same weights
    for layer in cnn.net:
        x = layer(x.contiguous()) if isinstance(layer, torch.nn.Conv2d) else layer(x)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    assert all(p.is_contiguous() for p in cnn.parameters())  # initialisers see plain tensors


@pytest.mark.parametrize(
    ("env", "options"),
    [
        (EnvSpec(id=PONG, preprocessing={}), {"n_step": 3, "prioritized_replay": True}),
        (EnvSpec(id="MinAtar/Breakout-v1"), {"dueling": True, "double_dqn": True}),
        (EnvSpec(id="ALE/Pong-v5"), {}),  # RGB frames (H, W, C) through the Nature CNN
    ],
    ids=["pong", "minatar", "pong-rgb"],
)
def test_dqn_trains_from_pixels(env: EnvSpec, options: dict[str, object], tmp_path: Path) -> None:
    config = dqn.Config(
        total_timesteps=400,
        learning_starts=100,
        train_freq=4,
        gradient_steps=1,
        batch_size=16,
        buffer_size=1_000,
        hidden_sizes=[32],
        eval_every=400,
        eval_episodes=1,
        eval_max_steps=100,
        **options,  # type: ignore[arg-type]
    )
    ctx = RunContext.in_memory(seed=0, workdir=tmp_path, env=env)
    ctx.timer.start()
    dqn.train(config, ctx)
    ctx.close()
    m = ctx.writer.metrics  # type: ignore[attr-defined]
    assert np.isfinite([v for _, v in m["losses/td_loss"]]).all()
    assert m["eval/return_mean"][-1][0] == 400
    names = {p.name for p, _ in ctx.writer.artifacts}  # type: ignore[attr-defined]
    assert "observation.png" in names


def test_an_atari_id_without_the_extra_is_refused_naming_it(tmp_path: Path) -> None:
    spec = tmp_path / "pong.yaml"
    spec.write_text("name: pong\nalgorithm: dqn\nenv: {id: ALE/Pong-v5, preprocessing: {}}\n")
    out = validate_without("ale_py", spec)
    assert out.returncode == 2, out.stderr
    assert "pong.yaml:3: env.id:" in out.stderr and "pip install 'rlgen[atari]'" in out.stderr
