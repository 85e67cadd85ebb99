"""Which observation spaces a Q-network takes, and how a replay buffer stores their values.

Kept apart from `agents.dqn` so that the algorithm reads as its paper: this is plumbing between
gymnasium's spaces and tensors, not part of DQN.
"""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import torch

# Observation spaces the Q-network takes: Box and MultiBinary as flat float vectors, Discrete and
# MultiDiscrete one-hot encoded inside the network (as SB3 does), so the replay buffer keeps the
# small integer observations rather than their one-hot vectors. Tuple and Dict spaces of these
# (nested: Blackjack's (sum, dealer card, usable ace), goal-conditioned dicts) enter as one flat
# Box: gymnasium's `flatten`, their Discrete parts one-hot, their Box parts as they are.
OBS_SPACES = (gym.spaces.Box, gym.spaces.MultiBinary, gym.spaces.Discrete, gym.spaces.MultiDiscrete)


def is_composite(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Tuple | gym.spaces.Dict)


def takes(space: gym.Space) -> bool:
    if isinstance(space, gym.spaces.Tuple):
        return len(space.spaces) > 0 and all(takes(s) for s in space.spaces)
    if isinstance(space, gym.spaces.Dict):
        return len(space.spaces) > 0 and all(takes(s) for s in space.spaces.values())
    return isinstance(space, OBS_SPACES)


# Integer dtypes the replay buffer keeps as they are, and the smallest that hold a range.
_TORCH_INTS = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
}


def buffer_obs_dtype(space: gym.Space) -> torch.dtype:
    """How the replay buffer stores observations of `space`: integers (images, Discrete and
    MultiDiscrete indices, MultiBinary bits) in the smallest integer type that holds every value
    of the space, everything else as float32; the network converts a sampled batch. uint8 images
    take a quarter of float32's memory: a 1M-transition buffer of 84x84x4 frames (obs and
    next_obs) needs 56 GB instead of 226 GB, as SB3 keeps them.

    Tuple/Dict spaces are stored flattened: their Discrete parts as one-hot 0/1 (written by
    gymnasium's `flatten`, so uint8 holds them), the rest as above, in one type for all parts.
    """
    if isinstance(space, gym.spaces.Tuple | gym.spaces.Dict):
        parts = space.spaces.values() if isinstance(space, gym.spaces.Dict) else space.spaces
        return functools.reduce(
            torch.promote_types,
            (
                torch.uint8
                if isinstance(p, gym.spaces.Discrete | gym.spaces.MultiDiscrete)
                else buffer_obs_dtype(p)
                for p in parts
            ),
        )
    if isinstance(space, gym.spaces.MultiBinary):
        return torch.uint8
    if isinstance(space, gym.spaces.Discrete | gym.spaces.MultiDiscrete):
        start = np.asarray(space.start)
        size = np.asarray(space.n if isinstance(space, gym.spaces.Discrete) else space.nvec)
        low, high = int(start.min()), int((start + size - 1).max())
    elif isinstance(space, gym.spaces.Box) and np.issubdtype(space.dtype, np.integer):
        info = np.iinfo(space.dtype)
        low, high = int(info.min), int(info.max)  # the dtype's range: values outside cannot occur
    else:
        return torch.float32
    for np_dtype, torch_dtype in _TORCH_INTS.items():
        info = np.iinfo(np_dtype)
        if info.min <= low and high <= info.max:
            return torch_dtype
    return torch.float32  # e.g. uint64 beyond int64: float32 rounds, as before
