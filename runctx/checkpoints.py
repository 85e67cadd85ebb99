"""Checkpoints: the state of a run saved as `.pt` files and handed to the run's writer.

An algorithm names the objects that make up its state and saves them with its counters:

    state = {"model": model, "optimizer": opt, "batches": order_generator}
    if (saved := ctx.checkpoints.restore(state)) is not None:   # a restarted or continued run
        start_epoch = saved["epoch"]
    ...
    ctx.checkpoints.save({**capture(state), "epoch": epoch + 1}, step=epoch + 1)

`capture` and `restore` know modules, optimizers and anything else with `state_dict()`, torch
generators and NumPy generators, so "every random generator's state" is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runctx.timer import TrainTimer
from runctx.writers import Writer


class CheckpointError(ValueError):
    """A checkpoint that cannot initialise this run: a missing entry or a tensor's shape."""


def capture(objects: Mapping[str, Any]) -> dict[str, Any]:
    """The saveable state of each object: `state_dict()` (modules, optimizers, replay buffers),
    a copy of a tensor (a value table), a torch generator's state tensor, a NumPy generator's
    bit-generator state (a dict of ints)."""
    out: dict[str, Any] = {}
    for name, obj in objects.items():
        if isinstance(obj, torch.Tensor):
            out[name] = obj.detach().cpu().clone()
        elif isinstance(obj, torch.Generator):
            out[name] = obj.get_state()
        elif isinstance(obj, np.random.Generator):
            out[name] = obj.bit_generator.state
        else:
            out[name] = obj.state_dict()
    return out


def load(objects: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Put `capture`'s output back into the same objects (tensors are copied into in place)."""
    missing = sorted(set(objects) - set(state))
    if missing:
        raise CheckpointError(f"the checkpoint has no {', '.join(map(repr, missing))}")
    for name, obj in objects.items():
        if isinstance(obj, torch.Tensor):
            with torch.no_grad():
                obj.copy_(state[name])
        elif isinstance(obj, torch.Generator):
            obj.set_state(state[name])
        elif isinstance(obj, np.random.Generator):
            obj.bit_generator.state = state[name]
        else:
            obj.load_state_dict(state[name])


def is_weights(obj: Any) -> bool:
    """Whether `obj` is what another run's checkpoint can initialise: a module or a tensor."""
    return isinstance(obj, (torch.nn.Module, torch.Tensor))


def check_shapes(weights: torch.nn.Module | torch.Tensor, saved: Any, prefix: str) -> None:
    """Raise `CheckpointError` naming the first tensor of `weights` whose saved shape differs,
    or that the checkpoint lacks or has in excess."""
    if isinstance(weights, torch.Tensor):
        own, saved = {"": weights}, {"": saved}
    else:
        own = weights.state_dict()
    for key in sorted(set(own) | set(saved)):
        name = f"{prefix}.{key}" if key else prefix
        if key not in saved:
            raise CheckpointError(f"tensor {name}: not in the checkpoint")
        if key not in own:
            raise CheckpointError(f"tensor {name}: in the checkpoint, not in this model")
        theirs = tuple(saved[key].shape) if saved[key] is not None else None
        ours = tuple(own[key].shape) if own[key] is not None else None
        if theirs != ours:
            raise CheckpointError(
                f"tensor {name}: shape {list(theirs or [])} in the checkpoint, "
                f"{list(ours or [])} in this model"
            )


class InitChecked(Exception):
    """Raised by `Checkpointer.restore` when the checkpointer only checks an initialisation
    (`check_only`): the algorithm built its models and the weights fit them."""


class Checkpointer:
    """Saves a run's state (modules, optimizers, counters, generator states) as `.pt` files.

    The file format is `torch.save` of a dict of tensors, numbers, strings and dicts of them, so
    checkpoints load with `torch.load(weights_only=True)`; an algorithm that keeps an opaque
    object (an environment's simulator state) stores it as bytes it decodes itself. Each save is
    atomic (a rename), so a crash never leaves a half-written checkpoint; the newest `keep` stay
    on disk, and every one goes to the writer.

    `init` holds another run's checkpoint for a run started from its weights (`--init-from`):
    `restore` then loads the modules' weights only, after checking every tensor's shape.
    """

    TIMER_KEY = "_rlgen_train_s"  # the run's training time so far, carried into a restart

    def __init__(
        self,
        directory: Path,
        writer: Writer,
        *,
        keep: int = 2,
        timer: TrainTimer | None = None,
        init: Mapping[str, Any] | None = None,
        check_only: bool = False,
        before_save: Callable[[], None] | None = None,
        after_save: Callable[[Path, int], None] | None = None,
    ):
        self.directory = directory
        # The run context flushes the metrics here: a checkpoint is never ahead of them, so a
        # restart that replays the steps after it loses no point logged before it.
        self.before_save = before_save
        self.after_save = after_save  # (file, step): a population scheduler hears of it
        self.writer = writer
        self.keep = keep
        self.timer = timer
        self.init = init
        self.check_only = check_only

    def save(self, state: Mapping[str, Any], step: int) -> Path:
        if self.before_save is not None:
            self.before_save()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step_{step:010d}.pt"
        tmp = path.with_suffix(".tmp")
        extra = {self.TIMER_KEY: self.timer.elapsed()} if self.timer is not None else {}
        torch.save({**state, **extra}, tmp)
        tmp.replace(path)
        self.writer.write_artifact(path, "checkpoints")
        for old in sorted(self.directory.glob("step_*.pt"))[: -self.keep]:
            old.unlink(missing_ok=True)
        if self.after_save is not None:
            self.after_save(path, step)
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

    def restore(self, objects: Mapping[str, Any]) -> dict[str, Any] | None:
        """Where the run goes on from a checkpoint (a restart, `rlgen continue`), load the
        newest one into `objects` and return it, counters and all. Where it starts from another
        run's weights (and has no checkpoint of its own yet), load those into the modules and
        tensors among `objects` and return None: the run starts at step 0 with fresh optimizers.
        Else None."""
        state = self.latest()
        if state is not None:
            load(objects, state)
            return state
        if self.init is not None:
            weights = {k: v for k, v in objects.items() if is_weights(v)}
            for name, obj in weights.items():
                if name not in self.init:
                    raise CheckpointError(f"the checkpoint has no {name!r}")
                check_shapes(obj, self.init[name], name)
            if self.check_only:
                raise InitChecked
            load(weights, self.init)
        return None
