"""The `rlgen` Typer app, its shared options, and how a command reads its spec.

Exit status: 0 every trial finished; 1 a trial failed (or tracking failed); 2 invalid input, in
which case nothing was started and no MLflow run was created; 130 interrupted (Ctrl-C or
SIGTERM; runs end KILLED).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="rlgen",
    help="Reinforcement-learning and generative-model experiments: YAML in, Ray runs, MLflow logs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130

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
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="Join this Ray cluster (default: embedded local Ray)."),
]
LocalOpt = Annotated[
    bool, typer.Option("--local", help="Run in-process, without Ray (for debugging).")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON object with the results on stdout.")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")]


def _version(value: bool) -> None:
    if value:
        from service import __version__

        sys.stdout.write(f"rlgen {__version__}\n")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Reinforcement-learning and generative-model experiments: YAML in, Ray runs, MLflow logs."""


def print_error(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, markup=True, soft_wrap=True)


def invalid(message: str) -> typer.Exit:
    """Say what is wrong with the input; raise the result to exit 2."""
    print_error(message)
    return typer.Exit(EXIT_INVALID)


def load(
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
            raise invalid("give a SPEC file or --from-run RUN_ID, not both")
        if from_run:
            return load_spec_text(
                spec_of_run(from_run, tracking_uri), f"run {from_run}:spec.yaml", overrides
            )
        if spec_path is None:
            raise invalid("give a SPEC file or --from-run RUN_ID")
        if spec_path == STDIN:
            return load_spec_text(sys.stdin.buffer.read(), "<stdin>", overrides)
        return load_spec(spec_path, overrides)
    except SpecError as e:
        for problem in e.problems:
            print_error(str(problem))
        raise typer.Exit(EXIT_INVALID) from None


def spec_of_run(run_id: str, tracking_uri: str | None) -> bytes:
    from mlflow.exceptions import MlflowException

    from service.store import check_store, client_for, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_store(uri, must_exist=True)  # never an empty store created to look for the run in
    client = client_for(uri)
    try:
        with tempfile.TemporaryDirectory() as d:
            return Path(client.download_artifacts(run_id, "spec.yaml", d)).read_bytes()
    except (MlflowException, OSError) as e:
        raise invalid(f"run {run_id}: cannot read its spec.yaml ({e})") from None
