"""`RunContext`: the plumbing every algorithm shares, composed from small parts.

ctx.seed, ctx.device                    the trial's seed and torch device
ctx.rng("exploration")                  independent NumPy generators, one per purpose
ctx.torch_generator("init")             independent torch generators, one per purpose
ctx.log_metrics({...}, step)            buffered `group/name` metrics (`MetricLogger`)
ctx.log_summary({...})                  one-off results of the run (drawn as bars, not lines)
ctx.log_figure(fig, name, step=None)    a figure, or one image of a per-step series
ctx.checkpoints.restore(objects)        resume (or start from another run's weights)
ctx.checkpoints.save(state, step)       state dicts (`Checkpointer`, `capture`)
ctx.timer.paused()                      evaluation off the training clock (`TrainTimer`)
ctx.should_stop()                       a stop was requested (Ctrl-C, cancel)
ctx.make_env(), ctx.make_vec_env(n)     the spec's environment (RL)
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from runctx.checkpoints import Checkpointer
from runctx.metrics import MetricLogger
from runctx.timer import TrainTimer
from runctx.writers import InMemoryWriter, Writer

if TYPE_CHECKING:
    import gymnasium as gym
    from matplotlib.figure import Figure

# The step of one-off results (`RunContext.log_summary`).
SUMMARY_STEP = 0


def scheduled_once(every: int, total: int) -> bool:
    """Whether a score due "every `every` epochs and at the end" (0: at the end only) comes once
    in `total` epochs: then it is a one-off result for `log_summary`, not a one-point curve."""
    return every <= 0 or every >= total


class EnvFactory(Protocol):
    """What a spec's `env` section gives the run context (`agents.envs.EnvSpec`)."""

    @property
    def id(self) -> str: ...

    def make(self, evaluation: bool = False, **overrides: Any) -> gym.Env: ...

    def make_vec(
        self, num_envs: int, evaluation: bool = False, **overrides: Any
    ) -> gym.vector.VectorEnv: ...


def stream_seed(seed: int, stream: str) -> np.random.SeedSequence:
    """The seed sequence of one named random stream of a trial.

    Equivalent to `SeedSequence(seed).spawn(...)`, whose children differ only in `spawn_key`,
    but keyed by the stream's name instead of by the order of the calls: adding a stream to an
    algorithm never shifts the numbers another stream draws."""
    return np.random.SeedSequence(seed, spawn_key=(zlib.crc32(stream.encode()),))


def stream_torch_generator(
    seed: int, stream: str, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A torch generator on `device` for one named stream of `seed` (see `stream_seed`)."""
    (state,) = stream_seed(seed, stream).generate_state(1, dtype=np.uint64)
    return torch.Generator(device=torch.device(device)).manual_seed(int(state) & (2**63 - 1))


class RunContext:
    """What `train(config, ctx)` gets besides its config. See the module docstring."""

    def __init__(
        self,
        *,
        seed: int,
        writer: Writer,
        workdir: Path,
        device: torch.device | str = "cpu",
        env: EnvFactory | None = None,
        dataset: Any = None,
        run_id: str = "local",
        stop_event: threading.Event | None = None,
        on_metrics: Callable[[Mapping[str, float], int, Any], None] | None = None,
        logged_until: Mapping[str, int] | None = None,
        init_from: Mapping[str, Any] | None = None,
        check_only: bool = False,
        on_checkpoint: Callable[[Path, int], None] | None = None,
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
        # init_from: another run's checkpoint whose weights start this run (`--init-from`);
        # check_only: only check they fit (see `Checkpointer.restore`).
        self.checkpoints = Checkpointer(
            workdir / "checkpoints",
            writer,
            timer=self.timer,
            init=init_from,
            check_only=check_only,
            before_save=self.metrics.flush,
            after_save=on_checkpoint,
        )
        self.log = logging.getLogger(f"rlgen.run.{run_id}")
        self._stop = stop_event or threading.Event()

    @classmethod
    def in_memory(
        cls,
        *,
        seed: int = 0,
        workdir: Path | str,
        env: EnvFactory | None = None,
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

    # -- random streams -----------------------------------------------------------------------
    # Every random draw in an algorithm comes from one of these, never from a global RNG. Each
    # purpose (network initialisation, exploration, batch sampling, fixed sample noise) has its
    # own stream, so that, say, sampling one more batch never changes the network's weights.
    def rng(self, stream: str) -> np.random.Generator:
        """A new NumPy generator for the named stream (the same numbers for the same seed)."""
        return np.random.default_rng(stream_seed(self.seed, stream))

    def torch_generator(
        self, stream: str, device: torch.device | str | None = None
    ) -> torch.Generator:
        """A new torch generator for the named stream, on `device` (default: the run's)."""
        return stream_torch_generator(self.seed, stream, device or self.device)

    # -- metrics and files --------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer `group/name` metrics at `step`; they are written in batches."""
        self.metrics.log(metrics, step)

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """Log one-off results of the whole run (a final probe accuracy, a solver's iteration
        count): values with no curve to draw.

        They are logged at step 0. MLflow's chart view draws a metric as a line when a run has it
        at a step >= 1 and otherwise as bars, one per run: the comparison a one-off result needs,
        where a single point at the last step would be a one-dot line chart.
        """
        self.metrics.log(metrics, SUMMARY_STEP)

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
    # `evaluation=True`: envs for evaluating, which play whole episodes and report the env's
    # own rewards where the training envs' preprocessing changes them (Atari's clipped rewards
    # and life-loss terminals).
    def make_env(self, evaluation: bool = False, **overrides: Any) -> gym.Env:
        if self.env is None:
            raise RuntimeError("this run has no `env` in its spec")
        return self.env.make(evaluation, **overrides)

    def make_vec_env(
        self, num_envs: int, evaluation: bool = False, **overrides: Any
    ) -> gym.vector.VectorEnv:
        if self.env is None:
            raise RuntimeError("this run has no `env` in its spec")
        return self.env.make_vec(num_envs, evaluation, **overrides)

    # -- cooperative cancellation -------------------------------------------------------------
    def should_stop(self) -> bool:
        """True once a stop was requested (Ctrl-C, cancel); loops check it and return early."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.metrics.close()
