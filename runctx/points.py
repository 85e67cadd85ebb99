"""A metric point, and the one rule for names of metrics, params and tags.

Metrics are named `group/name` (`charts/episode_return`, `eval/fid`, `loss/kl`): MLflow's UI
groups charts by the part before the slash.
"""

from __future__ import annotations

import posixpath
import re
from typing import NamedTuple


class MetricPoint(NamedTuple):
    key: str
    value: float
    step: int
    timestamp_ms: int


NAME_MAX = 250  # MLflow's limit for metric, param and tag names


def name_problem(name: str) -> str | None:
    """Why MLflow would refuse `name` as a metric, param or tag name (None: it would not):
    letters, digits, _ - . space : and /, at most 250 characters, and a path that does not
    normalise to another name ("a//b", "../x")."""
    if not name:
        return "empty"
    if len(name) > NAME_MAX:
        return f"longer than MLflow's {NAME_MAX} characters"
    if not re.fullmatch(r"[/\w.\- :]+", name, flags=re.ASCII):
        return "MLflow names hold only letters, digits, _ - . space : and /"
    if posixpath.normpath(name) != name or name.startswith(".."):
        return f"reads as the path {posixpath.normpath(name)!r} in MLflow"
    return None
