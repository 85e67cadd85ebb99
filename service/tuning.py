"""A sweep with an early-stopping scheduler (ASHA) as one Ray Tune experiment.

Tune is here for what plain Ray tasks (`service.execution.run_tasks`) cannot do: stop trials
early on the metric they report. Restarts of trials whose worker died work as for tasks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

from service.settings import get_settings
from service.spec import SpecBase
from service.tracking import TAG_ERROR
from service.trial import (
    TrialRequest,
    run_name,
    run_trial,
    tracker_for,
    trial_label,
)

if TYPE_CHECKING:  # not at run time: trial processes unpickle `_trainable` from here, and
    # `service.execution` imports MLflow, which trials on the embedded cluster never need
    from service.execution import ProgressFn
    from service.sweeps import Trial


class TrialFailedError(RuntimeError):
    """Raised in a Tune trial whose algorithm failed, so Tune records the trial as ERROR."""


class _TuneReporter:
    """Forwards the scheduler's metric to Ray Tune each time the algorithm logs it.

    It flushes the trial's metrics to MLflow first: when the scheduler stops the trial, Tune never
    returns from `tune.report`, and the worker ends without running the trial's cleanup; the
    driver then closes its MLflow run as KILLED, with everything logged up to that point kept.
    """

    def __init__(self, metric: str):
        self.metric = metric
        self.last: float | None = None
        self.seen: set[str] = set()

    def __call__(self, metrics: Mapping[str, float], step: int, logger: Any) -> None:
        self.seen.update(metrics)
        if self.metric in metrics:
            logger.flush()
            self.last = metrics[self.metric]
            tune.report({self.metric: self.last, "step": step})


def _trainable(config: dict[str, Any], request: TrialRequest, metric: str) -> None:
    trial = config["trial"]
    reporter = _TuneReporter(metric)
    outcome = run_trial(
        request.for_trial(int(trial["seed"]), trial["overrides"]),
        gpu_ids=ray.get_gpu_ids(),
        on_metrics=reporter,
    )
    if outcome.status == "FAILED":
        raise TrialFailedError(outcome.error)
    if reporter.last is None and outcome.status == "FINISHED":
        # Validation checks the algorithm can log the metric, but this configuration did not
        # (eval/fid without labels, eval/value_gap without a model...): ASHA had nothing to rank.
        reason = (
            f"never logged {reporter.metric!r}, the metric sweep.scheduler ranks trials by "
            f"(it logged: {', '.join(sorted(reporter.seen)) or 'nothing'})"
        )
        tracker = tracker_for(request)
        tracker.set_tag(outcome.run_id, TAG_ERROR, reason[:5000])  # MLflow keeps 8000
        tracker.set_terminated(outcome.run_id, "FAILED")
        tracker.close()
        raise TrialFailedError(reason)
    final: dict[str, Any] = {"run_id": outcome.run_id, "status": outcome.status}
    if reporter.last is not None:
        final[reporter.metric] = reporter.last
    tune.report(final)


class _Progress(tune.Callback):
    """Forwards trial state changes to the progress display (driver side only)."""

    def __init__(self, notify: ProgressFn) -> None:
        self.notify: ProgressFn | None = notify

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with its experiment state; the live display stays behind.
        return {"notify": None}

    def _send(self, trial: Any, status: str, run_id: str | None) -> None:
        if self.notify is not None:
            t = trial.config["trial"]
            self.notify(trial_label(int(t["seed"]), t["overrides"]), status, run_id)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._send(trial, "RUNNING", None)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        self._send(trial, result.get("status", "KILLED"), result.get("run_id"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._send(trial, "FAILED", None)


class _StopOnRequest(tune.Stopper):
    """Stops the whole experiment once Ctrl-C has set the event (checked every controller step,
    wherever in Tune's loop the signal landed)."""

    def __init__(self, event: threading.Event) -> None:
        self.event: threading.Event | None = event

    def __getstate__(self) -> dict[str, Any]:
        return {"event": None}  # Tune pickles stoppers with its experiment state

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.stop_all()

    def stop_all(self) -> bool:
        return self.event is not None and self.event.is_set()


def run_tune(
    request: TrialRequest,
    spec: SpecBase,
    trials: list[Trial],
    notify: ProgressFn,
    stop: threading.Event,
) -> tuple[dict[str, str], set[str]]:
    """Run the trials as one Tune experiment; returns (errors by label, labels stopped early)."""
    from service.execution import cause_of

    storage = Path(get_settings().workdir).resolve() / "ray_results"
    sweep = spec.sweep
    assert sweep is not None and sweep.scheduler is not None, "Tune runs sweeps with a scheduler"
    asha = sweep.scheduler
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, request=request, metric=asha.metric),
        {"cpu": spec.resources.num_cpus, "gpu": spec.resources.num_gpus},
    )
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(
        metric=asha.metric,
        mode=asha.mode,
        # +1: a trial that reports max_t times then ends on its own, with its final
        # evaluation, checkpoint and figures, instead of being stopped at its last report.
        max_t=asha.max_t + 1,
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )

    tuner = tune.Tuner(
        trainable,
        # The trials are expanded here (see `expand`), so Tune runs exactly this list.
        param_space={
            "trial": tune.grid_search([{"seed": t.seed, "overrides": t.overrides} for t in trials])
        },
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            max_concurrent_trials=sweep.max_concurrent_trials,
            # A trial the scheduler stops never returns from `tune.report`: its process is not
            # reusable.
            reuse_actors=False,
            trial_name_creator=lambda t: run_name(spec, int(t.config["trial"]["seed"])),
            trial_dirname_creator=lambda t: f"seed_{t.config['trial']['seed']}_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            stop=_StopOnRequest(stop),
            name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{request.launch_id[:6]}",
            storage_path=str(storage),
            verbose=0,
            callbacks=[_Progress(notify)],
            # A trial whose worker dies is restarted; it continues its MLflow run from its
            # last checkpoint (`Tracker.find_run`, `Tracker.resume`).
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        ),
    )
    results = tuner.fit()
    if stop.is_set():  # Ctrl-C: the trials Tune stopped were interrupted, not stopped early
        raise KeyboardInterrupt
    errors: dict[str, str] = {}
    stopped: set[str] = set()
    for i in range(len(results)):
        result = results[i]
        if not result.config:
            continue
        label = trial_label(
            int(result.config["trial"]["seed"]), result.config["trial"]["overrides"]
        )
        if result.error is not None:
            errors[label] = cause_of(result.error)
        elif "status" not in (result.metrics or {}):
            stopped.add(label)  # ended without its final report: the scheduler stopped it
    return errors, stopped
