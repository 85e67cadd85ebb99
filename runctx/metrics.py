"""Buffered metric logging: `log()` costs a list append, a background thread writes batches."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from runctx.points import MetricPoint, name_problem
from runctx.writers import RejectedError, Writer

log = logging.getLogger(__name__)


class MetricLogger:
    """Buffers metric points and hands them to the writer in batches, off the training thread.

    One MLflow `log_metric` call costs ~5 ms against SQLite, too much inside a training loop. So
    `log()` only appends to a buffer; when the buffer fills or `flush_interval_s` has passed (so
    the UI shows a long run's progress), a background thread writes it.

    Failures are of two kinds (the writer tells them apart):
    - transient (the tracking server restarts, SQLite is busy): the batch stays in the buffer, in
      order, and is retried at the next wake-up, so nothing is lost while the store is away;
    - permanent (`RejectedError`: the store refuses the points): the batch is dropped, and the
      next `log()`, `flush()` or `close()` raises the error, naming the metrics, so the run fails
      with the reason instead of blocking every later point behind one that can never be written.
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
        self._rejected: RejectedError | None = None
        self._valid_names: set[str] = set()
        self._buffer: list[MetricPoint] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()  # guards the buffer
        self._write_lock = threading.Lock()  # one batch in flight at a time, in order
        self._due = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def log(self, metrics: Mapping[str, float | int | torch.Tensor | np.number], step: int) -> None:
        self._raise_rejected()
        if not -(2**63) <= step < 2**63:  # MLflow stores steps as 64-bit integers
            raise ValueError(f"step {step} is outside the 64-bit range MLflow stores")
        now_ms = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            if key not in self._valid_names:  # each name is checked once
                problem = name_problem(key)
                if problem is not None:
                    raise ValueError(f"metric name {key!r}: {problem}")
                self._valid_names.add(key)
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
        self._write_if_due(due)

    def _write_if_due(self, due: bool) -> None:
        if due or time.monotonic() - self._last_flush >= self.flush_interval_s:
            if not self.background:
                self.flush()
                return
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name="rlgen-metrics", daemon=True
                    )
                    self._thread.start()
            self._last_flush = time.monotonic()  # one wake-up per interval, not one per log()
            self._due.set()

    def log_side(self, metrics: Mapping[str, float], step: int) -> None:
        """Points from outside the training loop (the trial's system monitor, another thread):
        buffered and written with the others, but not seen by `on_log` (which reports training
        results to Ray Tune), nor counted in `last`, nor filtered by `logged_until`."""
        now_ms = int(time.time() * 1000)
        points = [MetricPoint(k, float(v), int(step), now_ms) for k, v in metrics.items()]
        with self._lock:
            self._buffer.extend(points)
            due = len(self._buffer) >= self.max_buffer
        if self.background:  # never writes on the caller's thread
            self._write_if_due(due)

    def _loop(self) -> None:
        while not self._closing.is_set():
            self._due.wait(timeout=self.flush_interval_s)
            self._due.clear()
            try:
                self.flush()
            except RejectedError as e:
                self._rejected = e  # for the training thread to raise, at its next log()
            except Exception as e:  # kept in the buffer; the next wake-up or close() retries
                self.last_error = e
                log.warning("metrics not written yet (%s); kept for the next attempt", e)

    def _raise_rejected(self) -> None:
        if self._rejected is not None:
            error, self._rejected = self._rejected, None
            raise error

    def flush(self) -> None:
        """Write the buffer now; raises what the writer raised (see the class docstring)."""
        with self._write_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
                self._last_flush = time.monotonic()
            if batch:
                try:
                    self.writer.write_metrics(batch)
                except RejectedError as e:
                    self._rejected = self.last_error = e
                except BaseException:
                    with self._lock:
                        self._buffer[:0] = batch  # keep what could not be written, in order
                    raise
        self._raise_rejected()

    def close(self) -> None:
        """Stop the background writer and write what is left (raises if that fails)."""
        if self._thread is not None:
            self._closing.set()
            self._due.set()
            self._thread.join()
            self._thread = None
        self.flush()
