"""Running an experiment: one trial per seed, on Ray Tune (embedded or remote) or in-process.

The driver creates the parent run (when there is more than one trial), hands each worker a
`TrialRequest`, and afterwards closes whatever a dead or interrupted worker left RUNNING, so that no
MLflow run stays RUNNING forever. Results are read back from MLflow, the single source of truth.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
from ray import tune

from service import __version__
from service.settings import get_settings
from service.spec import SpecBase, flatten, resolved, spec_hash, to_yaml
from service.tracking import (
    TAG_ERROR,
    TAG_LAUNCH,
    client_for,
    close_dangling,
    ensure_experiment,
    git_commit,
    params_batch,
    resolve_tracking_uri,
    runs_of_launch,
)
from service.trial import TrialOutcome, TrialRequest, run_name, run_trial

log = logging.getLogger(__name__)

# Tune's own CSV/JSON/TensorBoard loggers duplicate what MLflow records; its SIGINT handler would
# swallow Ctrl-C, which we handle ourselves (runs end KILLED).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

Status = Literal["PENDING", "RUNNING", "FINISHED", "FAILED", "KILLED"]
ProgressFn = Callable[[int, str, str | None], None]  # (seed, status, run_id)


@dataclass
class TrialReport:
    run_id: str
    seed: int
    status: str
    metrics: dict[str, float]
    error: str | None = None


@dataclass
class LaunchReport:
    experiment: str
    experiment_id: str
    parent_run_id: str | None
    trials: list[TrialReport] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(t.status == "FINISHED" for t in self.trials)

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "parent_run_id": self.parent_run_id,
            "trials": [
                {"run_id": t.run_id, "seed": t.seed, "status": t.status, "metrics": t.metrics}
                | ({"error": t.error} if t.error else {})
                for t in self.trials
            ],
        }


def launch(
    spec: SpecBase,
    *,
    mode: Literal["ray", "local"] = "ray",
    address: str | None = None,
    tracking_uri: str | None = None,
    spec_path: Path | None = None,
    progress: ProgressFn | None = None,
) -> LaunchReport:
    """Run every trial of `spec` and return what MLflow recorded for them."""
    uri = resolve_tracking_uri(tracking_uri)
    if mode == "ray":
        _start_ray(address, spec)  # before any run exists: a bad address or resources leave nothing
    client = client_for(uri)
    experiment_id = ensure_experiment(client, spec.name, uri)
    launch_id = uuid.uuid4().hex
    commit = git_commit(
        *(
            p
            for p in (spec_path and spec_path.resolve().parent, Path(__file__).resolve().parent)
            if p
        )
    )
    tags = {
        "rlgen.version": __version__,
        "rlgen.spec_hash": spec_hash(spec),
        "rlgen.algorithm": spec.algorithm,
        **({"rlgen.git_commit": commit} if commit else {}),
    }

    parent_run_id = None
    if len(spec.seeds) > 1:
        parent = client.create_run(
            experiment_id, run_name=spec.name, tags={**tags, **spec.tags, TAG_LAUNCH: launch_id}
        )
        parent_run_id = parent.info.run_id
        client.log_batch(
            parent_run_id, params=params_batch(flatten(resolved(spec))), synchronous=True
        )
        client.log_text(parent_run_id, to_yaml(spec), "spec.yaml")

    request = TrialRequest(
        spec=resolved(spec),
        seed=spec.seeds[0],
        tracking_uri=uri,
        experiment_id=experiment_id,
        launch_id=launch_id,
        parent_run_id=parent_run_id,
        tags=tags,
    )
    notify = progress or (lambda *_: None)
    interrupted = False
    errors: dict[int, str] = {}
    try:
        if mode == "local":
            _run_local(request, spec.seeds, notify)
        else:
            errors = _run_tune(request, spec, notify)
    except KeyboardInterrupt:
        interrupted = True
        if mode == "ray" and address is None:
            ray.shutdown()  # stops the embedded cluster's workers before their runs are closed
    finally:
        trials = runs_of_launch(client, experiment_id, launch_id)
        for run in trials:
            seed = int(run.data.tags["rlgen.seed"])
            reason = errors.get(seed, "interrupted" if interrupted else "the worker died")
            close_dangling(client, [run], "KILLED" if interrupted else "FAILED", reason)
        if parent_run_id:
            final = [client.get_run(r.info.run_id).info.status for r in trials]
            ok = (
                not interrupted
                and len(final) == len(spec.seeds)
                and all(s == "FINISHED" for s in final)
            )
            client.set_terminated(
                parent_run_id, "KILLED" if interrupted else ("FINISHED" if ok else "FAILED")
            )
    report = LaunchReport(spec.name, experiment_id, parent_run_id, interrupted=interrupted)
    for run in runs_of_launch(client, experiment_id, launch_id):
        report.trials.append(
            TrialReport(
                run_id=run.info.run_id,
                seed=int(run.data.tags["rlgen.seed"]),
                status=run.info.status,
                metrics=dict(run.data.metrics),
                error=run.data.tags.get(TAG_ERROR),
            )
        )
    return report


# -- in-process ------------------------------------------------------------------------------------
@contextmanager
def _sigint_requests_stop(stop: threading.Event) -> Iterator[None]:
    """First Ctrl-C asks the running trial to stop cleanly; a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_local(request: TrialRequest, seeds: list[int], notify: ProgressFn) -> list[TrialOutcome]:
    stop = threading.Event()
    outcomes = []
    with _sigint_requests_stop(stop):
        for seed in seeds:
            if stop.is_set():
                break
            notify(seed, "RUNNING", None)
            outcome = run_trial(request.for_seed(seed), stop_event=stop)
            notify(seed, outcome.status, outcome.run_id)
            outcomes.append(outcome)
    if stop.is_set():
        raise KeyboardInterrupt
    return outcomes


# -- Ray Tune --------------------------------------------------------------------------------------
def _start_ray(address: str | None, spec: SpecBase) -> None:
    if not ray.is_initialized():
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=True,
        )
        # Tune looks for the result files of the loggers we disabled; MLflow has the results.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    available = ray.cluster_resources()
    need = {"CPU": spec.resources.num_cpus, "GPU": spec.resources.num_gpus}
    for name, amount in need.items():
        if amount > available.get(name, 0.0) and address is None:
            from service.spec import Problem, SpecError

            raise SpecError(
                [
                    Problem(
                        "resources",
                        f"resources.num_{name.lower()}s",
                        f"a trial asks for {amount:g} {name}s but the embedded Ray "
                        f"cluster has {available.get(name, 0.0):g}",
                    )
                ]
            )


class TrialFailedError(RuntimeError):
    """Raised in a Tune trial whose algorithm failed, so Tune records the trial as ERROR."""


def _trainable(config: dict[str, Any], request: TrialRequest) -> None:
    outcome = run_trial(request.for_seed(int(config["seed"])), gpu_ids=ray.get_gpu_ids())
    if outcome.status == "FAILED":
        raise TrialFailedError(outcome.error)
    tune.report({"run_id": outcome.run_id, "status": outcome.status})


class _Progress(tune.Callback):
    """Forwards trial state changes to the progress display (driver side only)."""

    def __init__(self, notify: ProgressFn) -> None:
        self.notify: ProgressFn | None = notify

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with its experiment state; the live display stays behind.
        return {"notify": None}

    def _send(self, trial: Any, status: str, run_id: str | None) -> None:
        if self.notify is not None:
            self.notify(int(trial.config["seed"]), status, run_id)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._send(trial, "RUNNING", None)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        self._send(trial, result.get("status", "FINISHED"), result.get("run_id"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._send(trial, "FAILED", None)


def _run_tune(request: TrialRequest, spec: SpecBase, notify: ProgressFn) -> dict[int, str]:
    storage = Path(get_settings().workdir).resolve() / "ray_results"
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, request=request),
        {"cpu": spec.resources.num_cpus, "gpu": spec.resources.num_gpus},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"seed": tune.grid_search(spec.seeds)},
        tune_config=tune.TuneConfig(
            trial_name_creator=lambda t: run_name(spec, int(t.config["seed"])),
            trial_dirname_creator=lambda t: f"seed_{t.config['seed']}_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{request.launch_id[:6]}",
            storage_path=str(storage),
            verbose=0,
            callbacks=[_Progress(notify)],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    results = tuner.fit()
    errors = {}
    for i in range(len(results)):
        result = results[i]
        if result.error is not None and result.config:
            cause: Any = result.error
            while getattr(cause, "cause", None) is not None:  # unwrap RayTaskError chains
                cause = cause.cause
            errors[int(result.config["seed"])] = str(cause).strip().splitlines()[-1][:2000]
    return errors
