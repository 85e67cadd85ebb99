"""Checkpoints: state dicts saved as `.pt` files and handed to the run's writer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from runctx.timer import TrainTimer
from runctx.writers import Writer


class Checkpointer:
    """Saves state dicts (modules, optimizers, counters, generator states) as `.pt` files.

    Checkpoints are plain dicts of tensors and numbers, never pickled objects, so they load with
    `torch.load(weights_only=True)`. Each save is atomic (a rename), so a crash never leaves a
    half-written checkpoint; the newest `keep` stay on disk, and every one goes to the writer.
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
        tmp.replace(path)
        self.writer.write_artifact(path, "checkpoints")
        for old in sorted(self.directory.glob("step_*.pt"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint in the directory (a restarted trial finds its own there), or
        None. Loading it carries its training time into the timer."""
        files = sorted(self.directory.glob("step_*.pt")) if self.directory.exists() else []
        if not files:
            return None
        loaded: dict[str, Any] = torch.load(files[-1], map_location="cpu", weights_only=True)
        train_s = loaded.pop(self.TIMER_KEY, None)
        if train_s is not None and self.timer is not None:
            self.timer.carry_over(float(train_s))
        return loaded
