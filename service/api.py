"""`rlgen serve`: the HTTP API. Experiments in (YAML or JSON), Ray Jobs out, MLflow runs back.

    POST /experiments              validate and submit; 202 with an id (422: the CLI's messages)
    GET  /experiments              every experiment this service submitted, with its job status
    GET  /experiments/{id}         status, MLflow runs (ids, statuses, UI links; runs_error when the
                                   tracking store cannot be read)
    POST /experiments/{id}/cancel  stop its Ray job
    GET  /experiments/{id}/logs    the job driver's output
    GET  /healthz                  liveness (no token)
    GET  /openapi.json, /docs      the OpenAPI schema and its Swagger UI

Every route but /healthz needs `Authorization: Bearer $RLGEN_API_TOKEN` (compared in constant time).
Bodies above `max_body_bytes` get 413 before they are parsed. The table of submitted experiments
is a SQLite file, so it survives a restart of the service; job states come live from Ray.
"""

from __future__ import annotations

import hmac
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.jobs import JobInfo, JobsError
from service.spec import MAX_SPEC_BYTES, SpecError, dump_yaml, load_spec_text, parse_yaml
from service.tracking import SEARCH_MAX, check_store, client_for

log = logging.getLogger(__name__)

TAG_API_ID = "rlgen.api_id"
# A body declared up to this many times the size limit is read (and dropped) before its 413, so
# that the client, still sending, gets the answer; a larger one is answered at once.
DRAIN_FACTOR = 16


class Submitter(Protocol):
    """What the API needs of a cluster (service.jobs.Jobs; a fake in unit tests)."""

    def submit(self, spec: Any, tracking_uri: str) -> str: ...
    def info(self, job_id: str) -> JobInfo: ...
    def list(self) -> list[JobInfo]: ...
    def logs(self, job_id: str) -> str: ...
    def cancel(self, job_id: str) -> bool: ...


@dataclass
class ApiConfig:
    token: str
    tracking_uri: str
    db_path: Path
    ui_url: str | None = None  # the MLflow UI's address for links (default: the tracking URI)
    max_body_bytes: int = MAX_SPEC_BYTES


class Table:
    """The experiments this service submitted: SQLite, one row each."""

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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    return dict(pairs)


def _json_as_yaml(body: bytes) -> bytes:
    """A JSON body as the YAML the spec loader reads, so that its errors name the body's own
    lines: JSON is YAML but for tabs (in valid JSON only whitespace between tokens, which PyYAML
    refuses) and escapes PyYAML reads otherwise (surrogate pairs); a body it would read
    differently is re-written as YAML instead (its lines are then those of the rewrite)."""
    try:
        data = json.loads(body, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # also: nested too deeply for either
        why = str(e) or "nested too deeply"
        raise HTTPException(422, {"errors": [f"body: invalid JSON: {why}"]}) from None
    text = body.replace(b"\t", b" ")
    try:
        if parse_yaml(text, "body").data == data:
            return text
    except SpecError:
        pass
    return dump_yaml(data).encode() if isinstance(data, dict) else body


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "job_id", "name", "algorithm", "created")}


def create_app(config: ApiConfig, submitter: Submitter) -> FastAPI:
    # The schema and docs routes are ours, behind the token like everything but /healthz.
    app = FastAPI(
        title="rlgen",
        summary="Submit RL and generative-model experiments to a Ray cluster; runs in MLflow.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    table = Table(config.db_path)
    bearer = HTTPBearer(auto_error=False)
    ui = (config.ui_url or config.tracking_uri).rstrip("/")

    def authorized(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = creds.credentials if creds else ""
        if not (creds and hmac.compare_digest(given.encode(), config.token.encode())):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        # Refuse oversized bodies by their declared length before reading them; a body without
        # one (chunked) is measured while the route reads it.
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            if int(length) <= DRAIN_FACTOR * config.max_body_bytes:
                # Read the rest and drop it: closing on a client still sending made its kernel
                # answer with a reset, and the client saw "connection reset", not the 413.
                async for _ in request.stream():
                    pass
            return JSONResponse({"detail": "request body too large"}, status_code=413)
        return await call_next(request)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorized)])
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(authorized)])
    def docs() -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="rlgen API")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/experiments", status_code=202, dependencies=[Depends(authorized)])
    async def submit(request: Request) -> dict[str, Any]:
        # Read at most the limit: a chunked body declares no length, and may never end.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise HTTPException(413, "request body too large")
            chunks.append(chunk)
        body = b"".join(chunks)
        exp_id = uuid.uuid4().hex[:12]
        try:
            if request.headers.get("content-type", "").startswith("application/json"):
                body = _json_as_yaml(body)
            spec = load_spec_text(body, "body")
        except SpecError as e:
            raise HTTPException(422, {"errors": [str(p) for p in e.problems]}) from None
        # Tag every run of this experiment with its API id, to find them in MLflow.
        spec = spec.model_copy(update={"tags": {**spec.tags, TAG_API_ID: exp_id}})
        try:
            job_id = submitter.submit(spec, config.tracking_uri)
        except JobsError as e:
            raise HTTPException(503, str(e)) from None
        table.add(
            {
                "id": exp_id,
                "job_id": job_id,
                "name": spec.name,
                "algorithm": spec.algorithm,
                "created": time.time(),
                "spec": body.decode("utf-8", "replace"),
            }
        )
        return {
            "id": exp_id,
            "job_id": job_id,
            "status": "PENDING",
            "url": f"/experiments/{exp_id}",
        }

    def row_or_404(exp_id: str) -> dict[str, Any]:
        row = table.get(exp_id)
        if row is None:
            raise HTTPException(404, f"no experiment {exp_id}")
        return row

    def job_status(row: dict[str, Any]) -> dict[str, Any]:
        try:
            info = submitter.info(row["job_id"])
            return {"status": info.status, "message": info.message}
        except JobsError as e:
            return {"status": "UNKNOWN", "message": str(e)}

    @app.get("/experiments", dependencies=[Depends(authorized)])
    def list_experiments() -> list[dict[str, Any]]:
        # One request for every job's status, not one per experiment.
        try:
            known = {info.id: info for info in submitter.list()}
        except Exception as e:  # JobsError, or the cluster's own errors: the same for every row
            log.warning("cannot list the cluster's jobs: %s", e)
            unknown = {"status": "UNKNOWN", "message": f"cannot list the cluster's jobs: {e}"}
            return [_summary(row) | unknown for row in table.all()]

        def status(row: dict[str, Any]) -> dict[str, Any]:
            info = known.get(row["job_id"])
            return {"status": info.status, "message": info.message} if info else job_status(row)

        return [_summary(row) | status(row) for row in table.all()]

    def mlflow_runs(row: dict[str, Any]) -> list[dict[str, Any]]:
        uri = config.tracking_uri
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            return []  # no job has logged yet; a GET creates no store
        client = client_for(uri)
        experiment = client.get_experiment_by_name(row["name"])
        if experiment is None:
            return []
        return [
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                "trial": run.data.tags.get("rlgen.trial"),
                "metrics": run.data.metrics,
                "url": f"{ui}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}",
            }
            for run in client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`{TAG_API_ID}` = '{row['id']}'",
                max_results=SEARCH_MAX,  # MLflow's default, 1,000, would cut a large sweep short
            )
        ]

    @app.get("/experiments/{exp_id}", dependencies=[Depends(authorized)])
    def get_experiment(exp_id: str) -> dict[str, Any]:
        row = row_or_404(exp_id)
        detail = _summary(row)
        try:
            # One quick request first: MLflow's client retries a server that is down for minutes.
            check_store(config.tracking_uri, timeout_s=3.0)
            runs, runs_error = mlflow_runs(row), None
        except Exception as e:  # the job's status is still worth answering with
            log.warning("experiment %s: cannot read its MLflow runs: %s", exp_id, e)
            runs, runs_error = [], f"cannot read the MLflow runs: {e}"
        return (
            detail
            | job_status(row)
            | {"runs": runs}
            | ({"runs_error": runs_error} if runs_error else {})
        )

    @app.post("/experiments/{exp_id}/cancel", dependencies=[Depends(authorized)])
    def cancel(exp_id: str) -> dict[str, Any]:
        row = row_or_404(exp_id)
        try:
            stopping = submitter.cancel(row["job_id"])
        except JobsError as e:
            raise HTTPException(503, str(e)) from None
        return {"id": exp_id, "stopping": stopping}

    @app.get(
        "/experiments/{exp_id}/logs",
        response_class=PlainTextResponse,
        dependencies=[Depends(authorized)],
    )
    def logs(exp_id: str) -> str:
        row = row_or_404(exp_id)
        try:
            return submitter.logs(row["job_id"])
        except JobsError as e:
            raise HTTPException(503, str(e)) from None

    return app
