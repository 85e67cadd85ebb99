"""The MLflow side: batched writes, retries of transient failures only."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from runctx import MetricPoint, RejectedError
from service.store import ensure_experiment, resolve_tracking_uri
from service.tracking import MlflowWriter, is_transient, with_retries


def points(start: int, n: int) -> list[MetricPoint]:
    return [
        MetricPoint("losses/x", float(i), i, 1_700_000_000_000 + i) for i in range(start, start + n)
    ]


def new_run(uri: str, name: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(uri)
    return client, client.create_run(ensure_experiment(client, name, uri)).info.run_id


def test_mlflow_writer_batches_over_the_limit(tracking_uri: str, experiment_name: str) -> None:
    client, run_id = new_run(tracking_uri, experiment_name)
    MlflowWriter(client, run_id).write_metrics(points(0, 2500))  # more than one log_batch allows
    history = client.get_metric_history(run_id, "losses/x")
    assert sorted(m.step for m in history) == list(range(2500))


def test_points_mlflow_refuses_fail_fast_naming_the_metric(
    tracking_uri: str, experiment_name: str
) -> None:
    client, run_id = new_run(tracking_uri, experiment_name)
    client.delete_run(run_id)  # MLflow refuses writes to a deleted run: a 4xx, for good
    t = time.monotonic()
    with pytest.raises(RejectedError, match="losses/x"):
        MlflowWriter(client, run_id).write_metrics(points(0, 3))
    assert time.monotonic() - t < 5  # no backoff: 0.5 + 1 + 2 + ... seconds of retries


def test_transient_and_permanent_failures_are_told_apart() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        INTERNAL_ERROR,
        INVALID_PARAMETER_VALUE,
        RESOURCE_DOES_NOT_EXIST,
        TEMPORARILY_UNAVAILABLE,
    )

    from service.relay import RelayError

    assert is_transient(ConnectionError("reset"))
    assert is_transient(TimeoutError())
    assert is_transient(MlflowException("API request failed", error_code=INTERNAL_ERROR))
    assert is_transient(MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(MlflowException("no run", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(ValueError("invalid"))
    assert is_transient(RelayError("x", transient=True))
    assert not is_transient(RelayError("x", transient=False))


def test_permanent_failures_are_not_retried() -> None:
    calls = []

    def refused() -> None:
        calls.append(1)
        raise ValueError("invalid value")

    with pytest.raises(ValueError):
        with_retries(refused, "x", first_wait_s=0.01)
    assert len(calls) == 1


def test_retries_with_backoff_then_gives_up() -> None:
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    assert with_retries(flaky, "x", first_wait_s=0.01) == "ok"
    assert len(calls) == 3
    with pytest.raises(ConnectionError):
        with_retries(
            lambda: (_ for _ in ()).throw(ConnectionError("down")),
            "x",
            attempts=2,
            first_wait_s=0.01,
        )


def test_relative_sqlite_uri_is_made_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


def test_stepped_figures_become_an_mlflow_image_series(
    tracking_uri: str, experiment_name: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure

    from runctx import RunContext

    client, run_id = new_run(tracking_uri, experiment_name)
    ctx = RunContext(seed=0, writer=MlflowWriter(client, run_id), workdir=tmp_path)
    for step in (1, 2):
        fig = Figure(figsize=(1, 1))
        fig.add_subplot().plot([0, step])
        ctx.log_figure(fig, "samples", step=step)
    fig = Figure(figsize=(1, 1))
    ctx.log_figure(fig, "filters")
    ctx.close()
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert len(images) >= 2 and all("samples" in p for p in images)
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/filters.png"]


def test_ui_command_opens_mlflow_ui_on_the_store(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from service import cli
    from service.cli import experiments

    calls = []
    monkeypatch.setattr(experiments.os, "execvp", lambda prog, args: calls.append(args))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(cli.app, ["ui", "--port", "5055"])
    assert result.exit_code == 0
    (args,) = calls
    # This interpreter's MLflow: with `mlflow` looked up on PATH, `.venv/bin/rlgen ui` from a
    # shell without the venv activated failed with FileNotFoundError.
    assert args[:5] == [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri"]
    assert args[5] == f"sqlite:///{tmp_path}/mlflow.db" and args[-1] == "5055"


def test_experiments_open_on_the_runs_view(tracking_uri: str, experiment_name: str) -> None:
    client = MlflowClient(tracking_uri)
    exp_id = ensure_experiment(client, experiment_name, tracking_uri)
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert (
        ensure_experiment(client, experiment_name, tracking_uri) == exp_id
    )  # found, not duplicated


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    """MLflow migrates a new store's schema when it first opens it; without a lock, two processes
    doing so at once crash ("table ... already exists")."""
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    start = time.time() + 3  # past the imports: the three open the store at the same moment
    code = (
        "import sys, time; from service.store import client_for; "
        f"time.sleep(max(0, {start} - time.time())); "
        f"client_for({uri!r}).search_experiments(max_results=1)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors


def test_param_names_mlflow_refuses_are_made_valid(tracking_uri: str, experiment_name: str) -> None:
    """Keys of free-form mappings (env.kwargs, driver.resources) become param names."""
    from runctx import name_problem as mlflow_name_problem
    from service.tracking import params_batch

    flat = {
        "env.kwargs.a,b": "1",
        "driver.resources.x/../y": "2",
        "ok/name: 1": "3",
        "k" * 300: "4",
    }
    params = params_batch(flat)
    assert [p.key for p in params][2] == "ok/name: 1"  # valid names stay as they are
    assert all(mlflow_name_problem(p.key) is None for p in params), [p.key for p in params]
    client, run_id = new_run(tracking_uri, experiment_name)
    client.log_batch(run_id, params=params, synchronous=True)  # MLflow takes them all
    assert len(client.get_run(run_id).data.params) == 4


def test_a_parent_run_that_cannot_be_set_up_ends_failed_not_running(
    tracking_uri: str, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.entities import Param

    from service import execution
    from service.spec import load_spec_text

    spec = load_spec_text(
        f"name: {experiment_name}\nalgorithm: value_iteration\nenv: {{id: FrozenLake-v1}}\n"
        "seeds: [0, 1]\n".encode(),
        "spec",
    )
    monkeypatch.setattr(execution, "params_batch", lambda flat: [Param("a,b", "refused")])
    with pytest.raises(Exception, match="Invalid value"):
        execution.launch(spec, mode="local", tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]  # the parent; no trial started


def test_sqlite_stores_are_checked_without_importing_mlflow(tmp_path: Path) -> None:
    """`rlgen run` checks its store before Ray starts; MLflow is imported later, by the launch."""
    import sqlite3

    from service.store import TrackingStoreError, check_store

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    check_store(f"sqlite:///{empty}")  # an empty database: MLflow creates its tables
    check_store(f"sqlite:///{tmp_path / 'new.db'}")  # no file yet: created on first use
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(TrackingStoreError, match="not MLflow's"):
        check_store(f"sqlite:///{other}")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(TrackingStoreError, match="cannot open the tracking store"):
        check_store(f"sqlite:///{garbage}")
    code = (
        "import sys; from service.store import check_store; "
        f"check_store({'sqlite:///' + str(empty)!r}); sys.exit('mlflow' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_an_mlflow_store_passes_the_check(tracking_uri: str, experiment_name: str) -> None:
    from service.store import check_store

    new_run(tracking_uri, experiment_name)  # the store now holds MLflow's tables
    check_store(tracking_uri)
