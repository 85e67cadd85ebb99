"""Finite MDPs in matrix form, and the Bellman backup both dynamic-programming solvers share.

A `TabularMDP` holds, for S states and A actions:

- `P`: scipy CSR matrix of shape (A*S, S). Row `a*S + s` is the *continuation* kernel
  P(s' | s, a) * (1 - done(s, a, s')): transitions that end the episode carry no future value,
  so they are left out of the matrix and only their reward counts.
- `R`: array (A, S), the expected immediate reward E[r | s, a] (terminating transitions included).
- `terminal`: bool array (S,), absorbing states from which nothing more can happen.

Stacking the actions into one (A*S, S) matrix makes a whole Bellman backup a single sparse
matrix-vector product, Q = R + gamma * P V, which torch runs on CPU or GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import scipy.sparse as sp
import torch

# Grid moves as (d_row, d_col) per action index, for drawing policy arrows.
FROZENLAKE_MOVES = ((0, -1), (1, 0), (0, 1), (-1, 0))  # LEFT, DOWN, RIGHT, UP
CLIFFWALKING_MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # UP, RIGHT, DOWN, LEFT


def unmodelled_dynamics(env: gym.Env) -> str | None:
    """What an env does that its `P` leaves out, for the options gymnasium keeps out of it; None
    when `P` is the whole story. Solving such a `P` would give the optimum of another MDP."""
    if getattr(env.unwrapped, "fickle_passenger", False):
        return (
            "Taxi's fickle passenger (fickle_passenger=True) changes destination in step(), "
            "outside the transition model P"
        )
    return None


@dataclass
class TabularMDP:
    P: sp.csr_matrix
    R: np.ndarray
    terminal: np.ndarray
    grid_shape: tuple[int, int] | None = None
    blocked: np.ndarray | None = None  # (S,) cells that cannot be entered (grid MDPs)
    moves: Sequence[tuple[int, int]] | None = None  # per-action grid move, for figures

    @property
    def n_states(self) -> int:
        return int(self.R.shape[1])

    @property
    def n_actions(self) -> int:
        return int(self.R.shape[0])

    def __post_init__(self) -> None:
        s, a = self.n_states, self.n_actions
        if self.P.shape != (a * s, s):
            raise ValueError(f"P has shape {self.P.shape}, expected {(a * s, s)}")
        row_mass = np.asarray(self.P.sum(axis=1)).ravel()
        if (self.P.data < 0).any() or (row_mass > 1 + 1e-9).any():
            raise ValueError("P rows must be sub-stochastic (non-negative, summing to at most 1)")

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        n_states: int,
        n_actions: int,
        state: np.ndarray,
        action: np.ndarray,
        next_state: np.ndarray,
        prob: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        **extra: Any,
    ) -> TabularMDP:
        """Build from flat transition arrays, one entry per (s, a, s') outcome (shape (N,))."""
        done = done.astype(bool)
        r = np.zeros((n_actions, n_states))
        np.add.at(r, (action, state), prob * reward)
        cont = ~done
        P = sp.csr_matrix(
            (prob[cont], (action[cont] * n_states + state[cont], next_state[cont])),
            shape=(n_actions * n_states, n_states),
        )  # coo -> csr sums duplicate (row, col) outcomes
        P.sum_duplicates()
        P.eliminate_zeros()
        row_mass = np.asarray(P.sum(axis=1)).ravel().reshape(n_actions, n_states)
        terminal = (row_mass == 0).all(axis=0) & (r == 0).all(axis=0)
        return cls(P=P, R=r, terminal=terminal, **extra)

    @classmethod
    def from_transition_dict(
        cls, P: dict, n_states: int, n_actions: int, **extra: Any
    ) -> TabularMDP:
        """Build from gymnasium's toy-text model `P[s][a] = [(prob, s', reward, done), ...]`."""
        rows = [
            (s, a, nxt, p, rew, d)
            for s in range(n_states)
            for a in range(n_actions)
            for (p, nxt, rew, d) in P[s][a]
        ]
        cols = np.array(rows, dtype=np.float64).T
        s_, a_, n_ = (cols[i].astype(np.int64) for i in range(3))
        return cls.from_arrays(
            n_states, n_actions, s_, a_, n_, cols[3], cols[4], cols[5] != 0, **extra
        )

    @classmethod
    def from_env(cls, env: gym.Env) -> TabularMDP:
        """The model of an env that exposes one: `transition_model()` (rlgen) or `P` (toy text)."""
        base: Any = env.unwrapped
        if hasattr(base, "transition_model"):
            model: TabularMDP = base.transition_model()
            return model
        if not hasattr(base, "P"):
            raise ValueError(
                f"{env.spec.id if env.spec else type(base).__name__} exposes no transition model "
                "(`unwrapped.P`); dynamic programming needs a tabular env such as FrozenLake-v1, "
                "Taxi-v4, CliffWalking-v1 or rlgen/GridWorld-v0"
            )
        if (reason := unmodelled_dynamics(env)) is not None:
            raise ValueError(reason)
        if not isinstance(base.observation_space, gym.spaces.Discrete) or not isinstance(
            base.action_space, gym.spaces.Discrete
        ):
            raise ValueError("a tabular MDP needs Discrete observation and action spaces")
        extra: dict[str, Any] = {}
        name = type(base).__name__
        if name == "FrozenLakeEnv":
            extra = {"grid_shape": tuple(base.desc.shape), "moves": FROZENLAKE_MOVES}
        elif name == "CliffWalkingEnv":
            extra = {"grid_shape": tuple(base.shape), "moves": CLIFFWALKING_MOVES}
        return cls.from_transition_dict(
            base.P, int(base.observation_space.n), int(base.action_space.n), **extra
        )

    def to_torch(self, device: torch.device, dtype: torch.dtype) -> TorchMDP:
        return TorchMDP.from_mdp(self, device, dtype)


@dataclass
class TorchMDP:
    """The MDP's P (CSR) and R on a torch device, with the Bellman backup."""

    P: torch.Tensor  # sparse CSR, (A*S, S)
    R: torch.Tensor  # (A*S,) flattened like P's rows
    n_states: int
    n_actions: int

    @classmethod
    def from_mdp(cls, mdp: TabularMDP, device: torch.device, dtype: torch.dtype) -> TorchMDP:
        # int32 indices halve the index traffic of the (memory-bound) SpMV: ~2x faster on CPU.
        idx = torch.int32 if mdp.P.nnz < 2**31 - 1 else torch.int64
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            P = torch.sparse_csr_tensor(
                torch.from_numpy(mdp.P.indptr).to(idx),
                torch.from_numpy(mdp.P.indices).to(idx),
                torch.from_numpy(mdp.P.data).to(dtype),
                size=mdp.P.shape,
                check_invariants=False,  # scipy built it canonical: sorted, no duplicates
            ).to(device)
        R = torch.from_numpy(mdp.R.reshape(-1)).to(device=device, dtype=dtype)
        return cls(P=P, R=R, n_states=mdp.n_states, n_actions=mdp.n_actions)

    def q_values(
        self, V: torch.Tensor, gamma: float, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One Bellman backup: Q(s, a) = R(s, a) + gamma * sum_s' P(s'|s, a) V(s').

        V: (S,) -> Q: (A, S). A single sparse matrix-vector product over all actions; `out` (A*S,)
        reuses a buffer, which matters on small MDPs where allocation costs as much as the product.
        """
        Q = torch.addmv(self.R, self.P, V, alpha=gamma, out=out)
        return Q.view(self.n_actions, self.n_states)


def epsilon_optimal_threshold(epsilon: float, gamma: float) -> float:
    """Residual below which the greedy policy is epsilon-optimal.

    If ||V_{k+1} - V_k||_inf < epsilon (1 - gamma) / (2 gamma), the policy greedy with respect to
    V_{k+1} is epsilon-optimal (Puterman 1994, Thm 6.3.1; Williams & Baird 1993).
    """
    return float("inf") if gamma == 0 else epsilon * (1 - gamma) / (2 * gamma)


def precision_floor(V: torch.Tensor) -> float:
    """The smallest residual floating point can resolve for values of V's magnitude."""
    scale = max(1.0, float(V.abs().max()))
    return 16 * torch.finfo(V.dtype).eps * scale
