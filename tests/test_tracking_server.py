"""A real `mlflow server` goes away mid-run and comes back: the run's metric logger keeps what it
could not write and loses nothing (marked `e2e`: it starts the server twice, ~15 s)."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from runctx import MetricLogger
from service import tracking
from service.relay import Relay, RelayTracker
from service.tracking import RunWriter, Tracker

from .test_e2e import free_port, wait_for

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


class Server:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its gunicorn/uvicorn workers go down with it
        )  # fmt: skip
        wait_for(f"{self.uri}/health")

    def kill(self) -> None:
        assert self.proc is not None
        import os

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    s.start()
    try:
        yield s
    finally:
        if s.proc is not None:
            s.kill()


def log_while_down(logger: MetricLogger, server: Server, steps: range) -> None:
    """Stop the server and log `steps`: logging never waits for it."""
    server.kill()
    down = time.monotonic()
    for step in steps:
        logger.log({"losses/x": step}, step=step)
        time.sleep(0.005)
    assert time.monotonic() - down < 5, "logging blocked while the server was down"


def logged_steps(server: Server, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(server.uri).get_metric_history(run_id, "losses/x"))


def test_metrics_logged_while_the_server_is_down_arrive_after_it_restarts(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow's own HTTP retries would otherwise wait out the outage inside one call.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    # A trial's writer stack on a cluster: buffered logger -> MLflow in the trial's process.
    writer = RunWriter(Tracker(client), run_id)
    logger = MetricLogger(writer, max_buffer=50, flush_interval_s=0.2)

    for step in range(200):
        logger.log({"losses/x": step}, step=step)
    logger.flush()

    calls: list[tuple[float, float, bool]] = []  # (start, end, raised) of each batch write
    write = writer.write_metrics

    def recorded(points):  # type: ignore[no-untyped-def]
        start = time.monotonic()
        try:
            write(points)
        except Exception:
            calls.append((start, time.monotonic(), True))
            raise
        calls.append((start, time.monotonic(), False))

    writer.write_metrics = recorded  # type: ignore[method-assign]

    log_while_down(logger, server, range(200, 400))
    time.sleep(2)  # the background thread's write is retrying with backoff by now
    restart = time.monotonic()  # down until here at least (`start` returns once it answers,
    server.start()  # which on a busy machine can be after the retried write got through)
    logger.close()
    # Some write was under way while the server was down, and failed or waited it out.
    assert any(start < restart and (raised or end > restart) for start, end, raised in calls), calls
    assert logged_steps(server, run_id) == list(range(400))  # nothing lost, nothing twice


def test_metrics_relayed_by_the_driver_survive_an_outage(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded cluster's path: a trial's logger writes through the driver's relay, whose
    retries give up while the server stays down; the logger keeps the batch and the relay
    stays usable, so everything arrives once the server is back."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # The relay's own retries, shortened: they give up within the outage (0.2 s + 0.4 s).
    retries = functools.partial(tracking.with_retries, attempts=3, first_wait_s=0.2)
    monkeypatch.setattr(tracking, "with_retries", retries)
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("relayed-outage")).info.run_id
    with Relay(server.uri) as relay:
        tracker = RelayTracker(relay.address)
        logger = MetricLogger(RunWriter(tracker, run_id), max_buffer=50, flush_interval_s=0.2)
        for step in range(100):
            logger.log({"losses/x": step}, step=step)
        logger.flush()

        log_while_down(logger, server, range(100, 300))
        # The relay's retries run out while the server is down: the logger keeps the batch.
        deadline = time.monotonic() + 60
        while logger.last_error is None:
            assert time.monotonic() < deadline, "no write failed while the server was down"
            time.sleep(0.2)
        server.start()
        logger.close()
        tracker.close()
    assert logged_steps(server, run_id) == list(range(300))  # nothing lost, nothing twice
