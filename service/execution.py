"""Running an experiment: one trial per seed (and sweep point) on Ray, embedded or remote, or
in-process. Trials are plain Ray tasks; a sweep whose scheduler stops trials early (ASHA) runs as
one Ray Tune experiment (`service.tuning`).

The driver creates the parent run (when there is more than one trial), hands each worker a
`TrialRequest`, and afterwards closes whatever a dead or interrupted worker left RUNNING, so that no
MLflow run stays RUNNING forever; should the driver itself be killed, its watcher process
(`service.watchdog`) does that. Results are read back from MLflow, the single source of truth.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import ray

from service import __version__
from service.aggregates import write_parent
from service.cluster import embedded, embedded_session_dir, start_ray
from service.lineage import Sources
from service.lineage import resolve as resolve_sources
from service.relay import Relay
from service.spec import SpecBase, SpecError, resolved, run_params, spec_hash, to_yaml
from service.spec.errors import Problem
from service.spec.models import Pbt
from service.store import client_for, ensure_experiment, resolve_tracking_uri
from service.sweeps import Trial, expand, trial_count
from service.tracking import (
    TAG_CONTINUED_FROM,
    TAG_ERROR,
    TAG_LAUNCH,
    TAG_STOPPED_EARLY,
    TAG_TRIAL,
    close_dangling,
    git_commit,
    params_batch,
    run_url,
    runs_of_launch,
)
from service.trial import TrialRequest, imported, run_on_ray_worker, run_trial
from service.watchdog import Watchdog

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


Status = Literal["PENDING", "RUNNING", "FINISHED", "FAILED", "KILLED"]
ProgressFn = Callable[[str, str, str | None], None]  # (trial label, status, run_id)
STOPPED_EARLY = "stopped early by the ASHA scheduler"
# Every PBT member's last segment ends its run FINISHED or FAILED: one left KILLED (by a pause)
# was never resumed. Ray Tune's synchronous PBT does this to a member it pauses while the
# member's checkpoint is still being registered, when another member's report triggers the
# exploit (the pause is cached as a stop; ray-project/ray#57906, fix open upstream).
PBT_STOPPED = (
    "ended before its budget: Ray Tune's synchronous PBT stopped this member instead of pausing "
    "it (ray-project/ray#57906); its run keeps what it logged and checkpointed until then"
)


def fail_stopped_members(client: MlflowClient, runs: list[Run]) -> list[str]:
    """At the end of a PBT sweep that was not interrupted, a member's run left KILLED was
    paused and never resumed: it ends FAILED, saying why. Returns those runs' ids."""
    ids = [run.info.run_id for run in runs if run.info.status == "KILLED"]
    for run_id in ids:
        client.set_tag(run_id, TAG_ERROR, PBT_STOPPED)
        client.set_terminated(run_id, "FAILED")
    return ids


@dataclass
class TrialResult:
    run_id: str
    seed: int
    status: str
    metrics: dict[str, float]
    error: str | None = None
    label: str = ""
    stopped_early: bool = False  # by the sweep's scheduler: a normal end in a sweep


@dataclass
class LaunchResult:
    experiment: str
    experiment_id: str
    parent_run_id: str | None
    trials: list[TrialResult] = field(default_factory=list)
    interrupted: bool = False
    ui: str | None = None  # the MLflow UI serving the runs: a tracking server's address

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(
            t.status == "FINISHED" or t.stopped_early for t in self.trials
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "parent_run_id": self.parent_run_id,
            **(
                {"parent_url": run_url(self.ui, self.experiment_id, self.parent_run_id)}
                if self.ui and self.parent_run_id
                else {}
            ),
            "trials": [
                {
                    "run_id": t.run_id,
                    **({"url": run_url(self.ui, self.experiment_id, t.run_id)} if self.ui else {}),
                    "seed": t.seed,
                    "trial": t.label,
                    "status": t.status,
                    "metrics": t.metrics,
                }
                | ({"stopped_early": True} if t.stopped_early else {})
                | ({"error": t.error} if t.error else {})
                for t in self.trials
            ],
        }


def runs_on_tune(spec: SpecBase) -> bool:
    """Whether `launch` runs the spec's trials through Ray Tune: for a sweep's scheduler (ASHA,
    PBT) or search (Optuna). Every other trial is a plain Ray task (`run_tasks`)."""
    return spec.sweep is not None and (
        spec.sweep.scheduler is not None or spec.sweep.search is not None
    )


def launch(
    spec: SpecBase,
    *,
    mode: Literal["ray", "local"] = "ray",
    address: str | None = None,
    tracking_uri: str | None = None,
    spec_path: Path | None = None,
    progress: ProgressFn | None = None,
    sources: Sources | None = None,
) -> LaunchResult:
    """Run every trial of `spec` and return what MLflow recorded for them. `sources`: the runs
    its trials start from (`service.lineage.resolve`), resolved here when not given."""
    uri = resolve_tracking_uri(tracking_uri)
    trials = expand(spec)
    if mode == "local" and spec.sweep is not None and spec.sweep.search is not None:
        where = spec.where("sweep", "search")
        raise SpecError([Problem(where, "sweep.search", "a search needs Ray: drop --local")])
    if sources is None:  # before anything starts: a bad run id leaves nothing behind
        sources = resolve_sources(spec, uri)
    warming: list[ray.ObjectRef] = []
    if mode == "ray":  # before any run exists: a bad address or resources leave nothing
        start_ray(address)
        check_resources(spec, address)
        if embedded() and not runs_on_tune(spec):
            warming = warm_up(spec, len(trials))
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

    # Should this process be killed, the watchdog ends the runs it leaves RUNNING (and what is
    # left of its embedded cluster); told `done` at the end, it exits without a word.
    session_dir = embedded_session_dir() if mode == "ray" else None
    with Watchdog(uri, experiment_id, launch_id, session_dir) as watchdog:
        if mode == "local" and spec.sweep is not None and spec.sweep.scheduler is not None:
            log.warning("--local runs every trial to its end: sweep.scheduler needs Ray")
        parent_run_id = None
        if trial_count(spec) > 1:
            lineage = {TAG_CONTINUED_FROM: spec.continue_from} if spec.continue_from else {}
            parent = client.create_run(
                experiment_id,
                run_name=f"{spec.name} (all trials)",
                tags={
                    **tags,
                    **spec.tags,
                    **lineage,
                    TAG_LAUNCH: launch_id,
                    "mlflow.note.content": describe(spec),
                },
            )
            parent_run_id = parent.info.run_id
            try:
                client.log_batch(
                    parent_run_id,
                    params=params_batch(
                        run_params(resolved(spec), seeds=spec.seeds, sweep=resolved(spec)["sweep"])
                    ),
                    synchronous=True,
                )
                client.log_text(parent_run_id, to_yaml(spec), "spec.yaml")
            except Exception as e:
                # No trial has started: end the parent rather than leave it RUNNING.
                with contextlib.suppress(Exception):
                    client.set_tag(parent_run_id, TAG_ERROR, f"{type(e).__name__}: {e}"[:5000])
                    client.set_terminated(parent_run_id, "FAILED")
                raise

        # On the embedded cluster, trials reach MLflow through this process (`service.relay`).
        relay = Relay(uri) if mode == "ray" and embedded() else None
        request = TrialRequest(
            spec=resolved(spec),
            seed=spec.seeds[0],
            tracking_uri=uri,
            experiment_id=experiment_id,
            launch_id=launch_id,
            parent_run_id=parent_run_id,
            tags=tags,
            relay=relay.address if relay else None,
            continue_from=sources.continue_from,
        )
        notify = progress or (lambda *_: None)
        interrupted = False
        errors: dict[str, str] = {}
        stopped: set[str] = set()
        population = spec.sweep is not None and isinstance(spec.sweep.scheduler, Pbt)
        try:
            stop = threading.Event()
            with _signals_request_stop(stop, interrupt=mode == "ray"):
                if mode == "local":
                    run_local(request, trials, notify, stop)
                elif not runs_on_tune(spec):
                    if warming:  # done by now, or nearly: the trials then start on warm workers
                        ray.wait(warming, num_returns=len(warming))
                    errors = run_tasks(request, spec, trials, notify, stop)
                else:
                    from service.tuning import run_tune  # Tune only where it schedules

                    errors, stopped = run_tune(request, spec, trials, notify, stop)
            if stop.is_set():
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            interrupted = True
            watchdog.interrupted()
            if mode == "ray" and address is None:
                ray.shutdown()  # stops the embedded cluster's workers before their runs are closed
        finally:
            if relay is not None:
                relay.close()
            runs = runs_of_launch(client, experiment_id, launch_id)
            if population and not interrupted:
                fail_stopped_members(client, runs)
            for run in runs:
                label = run.data.tags.get(TAG_TRIAL, "")
                # (A trial that failed in its algorithm ended its run FAILED itself.)
                if label in stopped and run.info.status != "FAILED":
                    close_dangling(client, [run], "KILLED", STOPPED_EARLY)
                    client.set_tag(run.info.run_id, TAG_STOPPED_EARLY, "asha")
                    client.set_tag(run.info.run_id, TAG_ERROR, STOPPED_EARLY)
                    continue
                reason = errors.get(label, "interrupted" if interrupted else "the worker died")
                close_dangling(client, [run], "KILLED" if interrupted else "FAILED", reason)
            if parent_run_id:
                runs = runs_of_launch(client, experiment_id, launch_id)
                final = {r.data.tags.get(TAG_TRIAL, ""): r.info.status for r in runs}
                ok = (
                    not interrupted
                    and len(final) == trial_count(spec)
                    and all(
                        s == "FINISHED" or (s == "KILLED" and label in stopped)
                        for label, s in final.items()
                    )
                )
                if not interrupted:
                    try:
                        scheduler = spec.sweep.scheduler if spec.sweep else None
                        write_parent(
                            client,
                            parent_run_id,
                            runs,
                            spec.report or ([scheduler.metric] if scheduler else []),
                            scheduler.mode if scheduler else None,
                        )
                    except Exception as e:  # the trials' own records stand; say what is missing
                        log.error("could not write the parent run's aggregates: %s", e)
                client.set_terminated(
                    parent_run_id, "KILLED" if interrupted else ("FINISHED" if ok else "FAILED")
                )
        result = LaunchResult(
            spec.name,
            experiment_id,
            parent_run_id,
            interrupted=interrupted,
            ui=uri if uri.startswith(("http://", "https://")) else None,
        )
        for run in runs_of_launch(client, experiment_id, launch_id):
            result.trials.append(
                TrialResult(
                    run_id=run.info.run_id,
                    seed=int(run.data.tags["rlgen.seed"]),
                    status=run.info.status,
                    metrics=dict(run.data.metrics),
                    error=run.data.tags.get(TAG_ERROR),
                    label=run.data.tags.get(TAG_TRIAL, ""),
                    stopped_early=TAG_STOPPED_EARLY in run.data.tags,
                )
            )
        return result


def describe(spec: SpecBase) -> str:
    """The parent run's description: what was run, over what, and how its trials differ."""
    env, dataset = getattr(spec, "env", None), getattr(spec, "dataset", None)
    subject = env.id if env is not None else (dataset.name if dataset is not None else "")
    lines = [f"{spec.algorithm} on {subject}" if subject else spec.algorithm]
    seeds = f"seeds {', '.join(map(str, spec.seeds))}"
    if spec.sweep is None:
        lines[0] += f", {seeds}."
    else:
        swept = ", ".join(sorted(spec.sweep.space()))
        how = "Optuna proposals" if spec.sweep.search else "configurations"
        lines[0] += f": {trial_count(spec)} trials, {how} of {swept} x {seeds}."
        if spec.sweep.scheduler is not None:
            lines.append(
                f"Scheduler: {spec.sweep.scheduler.type} on {spec.sweep.scheduler.metric}."
            )
    lines.append(
        "This run holds the aggregates across seeds (report.csv, figures/curves_*.png); "
        "each trial is a child run."
    )
    if spec.description:
        lines.insert(0, spec.description)
    return "\n\n".join(lines)


# -- Ctrl-C and in-process ------------------------------------------------------------------------
@contextmanager
def _signals_request_stop(stop: threading.Event, interrupt: bool = False) -> Iterator[None]:
    """Ctrl-C sets `stop`. In-process the first one asks the running trial to stop cleanly (it
    ends its run KILLED with what it logged) and a second interrupts at once; with `interrupt`
    (on Ray) the first also raises KeyboardInterrupt. Should Ray Tune's loop swallow that, its
    stopper sees the event and stops the trials (see `_StopOnRequest`).

    SIGTERM (`rlgen cancel` and `ray job stop`, a container or a scheduler stopping the command)
    interrupts at once, like a second Ctrl-C: without it the process died on the spot, its runs
    stayed RUNNING forever, and the embedded cluster's trials went on training in the
    background."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        again = stop.is_set()
        stop.set()
        if again or interrupt or signum == signal.SIGTERM:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_local(
    request: TrialRequest, trials: list[Trial], notify: ProgressFn, stop: threading.Event
) -> None:
    for trial in trials:
        if stop.is_set():
            break
        notify(trial.label, "RUNNING", None)
        outcome = run_trial(request.for_trial(trial.seed, trial.overrides), stop_event=stop)
        notify(trial.label, outcome.status, outcome.run_id)


# -- Ray ------------------------------------------------------------------------------------------
def check_resources(spec: SpecBase, address: str | None) -> None:
    """Raise SpecError when no trial could ever run: it asks for more than the embedded cluster
    has (another cluster may grow; its trials wait). The error names the field's line."""
    from service.spec import Problem, SpecError

    res = spec.resources
    available = ray.cluster_resources()
    need = {"CPU": res.num_cpus, "GPU": res.num_gpus}
    for name, amount in need.items():
        if amount > available.get(name, 0.0) and address is None:
            raise SpecError(
                [
                    Problem(
                        spec.where("resources", f"num_{name.lower()}s"),
                        f"resources.num_{name.lower()}s",
                        f"a trial asks for {amount:g} {name}s but the embedded Ray "
                        f"cluster has {available.get(name, 0.0):g}",
                    )
                ]
            )


def cause_of(error: BaseException) -> str:
    """The innermost error of a RayTaskError chain, on one line."""
    cause: Any = error
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause
    return str(cause).strip().splitlines()[-1][:2000] if str(cause).strip() else repr(cause)


def run_tasks(
    request: TrialRequest,
    spec: SpecBase,
    trials: list[Trial],
    notify: ProgressFn,
    stop: threading.Event,
) -> dict[str, str]:
    """The trials as plain Ray tasks; returns {label: error} for each trial whose worker died
    more often than `max_failures` allows (a trial that fails in its algorithm ends its own run
    FAILED, and is a result here).

    A task starts on an idle Ray worker of the job, and a worker that finished one trial takes
    the next: no process is started per trial. At most as many run at once as the cluster has
    room for (and `sweep.max_concurrent_trials`). When a worker dies, Ray runs its task again
    (`max_retries`), and the trial continues its MLflow run from its last checkpoint.
    """
    remote = ray.remote(run_on_ray_worker)
    options = {
        "num_cpus": spec.resources.num_cpus,
        "num_gpus": spec.resources.num_gpus,
        "max_retries": spec.max_failures,
        "retry_exceptions": False,  # an algorithm's exception is a result (FAILED), not a crash
    }
    limit = min(len(trials), room_for(spec))
    if spec.sweep is not None and spec.sweep.max_concurrent_trials:
        limit = min(limit, spec.sweep.max_concurrent_trials)
    waiting = list(trials)
    running: dict[ray.ObjectRef, Trial] = {}
    errors: dict[str, str] = {}
    try:
        while waiting or running:
            while waiting and len(running) < limit:
                trial = waiting.pop(0)
                task = remote.options(name=f"rlgen:{spec.name}:{trial.label}", **options)
                running[task.remote(request.for_trial(trial.seed, trial.overrides))] = trial
                notify(trial.label, "RUNNING", None)
            # ray.wait with a timeout, not ray.get: Ctrl-C must get through.
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
            if stop.is_set():
                raise KeyboardInterrupt
            for ref in ready:
                trial = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as e:  # its worker died too often
                    notify(trial.label, "FAILED", None)
                    errors[trial.label] = cause_of(e)
                    continue
                notify(trial.label, outcome.status, outcome.run_id)
    except KeyboardInterrupt:
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    return errors


def warm_up(spec: SpecBase, trials: int) -> list[ray.ObjectRef]:
    """Have as many of the embedded cluster's workers as will run trials at once import what
    trials run (`service.trial`), now: a Ray worker imports a task's module when it first runs
    one, and these imports then overlap this process's own set-up (MLflow, the experiment, its
    runs). Ray hands the next task to the worker that ran the last one, so the trials, submitted
    once these are done, start on warm workers. Returns the tasks to wait for."""
    remote = ray.remote(imported).options(
        num_cpus=spec.resources.num_cpus, num_gpus=spec.resources.num_gpus
    )
    return [remote.remote() for _ in range(min(trials, room_for(spec)))]


def room_for(spec: SpecBase) -> int:
    """How many of the spec's trials the cluster can run at once now (at least 1: on a cluster
    that grows, the others wait for room)."""
    available = ray.cluster_resources()
    res = spec.resources
    fits = [available.get("CPU", 0.0) // res.num_cpus]
    if res.num_gpus:
        fits.append(available.get("GPU", 0.0) // res.num_gpus)
    return max(1, int(min(fits)))
