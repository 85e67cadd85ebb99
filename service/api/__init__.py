"""`rlgen serve`: the HTTP API. Experiments in (YAML or JSON), Ray Jobs out, MLflow runs back.

    POST /experiments              validate and submit; 202 with an id (422: the CLI's messages)
    GET  /experiments              every experiment this service submitted, with its job status
    GET  /experiments/{id}         status, MLflow runs (ids, statuses, UI links; runs_error when the
                                   tracking store cannot be read)
    POST /experiments/{id}/cancel  stop its Ray job
    GET  /experiments/{id}/logs    the job driver's output
    GET  /healthz                  liveness (no token)
    GET  /openapi.json, /docs      the OpenAPI schema and its Swagger UI

Every route but /healthz needs `Authorization: Bearer $RLGEN_API_TOKEN` (`deps.authorized`).
Bodies above `max_body_bytes` get 413 before they are parsed. The table of submitted experiments
is a SQLite file (`table`), so it survives a restart of the service; job states come live from
Ray. Responses are pydantic models (`schemas`); the routes are in `routes`.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html

from service.api.deps import ApiConfig, Service, Submitter, authorized, limit_body
from service.api.routes import TAG_API_ID, router
from service.api.schemas import Health
from service.api.table import ExperimentTable

__all__ = ["TAG_API_ID", "ApiConfig", "Submitter", "create_app"]


def create_app(config: ApiConfig, submitter: Submitter) -> FastAPI:
    # The schema and docs routes are ours, behind the token like everything but /healthz.
    app = FastAPI(
        title="rlgen",
        summary="Submit RL and generative-model experiments to a Ray cluster; runs in MLflow.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = Service(config, submitter, ExperimentTable(config.db_path))
    app.middleware("http")(limit_body)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorized)])
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(authorized)])
    def docs() -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="rlgen API")

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:  # on the event loop: answers even with every thread busy
        return Health(status="ok")

    app.include_router(router)
    return app
