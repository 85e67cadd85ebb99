"""Environments of RL specs: a gymnasium id and its `gym.make` keyword arguments."""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import gymnasium as gym
from pydantic import BaseModel, ConfigDict, Field, model_validator


class EnvSpec(BaseModel):
    """A gymnasium environment: a registered id and the keyword arguments for `gym.make`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    id: str = Field(
        description="Gymnasium environment id, e.g. FrozenLake-v1 or rlgen/GridWorld-v0."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to gymnasium.make."
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

    def make(self, **overrides: Any) -> gym.Env:
        return gym.make(self.id, **{**self.kwargs, **overrides})

    def make_vec(self, num_envs: int, **overrides: Any) -> gym.vector.VectorEnv:
        """`num_envs` copies as one vector env: the env's own batched implementation where
        gymnasium ships one (classic control), else a `SyncVectorEnv` of `gym.make` copies.

        The copies are made by a `functools.partial` of `gym.make` (what `gym.make_vec` does
        with a local function), so the vector env pickles into checkpoints (`agents.envstate`).
        """
        kwargs = {**self.kwargs, **overrides}
        if gym.spec(self.id).vector_entry_point is not None:
            return gym.make_vec(self.id, num_envs=num_envs, **kwargs)
        return gym.vector.SyncVectorEnv([functools.partial(gym.make, self.id, **kwargs)] * num_envs)
