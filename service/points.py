"""The unit of metric logging, in a module of its own so that the metric-writer helper process
can import it without torch (which would add ~0.8 s to its start)."""

from __future__ import annotations

from typing import NamedTuple


class MetricPoint(NamedTuple):
    key: str
    value: float
    step: int
    timestamp_ms: int
