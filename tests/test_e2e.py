"""End to end on loopback: the docker-compose topology as local processes.

`ray start --head` (dashboard and Jobs API), a second `ray start` worker node, `mlflow server` on
SQLite with proxied artifacts, and `rlgen serve`. Through the HTTP API a 4-trial sweep is
submitted; one trial's worker process is killed mid-run and resumes from its checkpoint; the
service is restarted and still lists the experiment; MLflow's REST API then shows the parent and
four FINISHED children with metrics. Bad requests change nothing. A cancelled job's run ends
KILLED. Marked `e2e` (it runs in CI;
deselect with -m "not e2e").
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT
from .test_fault_tolerance import trial_workers

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
API_TOKEN = secrets.token_hex(16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_ports() -> list[str]:
    """Free ports for a node's agents: their defaults are fixed (52365...), and would collide
    with any other Ray on this machine."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def wait_for(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise TimeoutError(url)


def stop_cluster(marker: str) -> None:
    """Kill this test's Ray processes only (`ray stop` would also stop the test session's own
    cluster): those that inherited the marker variable, and all their descendants (Ray's agents
    start with a fresh environment)."""
    needle = f"RLGEN_E2E_CLUSTER={marker}".encode()
    parent: dict[int, int] = {}
    marked: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                marked.add(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    targets = set(marked)
    while True:
        more = {pid for pid, ppid in parent.items() if ppid in targets} - targets
        if not more:
            break
        targets |= more
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in targets:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        time.sleep(2)


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    token: str | None = API_TOKEN,
    content_type: str = "application/yaml",
) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.fail("the ray CLI is not installed beside this Python")
    tmp = tmp_path_factory.mktemp("e2e")
    marker = secrets.token_hex(8)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RLGEN_API_TOKEN": API_TOKEN,
        "RLGEN_E2E_CLUSTER": marker,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dash, ml, api = free_port(), free_port(), free_port(), free_port()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = tmp / "logs"
    logs.mkdir()

    def spawn(name: str, *args: str) -> subprocess.Popen[bytes]:
        out = (logs / f"{name}.log").open("wb")
        procs[name] = subprocess.Popen(args, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)
        return procs[name]

    def ray(*args: str) -> None:
        subprocess.run(
            [str(BIN / "ray"), *args],
            cwd=tmp,
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )

    ray(
        "start",
        "--head",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--num-cpus=1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        "--disable-usage-stats",
        *agent_ports(),
    )
    ray("start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", *agent_ports())  # worker node
    spawn(
        "mlflow",
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp}/mlflow.db",
        "--serve-artifacts",
        "--artifacts-destination",
        str(tmp / "mlartifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(ml),
    )
    serve_args = (
        str(BIN / "rlgen"),
        "serve",
        "--address",
        f"http://127.0.0.1:{dash}",
        "--tracking-uri",
        f"http://127.0.0.1:{ml}",
        "--port",
        str(api),
        "--db",
        str(tmp / "api.db"),
    )
    spawn("serve", *serve_args)
    urls = {"api": f"http://127.0.0.1:{api}", "mlflow": f"http://127.0.0.1:{ml}"}
    try:
        wait_for(f"{urls['mlflow']}/health")
        wait_for(f"{urls['api']}/healthz")
        yield {"urls": urls, "spawn": spawn, "serve_args": serve_args, "procs": procs, "logs": logs}
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop_cluster(marker)


SWEEP = (
    # Restarts continue from the checkpoint, replay buffer and all.
    (ROOT / "experiments" / "dqn_cartpole.yaml")
    .read_text()
    .replace("\nparams:\n", "\nparams:\n  checkpoint_buffer: true\n")
    + """
max_failures: 1
sweep:
  params:
    learning_rate: {grid: [0.001, 0.002]}
"""
)


def test_the_stack_end_to_end(stack: dict[str, Any]) -> None:
    api, mlflow = stack["urls"]["api"], stack["urls"]["mlflow"]
    name = f"e2e-{secrets.token_hex(4)}"
    spec = (
        SWEEP.replace("name: dqn-cartpole", f"name: {name}")
        .replace("seeds: [0, 1, 2, 3, 4]", "seeds: [0, 1]")
        .replace("total_timesteps: 50000", "total_timesteps: 30000")
        .replace("stop_at_return: 475", "stop_at_return: null\n  checkpoint_every: 3000")
        .replace("eval_every: 2500", "eval_every: 3000")
    )

    # Bad requests: no token, bad token, invalid YAML, oversized body. None changes anything.
    assert http("POST", f"{api}/experiments", spec.encode(), token=None)[0] == 401
    assert http("POST", f"{api}/experiments", spec.encode(), token="wrong")[0] == 401
    status, body = http(
        "POST", f"{api}/experiments", b"name: x\nalgorithm: dqn\nparams: {gamma: 9}\n"
    )
    assert status == 422 and any("params.gamma" in e for e in body["detail"]["errors"])
    assert http("POST", f"{api}/experiments", b"#" * 2_000_000)[0] == 413
    assert http("GET", f"{api}/experiments")[1] == []

    deadline = time.monotonic() + 120
    while True:  # 503 until the head's job agent is up (a few seconds after `ray start`)
        status, body = http("POST", f"{api}/experiments", spec.encode())
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert status == 202, body
    exp_id = body["id"]

    # Kill one trial's worker process once it has a checkpoint.
    killed, seen = False, None
    deadline = time.monotonic() + 240
    while not killed and time.monotonic() < deadline:
        time.sleep(0.5)
        detail = http("GET", f"{api}/experiments/{exp_id}")[1]
        for run in detail.get("runs", []):
            status, arts = http(
                "GET",
                f"{mlflow}/api/2.0/mlflow/artifacts/list?run_id={run['run_id']}&path=checkpoints",
                token=None,
            )
            seen = (status, arts, trial_workers())
            if status == 200 and arts.get("files") and trial_workers():
                os.kill(trial_workers()[0], signal.SIGKILL)
                killed = True
                break
    assert killed, (http("GET", f"{api}/experiments/{exp_id}")[1], seen)

    # Restart the service while the job runs: the job list is intact.
    stack["procs"]["serve"].send_signal(signal.SIGTERM)
    stack["procs"]["serve"].wait(timeout=30)
    stack["spawn"]("serve", *stack["serve_args"])
    wait_for(f"{api}/healthz")
    assert [e["id"] for e in http("GET", f"{api}/experiments")[1]] == [exp_id]

    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        detail = http("GET", f"{api}/experiments/{exp_id}")[1]
        if detail["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = http("GET", f"{api}/experiments/{exp_id}/logs")[1]
    assert detail["status"] == "SUCCEEDED", logs[-4000:] if isinstance(logs, str) else logs

    # MLflow's REST API: one parent, four FINISHED children with metrics, one restarted.
    _, experiment = http(
        "GET", f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}", token=None
    )
    _, found = http(
        "POST",
        f"{mlflow}/api/2.0/mlflow/runs/search",
        json.dumps(
            {"experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 100}
        ).encode(),
        token=None,
        content_type="application/json",
    )
    runs = found["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    children = [r for r, t in zip(runs, tags, strict=True) if "mlflow.parentRunId" in t]
    parents = [r for r, t in zip(runs, tags, strict=True) if "mlflow.parentRunId" not in t]
    assert len(parents) == 1 and len(children) == 4
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}
    for child in children:
        keys = {m["key"] for m in child["data"]["metrics"]}
        assert {"eval/return_mean", "losses/td_loss", "time/train_s"} <= keys
    assert sum(t.get("rlgen.restarts") == "1" for t in tags) == 1
    parent_metrics = {m["key"] for m in parents[0]["data"]["metrics"]}
    assert "eval/return_mean/mean" in parent_metrics

    # Cancelling a job stops its driver with SIGTERM (Ray waits 3 s, then SIGKILL): the trial's
    # run ends KILLED, not RUNNING forever (nor FAILED as if its worker had died).
    long = (
        f"name: {name}-cancel\nalgorithm: q_learning\nenv: {{id: Taxi-v4}}\nseeds: [0]\n"
        "params: {total_timesteps: 100000000, eval_every: 1000000}\n"
    )
    status, body = http("POST", f"{api}/experiments", long.encode())
    assert status == 202, body
    cancel_id, deadline = body["id"], time.monotonic() + 180
    while time.monotonic() < deadline:
        detail = http("GET", f"{api}/experiments/{cancel_id}")[1]
        if any(r["status"] == "RUNNING" for r in detail.get("runs", [])):
            break
        time.sleep(1)
    assert http("POST", f"{api}/experiments/{cancel_id}/cancel")[1]["stopping"], detail
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        detail = http("GET", f"{api}/experiments/{cancel_id}")[1]
        if detail["status"] == "STOPPED":
            break
        time.sleep(1)
    assert detail["status"] == "STOPPED", detail
    assert [r["status"] for r in detail["runs"]] == ["KILLED"], detail
