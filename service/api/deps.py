"""What every route shares: the service's configuration, the cluster, the token check, and the
size limit on bodies."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.table import ExperimentTable
from service.jobs import JobInfo
from service.spec import MAX_SPEC_BYTES

# A body declared up to this many times the size limit is read (and dropped) before its 413, so
# that the client, still sending, gets the answer; a larger one is answered at once.
DRAIN_FACTOR = 16


class Submitter(Protocol):
    """What the API needs of a cluster (`service.jobs.Jobs`; a fake in unit tests)."""

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


@dataclass
class Service:
    """The state every route reads: set on `app.state.service` by `create_app`."""

    config: ApiConfig
    submitter: Submitter
    table: ExperimentTable

    @property
    def ui(self) -> str:
        return (self.config.ui_url or self.config.tracking_uri).rstrip("/")


def service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


ServiceDep = Annotated[Service, Depends(service)]
_bearer = HTTPBearer(auto_error=False)


def authorized(
    svc: ServiceDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Every route but /healthz: `Authorization: Bearer $RLGEN_API_TOKEN`, compared in constant
    time."""
    given = creds.credentials if creds else ""
    if not (creds and hmac.compare_digest(given.encode(), svc.config.token.encode())):
        raise HTTPException(
            401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )


async def limit_body(request: Request, call_next: Any) -> Any:
    """Refuse a body whose declared length is over the limit before reading it (a chunked body,
    which declares none, is measured while the route reads it)."""
    limit = service(request).config.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        if int(length) <= DRAIN_FACTOR * limit:
            # Read the rest and drop it: closing on a client still sending made its kernel
            # answer with a reset, and the client saw "connection reset", not the 413.
            async for _ in request.stream():
                pass
        return JSONResponse({"detail": "request body too large"}, status_code=413)
    return await call_next(request)
