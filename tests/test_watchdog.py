"""The watcher that ends what a killed driver leaves behind (service.watchdog); the command-line case
(SIGKILL of `rlgen run`, embedded Ray and --local) is in test_cli."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from service.tracking import TAG_ERROR, TAG_LAUNCH
from service.watchdog import kill_cluster

from .conftest import ROOT, alive


def wait_gone(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid), f"process {pid} still there"


def holder(tmp_path: Path, folder: str, path: Path) -> subprocess.Popen[bytes]:
    """A process whose command line runs a script in `folder` and that keeps `path` open."""
    script = tmp_path / folder / f"hold_{uuid.uuid4().hex[:6]}.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(
        f"import sys, time\nf = open({str(path)!r}, 'a')\nsys.stdout.write('ready\\n')\n"
        "sys.stdout.flush()\ntime.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_kill_cluster_stops_only_rays_processes_of_that_session(tmp_path: Path) -> None:
    session, other = tmp_path / "session_a", tmp_path / "session_b"
    ours = holder(tmp_path, "ray", session / "logs" / "agent.err")  # ".../ray/..." like Ray's
    theirs = holder(tmp_path, "ray", other / "logs" / "agent.err")  # another cluster
    tail = holder(tmp_path, "tools", session / "logs" / "agent.err")  # a user reading a log
    try:
        assert kill_cluster(str(session)) == 1
        assert ours.wait(timeout=10) == -9
        assert theirs.poll() is None and tail.poll() is None
    finally:
        for proc in (ours, theirs, tail):
            proc.kill()
            proc.wait()


DRIVER = """
import os, signal, sys
from service.watchdog import Watchdog

uri, experiment_id, launch_id, session_dir, how = sys.argv[1:]
guard = Watchdog(uri, experiment_id, launch_id, session_dir)
print(guard._proc.pid, flush=True)
if how == "done":
    guard.close()
elif how == "failed":
    with guard:
        raise SystemExit("boom")  # an error the driver reports: it lives on, its cluster too
else:
    if how == "interrupted":
        guard.interrupted()
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("how", ["killed", "interrupted", "done", "failed"])
def test_the_watcher_ends_the_runs_a_dead_driver_left(
    tmp_path: Path, tracking_uri: str, experiment_name: str, how: str
) -> None:
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(experiment_name)
    launch_id = uuid.uuid4().hex
    launch = {TAG_LAUNCH: launch_id}
    parent = client.create_run(experiment_id, tags=launch).info.run_id
    trial = client.create_run(experiment_id, tags=launch).info.run_id
    done = client.create_run(experiment_id, tags=launch).info.run_id
    client.set_terminated(done, "FINISHED")
    other = client.create_run(experiment_id, tags={TAG_LAUNCH: "another"}).info.run_id
    session = tmp_path / "session"
    cluster = holder(tmp_path, "ray", session / "logs" / "raylet.out")
    try:
        driver = subprocess.run(
            [
                sys.executable,
                "-c",
                DRIVER,
                tracking_uri,
                experiment_id,
                launch_id,
                str(session),
                how,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        wait_gone(int(driver.stdout.split()[0]))
        status = {r: client.get_run(r).info.status for r in (parent, trial, done, other)}
        expected = {"killed": "FAILED", "interrupted": "KILLED", "failed": "FAILED"}.get(how)
        assert status == {
            parent: expected or "RUNNING",
            trial: expected or "RUNNING",
            done: "FINISHED",
            other: "RUNNING",
        }
        if how == "done":
            assert TAG_ERROR not in client.get_run(trial).data.tags
        elif how == "failed":
            assert (
                client.get_run(trial).data.tags[TAG_ERROR] == "the launch failed: SystemExit: boom"
            )
            assert cluster.poll() is None  # the driver lives: its cluster is not the watcher's
        else:
            assert "died before it ended this run" in client.get_run(trial).data.tags[TAG_ERROR]
            assert cluster.wait(timeout=10) == -9  # what was left of its cluster
    finally:
        cluster.kill()
        cluster.wait()
        client.set_terminated(other, "FINISHED")


def test_the_watcher_says_which_launch_it_could_not_end(tmp_path: Path) -> None:
    """The tracking server gone too: one line naming the launch, not a traceback."""
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    driver = subprocess.run(
        [sys.executable, "-c", DRIVER, uri, "0", "launch42", str(tmp_path), "killed"],
        cwd=ROOT,
        env=env,
        capture_output=True,  # returns once the watcher, which shares stderr, is done too
        text=True,
        timeout=120,
    )
    assert "could not end the runs of launch launch42" in driver.stderr, driver.stderr
    assert "Traceback" not in driver.stderr, driver.stderr
