"""Experience replay for DQN: n-step transitions, uniform and proportional prioritized buffers.

Every stored transition is already in the form the TD target needs,

    y = G + d * Q_target(s', .)        G = sum_{j<k} gamma^j r_{t+j},   d = gamma^k (1 - terminated)

with k = n, or fewer steps when the episode ended first. A time-limit truncation ends the episode
but keeps d = gamma^k (its value is bootstrapped); only a true termination zeroes it. Storing
(s, a, G, s', d) makes 1-step and n-step replay, uniform and prioritized, one code path.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Transitions:
    """A batch of k transitions, numpy on the way in: obs (k, *obs_shape), the rest (k,)."""

    obs: np.ndarray
    actions: np.ndarray
    returns: np.ndarray
    next_obs: np.ndarray
    discounts: np.ndarray

    def __len__(self) -> int:
        return len(self.actions)


class NStep:
    """Turns each env's stream of 1-step transitions into n-step ones (Sutton & Barto, 7.1).

    `push` takes one vector-env step, (num_envs, ...) arrays, and returns the transitions that are
    complete: for each env, the one that started n steps ago, and at the end of an episode every
    pending one with its shorter horizon. `valid` masks steps that are not transitions (the reset
    step of gymnasium's next-step autoreset).
    """

    def __init__(self, n: int, num_envs: int, gamma: float):
        self.n, self.gamma = n, gamma
        self.pending: list[deque[tuple[np.ndarray, int, float]]] = [
            deque() for _ in range(num_envs)
        ]

    def push(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        done: np.ndarray,
        valid: np.ndarray,
    ) -> Transitions:
        if self.n == 1:  # the common case, vectorised: every valid step is a transition
            return Transitions(
                obs[valid],
                actions[valid],
                rewards[valid].astype(np.float32),
                next_obs[valid],
                (self.gamma * ~terminated[valid]).astype(np.float32),
            )
        out: list[tuple[np.ndarray, int, float, np.ndarray, float]] = []
        for e in np.flatnonzero(valid):
            queue = self.pending[e]
            queue.append((obs[e], int(actions[e]), float(rewards[e])))
            if done[e]:
                while queue:  # flush: horizons len(queue), len(queue) - 1, ..., 1
                    out.append(self._emit(queue, next_obs[e], bool(terminated[e])))
                    queue.popleft()
            elif len(queue) == self.n:
                out.append(self._emit(queue, next_obs[e], False))
                queue.popleft()
        if not out:
            empty = np.empty((0, *obs.shape[1:]), dtype=obs.dtype)
            return Transitions(
                empty,
                np.empty(0, np.int64),
                np.empty(0, np.float32),
                empty,
                np.empty(0, np.float32),
            )
        o, a, g, no, d = zip(*out, strict=True)
        return Transitions(
            np.stack(o),
            np.array(a),
            np.array(g, dtype=np.float32),
            np.stack(no),
            np.array(d, dtype=np.float32),
        )

    def _emit(
        self, queue: deque[tuple[np.ndarray, int, float]], next_obs: np.ndarray, terminated: bool
    ) -> tuple[np.ndarray, int, float, np.ndarray, float]:
        ret = sum(self.gamma**j * r for j, (_, _, r) in enumerate(queue))
        discount = 0.0 if terminated else self.gamma ** len(queue)
        obs, action, _ = queue[0]
        return obs, action, ret, next_obs, discount

    def reset(self) -> None:
        for queue in self.pending:
            queue.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The pending steps of every env, concatenated: obs (P, ...), actions (P,), rewards
        (P,), and each env's count (num_envs,)."""
        steps = [step for queue in self.pending for step in queue]
        return {
            "counts": torch.tensor([len(q) for q in self.pending], dtype=torch.int64),
            "obs": torch.from_numpy(np.array([o for o, _, _ in steps])),
            "actions": torch.tensor([a for _, a, _ in steps], dtype=torch.int64),
            "rewards": torch.tensor([r for _, _, r in steps], dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        steps = (state["obs"].numpy(), state["actions"].tolist(), state["rewards"].tolist())
        rows = iter(zip(*steps, strict=True))
        for queue, count in zip(self.pending, state["counts"].tolist(), strict=True):
            queue.clear()
            queue.extend(next(rows) for _ in range(count))


@dataclass
class Batch:
    """A sampled batch on the training device: obs (B, *obs_shape), the rest (B,)."""

    obs: torch.Tensor
    actions: torch.Tensor
    returns: torch.Tensor
    next_obs: torch.Tensor
    discounts: torch.Tensor
    weights: torch.Tensor | None  # importance-sampling weights (prioritized replay only)
    indices: torch.Tensor


class ReplayBuffer:
    """A ring buffer of transitions, preallocated as tensors on the training device.

    Sampling draws indices with the trial's generator; adding k transitions is one slice
    assignment per field (two when they wrap around the end).
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        obs_dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator,
    ):
        self.capacity, self.device, self.generator = capacity, device, generator
        self.obs = torch.zeros((capacity, *obs_shape), dtype=obs_dtype, device=device)
        self.next_obs = torch.zeros_like(self.obs)
        self.actions = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.returns = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.discounts = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.pos = 0  # next row to write
        self.size = 0

    def fields(self) -> dict[str, torch.Tensor]:
        return {
            "obs": self.obs,
            "next_obs": self.next_obs,
            "actions": self.actions,
            "returns": self.returns,
            "discounts": self.discounts,
        }

    def add(self, t: Transitions) -> np.ndarray:
        """Store k transitions; returns the rows they went to, (k,)."""
        k = len(t)
        if k == 0:
            return np.empty(0, dtype=np.int64)
        if k > self.capacity:  # only the newest fit
            k = self.capacity
            t = Transitions(
                t.obs[-k:], t.actions[-k:], t.returns[-k:], t.next_obs[-k:], t.discounts[-k:]
            )
        rows = (self.pos + np.arange(k)) % self.capacity
        first = min(k, self.capacity - self.pos)  # rows before the wrap
        for name, src in (
            ("obs", t.obs),
            ("next_obs", t.next_obs),
            ("actions", t.actions),
            ("returns", t.returns),
            ("discounts", t.discounts),
        ):
            dst = getattr(self, name)
            data = torch.as_tensor(src, device=self.device).to(dst.dtype)
            dst[self.pos : self.pos + first] = data[:first]
            if first < k:
                dst[: k - first] = data[first:]
        self.pos = (self.pos + k) % self.capacity
        self.size = min(self.size + k, self.capacity)
        return rows

    def _gather(self, idx: torch.Tensor, weights: torch.Tensor | None) -> Batch:
        return Batch(
            self.obs[idx],
            self.actions[idx],
            self.returns[idx],
            self.next_obs[idx],
            self.discounts[idx],
            weights,
            idx,
        )

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(
            0, self.size, (batch_size,), generator=self.generator, device=self.device
        )
        return self._gather(idx, None)

    def update_priorities(self, indices: torch.Tensor, td_errors: torch.Tensor) -> None:
        """Uniform replay has no priorities."""

    def state_dict(self) -> dict[str, object]:
        return {
            **{k: v[: self.size].cpu() for k, v in self.fields().items()},
            "pos": self.pos,
            "size": self.size,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        size = int(state["size"])  # type: ignore[call-overload]
        for name, dst in self.fields().items():
            dst[:size] = state[name].to(self.device)  # type: ignore[attr-defined]
        self.pos, self.size = int(state["pos"]), size  # type: ignore[call-overload]


class SumTree:
    """Binary tree over `capacity` leaves (a power of two) whose nodes hold the sum (or the min)
    of their children: O(log N) updates, prefix-sum search and total. Node 1 is the root; the
    leaves sit at [capacity, 2 capacity). Batched: every operation is one numpy op per level."""

    def __init__(self, capacity: int, op: str = "sum"):
        self.capacity = 1 << max(0, int(capacity - 1).bit_length())
        self.op = op
        self.neutral = 0.0 if op == "sum" else np.inf
        self.depth = self.capacity.bit_length() - 1
        self.nodes = np.full(2 * self.capacity, self.neutral)

    def update(self, leaves: np.ndarray, values: np.ndarray) -> None:
        i = leaves + self.capacity
        self.nodes[i] = values  # with repeated leaves the last value wins, as in a loop
        combine = np.add if self.op == "sum" else np.minimum
        for _ in range(self.depth):  # repeated parents just get the same value twice
            i >>= 1
            self.nodes[i] = combine(self.nodes[2 * i], self.nodes[2 * i + 1])

    @property
    def root(self) -> float:
        return float(self.nodes[1])

    def find(self, mass: np.ndarray) -> np.ndarray:
        """For each prefix mass u in [0, total): the leaf i with sum(<i) <= u < sum(<=i)."""
        i = np.ones(len(mass), dtype=np.int64)
        u = mass.astype(np.float64, copy=True)
        for _ in range(self.depth):
            left = self.nodes[2 * i]
            right = u >= left
            u -= left * right
            i = 2 * i + right
        return i - self.capacity


class PrioritizedReplayBuffer(ReplayBuffer):
    """Proportional prioritized replay (Schaul et al. 2016).

    P(i) = p_i^alpha / sum_k p_k^alpha with p_i = |delta_i| + eps; new transitions get the largest
    priority seen so far, so each is replayed at least once soon. The bias is corrected by the
    importance weights w_i = (N P(i))^-beta / max_j w_j (the max is over the whole buffer, through
    a min-tree of priorities), with beta annealed to 1 by the caller.
    """

    def __init__(self, *args: object, alpha: float, eps: float, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.alpha, self.eps = alpha, eps
        self.sums = SumTree(self.capacity, "sum")
        self.mins = SumTree(self.capacity, "min")
        self.max_priority = 1.0  # of p^alpha
        self.beta = 0.4

    def add(self, t: Transitions) -> np.ndarray:
        rows = super().add(t)
        if len(rows):
            values = np.full(len(rows), self.max_priority)
            self.sums.update(rows, values)
            self.mins.update(rows, values)
        return rows

    def sample(self, batch_size: int) -> Batch:
        # Stratified: one uniform draw in each of batch_size equal slices of the total mass.
        total = self.sums.root
        u = (
            torch.rand(
                batch_size,
                generator=self.generator,
                dtype=torch.float64,
                device=self.generator.device,
            )
            .cpu()
            .numpy()
        )
        mass = (np.arange(batch_size) + u) * (total / batch_size)
        leaves = np.minimum(self.sums.find(np.minimum(mass, np.nextafter(total, 0))), self.size - 1)
        probs = self.sums.nodes[leaves + self.sums.capacity] / total
        min_prob = self.mins.root / total
        # w_i / max_j w_j = (P(i) / min_j P(j))^-beta: N cancels.
        weights = (probs / min_prob) ** -self.beta
        idx = torch.as_tensor(leaves, device=self.device)
        return self._gather(idx, torch.as_tensor(weights, dtype=torch.float32, device=self.device))

    def update_priorities(self, indices: torch.Tensor, td_errors: torch.Tensor) -> None:
        priorities = (td_errors.detach().abs().double().cpu().numpy() + self.eps) ** self.alpha
        leaves = indices.cpu().numpy()
        self.sums.update(leaves, priorities)
        self.mins.update(leaves, priorities)
        self.max_priority = max(self.max_priority, float(priorities.max()))

    def state_dict(self) -> dict[str, object]:
        return {
            **super().state_dict(),
            "priorities": torch.from_numpy(
                self.sums.nodes[self.sums.capacity : self.sums.capacity + self.size].copy()
            ),
            "max_priority": self.max_priority,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        super().load_state_dict(state)
        priorities = state["priorities"].numpy()  # type: ignore[attr-defined]
        rows = np.arange(len(priorities))
        self.sums.update(rows, priorities)
        self.mins.update(rows, priorities)
        self.max_priority = float(state["max_priority"])  # type: ignore[arg-type]
