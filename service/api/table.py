"""The experiments the API submitted: a SQLite table, so it survives a restart of the service."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class ExperimentTable:
    """One row per submitted experiment; job states come live from Ray, not from here."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS experiments (id TEXT PRIMARY KEY, job_id TEXT, "
                "name TEXT, algorithm TEXT, created REAL, spec TEXT)"
            )

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def add(self, row: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO experiments VALUES (:id, :job_id, :name, :algorithm, :created, :spec)",
                row,
            )

    def get(self, exp_id: str) -> dict[str, Any] | None:
        with self._db() as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM experiments WHERE id = ?", (exp_id,)).fetchone()
        return dict(row) if row else None

    def all(self) -> list[dict[str, Any]]:
        with self._db() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM experiments ORDER BY created DESC").fetchall()
        return [dict(r) for r in rows]
