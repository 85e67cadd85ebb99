"""Shared fixtures: one Ray instance and one MLflow SQLite store for the whole session."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def validate_without(module: str, spec: Path) -> subprocess.CompletedProcess[str]:
    """`rlgen validate SPEC` in a fresh interpreter where `module` cannot be imported: what a
    machine without the extra that installs it sees."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; "
        "sys.argv = ['rlgen', 'validate', sys.argv[1]]; from service.cli import main; main()"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(spec)], capture_output=True, text=True, cwd=ROOT
    )


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not), from Linux /proc: also for processes
    that are not this one's children."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store per session (creating its tables takes seconds); tests use unique names."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def experiment_name() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """Ray starts in ~5 s: start it once and share it across the session. It is the embedded
    cluster `rlgen run` starts (trials tracked through the driver's relay),
    with logical GPUs (there are none here): placement of GPU trials is testable."""
    import ray

    from service.cluster import embedded, start_ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    start_ray(num_cpus=2, num_gpus=2)
    assert embedded()
    yield
    ray.shutdown()


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path
