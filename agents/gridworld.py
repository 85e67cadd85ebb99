"""`rlgen/GridWorld-v0`: a generated, optionally slippery gridworld of any size.

The agent starts in the top-left cell and must reach the bottom-right goal; every step costs -1, so
the return is minus the number of steps. Obstacles fill cells at random (with `obstacle_density`,
from the layout `seed`); moving into an obstacle or the border leaves the agent in place. With
probability `slip` the move goes to one of the two perpendicular directions instead (as in
FrozenLake). The layout always keeps a path from start to goal.

The transition model is built with array operations over all cells at once, never through Python
dicts, so value iteration can solve grids of 10^6 states and more.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from scipy import ndimage

from agents.mdp import FROZENLAKE_MOVES, TabularMDP

MOVES = np.array(FROZENLAKE_MOVES)  # action -> (d_row, d_col): LEFT, DOWN, RIGHT, UP
# 4096^2 = 16.8M states: the transition model's ~200M entries take ~6 GB. Beyond it, building even
# the layout (size^2 random draws) at validation would exhaust the memory of the process asking.
MAX_SIZE = 4096


class GridWorldEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array", "ansi"], "render_fps": 8}  # noqa: RUF012

    def __init__(
        self,
        size: int = 8,
        slip: float = 0.2,
        obstacle_density: float = 0.1,
        seed: int = 0,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
    ):
        if not isinstance(size, int) or not 2 <= size <= MAX_SIZE:
            raise ValueError(f"size must be an integer in [2, {MAX_SIZE}], got {size!r}")
        if not 0.0 <= slip <= 1.0:
            raise ValueError(f"slip must lie in [0, 1], got {slip!r}")
        if not 0.0 <= obstacle_density < 1.0:
            raise ValueError(f"obstacle_density must lie in [0, 1), got {obstacle_density!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}")
        self.size, self.slip, self.render_mode = size, float(slip), render_mode
        self.shape = (size, size)
        self.n_states = size * size
        self.start, self.goal = 0, self.n_states - 1
        self.max_episode_steps = max_episode_steps or 4 * self.n_states
        self.blocked = _layout(size, obstacle_density, np.random.default_rng(seed))
        self.observation_space = gym.spaces.Discrete(self.n_states)
        self.action_space = gym.spaces.Discrete(4)
        self._state, self._steps = self.start, 0

    def _move(self, state: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """Next cell for each (state, direction) pair, staying put at walls and obstacles."""
        row, col = np.divmod(state, self.size)
        r2 = row + MOVES[direction, 0]
        c2 = col + MOVES[direction, 1]
        inside = (r2 >= 0) & (r2 < self.size) & (c2 >= 0) & (c2 < self.size)
        nxt = np.where(inside, r2 * self.size + c2, state)
        return np.where(self.blocked.ravel()[nxt], state, nxt)

    def transition_model(self) -> TabularMDP:
        S, A = self.n_states, 4
        states = np.arange(S)
        # Goal and obstacle cells are absorbing: no transitions, no reward.
        live = ~self.blocked.ravel()
        live[self.goal] = False
        s_live = states[live]
        # The intended direction and the two perpendicular ones (turns of +1 and +3 quarters).
        outcomes = [(0, 1.0 - self.slip), (1, self.slip / 2), (3, self.slip / 2)]
        parts = []
        for a in range(A):
            for turn, prob in outcomes:
                if prob == 0:
                    continue
                nxt = self._move(s_live, np.full_like(s_live, (a + turn) % 4))
                parts.append((s_live, np.full_like(s_live, a), nxt, np.full(len(s_live), prob)))
        s, a_, n, p = (np.concatenate(x) for x in zip(*parts, strict=True))
        return TabularMDP.from_arrays(
            S,
            A,
            s,
            a_,
            n,
            p,
            reward=np.full(len(s), -1.0),
            done=n == self.goal,
            grid_shape=self.shape,
            blocked=self.blocked.ravel().copy(),
            moves=FROZENLAKE_MOVES,
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        super().reset(seed=seed)
        self._state, self._steps = self.start, 0
        return self._state, {}

    def step(self, action: int) -> tuple[int, float, bool, bool, dict[str, Any]]:
        u = self.np_random.random()
        turn = 0 if u >= self.slip else (1 if u < self.slip / 2 else 3)
        direction = np.array([(int(action) + turn) % 4])
        self._state = int(self._move(np.array([self._state]), direction)[0])
        self._steps += 1
        terminated = self._state == self.goal
        truncated = not terminated and self._steps >= self.max_episode_steps
        return self._state, -1.0, terminated, truncated, {}

    def render(self) -> Any:
        if self.render_mode == "ansi":
            grid = np.where(self.blocked, "#", ".")
            grid.flat[self.goal] = "G"
            grid.flat[self._state] = "A"
            return "\n".join("".join(row) for row in grid)
        if self.render_mode == "rgb_array":
            img = np.full((*self.shape, 3), 255, np.uint8)
            img[self.blocked] = (60, 60, 60)
            img.reshape(-1, 3)[self.goal] = (40, 170, 60)
            img.reshape(-1, 3)[self._state] = (220, 40, 40)
            scale = max(1, 256 // self.size)
            return np.kron(img, np.ones((scale, scale, 1), np.uint8))
        return None


def _layout(size: int, density: float, rng: np.random.Generator) -> np.ndarray:
    """Random obstacles (size, size) that keep the goal reachable from the start."""
    blocked = rng.random((size, size)) < density
    blocked[0, 0] = blocked[-1, -1] = False
    labels, _ = ndimage.label(~blocked)  # 4-connected components of free cells
    if labels[0, 0] != labels[-1, -1]:
        # Clear an L-shaped corridor: along the top row, then down the last column.
        blocked[0, :] = False
        blocked[:, -1] = False
    return blocked
