"""The run context: everything an algorithm receives besides its own config.

An algorithm is `train(config, ctx)`. The context carries the plumbing every algorithm shares
(seed and generators, device, buffered metric logging, figures, checkpoints, the training clock and
cooperative stop requests), composed from small parts rather than inherited. This module imports
neither Ray nor MLflow: `agents/` and `generative/` run in-process against `RunContext.in_memory()`,
and the service plugs an MLflow writer in behind the same interface.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.points import MetricPoint

if TYPE_CHECKING:
    import gymnasium as gym
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

_METRIC_KEY = re.compile(r"^[A-Za-z0-9_\-. /]+$")


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
        import gymnasium as gym

        registered = gym.registry.get(str(data.get("id")))
        if registered is None or not str(registered.entry_point).endswith(":FrozenLakeEnv"):
            return data
        from gymnasium.envs.toy_text.frozen_lake import generate_random_map

        text = json.dumps({"id": data["id"], "kwargs": kwargs}, sort_keys=True, default=str)
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return {**data, "kwargs": {**kwargs, "desc": generate_random_map(seed=seed)}}

    def make(self, **overrides: Any) -> gym.Env:
        import gymnasium as gym

        import agents  # noqa: F401  (registers rlgen/* environments)

        return gym.make(self.id, **{**self.kwargs, **overrides})

    def make_vec(self, num_envs: int, **overrides: Any) -> gym.vector.VectorEnv:
        """`num_envs` copies as one vector env: the env's own batched implementation where
        gymnasium ships one (classic control), else a `SyncVectorEnv` of `gym.make` copies."""
        import gymnasium as gym

        import agents  # noqa: F401

        return gym.make_vec(self.id, num_envs=num_envs, **{**self.kwargs, **overrides})


class Writer(Protocol):
    """Where a run's records end up (MLflow in the service, memory in tests)."""

    def write_metrics(self, points: Sequence[MetricPoint]) -> None: ...

    def write_artifact(self, local_path: Path, artifact_dir: str) -> None: ...

    def write_image(self, local_path: Path, key: str, step: int) -> None:
        """One image of a series `key` at `step` (the MLflow UI pages through steps)."""
        ...


@dataclass
class InMemoryWriter:
    """Keeps everything in memory: the writer for tests and notebooks."""

    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    artifacts: list[tuple[Path, str]] = field(default_factory=list)
    batches: int = 0

    def write_metrics(self, points: Sequence[MetricPoint]) -> None:
        self.batches += 1
        for p in points:
            self.metrics[p.key].append((p.step, p.value))

    def write_artifact(self, local_path: Path, artifact_dir: str) -> None:
        self.artifacts.append((local_path, artifact_dir))

    def write_image(self, local_path: Path, key: str, step: int) -> None:
        self.artifacts.append((local_path, f"images/{key}"))


class MetricLogger:
    """Buffers metric points and hands them to the writer in batches, off the training thread.

    One MLflow `log_metric` call costs ~5 ms against SQLite and even `log_batch` ~0.05-0.1 ms a
    metric, too much to pay inside a training loop. So `log()` only appends to a buffer; when the
    buffer fills or `flush_interval_s` has passed (so the UI still shows a long run's progress), a
    background thread writes it. A batch the writer fails on stays in the buffer and is retried,
    so nothing is lost while the tracking server is away. `flush()` writes synchronously and
    raises; `close()` stops the thread and flushes.
    """

    def __init__(
        self,
        writer: Writer,
        *,
        max_buffer: int = 1000,
        flush_interval_s: float = 10.0,
        background: bool = True,
        on_log: Callable[[Mapping[str, float], int, Any], None] | None = None,
        logged_until: Mapping[str, int] | None = None,
    ):
        self.writer = writer
        # A resumed run replays the steps after its checkpoint; those a metric already has are
        # not logged again (MLflow would keep both).
        self.logged_until = dict(logged_until or {})
        # Sees every logged dict, with this logger (the service flushes, then reports to Ray Tune).
        self.on_log = on_log
        self.max_buffer = max_buffer
        self.flush_interval_s = flush_interval_s
        self.background = background
        self.last: dict[str, float] = {}
        self.last_step = 0
        self.last_error: BaseException | None = None
        self._buffer: list[MetricPoint] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()  # guards the buffer
        self._write_lock = threading.Lock()  # one batch in flight at a time, in order
        self._due = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def log(self, metrics: Mapping[str, float | int | torch.Tensor | np.number], step: int) -> None:
        now_ms = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            if not _METRIC_KEY.match(key):
                raise ValueError(f"metric name {key!r} has characters MLflow does not accept")
            v = float(value.item() if isinstance(value, torch.Tensor) else value)
            if step <= self.logged_until.get(key, -1):
                continue
            points.append(MetricPoint(key, v, int(step), now_ms))
            self.last[key] = v
        with self._lock:
            self._buffer.extend(points)
            self.last_step = max(self.last_step, int(step))
            due = len(self._buffer) >= self.max_buffer
        if self.on_log is not None:
            self.on_log({p.key: p.value for p in points}, int(step), self)
        if due or time.monotonic() - self._last_flush >= self.flush_interval_s:
            if not self.background:
                self.flush()
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="rlgen-metrics", daemon=True
                )
                self._thread.start()
            self._last_flush = time.monotonic()  # one wake-up per interval, not one per log()
            self._due.set()

    def _loop(self) -> None:
        while not self._closing.is_set():
            self._due.wait(timeout=self.flush_interval_s)
            self._due.clear()
            try:
                self.flush()
            except Exception as e:  # kept in the buffer; the next wake-up or close() retries
                self.last_error = e
                log.warning("metrics not written yet (%s); kept for the next attempt", e)

    def flush(self) -> None:
        with self._write_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
                self._last_flush = time.monotonic()
            if not batch:
                return
            try:
                self.writer.write_metrics(batch)
            except BaseException:
                with self._lock:
                    self._buffer[:0] = batch  # keep what could not be written, in order
                raise

    def close(self) -> None:
        """Stop the background writer and write what is left (raises if that fails)."""
        if self._thread is not None:
            self._closing.set()
            self._due.set()
            self._thread.join()
            self._thread = None
        self.flush()


class TrainTimer:
    """Wall-clock seconds spent training: runs from `start()`, minus every `paused()` block.

    Algorithms wrap evaluation and figure rendering in `with ctx.timer.paused():` so that
    `time/train_s` measures training alone.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._paused_s = 0.0
        self._pause_depth = 0
        self._pause_start = 0.0
        self._stopped_at: float | None = None
        self._carried_s = 0.0  # training time before a restart, from the checkpoint resumed

    def start(self) -> None:
        self._start, self._paused_s, self._stopped_at = time.perf_counter(), 0.0, None
        self._carried_s = 0.0

    def carry_over(self, seconds: float) -> None:
        """Count `seconds` of training done before this process resumed from a checkpoint."""
        self._carried_s = seconds

    def stop(self) -> None:
        if self._stopped_at is None:
            self._stopped_at = time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._pause_depth += 1
        if self._pause_depth == 1:
            self._pause_start = time.perf_counter()
        try:
            yield
        finally:
            if self._pause_depth == 1:
                self._paused_s += self._paused_before(self._end())
            self._pause_depth -= 1

    def _end(self) -> float:
        return self._stopped_at if self._stopped_at is not None else time.perf_counter()

    def _paused_before(self, t: float) -> float:
        """Seconds of the pause in progress before `t`: none of a pause begun after `stop()`
        (a final evaluation), only its first part if the timer stopped during it."""
        return max(0.0, t - self._pause_start) if self._pause_depth else 0.0

    def elapsed(self) -> float:
        if self._start is None:
            return self._carried_s
        end = self._end()
        return self._carried_s + end - self._start - self._paused_s - self._paused_before(end)


class Checkpointer:
    """Saves state dicts (modules, optimizers, counters) as `.pt` files, handed to the writer.

    Checkpoints are plain dicts of tensors and numbers, never pickled objects, so they load with
    `torch.load(weights_only=True)`.
    """

    TIMER_KEY = "_rlgen_train_s"  # the run's training time so far, carried into a restart

    def __init__(
        self, directory: Path, writer: Writer, *, keep: int = 2, timer: TrainTimer | None = None
    ):
        self.directory = directory
        self.writer = writer
        self.keep = keep
        self.timer = timer

    def save(self, state: Mapping[str, Any], step: int) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step_{step:010d}.pt"
        tmp = path.with_suffix(".tmp")
        extra = {self.TIMER_KEY: self.timer.elapsed()} if self.timer is not None else {}
        torch.save({**state, **extra}, tmp)
        tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
        self.writer.write_artifact(path, "checkpoints")
        for old in sorted(self.directory.glob("step_*.pt"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> dict[str, Any] | None:
        files = sorted(self.directory.glob("step_*.pt")) if self.directory.exists() else []
        if not files:
            return None
        loaded: dict[str, Any] = torch.load(files[-1], map_location="cpu", weights_only=True)
        train_s = loaded.pop(self.TIMER_KEY, None)
        if train_s is not None and self.timer is not None:  # resuming: time/train_s goes on
            self.timer.carry_over(float(train_s))
        return loaded


class RunContext:
    """What `train(config, ctx)` gets besides its config. See the module docstring."""

    def __init__(
        self,
        *,
        seed: int,
        writer: Writer,
        workdir: Path,
        device: torch.device | str = "cpu",
        env: EnvSpec | None = None,
        dataset: Any = None,
        run_id: str = "local",
        stop_event: threading.Event | None = None,
        on_metrics: Callable[[Mapping[str, float], int, Any], None] | None = None,
        logged_until: Mapping[str, int] | None = None,
    ):
        self.seed = seed
        self.run_id = run_id
        self.device = torch.device(device)
        self.env = env
        self.dataset = dataset
        self.workdir = workdir
        self.writer = writer
        self.metrics = MetricLogger(writer, on_log=on_metrics, logged_until=logged_until)
        self.timer = TrainTimer()
        self.checkpoints = Checkpointer(workdir / "checkpoints", writer, timer=self.timer)
        self.log = logging.getLogger(f"rlgen.run.{run_id}")
        # Every random draw in an algorithm comes from these, never from a global RNG.
        self.np_rng = np.random.default_rng(seed)
        self.torch_rng = torch.Generator(device=self.device).manual_seed(seed)
        self._stop = stop_event or threading.Event()

    @classmethod
    def in_memory(
        cls,
        *,
        seed: int = 0,
        workdir: Path | str,
        env: EnvSpec | None = None,
        dataset: Any = None,
        device: torch.device | str = "cpu",
    ) -> RunContext:
        """A context recording into an `InMemoryWriter` (`ctx.writer`): for tests and notebooks."""
        return cls(
            seed=seed,
            writer=InMemoryWriter(),
            workdir=Path(workdir),
            device=device,
            env=env,
            dataset=dataset,
        )

    # -- metrics ------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer `group/name` metrics at `step`; they are written in batches."""
        self.metrics.log(metrics, step)

    def log_figure(self, fig: Figure, name: str, step: int | None = None) -> Path:
        """Save a matplotlib figure as a PNG (off the training clock).

        Without a step it is the artifact `figures/{name}.png`; with one it joins the image
        series `name`, which the MLflow UI pages through by step (per-epoch samples).
        """
        with self.timer.paused():
            out_dir = self.workdir / "figures"
            out_dir.mkdir(parents=True, exist_ok=True)
            stem = name if step is None else f"{name}_step{step:08d}"
            path = out_dir / f"{stem}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            if step is None:
                self.writer.write_artifact(path, "figures")
            else:
                self.writer.write_image(path, name, step)
        return path

    def log_artifact(self, path: Path, artifact_dir: str = "") -> None:
        self.writer.write_artifact(path, artifact_dir)

    # -- environments -------------------------------------------------------------------------
    def make_env(self, **overrides: Any) -> gym.Env:
        if self.env is None:
            raise RuntimeError("this run has no `env` in its spec")
        return self.env.make(**overrides)

    def make_vec_env(self, num_envs: int, **overrides: Any) -> gym.vector.VectorEnv:
        if self.env is None:
            raise RuntimeError("this run has no `env` in its spec")
        return self.env.make_vec(num_envs, **overrides)

    # -- cooperative cancellation -------------------------------------------------------------
    def should_stop(self) -> bool:
        """True once a stop was requested (Ctrl-C, cancel); loops check it and return early."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.metrics.close()
