"""Environments in checkpoints.

Gymnasium has no API for an environment's state, so a checkpoint keeps the environment itself:
its pickle, as a uint8 tensor (checkpoints stay loadable with `torch.load(weights_only=True)`;
only the algorithm that wrote the bytes unpickles them, when it resumes its own run or one the
user continues). Toy-text and classic-control envs, their vector envs and gymnasium's wrappers
all pickle, so a resumed run goes on inside the very episodes it was in. MuJoCo envs pickle as
their constructor's arguments (gymnasium's `EzPickle`), which would revive them at their initial
pose: their simulator state (`mujoco.mj_getState`, the integration state) and their generator
travel beside the pickle and are put back. Where an env does not pickle, `snapshot` returns None
and the resumed run starts fresh episodes.
"""

from __future__ import annotations

import functools
import logging
import pickle
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def _mujoco_envs(env: Any) -> list[Any]:
    """The MuJoCo envs inside `env` (an env or a vector env of copies), unwrapped."""
    inner = [e.unwrapped for e in getattr(env, "envs", [env])]
    return [e for e in inner if type(e).__module__.startswith("gymnasium.envs.mujoco")]


def _physics(env: Any) -> list[tuple[np.ndarray, np.random.Generator]]:
    import mujoco

    states = []
    for e in _mujoco_envs(env):
        what = mujoco.mjtState.mjSTATE_INTEGRATION
        state = np.empty(mujoco.mj_stateSize(e.model, what))
        mujoco.mj_getState(e.model, e.data, state, what)
        states.append((state, e.np_random))
    return states


def _restore_physics(env: Any, states: list[tuple[np.ndarray, np.random.Generator]]) -> None:
    import mujoco

    for e, (state, rng) in zip(_mujoco_envs(env), states, strict=True):
        mujoco.mj_setState(e.model, e.data, state, mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(e.model, e.data)  # positions and velocities -> derived quantities
        e.np_random = rng


@functools.cache
def _warn_unpicklable(kind: str, reason: str) -> None:
    """Once a process for each kind of env, not at every checkpoint of a run."""
    log.warning("the env does not pickle (%s): a resumed run starts fresh episodes", reason)


def snapshot(env: Any) -> torch.Tensor | None:
    """The env (a `gym.Env` or vector env, wrappers and random state included) as bytes."""
    try:
        blob = pickle.dumps((env, _physics(env)), protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        _warn_unpicklable(type(env).__qualname__, str(e))
        return None
    return torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())


def revive(blob: torch.Tensor) -> Any:
    """The env `snapshot` saved, in the state it was in."""
    saved = pickle.loads(blob.numpy().tobytes())
    # (env, physics) since MuJoCo's state is kept; older checkpoints hold the env alone.
    env, physics = saved if isinstance(saved, tuple) else (saved, [])
    _restore_physics(env, physics)
    return env


def episodes_state(envs: Any, **arrays: Any) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps to go on inside the episodes `envs` are in: the envs themselves
    and the training loop's per-env arrays (observations, returns so far, ...), as tensors; or
    nothing where the envs do not pickle (the resumed run then starts fresh episodes)."""
    blob = snapshot(envs)
    if blob is None:
        return {}
    return {"envs": blob, **{k: torch.from_numpy(np.asarray(v).copy()) for k, v in arrays.items()}}
