"""The driver's tracking relay: what trials on the embedded cluster ask of MLflow, done by the
driver (`service.relay`), so that their processes never import MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from service.relay import Relay, RelayError, RelayTracker
from service.spec import load_spec, resolved
from service.store import ensure_experiment
from service.tracking import TAG_LAUNCH, TAG_TRIAL, Tracker
from service.trial import TrialRequest, tracker_for

from .conftest import ROOT


def points(start: int, n: int, key: str = "losses/x") -> list[tuple[str, float, int, int]]:
    return [(key, float(i), i, 1_700_000_000_000 + i) for i in range(start, start + n)]


def test_a_run_recorded_through_the_relay(
    tracking_uri: str, experiment_name: str, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, experiment_name, tracking_uri)
    launch_id = uuid.uuid4().hex
    with Relay(tracking_uri) as relay:
        tracker = RelayTracker(relay.address)
        assert tracker.find_run(experiment_id, launch_id, "s0") is None
        run_id = tracker.create_run(
            experiment_id, {TAG_LAUNCH: launch_id, TAG_TRIAL: "s0", "x": "1"}, "relayed-s0"
        )
        tracker.log_params(run_id, {"params.gamma": "0.99", "env.kwargs.a(b)": "1"})
        # Two trials writing at once, each over its own connection, more than one batch each.
        others = [RelayTracker(relay.address) for _ in range(2)]
        threads = [
            threading.Thread(target=t.write_metrics, args=(run_id, points(0, 1500, f"k/{i}")))
            for i, t in enumerate(others)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        checkpoint = tmp_path / "step_100.pt"
        checkpoint.write_bytes(b"state")
        tracker.write_artifact(run_id, str(checkpoint), "checkpoints")
        # A restarted trial finds its run, its checkpoint and the steps already logged.
        found = tracker.find_run(experiment_id, launch_id, "s0")
        assert found is not None and found[0] == run_id and found[1]["x"] == "1"
        workdir = tmp_path / "restart"
        workdir.mkdir()
        assert tracker.resume(run_id, str(workdir)) == {"k/0": 1499, "k/1": 1499}
        assert (workdir / "checkpoints" / "step_100.pt").read_bytes() == b"state"
        tracker.set_terminated(run_id, "FINISHED")
        for t in (tracker, *others):
            t.close()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "relayed-s0"
    assert run.data.params == {"params.gamma": "0.99", "env.kwargs.a_b_": "1"}
    assert run.data.tags["rlgen.resumed_from"] == "checkpoints/step_100.pt"
    for key in ("k/0", "k/1"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1500))
    assert not Path(relay.address).parent.exists()  # its socket's directory is gone


def test_the_relay_answers_errors_and_serves_only_the_trackers_methods(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.tracking.with_retries", lambda fn, what, **kw: fn())
    with Relay(tracking_uri) as relay:
        tracker = RelayTracker(relay.address)
        with pytest.raises(RelayError, match="no method 'client'"):
            tracker._call("client")
        with pytest.raises(RelayError, match="no method '__init__'"):
            tracker._call("__init__", "sqlite:///elsewhere.db")
        # MLflow's own error comes back (after the driver's retries, none here)...
        with pytest.raises(RelayError, match=r"MlflowException: Run with id=0+ not found"):
            tracker.set_tag("0" * 32, "k", "v")
        # ...and the connection still works.
        assert tracker.find_run("0", uuid.uuid4().hex, "s0") is None
    with pytest.raises(ConnectionError, match="relay went away"):
        tracker.set_tag("0" * 32, "k", "v")


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9", "sqlite"])
def test_a_call_waiting_on_a_tracking_server_holds_up_no_other_trial(
    uri: str, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One trial's call is stuck (a server retried through an outage): on a tracking server the
    other trials' calls go on; into a SQLite store they wait their turn (one writer)."""
    stuck, release = threading.Event(), threading.Event()

    def set_tag(self: Tracker, run_id: str, key: str, value: str) -> None:
        if run_id == "stuck":
            stuck.set()
            release.wait(timeout=30)

    monkeypatch.setattr(Tracker, "set_tag", set_tag)
    with Relay(tracking_uri if uri == "sqlite" else uri) as relay:
        first, second = RelayTracker(relay.address), RelayTracker(relay.address)
        waiting = threading.Thread(target=first.set_tag, args=("stuck", "k", "v"))
        waiting.start()
        assert stuck.wait(timeout=10)
        other = threading.Thread(target=second.set_tag, args=("other", "k", "v"))
        other.start()
        other.join(timeout=2)
        assert other.is_alive() == (uri == "sqlite")
        release.set()
        for thread in (waiting, other):
            thread.join(timeout=10)
            assert not thread.is_alive()
        first.close()
        second.close()


TRIAL = r"""
import json, sys
from service.trial import TrialRequest, run_trial

request = TrialRequest(**json.loads(sys.argv[1]))
outcome = run_trial(request)
print(json.dumps({"status": outcome.status, "run_id": outcome.run_id,
                  "mlflow": sorted(m for m in sys.modules if m.split(".")[0] == "mlflow")}))
"""


def test_a_trial_through_the_relay_never_imports_mlflow(
    tracking_uri: str, experiment_name: str
) -> None:
    spec = load_spec(ROOT / "experiments" / "value_iteration_frozenlake.yaml")
    client = MlflowClient(tracking_uri)
    request = {
        "spec": resolved(spec),
        "seed": 3,
        "tracking_uri": tracking_uri,
        "experiment_id": ensure_experiment(client, experiment_name, tracking_uri),
        "launch_id": uuid.uuid4().hex,
    }
    with Relay(tracking_uri) as relay:
        out = subprocess.run(
            [sys.executable, "-c", TRIAL, json.dumps({**request, "relay": relay.address})],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "FINISHED" and result["mlflow"] == []
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["seed"] == "3"
    assert run.data.metrics["eval/return_mean"] > 0.5  # value iteration solves the lake
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"spec.yaml", "figures"}


def test_trials_use_the_relay_exactly_when_the_launch_gives_one(
    tracking_uri: str, tmp_path: Path
) -> None:
    """One path per deployment: a request with the driver's relay (the embedded cluster) goes
    through it, one without (a cluster) opens MLflow; a relay that no longer answers is an
    error (its driver, and with it the launch, is gone), never a quiet switch of paths."""
    request = TrialRequest(
        spec={}, seed=0, tracking_uri=tracking_uri, experiment_id="0", launch_id="x"
    )
    with Relay(tracking_uri) as relay:
        tracker = tracker_for(replace(request, relay=relay.address))
        assert isinstance(tracker, RelayTracker)
        tracker.close()
    assert isinstance(tracker_for(request), Tracker)
    with pytest.raises(OSError):
        tracker_for(replace(request, relay=relay.address))  # its driver is gone


def test_a_killed_drivers_directory_is_removed_by_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver killed by SIGKILL cannot remove its relay socket's directory; the next driver
    removes it, and keeps those of drivers still running."""
    import tempfile

    from service.cluster import private_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is free now (reuse within the test is astronomically unlikely)
    dead = tmp_path / f"rlgen.relay-{gone.pid}-abc"
    live = tmp_path / f"rlgen.relay-{os.getppid()}-def"
    other = tmp_path / f"rlgen.relay-{gone.pid}"  # not one of ours: no "-" after the pid
    for d in (dead, live, other):
        d.mkdir()
        (d / "socket").touch()
    new = Path(private_dir("rlgen.relay-"))
    assert not dead.exists() and live.exists() and other.exists()
    assert new.parent == tmp_path and new.name.startswith(f"rlgen.relay-{os.getpid()}-")
    assert new.stat().st_mode & 0o777 == 0o700


def test_a_rejection_through_the_relay_fails_fast_naming_the_metric(
    tracking_uri: str, experiment_name: str
) -> None:
    """A permanent refusal (writing to a deleted run) comes back through the relay as
    `RejectedError` with the metric's name, without the retries a transient failure gets."""
    from runctx import MetricPoint, RejectedError
    from service.tracking import RunWriter

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(ensure_experiment(client, experiment_name, tracking_uri)).info.run_id
    client.delete_run(run_id)
    with Relay(tracking_uri) as relay:
        tracker = RelayTracker(relay.address)
        t = time.monotonic()
        with pytest.raises(RejectedError, match="losses/x"):
            RunWriter(tracker, run_id).write_metrics([MetricPoint("losses/x", 1.0, 0, 0)])
        assert time.monotonic() - t < 5
        tracker.close()
