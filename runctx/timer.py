"""The training clock: `time/train_s` counts training, not evaluation or figures."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class TrainTimer:
    """Wall-clock seconds spent training: runs from `start()`, minus every `paused()` block.

    Algorithms wrap evaluation and figure rendering in `with ctx.timer.paused():` so that
    `time/train_s` measures training alone. A run resumed from a checkpoint carries the time
    trained before (`carry_over`).
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._paused_s = 0.0
        self._pause_depth = 0
        self._pause_start = 0.0
        self._stopped_at: float | None = None
        self._carried_s = 0.0

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
