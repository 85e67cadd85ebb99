"""Environments in checkpoints.

Gymnasium has no API for an environment's state, so a checkpoint keeps the environment itself:
its pickle, as a uint8 tensor (checkpoints stay loadable with `torch.load(weights_only=True)`;
only the algorithm that wrote the bytes unpickles them, when it resumes its own run or one the
user continues). Toy-text and classic-control envs, their vector envs and gymnasium's wrappers
all pickle, so a resumed run goes on inside the very episodes it was in. Where an env does not
pickle, `snapshot` returns None and the resumed run starts fresh episodes.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def snapshot(env: Any) -> torch.Tensor | None:
    """The env (a `gym.Env` or vector env, wrappers and random state included) as bytes."""
    try:
        blob = pickle.dumps(env, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        log.warning("the env does not pickle (%s): a resumed run starts fresh episodes", e)
        return None
    return torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())


def revive(blob: torch.Tensor) -> Any:
    """The env `snapshot` saved, in the state it was in."""
    return pickle.loads(blob.numpy().tobytes())


def episodes_state(envs: Any, **arrays: Any) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps to go on inside the episodes `envs` are in: the envs themselves
    and the training loop's per-env arrays (observations, returns so far, ...), as tensors; or
    nothing where the envs do not pickle (the resumed run then starts fresh episodes)."""
    blob = snapshot(envs)
    if blob is None:
        return {}
    return {"envs": blob, **{k: torch.from_numpy(np.asarray(v).copy()) for k, v in arrays.items()}}
