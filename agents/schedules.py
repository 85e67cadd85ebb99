"""Schedules shared by the RL algorithms (exploration, step sizes, importance exponents)."""

from __future__ import annotations


def linear_schedule(start: float, end: float, duration: float, t: float) -> float:
    """`start` at t = 0, moving linearly to `end` at t = `duration`, and `end` after it."""
    if duration <= 0:
        return end
    return start + (end - start) * min(1.0, t / duration)
