"""`rlgen`: run, validate and inspect experiments.

Exit status: 0 every trial finished; 1 a trial failed (or tracking failed); 2 invalid input, in
which case nothing was started and no MLflow run was created; 130 interrupted (Ctrl-C or
SIGTERM; runs end KILLED).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    name="rlgen",
    help="Reinforcement-learning and generative-model experiments: YAML in, Ray runs, MLflow logs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
STYLE = {
    "PENDING": "dim",
    "RUNNING": "cyan",
    "FINISHED": "green",
    "FAILED": "red",
    "KILLED": "yellow",
}

TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db]",
    ),
]
STDIN = Path("-")  # as SPEC: the spec on standard input (`... | rlgen run -`)
SPEC_ARG = typer.Argument(metavar="SPEC", help="Experiment YAML file (- reads standard input).")
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field, e.g. --set params.gamma=0.95 (repeatable)."),
]


def _invalid(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(EXIT_INVALID)


def _load(
    spec_path: Path | None,
    from_run: str | None,
    overrides: list[str],
    tracking_uri: str | None,
    spec_env: str | None = None,
) -> Any:
    from service.spec import SpecError, load_spec, load_spec_text

    try:
        if spec_env:  # a submitted job: the spec travels in its environment (service.jobs)
            return load_spec_text(os.environ.get(spec_env, "").encode(), "spec", overrides)
        if from_run and spec_path is not None:
            raise _invalid("give a SPEC file or --from-run RUN_ID, not both")
        if from_run:
            return load_spec_text(
                _spec_of_run(from_run, tracking_uri), f"run {from_run}:spec.yaml", overrides
            )
        if spec_path is None:
            raise _invalid("give a SPEC file or --from-run RUN_ID")
        if spec_path == STDIN:
            return load_spec_text(sys.stdin.buffer.read(), "<stdin>", overrides)
        return load_spec(spec_path, overrides)
    except SpecError as e:
        for problem in e.problems:
            err.print(
                f"[red]error:[/red] {escape(str(problem))}",
                markup=True,
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(EXIT_INVALID) from None


def _load_while_ray_starts(load: Any, address: str | None, tracking_uri: str | None) -> Any:
    """`load()` the spec in a thread while this one starts (or joins) Ray.

    Ray's start takes ~3 s, mostly waiting on its daemons; loading imports torch, the algorithms
    and MLflow's store (~2 s of CPU). Ray must start on the main thread (its daemons die with the
    thread that started them). An invalid spec still exits 2, after stopping what was started.
    """
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from service.cluster import start_ray
    from service.tracking import check_store, resolve_tracking_uri

    def load_and_open_store() -> Any:
        spec = load()
        from service.cluster import set_preload_workers
        from service.execution import concurrent_trials

        # The embedded cluster's workers are starting meanwhile: as many preload as will work.
        set_preload_workers(concurrent_trials(spec))
        uri = resolve_tracking_uri(tracking_uri)
        # Opens an existing store here, while Ray starts (MLflow builds its SQLAlchemy store once
        # per process, ~1 s), but creates none: an unrunnable experiment leaves nothing behind.
        check_store(uri)
        from service.execution import runs_on_tune

        if runs_on_tune(spec):
            import service.tuning  # noqa: F401  (Ray Tune's modules, ~1 s)
        return spec

    with ThreadPoolExecutor(max_workers=1) as pool:
        loading = pool.submit(load_and_open_store)
        ours = not ray.is_initialized()  # what this call starts, it stops again on an error
        try:
            start_ray(address, preload_workers="later")  # said once the spec is loaded
            ray_error = None
        except Exception as e:  # a bad address; but an invalid spec is reported first
            ray_error = e
        try:
            spec = loading.result()
        except BaseException:
            if ours:
                ray.shutdown()
            raise
    if ray_error is not None:
        where = address or os.environ.get("RAY_ADDRESS") or "the embedded cluster"
        raise _invalid(f"cannot start or reach Ray ({where}): {ray_error}")
    return spec


def _spec_of_run(run_id: str, tracking_uri: str | None) -> bytes:
    from mlflow.exceptions import MlflowException

    from service.tracking import check_store, client_for, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_store(uri, must_exist=True)  # never an empty store created to look for the run in
    client = client_for(uri)
    try:
        with tempfile.TemporaryDirectory() as d:
            return Path(client.download_artifacts(run_id, "spec.yaml", d)).read_bytes()
    except (MlflowException, OSError) as e:
        raise _invalid(f"run {run_id}: cannot read its spec.yaml ({e})") from None


class ProgressTable:
    """A live table of trials on stderr (final state only when stderr is not a terminal).

    Rows are trial labels (`s0`, or `s0 learning_rate=0.001` in a sweep), added as they appear.
    The result column shows the first of `metrics` (the experiment's own: its scheduler's metric,
    its `report` list) a trial logged, else its headline metric, so that rows compare.
    """

    def __init__(self, labels: list[str], title: str, metrics: Sequence[str] = ()):
        from service.report import HEADLINE

        self.title = title
        self.metrics = tuple(dict.fromkeys([*metrics, *HEADLINE]))
        self.rows: dict[str, dict[str, Any]] = {}
        for label in labels:
            self._row(label)
        self.live = Live(
            self.render(),
            console=err,
            refresh_per_second=4,
            auto_refresh=err.is_terminal,
            transient=False,
        )

    def _row(self, label: str) -> dict[str, Any]:
        return self.rows.setdefault(
            label, {"status": "PENDING", "run_id": "", "t0": None, "t1": None, "result": ""}
        )

    def update(
        self, label: str, status: str, run_id: str | None, metrics: dict[str, float] | None = None
    ) -> None:
        row = self._row(label)
        key = next((k for k in self.metrics if k in (metrics or {})), None)
        if key is not None and metrics is not None:
            row["result"] = f"{key} = {metrics[key]:.4g}"
        now = time.monotonic()
        if status == "RUNNING" and row["t0"] is None:
            row["t0"] = now
        if status in ("FINISHED", "FAILED", "KILLED"):
            row["t1"] = now
        row["status"] = status
        row["run_id"] = run_id or row["run_id"]
        self.live.update(self.render())

    def render(self) -> Table:
        table = Table(title=self.title, title_justify="left")
        for col in ("trial", "status", "MLflow run", "time", "result"):
            table.add_column(col)
        for label, row in self.rows.items():
            elapsed = (
                "" if row["t0"] is None else f"{(row['t1'] or time.monotonic()) - row['t0']:.1f}s"
            )
            table.add_row(
                escape(label),
                f"[{STYLE.get(row['status'], '')}]{row['status']}",
                row["run_id"],
                elapsed,
                escape(row["result"]),
            )
        return table


@app.command()
def run(
    spec_path: Annotated[Path | None, SPEC_ARG] = None,
    overrides: SetOpt = None,
    from_run: Annotated[
        str | None, typer.Option("--from-run", help="Re-run the spec logged by an MLflow run.")
    ] = None,
    spec_env: Annotated[
        str | None,
        typer.Option("--spec-env", hidden=True, help="Read the spec from this env variable."),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Join this Ray cluster (default: embedded local Ray)."),
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Run in-process, without Ray (for debugging).")
    ] = False,
    tracking_uri: TrackingOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with the results on stdout.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    """Validate SPEC and run one trial per seed, logging to MLflow."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # MLflow sets its loggers' level when imported (here, later, and in Ray's workers,
        # which inherit this environment): its INFO lines would clutter the progress table.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    if local and address:
        raise _invalid("--local and --address exclude each other")

    def load() -> Any:
        return _load(spec_path, from_run, overrides or [], tracking_uri, spec_env)

    from service.tracking import TrackingStoreError, check_store, resolve_tracking_uri

    try:
        if local:
            spec = load()
            check_store(resolve_tracking_uri(tracking_uri))
        else:  # checks the store too, while Ray starts
            spec = _load_while_ray_starts(load, address, tracking_uri)
    except TrackingStoreError as e:
        raise _invalid(f"--tracking-uri: {e}") from None

    from service.execution import check_resources, expand, launch
    from service.spec import SpecError

    if not local:  # before the progress table: an unrunnable spec gets its error alone
        try:
            check_resources(spec, address)
        except SpecError as e:
            raise _invalid(str(e)) from None
    scheduler = spec.sweep.scheduler if spec.sweep is not None else None
    table = ProgressTable(
        [t.label for t in expand(spec)],
        f"{spec.name}: {spec.algorithm}",
        [*([scheduler.metric] if scheduler else []), *spec.report],
    )
    try:
        with table.live:
            report = launch(
                spec,
                mode="local" if local else "ray",
                address=address,
                tracking_uri=tracking_uri,
                spec_path=spec_path,
                progress=table.update,
            )
            for trial in report.trials:
                table.update(trial.label, trial.status, trial.run_id, trial.metrics)
    except SpecError as e:
        raise _invalid(str(e)) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: runs ended KILLED")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
    for trial in report.trials:
        if trial.error:
            style = "yellow" if trial.stopped_early else "red"
            err.print(
                f"[{style}]{escape(trial.label or f's{trial.seed}')} {trial.status}[/{style}]: "
                f"{escape(trial.error)}",
                markup=True,
                highlight=False,
            )
    if report.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_FAILED)


@app.command()
def evaluate(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="An MLflow run of an RL trial.")],
    episodes: Annotated[int, typer.Option("--episodes", min=1, help="Greedy episodes.")] = 10,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the first reset.")] = 0,
    render: Annotated[
        str | None,
        typer.Option("--render", help="Record the first episode: 'gif' (logged to the run)."),
    ] = None,
    tracking_uri: TrackingOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Roll out the policy a run logged; log `evaluate/*` metrics (and the GIF) to that run."""
    if render not in (None, "gif"):
        raise _invalid(f"--render: unknown format {render!r}; the one supported is 'gif'")
    from service.evaluate import EvaluateError, evaluate_run
    from service.tracking import TrackingStoreError, check_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    try:
        check_store(uri, must_exist=True)
        result = evaluate_run(run_id, uri, episodes=episodes, seed=seed, render=render)
    except TrackingStoreError as e:
        raise _invalid(f"--tracking-uri: {e}") from None
    except EvaluateError as e:
        raise _invalid(str(e)) from None
    summary = {
        "run_id": run_id,
        "episodes": episodes,
        "return_mean": float(result.returns.mean()),
        "return_std": float(result.returns.std()),
        "length_mean": float(result.lengths.mean()),
        "gif": str(result.gif) if result.gif else None,
    }
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    sys.stdout.write(
        f"{run_id}: return {summary['return_mean']:.2f} +- {summary['return_std']:.2f}, "
        f"length {summary['length_mean']:.1f} over {episodes} episode{'s' * (episodes != 1)}"
        + (f"; logged {result.gif}" if result.gif else "")
        + "\n"
    )


JobsAddress = Annotated[
    str,
    typer.Option(
        "--address",
        envvar="RAY_ADDRESS",
        help="The cluster's Ray Jobs API, http://HEAD:8265 [env: RAY_ADDRESS]",
    ),
]


def _check_jobs_address(address: str) -> None:
    if not address.startswith(("http://", "https://")):
        raise _invalid(f"--address: expected the Jobs API URL http://HEAD:8265, not {address!r}")


def _jobs(address: str) -> Any:
    from service.jobs import Jobs, JobsError

    _check_jobs_address(address)
    try:
        return Jobs(address)
    except JobsError as e:  # nothing answers there: a wrong --address, as for `rlgen run`
        raise _invalid(str(e)) from None


@app.command()
def submit(
    spec_path: Annotated[Path, SPEC_ARG],
    address: JobsAddress,
    overrides: SetOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Validate SPEC and submit it to a Ray cluster as a job; print the job id at once."""
    from service.jobs import JobsError
    from service.tracking import TrackingStoreError, check_store, resolve_tracking_uri

    _check_jobs_address(address)  # before any warning about the spec
    spec = _load(spec_path, None, overrides or [], tracking_uri)
    uri = resolve_tracking_uri(tracking_uri)
    try:  # the form only: the cluster may reach a server this machine cannot
        check_store(uri, reach=False)
    except TrackingStoreError as e:
        raise _invalid(f"--tracking-uri: {e}") from None
    jobs = _jobs(address)  # an unreachable cluster is the error to report, before any warning
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

    jobs = _jobs(address)
    try:
        infos = [jobs.info(job_id)] if job_id else jobs.list()
    except JobsError as e:
        raise _invalid(str(e)) from None
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
        sys.stdout.write(_jobs(address).logs(job_id))
    except JobsError as e:
        raise _invalid(str(e)) from None


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    address: JobsAddress = "",
) -> None:
    """Stop a submitted job (its trials' runs end KILLED)."""
    from service.jobs import JobsError

    try:
        stopped = _jobs(address).cancel(job_id)
    except JobsError as e:
        raise _invalid(str(e)) from None
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
    from service.tracking import TrackingStoreError, check_store, resolve_tracking_uri

    try:
        check_store(resolve_tracking_uri(tracking_uri), reach=False)
    except TrackingStoreError as e:
        raise _invalid(f"--tracking-uri: {e}") from None
    token = get_settings().api_token
    if token is None or not token.get_secret_value():
        raise _invalid(
            "set RLGEN_API_TOKEN: every route but /healthz requires it as a bearer token"
        )
    if problem := _cannot_listen(host, port):
        raise _invalid(f"--host/--port: cannot listen on {host}:{port}: {problem}")
    config = ApiConfig(
        token=token.get_secret_value(),
        tracking_uri=resolve_tracking_uri(tracking_uri),
        db_path=db,
        ui_url=ui_url,
    )
    uvicorn.run(create_app(config, _jobs(address)), host=host, port=port, log_level="info")


def _cannot_listen(host: str, port: int) -> str | None:
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


@app.command()
def validate(
    spec_path: Annotated[Path, SPEC_ARG],
    overrides: SetOpt = None,
) -> None:
    """Check SPEC without running it; print the resolved spec (every default filled in)."""
    from service.spec import to_yaml

    spec = _load(spec_path, None, overrides or [], None)
    sys.stdout.write(to_yaml(spec))


@app.command()
def schema() -> None:
    """Print the JSON schema of experiment specs (for YAML completion in editors)."""
    from service.spec import spec_json_schema

    sys.stdout.write(json.dumps(spec_json_schema(), indent=2) + "\n")


@app.command()
def algorithms(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the algorithms with their parameters, defaults and descriptions."""
    from service.registry import ALGORITHMS

    listing: dict[str, dict[str, Any]] = {
        name: {
            "family": a.family,
            "summary": a.summary,
            "params": {
                f: {
                    "type": _type_name(info.annotation),
                    "default": info.get_default(call_default_factory=True),
                    "description": info.description or "",
                }
                for f, info in a.config.model_fields.items()
            },
        }
        for name, a in ALGORITHMS.items()
    }
    if as_json:
        sys.stdout.write(json.dumps(listing, indent=2, default=str) + "\n")
        return
    out = Console()
    for name, entry in listing.items():
        table = Table(title=f"{name} ({entry['family']}): {entry['summary']}", title_justify="left")
        for col in ("param", "type", "default", "description"):
            table.add_column(col, overflow="fold")
        for field_name, info in entry["params"].items():
            table.add_row(
                *(
                    escape(v)
                    for v in (field_name, info["type"], repr(info["default"]), info["description"])
                )
            )
        out.print(table)


def _type_name(annotation: Any) -> str:
    """`list[int]`, `float | None`, `'mlp' | 'conv'`: what a spec may write (constraints such as
    gt=0 are in the description and the schema)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', origin)}[{inner}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


@app.command()
def ui(
    tracking_uri: TrackingOpt = None,
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
) -> None:
    """Open the MLflow UI on the experiments' tracking store."""
    from service.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    # This interpreter's MLflow: `mlflow` itself need not be on PATH (a venv not activated).
    args = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    args += ["--host", host, "--port", str(port)]
    # MLflow 3's UI starts in its GenAI mode; this link opens the runs tables.
    err.print(
        f"MLflow UI on http://{escape(host)}:{port}/#/experiments?workflowType=machine_learning "
        f"({escape(uri)})"
    )
    os.execvp(args[0], args)


def main() -> None:
    """The `rlgen` command: `app`, then a quick exit.

    Once a command is done, its runs are closed and the exit handlers (Ray's shutdown among them)
    have run; Python's own teardown of the torch, MLflow and SQLAlchemy module graph would then
    add ~1 s to every command, for nothing.
    """
    import atexit
    import signal

    def terminate(signum: int, frame: Any) -> None:
        # SIGTERM unwinds like Ctrl-C: `run` ends its runs KILLED (service.execution installs
        # its own handler while trials run) and an embedded Ray cluster is shut down below,
        # instead of dying on the spot with the cluster and its trials left running.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        app()
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        # Now, not from Ray's exit handler, which first waits 0.5 s for log lines to print
        # (this CLI has the workers' logs stay in Ray's log files).
        ray.shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
