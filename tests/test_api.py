"""The HTTP API with an in-process cluster stand-in that runs each experiment locally at once."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api import TAG_API_ID, ApiConfig, create_app
from service.execution import launch
from service.jobs import JobInfo, JobsError

from .conftest import ROOT

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = (
    (ROOT / "experiments" / "q_learning_frozenlake.yaml")
    .read_text()
    .replace("total_timesteps: 200000", "total_timesteps: 2000")
    .replace("eval_every: 10000", "eval_every: 1000")
    .replace("seeds: [0, 1, 2]", "seeds: [0, 1]")
)


class LocalJobs:
    """Runs a submitted spec in-process (`launch(mode="local")`) and remembers it as a job."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobInfo] = {}
        self.submitted: list[Any] = []
        self.cancelled: list[str] = []
        self.requests = 0  # to the cluster, for job statuses

    def submit(self, spec: Any, tracking_uri: str) -> str:
        self.submitted.append(spec)
        report = launch(spec, mode="local", tracking_uri=tracking_uri)
        job_id = f"job_{len(self.jobs)}"
        status = "SUCCEEDED" if report.ok else "FAILED"
        self.jobs[job_id] = JobInfo(job_id, status, spec.name, spec.algorithm, "", 0.0, 1.0)
        return job_id

    def info(self, job_id: str) -> JobInfo:
        self.requests += 1
        if job_id not in self.jobs:
            raise JobsError(f"no job {job_id}")
        return self.jobs[job_id]

    def list(self) -> list[JobInfo]:
        self.requests += 1
        return list(self.jobs.values())

    def logs(self, job_id: str) -> str:
        return f"logs of {job_id}\n"

    def cancel(self, job_id: str) -> bool:
        self.cancelled.append(job_id)
        return True


@pytest.fixture
def api(tracking_uri: str, tmp_path: Path) -> tuple[TestClient, LocalJobs, ApiConfig]:
    config = ApiConfig(
        token=TOKEN, tracking_uri=tracking_uri, db_path=tmp_path / "api.db", max_body_bytes=20_000
    )
    jobs = LocalJobs()
    return TestClient(create_app(config, jobs)), jobs, config


def test_healthz_needs_no_token(api: Any) -> None:
    client, _, _ = api
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]
)
def test_every_other_route_needs_the_token(api: Any, headers: dict[str, str]) -> None:
    client, jobs, _ = api
    for method, path in [
        ("post", "/experiments"),
        ("get", "/experiments"),
        ("get", "/experiments/x"),
        ("post", "/experiments/x/cancel"),
        ("get", "/experiments/x/logs"),
    ]:
        response = getattr(client, method)(path, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
    assert not jobs.submitted


def test_submit_status_logs_cancel_and_restart(
    api: Any, experiment_name: str, in_tmp: Path
) -> None:
    client, jobs, config = api
    body = SPEC.replace("name: q-learning-frozenlake", f"name: {experiment_name}")
    response = client.post("/experiments", content=body, headers=AUTH)
    assert response.status_code == 202, response.text
    exp_id = response.json()["id"]
    assert jobs.submitted[0].tags[TAG_API_ID] == exp_id

    detail = client.get(f"/experiments/{exp_id}", headers=AUTH).json()
    assert detail["status"] == "SUCCEEDED" and detail["name"] == experiment_name
    runs = detail["runs"]
    assert len(runs) == 3  # parent + 2 seeds
    assert {r["status"] for r in runs} == {"FINISHED"}
    assert {r["trial"] for r in runs} >= {"s0", "s1"}
    # Links open each run in the UI's model-training view (not the GenAI one).
    assert all(
        r["url"].endswith(f"/runs/{r['run_id']}?workflowType=machine_learning") for r in runs
    )

    listed = client.get("/experiments", headers=AUTH).json()
    assert [e["id"] for e in listed] == [exp_id]
    assert client.get(f"/experiments/{exp_id}/logs", headers=AUTH).text == "logs of job_0\n"
    assert client.post(f"/experiments/{exp_id}/cancel", headers=AUTH).json()["stopping"]
    assert jobs.cancelled == ["job_0"]
    assert client.get("/experiments/nope", headers=AUTH).status_code == 404

    # A restarted service (same database) still lists the experiment.
    restarted = TestClient(create_app(config, jobs))
    assert [e["id"] for e in restarted.get("/experiments", headers=AUTH).json()] == [exp_id]


def test_a_large_sweep_lists_every_run(api: Any, experiment_name: str, in_tmp: Path) -> None:
    """MLflow's search returns 1,000 runs unless asked for more; a sweep may have 10,000."""
    from mlflow.tracking import MlflowClient

    client, _, config = api
    body = SPEC.replace("name: q-learning-frozenlake", f"name: {experiment_name}")
    exp_id = client.post("/experiments", content=body, headers=AUTH).json()["id"]
    mlflow = MlflowClient(config.tracking_uri)
    experiment = mlflow.get_experiment_by_name(experiment_name).experiment_id
    for _ in range(1000):  # more trials of the same experiment, as a large sweep has
        mlflow.create_run(experiment, tags={TAG_API_ID: exp_id})
    runs = client.get(f"/experiments/{exp_id}", headers=AUTH).json()["runs"]
    assert len(runs) == 1003  # parent, 2 seeds, and the 1,000 more


def test_the_list_asks_the_cluster_once(api: Any, experiment_name: str, in_tmp: Path) -> None:
    client, jobs, _ = api
    body = SPEC.replace("name: q-learning-frozenlake", f"name: {experiment_name}")
    ids = [client.post("/experiments", content=body, headers=AUTH).json()["id"] for _ in range(3)]
    jobs.jobs["job_1"].status = "RUNNING"
    del jobs.jobs["job_2"]  # e.g. deleted from the cluster: that one is asked for on its own
    jobs.requests = 0
    listed = client.get("/experiments", headers=AUTH).json()
    assert jobs.requests == 2
    assert {e["id"]: e["status"] for e in listed} == dict(
        zip(ids, ["SUCCEEDED", "RUNNING", "UNKNOWN"], strict=True)
    )

    def unreachable() -> Any:
        jobs.requests += 1
        raise JobsError("cannot reach the Ray Jobs API")

    jobs.list, jobs.requests = unreachable, 0  # type: ignore[method-assign]
    listed = client.get("/experiments", headers=AUTH).json()
    assert jobs.requests == 1  # not once more for each experiment, each waiting on its timeout
    assert {e["status"] for e in listed} == {"UNKNOWN"} and len(listed) == 3
    assert all("cannot reach the Ray Jobs API" in e["message"] for e in listed)


def test_json_bodies_are_accepted(api: Any, experiment_name: str, in_tmp: Path) -> None:
    import yaml

    client, jobs, _ = api
    data = yaml.safe_load(SPEC) | {"name": experiment_name, "seeds": [0]}
    response = client.post("/experiments", json=data, headers=AUTH)
    assert response.status_code == 202, response.text
    assert jobs.submitted[0].seeds == [0]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (SPEC.replace("gamma: 0.99", "gamma: 2"), "body:12: params.gamma: Input should be less"),
        ("name: x\nalgorithm: dqnn\n", "body:2: algorithm: unknown algorithm 'dqnn'"),
        ("name: [unclosed\n", "YAML error"),
        ("a: &a [*a]\n", "recursive YAML alias"),
        ("a: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ],
)
def test_invalid_specs_get_422_with_the_cli_messages(api: Any, body: str, fragment: str) -> None:
    client, jobs, _ = api
    response = client.post("/experiments", content=body, headers=AUTH)
    assert response.status_code == 422
    assert any(fragment in e for e in response.json()["detail"]["errors"]), response.text
    assert not jobs.submitted
    assert client.get("/experiments", headers=AUTH).json() == []


@pytest.mark.parametrize("indent", [2, "\t"])
def test_json_errors_name_the_bodys_own_lines(api: Any, indent: int | str) -> None:
    import yaml

    client, jobs, _ = api
    data = yaml.safe_load(SPEC)
    data["params"]["gamma"] = 2.0
    text = json.dumps(data, indent=indent)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if '"gamma"' in t)
    assert line > 1
    headers = {**AUTH, "Content-Type": "application/json"}
    response = client.post("/experiments", content=text, headers=headers)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]["errors"]
    assert any(e.startswith(f"body:{line}: params.gamma: Input should be less") for e in errors)
    assert not jobs.submitted


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("{bad", "invalid JSON"),
        ("[" * 5000 + "]" * 5000, "invalid JSON"),
        ("[1]", "not a list"),
        ('{"name": "a", "algorithm": "q_learning", "name": "b"}', "duplicate key 'name'"),
    ],
)
def test_invalid_json_bodies_get_422(api: Any, body: str, fragment: str) -> None:
    client, jobs, _ = api
    headers = {**AUTH, "Content-Type": "application/json"}
    response = client.post("/experiments", content=body, headers=headers)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["detail"]["errors"][0], response.text
    assert not jobs.submitted


def test_an_unreachable_tracking_server_leaves_the_job_status_readable(
    tmp_path: Path, in_tmp: Path
) -> None:
    """MLflow's client would retry a server that is down for minutes, then fail with a 500."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free: nothing answers there
    config = ApiConfig(
        token=TOKEN, tracking_uri=f"http://127.0.0.1:{port}", db_path=tmp_path / "a.db"
    )
    jobs = LocalJobs()
    jobs.submit = lambda spec, uri: "job_0"  # type: ignore[method-assign]  # runs nothing
    jobs.jobs["job_0"] = JobInfo("job_0", "RUNNING", "x", "q_learning", "", 0.0, None)
    client = TestClient(create_app(config, jobs))
    exp_id = client.post("/experiments", content=SPEC, headers=AUTH).json()["id"]
    t = time.monotonic()
    response = client.get(f"/experiments/{exp_id}", headers=AUTH)
    assert time.monotonic() - t < 10
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "RUNNING" and body["runs"] == []
    assert f"no MLflow server answers at http://127.0.0.1:{port}" in body["runs_error"]


def test_oversized_bodies_get_413_and_change_nothing(api: Any) -> None:
    client, jobs, _ = api
    response = client.post("/experiments", content="#" * 30_000, headers=AUTH)
    assert response.status_code == 413
    assert not jobs.submitted and client.get("/experiments", headers=AUTH).json() == []


def post_through_asgi(
    client: Any, headers: list[tuple[bytes, bytes]], chunks: int | None
) -> tuple[int, int, int]:
    """POST /experiments straight to the ASGI app, the body in `chunks` chunks of 4 kB (None:
    a body that never ends); returns (status, chunks read before the answer, chunks read in
    all). The test client would read a streamed body whole before the app sees it."""
    received, received_at_answer, status = 0, -1, 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        more = chunks is None or received < chunks
        return {"type": "http.request", "body": b"#" * 4096, "more_body": more}

    async def send(message: dict[str, Any]) -> None:
        nonlocal received_at_answer, status
        if message["type"] == "http.response.start":
            received_at_answer, status = received, message["status"]

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/experiments", "raw_path": b"/experiments", "query_string": b"",
        "root_path": "", "server": ("testserver", 80), "client": ("testclient", 1),
        "headers": [(b"authorization", AUTH["Authorization"].encode()),
                    (b"content-type", b"application/yaml"), *headers],
    }  # fmt: skip
    asyncio.run(asyncio.wait_for(client.app(scope, receive, send), timeout=10))
    return status, received_at_answer, received


def test_a_chunked_body_is_read_only_up_to_the_limit(api: Any) -> None:
    """No declared length (chunked): the route stops reading once past the limit instead of
    buffering a body that may never end."""
    client, jobs, _ = api
    status, _, received = post_through_asgi(client, [(b"transfer-encoding", b"chunked")], None)
    assert status == 413
    assert received <= 20_000 // 4096 + 2  # the limit is 20 kB
    assert not jobs.submitted and client.get("/experiments", headers=AUTH).json() == []


def test_a_body_declared_too_large_is_read_before_its_413_unless_huge(api: Any) -> None:
    """Answering while the client still sends makes the client's kernel see a reset, so the
    client reports "connection reset" instead of the 413: a body up to DRAIN_FACTOR times the
    limit is read (and dropped) first; a larger one is answered at once, unread."""
    from service.api.deps import DRAIN_FACTOR

    client, jobs, _ = api
    chunks = 2 * 20_000 // 4096 + 1  # twice the 20 kB limit
    length = str(chunks * 4096).encode()
    status, at_answer, _ = post_through_asgi(client, [(b"content-length", length)], chunks)
    assert (status, at_answer) == (413, chunks)  # the whole body was read, then the answer
    huge = str(DRAIN_FACTOR * 20_000 + 1).encode()
    status, at_answer, _ = post_through_asgi(client, [(b"content-length", huge)], None)
    assert (status, at_answer) == (413, 0)  # never read
    assert not jobs.submitted and client.get("/experiments", headers=AUTH).json() == []


def test_openapi_docs(api: Any) -> None:
    client, _, _ = api
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/docs", headers=AUTH).status_code == 200
    paths = client.get("/openapi.json", headers=AUTH).json()["paths"]
    assert {"/experiments", "/experiments/{exp_id}", "/healthz"} <= set(paths)


def test_every_route_declares_its_response_schema(api: Any) -> None:
    client, _, _ = api
    spec = client.get("/openapi.json", headers=AUTH).json()
    schemas = set(spec["components"]["schemas"])
    assert {"Submitted", "ExperimentSummary", "ExperimentDetail", "Run", "Cancelled"} <= schemas
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            ok = next(code for code in op["responses"] if code.startswith("2"))
            content = op["responses"][ok]["content"]
            if path.endswith("/logs"):
                assert "text/plain" in content
                continue
            schema = content["application/json"]["schema"]
            assert schema.get("$ref") or schema.get("items", {}).get("$ref"), (method, path)


class SlowJobs(LocalJobs):
    """A cluster whose Jobs API takes a second to accept each job."""

    def submit(self, spec: Any, tracking_uri: str) -> str:
        time.sleep(1.0)
        self.jobs[f"job_{len(self.jobs)}"] = JobInfo("j", "PENDING", spec.name, "", "", 0.0, None)
        return f"job_{len(self.jobs) - 1}"


def test_the_event_loop_never_blocks_while_submissions_are_validated(
    tracking_uri: str, tmp_path: Path
) -> None:
    import threading

    import httpx
    import uvicorn

    config = ApiConfig(token=TOKEN, tracking_uri=tracking_uri, db_path=tmp_path / "api.db")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, SlowJobs()), host="127.0.0.1", port=port, log_level="error"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server never started"
            time.sleep(0.05)
        statuses: list[int] = []

        def post() -> None:
            with httpx.Client(timeout=60) as c:
                statuses.append(
                    c.post(f"{base}/experiments", content=SPEC, headers=AUTH).status_code
                )

        posts = [threading.Thread(target=post) for _ in range(20)]
        for p in posts:
            p.start()
        latencies = []
        with httpx.Client(timeout=10) as c:
            while any(p.is_alive() for p in posts):
                t = time.perf_counter()
                assert c.get(f"{base}/healthz").status_code == 200
                latencies.append(time.perf_counter() - t)
                time.sleep(0.05)
        for p in posts:
            p.join()
        assert statuses == [202] * 20
        assert len(latencies) >= 10  # the submissions took a while: healthz was asked throughout
        assert max(latencies) < 0.1, sorted(latencies)[-5:]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
