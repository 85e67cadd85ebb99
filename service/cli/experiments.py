"""Commands that run and inspect experiments on this machine: run, evaluate, validate, schema,
algorithms, ui."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.cli.app import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    SPEC_ARG,
    AddressOpt,
    JsonOpt,
    LocalOpt,
    SetOpt,
    TrackingOpt,
    VerboseOpt,
    app,
    err,
    invalid,
    load,
    print_error,
)
from service.cli.progress import ProgressTable


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
    init_from: Annotated[
        str | None,
        typer.Option(
            "--init-from",
            metavar="RUN_ID",
            help="Start every trial from this trial run's weights (same algorithm and shapes).",
        ),
    ] = None,
    address: AddressOpt = None,
    local: LocalOpt = False,
    tracking_uri: TrackingOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Validate SPEC and run one trial per seed, logging to MLflow."""
    if init_from is not None:
        overrides = [*(overrides or []), f"init_from={init_from}"]
    launch_spec(
        spec_path, overrides, from_run, spec_env, address, local, tracking_uri, as_json, verbose
    )


@app.command("continue")
def continue_(
    run_id: Annotated[
        str, typer.Argument(metavar="RUN_ID", help="A trial run, or a sweep's parent run.")
    ],
    overrides: SetOpt = None,
    address: AddressOpt = None,
    local: LocalOpt = False,
    tracking_uri: TrackingOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train RUN_ID's trials further from their last checkpoints, in new runs linked to them.

    Only the budget may change: `--set params.total_timesteps=200000` (or `epochs`...)."""
    from service.lineage import FREE_FIELDS

    for item in overrides or []:  # the params are checked against the budget once read
        key = item.split("=", 1)[0].strip()
        if key.split(".")[0] not in ("params", *FREE_FIELDS):
            raise invalid(f"--set {key}: a continued run may change only its budget params")
    overrides = [*(overrides or []), f"continue_from={run_id}"]
    launch_spec(None, overrides, run_id, None, address, local, tracking_uri, as_json, verbose)


def launch_spec(
    spec_path: Path | None,
    overrides: list[str] | None,
    from_run: str | None,
    spec_env: str | None,
    address: str | None,
    local: bool,
    tracking_uri: str | None,
    as_json: bool,
    verbose: bool,
) -> None:
    """What `run` and `continue` do once their arguments are read."""
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
        raise invalid("--local and --address exclude each other")

    from service.cluster import start_ray
    from service.lineage import resolve
    from service.spec import SpecError
    from service.store import TrackingStoreError, check_store, resolve_tracking_uri

    # Everything that can be wrong with the input is found before Ray starts or a run exists.
    try:
        spec = load(spec_path, from_run, overrides or [], tracking_uri, spec_env)
        uri = resolve_tracking_uri(tracking_uri)
        check_store(uri, must_exist=spec.continue_from is not None or spec.init_from is not None)
        sources = resolve(spec, uri)
    except TrackingStoreError as e:
        raise invalid(f"--tracking-uri: {e}") from None
    except SpecError as e:
        for problem in e.problems:
            print_error(str(problem))
        raise typer.Exit(EXIT_INVALID) from None
    if not local:
        try:
            start_ray(address)
        except Exception as e:
            where = address or os.environ.get("RAY_ADDRESS") or "the embedded cluster"
            raise invalid(f"cannot start or reach Ray ({where}): {e}") from None

    from service.execution import check_resources, launch
    from service.sweeps import expand

    if not local:  # before the progress table: an unrunnable spec gets its error alone
        try:
            check_resources(spec, address)
        except SpecError as e:
            raise invalid(str(e)) from None
    scheduler = spec.sweep.scheduler if spec.sweep is not None else None
    table = ProgressTable(
        [t.label for t in expand(spec)],
        f"{spec.name}: {spec.algorithm}",
        [*([scheduler.metric] if scheduler else []), *spec.report],
    )
    try:
        with table.live:
            result = launch(
                spec,
                mode="local" if local else "ray",
                address=address,
                tracking_uri=tracking_uri,
                spec_path=spec_path,
                progress=table.update,
                sources=sources,
            )
            for trial in result.trials:
                table.update(trial.label, trial.status, trial.run_id, trial.metrics)
    except SpecError as e:
        raise invalid(str(e)) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: runs ended KILLED")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
    for trial in result.trials:
        if trial.error:
            style = "yellow" if trial.stopped_early else "red"
            err.print(
                f"[{style}]{escape(trial.label or f's{trial.seed}')} {trial.status}[/{style}]: "
                f"{escape(trial.error)}",
                markup=True,
                highlight=False,
            )
    if result.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_OK if result.ok else EXIT_FAILED)


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
        raise invalid(f"--render: unknown format {render!r}; the one supported is 'gif'")
    from service.evaluate import EvaluateError, evaluate_run
    from service.store import TrackingStoreError, check_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    try:
        check_store(uri, must_exist=True)
        result = evaluate_run(run_id, uri, episodes=episodes, seed=seed, render=render)
    except TrackingStoreError as e:
        raise invalid(f"--tracking-uri: {e}") from None
    except EvaluateError as e:
        raise invalid(str(e)) from None
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


@app.command()
def validate(
    spec_paths: Annotated[
        list[Path], typer.Argument(metavar="SPEC...", help="Experiment YAML files.")
    ],
    overrides: SetOpt = None,
) -> None:
    """Check specs without running them. One SPEC: print it resolved (every default filled in).
    Several: one line for each valid file, and each problem of the others; exit 2 if any is
    invalid."""
    from service.spec import SpecError, load_spec, to_yaml
    from service.sweeps import trial_count

    if len(spec_paths) == 1:
        spec = load(spec_paths[0], None, overrides or [], None)
        sys.stdout.write(to_yaml(spec))
        return
    bad = 0
    for path in spec_paths:
        try:
            spec = load_spec(path, overrides or [])
        except SpecError as e:
            bad += 1
            for problem in e.problems:
                print_error(str(problem))
            continue
        trials = trial_count(spec)
        sys.stdout.write(f"{path}: ok ({spec.algorithm}, {trials} trial{'s' * (trials != 1)})\n")
    if bad:
        raise typer.Exit(EXIT_INVALID)


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
            "checkpoint": a.resumes,
            "budget": [f"params.{b}" for b in a.budget],
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
        table = Table(
            title=f"{name} ({entry['family']}): {entry['summary']}",
            caption=f"checkpoint: {entry['checkpoint']}; budget: {', '.join(entry['budget'])}",
            title_justify="left",
            caption_justify="left",
        )
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
    from service.store import resolve_tracking_uri

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
