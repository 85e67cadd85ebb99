"""Environments of RL specs: a gymnasium id, its `gym.make` keyword arguments and, for Atari
games, the standard preprocessing.

Atari (ALE) and MinAtar ids are registered by optional packages (`pip install 'rlgen[atari]'`);
gymnasium registers its MuJoCo ids itself, but they run only with `mujoco` installed (`pip
install 'rlgen[mujoco]'`). Which package serves which ids is a closed table (`FAMILIES`): a spec
names an id, never a module to import.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class Family:
    """Env ids registered or served by an optional package."""

    name: str
    module: str  # imported (and its `register_envs()` called, if it has one) to register them
    extra: str  # the rlgen extra that installs it
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    # Ids gymnasium registers itself whose entry point lives in this package: importing
    # `module` then only checks that the optional dependency is there.
    entry_points: tuple[str, ...] = ()

    def matches(self, env_id: str) -> bool:
        if env_id.startswith(self.prefixes) or env_id.endswith(self.suffixes):
            return True
        registered = gym.registry.get(env_id)
        return (
            bool(self.entry_points)
            and registered is not None
            and str(registered.entry_point).startswith(self.entry_points)
        )


# ALE/Pong-v5: sticky actions (0.25), as Machado et al. (2018) recommend; PongNoFrameskip-v4:
# deterministic, the setting of the DQN and Rainbow papers and of most published tables.
ALE = Family("Atari (ALE)", "ale_py", "atari", prefixes=("ALE/",), suffixes=("NoFrameskip-v4",))
MINATAR = Family("MinAtar", "minatar.gym", "atari", prefixes=("MinAtar/",))
# HalfCheetah-v5, Hopper-v5, ...: registered by gymnasium, simulated by the `mujoco` wheel.
MUJOCO = Family(
    "MuJoCo", "gymnasium.envs.mujoco", "mujoco", entry_points=("gymnasium.envs.mujoco",)
)
FAMILIES = (ALE, MINATAR, MUJOCO)


class MissingExtra(LookupError):
    """The package that registers an env id is not installed."""


def ensure_registered(env_id: str) -> None:
    """Register `env_id`'s family with gymnasium, if it belongs to one and is not registered
    yet, or check that the package its registered entry point needs is installed (on the
    driver when a spec is checked, and again in each trial's worker process)."""
    for family in FAMILIES:
        if env_id in gym.registry and not family.entry_points:
            continue
        if family.matches(env_id):
            try:
                module = importlib.import_module(family.module)
            except (ImportError, gym.error.DependencyNotInstalled):
                raise MissingExtra(
                    f"{family.name} envs need an extra: pip install 'rlgen[{family.extra}]'"
                ) from None
            if env_id not in gym.registry and hasattr(module, "register_envs"):
                module.register_envs()
            return


def is_ale(env_id: str) -> bool:
    return ALE.matches(env_id)


class AtariPreprocessing(BaseModel):
    """The standard Atari preprocessing (Mnih et al. 2015; Machado et al. 2018), by ALE's own
    vector env (its C++ threads) for training and evaluation, and by gymnasium's
    `AtariPreprocessing` and `FrameStackObservation` wrappers for a single env (`rlgen
    evaluate`, whose episodes are rendered; FIRE on reset by `FireOnReset`, as gymnasium has
    no wrapper for it). Observations: (frame_stack, screen_size, screen_size) uint8 greyscale,
    identical on both paths for the same actions (no-op starts aside: each path draws their
    number from its own generator)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noop_max: int = Field(30, ge=0, description="Up to this many no-op actions after a reset.")
    frame_skip: int = Field(
        4, ge=1, description="Emulator frames per action; the last two are max-pooled."
    )
    screen_size: int = Field(84, ge=16, le=210, description="Frames resized to this square.")
    frame_stack: int = Field(4, ge=1, le=16, description="Frames stacked as one observation.")
    terminal_on_life_loss: bool = Field(
        False,
        description="Training episodes end at a lost life (evaluation always plays the whole "
        "game). Machado et al. (2018) advise against it; the DQN paper used it.",
    )
    fire_reset: bool = Field(
        True, description="Press FIRE after a reset, in games that need it to start."
    )
    clip_rewards: bool = Field(
        True,
        description="Training rewards clipped to their sign; evaluation reports game scores.",
    )


class FireOnReset(gym.Wrapper):
    """After each reset, FIRE for one emulator frame in games whose action set has it
    (Breakout, Pong, ...: some start to play only then), as ALE's vector env does with
    `use_fire_reset`. It wraps the frame-skip-1 game under gymnasium's `AtariPreprocessing`,
    whose no-op starts and first observation then follow the FIRE, as in ALE's reset."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        meanings = env.unwrapped.get_action_meanings()  # type: ignore[attr-defined]
        self.fire = meanings.index("FIRE") if "FIRE" in meanings else None

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        if self.fire is not None:
            obs, _, _, _, info = self.env.step(self.fire)  # one frame cannot end a game
        return obs, info


class EnvSpec(BaseModel):
    """A gymnasium environment: a registered id and the keyword arguments for `gym.make`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    id: str = Field(
        description="Gymnasium environment id, e.g. FrozenLake-v1 or rlgen/GridWorld-v0."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to gymnasium.make."
    )
    preprocessing: AtariPreprocessing | None = Field(
        None, description="The standard Atari preprocessing (ALE games only)."
    )

    @model_validator(mode="before")
    @classmethod
    def _draw_random_lake(cls, data: Any) -> Any:
        """FrozenLake with `map_name: null` and no `desc` draws a random lake at every `gym.make`
        from numpy's global RNG: the training env, the evaluation env and the model dynamic
        programming solves would be different lakes, and different again on every run. The lake
        is drawn here once instead, seeded by the env section itself, and kept as `kwargs.desc`:
        every env of every seed is the same lake, and the run's resolved spec records it."""
        if not isinstance(data, dict) or not isinstance(data.get("kwargs"), dict):
            return data
        kwargs = data["kwargs"]
        if "map_name" not in kwargs or kwargs["map_name"] is not None or kwargs.get("desc"):
            return data
        registered = gym.registry.get(str(data.get("id")))
        if registered is None or not str(registered.entry_point).endswith(":FrozenLakeEnv"):
            return data
        from gymnasium.envs.toy_text.frozen_lake import generate_random_map

        text = json.dumps({"id": data["id"], "kwargs": kwargs}, sort_keys=True, default=str)
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return {**data, "kwargs": {**kwargs, "desc": generate_random_map(seed=seed)}}

    def make(self, evaluation: bool = False, **overrides: Any) -> gym.Env:
        """One env. `evaluation`: whole games with their scores (no life-loss terminals, no
        reward clipping) where the preprocessing would change them for training."""
        ensure_registered(self.id)
        kwargs = {**self.kwargs, **overrides}
        pre = self.preprocessing
        if pre is None:
            return gym.make(self.id, **kwargs)
        from gymnasium.wrappers import AtariPreprocessing as Preprocess
        from gymnasium.wrappers import FrameStackObservation, TransformReward

        # gymnasium's wrapper skips frames itself: the emulator must not skip any.
        env = gym.make(self.id, **{**kwargs, "frameskip": 1})
        if pre.fire_reset:
            env = FireOnReset(env)
        env = Preprocess(
            env,
            noop_max=pre.noop_max,
            frame_skip=pre.frame_skip,
            screen_size=pre.screen_size,
            terminal_on_life_loss=pre.terminal_on_life_loss and not evaluation,
            grayscale_obs=True,
        )
        if pre.clip_rewards and not evaluation:
            env = TransformReward(env, lambda r: float(np.sign(float(r))))
        return FrameStackObservation(env, pre.frame_stack, padding_type="zero")

    def make_vec(
        self, num_envs: int, evaluation: bool = False, **overrides: Any
    ) -> gym.vector.VectorEnv:
        """`num_envs` copies as one vector env: the env's own batched implementation where
        there is one (classic control; ALE's for `preprocessing`, which runs the games and the
        preprocessing in C++ threads), else a `SyncVectorEnv` of `gym.make` copies.
        `evaluation`: see `make`.

        The copies are made by a `functools.partial` of `gym.make` (what `gym.make_vec` does
        with a local function), so the vector env pickles into checkpoints (`agents.envstate`).
        """
        ensure_registered(self.id)
        kwargs = {**self.kwargs, **overrides}
        if self.preprocessing is not None:
            return self._ale_vector(num_envs, evaluation, kwargs)
        # ALE's registered vector env preprocesses (84x84 stacks, clipped rewards); without
        # `preprocessing` the spec asks for the game's own frames, as `make` gives them.
        if gym.spec(self.id).vector_entry_point is not None and not is_ale(self.id):
            return gym.make_vec(self.id, num_envs=num_envs, **kwargs)
        return gym.vector.SyncVectorEnv([functools.partial(gym.make, self.id, **kwargs)] * num_envs)

    def _ale_vector(
        self, num_envs: int, evaluation: bool, kwargs: dict[str, Any]
    ) -> gym.vector.VectorEnv:
        from ale_py.vector_env import AtariVectorEnv

        pre = self.preprocessing
        assert pre is not None
        # The registered id's settings (sticky actions, action set, episode cap), then the
        # spec's kwargs; the preprocessing's frame skip replaces the id's.
        game = {**gym.spec(self.id).kwargs, **kwargs}
        return AtariVectorEnv(
            game=game["game"],
            num_envs=num_envs,
            repeat_action_probability=float(game.get("repeat_action_probability", 0.0)),
            full_action_space=bool(game.get("full_action_space", False)),
            max_num_frames_per_episode=int(game.get("max_num_frames_per_episode", 108_000)),
            frameskip=pre.frame_skip,
            img_height=pre.screen_size,
            img_width=pre.screen_size,
            stack_num=pre.frame_stack,
            grayscale=True,
            maxpool=True,
            noop_max=pre.noop_max,
            use_fire_reset=pre.fire_reset,
            episodic_life=pre.terminal_on_life_loss and not evaluation,
            reward_clipping=pre.clip_rewards and not evaluation,
        )
