"""Commands for experiments submitted to a Ray cluster as jobs, and the HTTP API: submit,
status, list, logs, cancel, serve."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.cli.app import (
    EXIT_FAILED,
    SPEC_ARG,
    SetOpt,
    TrackingOpt,
    app,
    err,
    invalid,
    load,
)

JobsAddress = Annotated[
    str,
    typer.Option(
        "--address",
        envvar="RAY_ADDRESS",
        help="The cluster's Ray Jobs API, http://HEAD:8265 [env: RAY_ADDRESS]",
    ),
]


def check_jobs_address(address: str) -> None:
    if not address.startswith(("http://", "https://")):
        raise invalid(f"--address: expected the Jobs API URL http://HEAD:8265, not {address!r}")


def jobs_api(address: str) -> Any:
    from service.jobs import Jobs, JobsError

    check_jobs_address(address)
    try:
        return Jobs(address)
    except JobsError as e:  # nothing answers there: a wrong --address, as for `rlgen run`
        raise invalid(str(e)) from None


@app.command()
def submit(
    spec_path: Annotated[Path, SPEC_ARG],
    address: JobsAddress,
    overrides: SetOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Validate SPEC and submit it to a Ray cluster as a job; print the job id at once."""
    from service.jobs import JobsError
    from service.store import TrackingStoreError, check_store, resolve_tracking_uri

    check_jobs_address(address)  # before any warning about the spec
    spec = load(spec_path, None, overrides or [], tracking_uri)
    uri = resolve_tracking_uri(tracking_uri)
    try:  # the form only: the cluster may reach a server this machine cannot
        check_store(uri, reach=False)
    except TrackingStoreError as e:
        raise invalid(f"--tracking-uri: {e}") from None
    jobs = jobs_api(address)  # an unreachable cluster is the error to report, before any warning
    if uri.startswith("sqlite:"):
        err.print(
            f"[yellow]warning:[/yellow] {escape(uri)} is a file on the cluster's head node; "
            "pass --tracking-uri http://MLFLOW:5000 to log to a tracking server",
            markup=True,
            highlight=False,
        )
    try:
        job_id = jobs.submit(spec, uri)
    except JobsError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", markup=True, highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    sys.stdout.write(job_id + "\n")


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(metavar="[ID]")] = None,
    address: JobsAddress = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Status of one submitted job, or of all of them."""
    from service.jobs import JobsError

    jobs = jobs_api(address)
    try:
        infos = [jobs.info(job_id)] if job_id else jobs.list()
    except JobsError as e:
        raise invalid(str(e)) from None
    if as_json:
        sys.stdout.write(json.dumps([i.to_json() for i in infos]) + "\n")
        return
    table = Table(title=f"rlgen jobs on {address}", title_justify="left")
    for col in ("id", "status", "name", "algorithm", "message"):
        table.add_column(col, overflow="fold")
    for i in infos:
        table.add_row(*(escape(str(v)) for v in (i.id, i.status, i.name, i.algorithm, i.message)))
    Console().print(table)


@app.command(name="list")
def list_jobs(
    address: JobsAddress = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """All experiments submitted to the cluster, newest first."""
    status(None, address, as_json)


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    address: JobsAddress = "",
) -> None:
    """The driver's output of a submitted job."""
    from service.jobs import JobsError

    try:
        sys.stdout.write(jobs_api(address).logs(job_id))
    except JobsError as e:
        raise invalid(str(e)) from None


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    address: JobsAddress = "",
) -> None:
    """Stop a submitted job (its trials' runs end KILLED)."""
    from service.jobs import JobsError

    try:
        stopped = jobs_api(address).cancel(job_id)
    except JobsError as e:
        raise invalid(str(e)) from None
    sys.stdout.write(f"{job_id}: {'stopping' if stopped else 'already ended'}\n")


@app.command()
def serve(
    address: JobsAddress,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    tracking_uri: TrackingOpt = None,
    db: Annotated[
        Path, typer.Option(help="SQLite file of submitted experiments (survives restarts).")
    ] = Path(".rlgen/api.db"),
    ui_url: Annotated[
        str | None, typer.Option(help="MLflow UI address for run links [default: tracking URI]")
    ] = None,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs); needs RLGEN_API_TOKEN."""
    import uvicorn

    from service.api import ApiConfig, create_app
    from service.settings import get_settings
    from service.store import TrackingStoreError, check_store, resolve_tracking_uri

    try:
        check_store(resolve_tracking_uri(tracking_uri), reach=False)
    except TrackingStoreError as e:
        raise invalid(f"--tracking-uri: {e}") from None
    token = get_settings().api_token
    if token is None or not token.get_secret_value():
        raise invalid("set RLGEN_API_TOKEN: every route but /healthz requires it as a bearer token")
    if problem := cannot_listen(host, port):
        raise invalid(f"--host/--port: cannot listen on {host}:{port}: {problem}")
    config = ApiConfig(
        token=token.get_secret_value(),
        tracking_uri=resolve_tracking_uri(tracking_uri),
        db_path=db,
        ui_url=ui_url,
    )
    uvicorn.run(create_app(config, jobs_api(address)), host=host, port=port, log_level="info")


def cannot_listen(host: str, port: int) -> str | None:
    """Why `rlgen serve` could not listen there (a port in use, an address not of this machine),
    asked before the service starts, so it is an input error (exit 2) like the others."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds it
    try:
        with socket.socket(family) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        return e.strerror or str(e)
    return None
