"""The live table of trials that `rlgen run` shows on stderr."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.live import Live
from rich.markup import escape
from rich.table import Table

from service.cli.app import err

STYLE = {
    "PENDING": "dim",
    "RUNNING": "cyan",
    "FINISHED": "green",
    "FAILED": "red",
    "KILLED": "yellow",
}


class ProgressTable:
    """A live table of trials on stderr (final state only when stderr is not a terminal).

    Rows are trial labels (`s0`, or `s0 learning_rate=0.001` in a sweep), added as they appear.
    The result column shows the first of `metrics` (the experiment's own: its scheduler's metric,
    its `report` list) a trial logged, else its headline metric, so that rows compare.
    """

    def __init__(self, labels: list[str], title: str, metrics: Sequence[str] = ()):
        from service.aggregates import HEADLINE

        self.title = title
        self.metrics = tuple(dict.fromkeys([*metrics, *HEADLINE]))
        self.rows: dict[str, dict[str, Any]] = {}
        for label in labels:
            self._row(label)
        self.live = Live(
            self.render(),
            console=err,
            refresh_per_second=4,
            auto_refresh=err.is_terminal,
            transient=False,
        )

    def _row(self, label: str) -> dict[str, Any]:
        return self.rows.setdefault(
            label, {"status": "PENDING", "run_id": "", "t0": None, "t1": None, "result": ""}
        )

    def update(
        self, label: str, status: str, run_id: str | None, metrics: dict[str, float] | None = None
    ) -> None:
        row = self._row(label)
        key = next((k for k in self.metrics if k in (metrics or {})), None)
        if key is not None and metrics is not None:
            row["result"] = f"{key} = {metrics[key]:.4g}"
        now = time.monotonic()
        if status == "RUNNING" and row["t0"] is None:
            row["t0"] = now
        if status in ("FINISHED", "FAILED", "KILLED"):
            row["t1"] = now
        row["status"] = status
        row["run_id"] = run_id or row["run_id"]
        self.live.update(self.render())

    def render(self) -> Table:
        table = Table(title=self.title, title_justify="left")
        for col in ("trial", "status", "MLflow run", "time", "result"):
            table.add_column(col)
        for label, row in self.rows.items():
            elapsed = (
                "" if row["t0"] is None else f"{(row['t1'] or time.monotonic()) - row['t0']:.1f}s"
            )
            table.add_row(
                escape(label),
                f"[{STYLE.get(row['status'], '')}]{row['status']}",
                row["run_id"],
                elapsed,
                escape(row["result"]),
            )
        return table
