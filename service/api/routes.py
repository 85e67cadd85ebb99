"""The `/experiments` routes.

Nothing here runs on the event loop but reading a body: validation (which builds the spec's env),
the Ray Jobs API and MLflow are blocking calls, so the routes are plain `def` (FastAPI runs them
in its thread pool) or hand the work to it (`run_in_threadpool`). `/healthz` answers at once
while any number of submissions are being validated.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import Service, ServiceDep, authorized
from service.api.schemas import (
    Cancelled,
    ContinueRequest,
    ExperimentDetail,
    ExperimentSummary,
    Run,
    Submitted,
)
from service.jobs import JobsError
from service.spec import SpecError, dump_yaml, load_spec_text, parse_yaml
from service.store import check_store, client_for
from service.tracking import SEARCH_MAX, TAG_TRIAL, run_url

log = logging.getLogger(__name__)

TAG_API_ID = "rlgen.api_id"

router = APIRouter(prefix="/experiments", dependencies=[Depends(authorized)])


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    return dict(pairs)


def json_as_yaml(body: bytes) -> bytes:
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


def accept(svc: Service, body: bytes, is_json: bool) -> Submitted:
    """Validate, submit and record one experiment (blocking: in the thread pool)."""
    try:
        spec = load_spec_text(json_as_yaml(body) if is_json else body, "body")
    except SpecError as e:
        raise HTTPException(422, {"errors": [str(p) for p in e.problems]}) from None
    return _submit(svc, spec, body.decode("utf-8", "replace"))


def _submit(svc: Service, spec: Any, text: str) -> Submitted:
    exp_id = uuid.uuid4().hex[:12]
    # Tag every run of this experiment with its API id, to find them in MLflow.
    spec = spec.model_copy(update={"tags": {**spec.tags, TAG_API_ID: exp_id}})
    try:
        job_id = svc.submitter.submit(spec, svc.config.tracking_uri)
    except JobsError as e:
        raise HTTPException(503, str(e)) from None
    svc.table.add(
        {
            "id": exp_id,
            "job_id": job_id,
            "name": spec.name,
            "algorithm": spec.algorithm,
            "created": time.time(),
            "spec": text,
        }
    )
    return Submitted(id=exp_id, job_id=job_id, status="PENDING", url=f"/experiments/{exp_id}")


@router.post("", status_code=202, response_model=Submitted)
async def submit(request: Request, svc: ServiceDep) -> Submitted:
    """Validate a spec (YAML, or JSON with `Content-Type: application/json`) and submit it as a
    Ray Job; 422 with the CLI's messages when it is invalid."""
    # Read at most the limit: a chunked body declares no length, and may never end.
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > svc.config.max_body_bytes:
            raise HTTPException(413, "request body too large")
        chunks.append(chunk)
    is_json = request.headers.get("content-type", "").startswith("application/json")
    return await run_in_threadpool(accept, svc, b"".join(chunks), is_json)


def _row_or_404(svc: Service, exp_id: str) -> dict[str, Any]:
    row = svc.table.get(exp_id)
    if row is None:
        raise HTTPException(404, f"no experiment {exp_id}")
    return row


def _summary(row: dict[str, Any], status: str, message: str) -> dict[str, Any]:
    fields = ("id", "job_id", "name", "algorithm", "created")
    return {**{k: row[k] for k in fields}, "status": status, "message": message}


def _job_status(svc: Service, row: dict[str, Any]) -> tuple[str, str]:
    try:
        info = svc.submitter.info(row["job_id"])
        return info.status, info.message
    except JobsError as e:
        return "UNKNOWN", str(e)


@router.get("", response_model=list[ExperimentSummary])
def list_experiments(svc: ServiceDep) -> list[ExperimentSummary]:
    """Every experiment this service submitted, newest first, with its job's status."""
    rows = svc.table.all()
    # One request for every job's status, not one per experiment.
    try:
        known = {info.id: info for info in svc.submitter.list()}
    except Exception as e:  # JobsError, or the cluster's own errors: the same for every row
        log.warning("cannot list the cluster's jobs: %s", e)
        why = f"cannot list the cluster's jobs: {e}"
        return [ExperimentSummary(**_summary(row, "UNKNOWN", why)) for row in rows]
    out = []
    for row in rows:
        info = known.get(row["job_id"])
        status, message = (info.status, info.message) if info else _job_status(svc, row)
        out.append(ExperimentSummary(**_summary(row, status, message)))
    return out


def _runs(svc: Service, row: dict[str, Any]) -> list[Run]:
    uri = svc.config.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []  # no job has logged yet; a GET creates no store
    client = client_for(uri)
    experiment = client.get_experiment_by_name(row["name"])
    if experiment is None:
        return []
    return [
        Run(
            run_id=run.info.run_id,
            name=run.info.run_name,
            status=run.info.status,
            trial=run.data.tags.get(TAG_TRIAL),
            metrics=run.data.metrics,
            url=run_url(svc.ui, experiment.experiment_id, run.info.run_id),
        )
        for run in client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{TAG_API_ID}` = '{row['id']}'",
            max_results=SEARCH_MAX,  # MLflow's default, 1,000, would cut a large sweep short
        )
    ]


@router.get("/{exp_id}", response_model=ExperimentDetail)
def get_experiment(exp_id: str, svc: ServiceDep) -> ExperimentDetail:
    """One experiment: its job's status and its MLflow runs (with `runs_error` when the
    tracking store cannot be read; the job's status is still worth answering with)."""
    row = _row_or_404(svc, exp_id)
    try:
        # One quick request first: MLflow's client retries a server that is down for minutes.
        check_store(svc.config.tracking_uri, timeout_s=3.0)
        runs, runs_error = _runs(svc, row), None
    except Exception as e:
        log.warning("experiment %s: cannot read its MLflow runs: %s", exp_id, e)
        runs, runs_error = [], f"cannot read the MLflow runs: {e}"
    status, message = _job_status(svc, row)
    return ExperimentDetail(**_summary(row, status, message), runs=runs, runs_error=runs_error)


@router.post("/{exp_id}/cancel", response_model=Cancelled)
def cancel(exp_id: str, svc: ServiceDep) -> Cancelled:
    """Stop the experiment's Ray Job (its trials' runs end KILLED)."""
    row = _row_or_404(svc, exp_id)
    try:
        stopping = svc.submitter.cancel(row["job_id"])
    except JobsError as e:
        raise HTTPException(503, str(e)) from None
    return Cancelled(id=exp_id, stopping=stopping)


@router.post("/{exp_id}/continue", status_code=202, response_model=Submitted)
def continue_experiment(exp_id: str, body: ContinueRequest, svc: ServiceDep) -> Submitted:
    """Train the experiment's trials further from their last checkpoints, as a new experiment
    whose runs are linked to the old ones (`rlgen continue`); 422 when the runs cannot be
    continued (no checkpoint, a non-budget change), 409 while it has no ended run."""
    from service.lineage import FREE_FIELDS, resolve

    row = _row_or_404(svc, exp_id)
    for item in body.set:
        key = item.split("=", 1)[0].strip()
        if key.split(".")[0] not in ("params", *FREE_FIELDS):
            raise HTTPException(
                422, {"errors": [f"{key}: a continued run may change only its budget params"]}
            )
    check_store(svc.config.tracking_uri, timeout_s=3.0)
    runs = _runs(svc, row)
    ended = [r for r in runs if r.status not in ("RUNNING", "SCHEDULED")]
    # A parent run (no trial label) stands for all its trials; else the experiment's one trial.
    top = [r for r in ended if r.trial is None] or ended
    if len(top) != 1:
        raise HTTPException(409, f"experiment {exp_id} has {len(top)} ended top-level runs, not 1")
    text = row["spec"]
    try:
        spec = load_spec_text(text.encode(), "spec", [*body.set, f"continue_from={top[0].run_id}"])
        resolve(spec, svc.config.tracking_uri)
    except SpecError as e:
        raise HTTPException(422, {"errors": [str(p) for p in e.problems]}) from None
    return _submit(svc, spec, dump_yaml(spec.model_dump(mode="json", exclude_defaults=True)))


@router.get("/{exp_id}/logs", response_class=PlainTextResponse)
def logs(exp_id: str, svc: ServiceDep) -> str:
    """The job driver's output (plain text)."""
    row = _row_or_404(svc, exp_id)
    try:
        return svc.submitter.logs(row["job_id"])
    except JobsError as e:
        raise HTTPException(503, str(e)) from None
