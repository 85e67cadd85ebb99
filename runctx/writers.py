"""Where a run's records end up: the `Writer` protocol, and the in-memory writer for tests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from runctx.points import MetricPoint


class RejectedError(ValueError):
    """The store refused these records for good (an invalid name or value, a 4xx answer).

    Writers raise it to tell a permanent rejection from a transient failure (a lost connection,
    a 5xx answer, a busy SQLite file): the metric logger retries the latter and drops the former,
    so one bad point never holds up every point logged after it."""


class Writer(Protocol):
    """Where a run's records end up (MLflow in the service, memory in tests)."""

    def write_metrics(self, points: Sequence[MetricPoint]) -> None:
        """Write a batch; raise `RejectedError` if it can never be written."""
        ...

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
