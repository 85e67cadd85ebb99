"""Experience replay for DQN: n-step transitions, uniform and proportional prioritized buffers.

Every stored transition is already in the form the TD target needs,

    y = G + d * Q_target(s', .)        G = sum_{j<k} gamma^j r_{t+j},   d = gamma^k (1 - terminated)

with k = n, or fewer steps when the episode ended first. A time-limit truncation ends the episode
but keeps d = gamma^k (its value is bootstrapped); only a true termination zeroes it. Storing
(s, a, G, s', d) makes 1-step and n-step replay, uniform and prioritized, one code path.
"""

from __future__ import annotations

import math
import os
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


# Redraws of a batch's dead transitions (`FrameStore`) before giving up.
MAX_REDRAWS = 100


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory `device` has in all (the host's RAM for the CPU), or None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """Refuse `what`, a buffer of `nbytes` at capacity, if the device cannot hold it at all.
    Buffers are allocated uninitialised and fill as a run goes, so without this check a run
    would die hours in, when the host's OOM killer ends it or the GPU runs out."""
    total = device_memory(device)
    if total is not None and nbytes > total:
        raise MemoryError(
            f"{what} would take {nbytes / 2**30:,.1f} GiB when full, more than the "
            f"{total / 2**30:,.1f} GiB of memory of this {device.type}: lower the buffer size"
        )


class ReplayBuffer:
    """A ring buffer of transitions, preallocated as tensors on the training device.

    Sampling draws indices with the trial's generator; adding k transitions is one slice
    assignment per field (two when they wrap around the end). With `frames`, observations are
    (S,) frame ids of a `FrameStore` (obs_shape (S,), int64), turned back into stacks of frames
    when sampled; transitions whose frames were overwritten are redrawn.
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        obs_dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator,
        frames: FrameStore | None = None,
        action_shape: tuple[int, ...] = (),
        action_dtype: torch.dtype = torch.int64,
    ):
        self.capacity, self.device, self.generator = capacity, device, generator
        self.frames = frames
        row = 2 * math.prod(obs_shape) * obs_dtype.itemsize
        row += math.prod(action_shape) * action_dtype.itemsize + 2 * 4  # + returns, discounts
        what = f"a replay buffer of {capacity:,} transitions of {obs_shape} observations"
        store = 0
        if frames is not None:
            store, what = frames.nbytes(), what + " (frame ids) and its frames"
        check_fits(capacity * row + store, device, what)
        # Uninitialised: rows are read only once written (below `size`), and the host's pages
        # are then touched as the buffer fills instead of all at start (zeroing 2.8 GB of image
        # stacks takes seconds).
        self.obs = torch.empty((capacity, *obs_shape), dtype=obs_dtype, device=device)
        self.next_obs = torch.empty_like(self.obs)
        # Action indices (DQN), or continuous action vectors (SAC: action_shape (A,), float32).
        self.actions = torch.empty((capacity, *action_shape), dtype=action_dtype, device=device)
        self.returns = torch.empty(capacity, dtype=torch.float32, device=device)
        self.discounts = torch.empty(capacity, dtype=torch.float32, device=device)
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
        # index_select: whole rows copied at once (see `FrameStore.stack`).
        obs, next_obs = self.obs.index_select(0, idx), self.next_obs.index_select(0, idx)
        if self.frames is not None:
            obs, next_obs = self.frames.stack(obs), self.frames.stack(next_obs)
        return Batch(
            obs,
            self.actions.index_select(0, idx),
            self.returns.index_select(0, idx),
            next_obs,
            self.discounts.index_select(0, idx),
            weights,
            idx,
        )

    def dead(self, idx: torch.Tensor) -> torch.Tensor:
        """(B,) rows -> (B,) bool: transitions whose frames were overwritten."""
        if self.frames is None:
            return torch.zeros(len(idx), dtype=torch.bool, device=self.device)
        return ~(self.frames.alive(self.obs[idx]) & self.frames.alive(self.next_obs[idx]))

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(
            0, self.size, (batch_size,), generator=self.generator, device=self.device
        )
        for _ in range(MAX_REDRAWS):
            dead = self.dead(idx)
            if self.frames is None or not bool(dead.any()):
                return self._gather(idx, None)
            redraw = torch.randint(
                0, self.size, (batch_size,), generator=self.generator, device=self.device
            )
            idx = torch.where(dead, redraw, idx)
        raise RuntimeError(_TOO_MANY_DEAD)

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


_TOO_MANY_DEAD = (
    "replay: the frames of almost every sampled transition were overwritten; the frame store "
    "is too small for the buffer"
)


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
        for _ in range(MAX_REDRAWS):
            batch = self._sample(batch_size)
            dead = self.dead(batch.indices)
            if self.frames is None or not bool(dead.any()):
                return batch
            # Never again: no mass in the sum tree, and out of the min tree's minimum.
            rows = batch.indices[dead].cpu().numpy()
            self.sums.update(rows, np.zeros(len(rows)))
            self.mins.update(rows, np.full(len(rows), np.inf))
        raise RuntimeError(_TOO_MANY_DEAD)

    def _sample(self, batch_size: int) -> Batch:
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


class FrameStore:
    """Each frame of stacked observations stored once, on the training device.

    Atari observations are stacks of the last S frames, (S, H, W) uint8, and consecutive
    observations share S - 1 of them. Storing both stacks of every transition, as a plain buffer
    does, costs 2 S frames a transition (SB3's default: 56 KB at 84x84); this stores one. A
    transition holds its two stacks as S frame ids each; `stack(ids)` rebuilds them.

    `intern(obs)` turns a step's observations (N, S, H, W) into ids (N, S), writing only frames
    it has not seen: per env, a stack that is the previous one shifted by one frame (the usual
    step) writes its newest frame; any other (a reset) writes its distinct frames, with all-zero
    padding frames sharing one permanent zero frame. Sampled stacks are therefore exactly the
    stacks the env returned.

    Frames live in a ring of `capacity` slots. An id is a global frame count; the slot holding
    it is `id % capacity`, and the id is alive while that slot still holds it. Transitions whose
    frames were overwritten are dead: the replay buffer never returns them (`alive`).
    """

    ZERO = -1  # the id of the all-zero frame

    def __init__(
        self, capacity: int, frame_shape: tuple[int, ...], num_envs: int, device: torch.device
    ):
        self.capacity, self.device = capacity, device
        check_fits(
            (capacity + 1) * math.prod(frame_shape) + capacity * 8,  # frames, ids
            device,
            f"a frame store of {capacity:,} frames of {frame_shape}",
        )
        # One more row: the zero frame, at index `capacity`. The ring is left uninitialised (a
        # slot is read only once its id is in `ids`), so its pages are touched as it fills.
        self.frames = torch.empty((capacity + 1, *frame_shape), dtype=torch.uint8, device=device)
        self.frames[capacity] = 0
        self.ids = torch.full((capacity,), -2, dtype=torch.int64, device=device)  # id per slot
        self.written = 0  # frames written so far: the next id
        self.last_obs: list[np.ndarray | None] = [None] * num_envs  # per env: its last stack
        self.last_ids: list[np.ndarray | None] = [None] * num_envs

    def intern(self, obs: np.ndarray, envs: np.ndarray | None = None) -> np.ndarray:
        """Ids (N, S) of the stacks obs (N, S, H, W) of envs `envs` (default: 0..N-1)."""
        envs = np.arange(len(obs)) if envs is None else envs
        out = np.empty(obs.shape[:2], dtype=np.int64)
        new: list[np.ndarray] = []  # frames to write, in id order
        for row, e in enumerate(envs):
            stack, last = obs[row], self.last_obs[e]
            last_ids = self.last_ids[e]
            if last is not None and last_ids is not None and np.array_equal(stack, last):
                ids = last_ids
            elif last is not None and last_ids is not None and np.array_equal(stack[:-1], last[1:]):
                ids = np.append(last_ids[1:], self._id_of(stack[-1], None, new))
            else:
                ids = np.empty(len(stack), dtype=np.int64)
                for j, frame in enumerate(stack):
                    same = j > 0 and np.array_equal(frame, stack[j - 1])
                    ids[j] = self._id_of(frame, ids[j - 1] if same else None, new)
            out[row] = ids
            self.last_obs[e], self.last_ids[e] = stack.copy(), ids
        if new:
            first = self.written - len(new)
            gids = torch.arange(first, self.written, device=self.device)
            slots = gids % self.capacity
            self.frames[slots] = torch.as_tensor(np.stack(new), device=self.device)
            self.ids[slots] = gids
        return out

    def _id_of(self, frame: np.ndarray, same_as: int | None, new: list[np.ndarray]) -> int:
        if same_as is not None:
            return same_as
        if not frame.any():
            return self.ZERO
        new.append(frame)
        self.written += 1
        return self.written - 1

    def alive(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> (B,): whether every frame is still stored."""
        held = self.ids[ids.clamp(min=0) % self.capacity]
        return ((ids == self.ZERO) | (held == ids)).all(dim=1)

    def stack(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> (B, S, H, W) frames."""
        slots = torch.where(ids == self.ZERO, self.capacity, ids % self.capacity)
        # index_select copies whole frames; indexing with a (B, S) tensor goes byte by byte on
        # CPUs (0.6 ms against 0.05 for 32 stacks of 4 84x84 frames).
        return self.frames.index_select(0, slots.flatten()).view(*ids.shape, *self.frames.shape[1:])

    def forget_episodes(self) -> None:
        """Fresh episodes begin (a resumed run without its envs): no stack continues."""
        self.last_obs = [None] * len(self.last_obs)
        self.last_ids = [None] * len(self.last_ids)

    def state_dict(self) -> dict[str, object]:
        kept = min(self.written, self.capacity)
        has_last = [o is not None for o in self.last_obs]
        return {
            "frames": self.frames[:kept].cpu(),
            "ids": self.ids[:kept].cpu(),
            "written": self.written,
            "has_last": torch.tensor(has_last),
            "last_obs": torch.from_numpy(
                np.array([o for o in self.last_obs if o is not None], dtype=np.uint8)
            ),
            "last_ids": torch.from_numpy(
                np.array([i for i in self.last_ids if i is not None], dtype=np.int64)
            ),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        kept = len(state["ids"])  # type: ignore[arg-type]
        self.frames[:kept] = state["frames"].to(self.device)  # type: ignore[attr-defined]
        self.ids[:kept] = state["ids"].to(self.device)  # type: ignore[attr-defined]
        self.written = int(state["written"])  # type: ignore[call-overload]
        rows = iter(zip(state["last_obs"].numpy(), state["last_ids"].numpy(), strict=True))  # type: ignore[attr-defined]
        for e, has in enumerate(state["has_last"].tolist()):  # type: ignore[attr-defined]
            self.last_obs[e], self.last_ids[e] = next(rows) if has else (None, None)

    def nbytes(self) -> int:
        return self.frames.nbytes + self.ids.nbytes
