"""A sweep with a scheduler as one Ray Tune experiment: ASHA (early stopping) or PBT
(population-based training).

Tune is here for what plain Ray tasks (`service.execution.run_tasks`) cannot do: stop trials
early on the metric they report (ASHA), and move trials to other trials' checkpoints with new
hyperparameters (PBT). Restarts of trials whose worker died work as for tasks.

Under ASHA a trial reports each time it logs the metric. Under PBT it reports at each checkpoint
(with the metric's latest value and the checkpoint, `trial.population_checkpoint`), since an
exploit continues from the donor's state at exactly the reported step. A PBT trial keeps one MLflow
run, named by its first values; each exploit is a line of its `rlgen.pbt.exploits` tag and its
explored values are `pbt/<param>` metrics (see `service.trial.record_exploit`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

from service.settings import get_settings
from service.spec import SpecBase, spec_hash
from service.spec.models import Asha, Distribution, Optuna, Pbt
from service.tracking import TAG_ERROR
from service.trial import (
    TrialRequest,
    population_checkpoint,
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


def identity(config: dict[str, Any], seeds: list[int]) -> tuple[int, dict[str, Any], str]:
    """(seed, swept values, label) of a Tune trial's config: an expanded trial's, or a search's
    proposal, whose repeats (`Repeater`'s index) are the spec's seeds. Proposed values are kept
    to 4 significant digits, as sweeps draw them (what labels show)."""
    if "trial" in config:
        trial = config["trial"]
        return int(trial["seed"]), trial["overrides"], trial["label"]
    seed = seeds[int(config.get("__trial_index__", 0))]
    overrides = {
        path: float(f"{v:.4g}") if isinstance(v, float) else v
        for path, v in config["overrides"].items()
    }
    return seed, overrides, trial_label(seed, overrides)


def _search_domain(dist: Distribution) -> Any:
    """A spec's distribution for a searcher: lists are categorical."""
    if dist.grid is not None or dist.choice is not None:
        return tune.choice(list(dist.grid or dist.choice or []))
    if dist.uniform is not None:
        return tune.uniform(*dist.uniform)
    assert dist.loguniform is not None
    return tune.loguniform(*dist.loguniform)


def _searcher(spec: SpecBase, search: Optuna) -> Any:
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    # Seeded by the spec, as sweeps' draws are: the same spec proposes the same first points.
    seed = int(spec_hash(spec), 16) % 2**31
    searcher = OptunaSearch(metric=search.metric, mode=search.mode, seed=seed)
    return Repeater(searcher, repeat=len(spec.seeds), set_index=True)


class _PopulationReporter:
    """Reports to Tune at each checkpoint (PBT): the metric's latest value, and the checkpoint."""

    def __init__(self, metric: str, label: str):
        self.metric, self.label = metric, label
        self.last: float | None = None
        self.seen: set[str] = set()

    def __call__(self, metrics: Mapping[str, float], step: int, logger: Any) -> None:
        self.seen.update(metrics)
        if self.metric in metrics:
            self.last = metrics[self.metric]

    def checkpoint(self, file: Path, step: int, run_id: str) -> None:
        if self.last is None:  # nothing to rank by yet
            return
        with tempfile.TemporaryDirectory() as d:
            directory = population_checkpoint(file, step, run_id, self.label, Path(d))
            tune.report(
                {self.metric: self.last, "step": step},
                checkpoint=tune.Checkpoint.from_directory(str(directory)),
            )


def _trainable(
    config: dict[str, Any], request: TrialRequest, metric: str, population: bool = False
) -> None:
    if population:
        _population_member(config, request, metric)
        return
    seed, overrides, _ = identity(config, request.spec["seeds"])
    reporter = _TuneReporter(metric)
    outcome = run_trial(
        request.for_trial(seed, overrides),
        gpu_ids=ray.get_gpu_ids(),
        on_metrics=reporter,
    )
    if outcome.status == "FAILED":
        # Failed in its algorithm (its run is FAILED with the reason): ended, not raised, so
        # that Tune's retries (`max_failures`) stay for workers that died.
        tune.report({"run_id": outcome.run_id, "status": "FAILED"})
        return
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


def _population_member(config: dict[str, Any], request: TrialRequest, metric: str) -> None:
    """A PBT trial: its config may be another member's, mutated (after an exploit), so its label
    is its Tune trial's name, fixed when the trial was created from its first values."""
    trial = config["trial"]
    label = tune.get_context().get_trial_name()
    reporter = _PopulationReporter(metric, label)
    start = tune.get_checkpoint()
    with start.as_directory() if start is not None else contextlib.nullcontext() as directory:
        outcome = run_trial(
            request.for_trial(int(trial["seed"]), trial["overrides"], label=label),
            gpu_ids=ray.get_gpu_ids(),
            on_metrics=reporter,
            on_checkpoint=reporter.checkpoint,
            start_checkpoint=Path(directory) if directory is not None else None,
        )
    if outcome.status == "FAILED":  # ended, not retried (see `_trainable`)
        return
    if reporter.last is None and outcome.status == "FINISHED" and start is None:
        # (A trial sent to a donor's final checkpoint has nothing left to train or log.)
        raise TrialFailedError(
            f"never logged {metric!r}, the metric sweep.scheduler ranks trials by"
        )
    # No final report: PBT would rank it and might send a finished trial back to an earlier
    # checkpoint. The run's status in MLflow is the outcome.


def _clip_to_bounds(bounds: dict[str, tuple[float, float]], config: dict[str, Any]) -> dict:
    """PBT scales continuous values by 0.8 or 1.2: keep them inside the spec's bounds (which
    validation checked) and at 4 significant digits, as sweeps draw them."""
    overrides = config["trial"]["overrides"]
    for path, (low, high) in bounds.items():
        value = min(max(float(overrides[path]), low), high)
        rounded = float(f"{value:.4g}")
        overrides[path] = rounded if low <= rounded <= high else value
    return config


def _tune_domain(dist: Distribution) -> Any:
    """A spec's distribution as PBT's mutation: a list is explored by neighbours."""
    if dist.grid is not None or dist.choice is not None:
        return list(dist.grid or dist.choice or [])
    if dist.uniform is not None:
        return tune.uniform(*dist.uniform)
    assert dist.loguniform is not None
    return tune.loguniform(*dist.loguniform)


def population_scheduler(pbt: Pbt) -> Any:
    from ray.tune.schedulers import PopulationBasedTraining

    mutations = pbt.hyperparam_mutations
    bounds: dict[str, tuple[float, float]] = {}
    for path, d in mutations.items():
        if (interval := d.uniform or d.loguniform) is not None:
            bounds[path] = interval
    return PopulationBasedTraining(
        time_attr="step",
        metric=pbt.metric,
        mode=pbt.mode,
        perturbation_interval=pbt.perturbation_interval,
        burn_in_period=pbt.burn_in_period,
        hyperparam_mutations={
            "trial": {"overrides": {p: _tune_domain(d) for p, d in mutations.items()}}
        },
        quantile_fraction=pbt.quantile_fraction,
        resample_probability=pbt.resample_probability,
        custom_explore_fn=functools.partial(_clip_to_bounds, bounds),
        synch=pbt.synch,
    )


class _Progress(tune.Callback):
    """Forwards trial state changes to the progress display (driver side only), and learns each
    Tune trial's label (a PBT trial's config may be another member's after an exploit; its name
    is its own label)."""

    def __init__(self, notify: ProgressFn, seeds: list[int], population: bool) -> None:
        self.notify: ProgressFn | None = notify
        self.seeds, self.population = seeds, population
        self.labels: dict[str, str] = {}  # Tune trial id -> label

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with its experiment state; the live display stays behind.
        return {"notify": None, "seeds": self.seeds, "population": self.population, "labels": {}}

    def label(self, trial: Any) -> str:
        if trial.trial_id not in self.labels:
            own = str(trial) if self.population else identity(trial.config, self.seeds)[2]
            self.labels[trial.trial_id] = own
        return self.labels[trial.trial_id]

    def _send(self, trial: Any, status: str, run_id: str | None) -> None:
        label = self.label(trial)
        if self.notify is not None:
            self.notify(label, status, run_id)

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
    assert sweep is not None, "Tune runs sweeps"
    ranking = sweep.scheduler or sweep.search
    assert ranking is not None, "Tune runs sweeps with a scheduler or a search"
    population = isinstance(sweep.scheduler, Pbt)
    trainable = tune.with_resources(
        tune.with_parameters(
            _trainable, request=request, metric=ranking.metric, population=population
        ),
        {"cpu": spec.resources.num_cpus, "gpu": spec.resources.num_gpus},
    )
    scheduler: Any = None  # Tune's default: every trial runs to its end
    if isinstance(sweep.scheduler, Pbt):
        scheduler = population_scheduler(sweep.scheduler)
    elif isinstance(sweep.scheduler, Asha):
        from ray.tune.schedulers import ASHAScheduler

        asha = sweep.scheduler
        scheduler = ASHAScheduler(
            metric=asha.metric,
            mode=asha.mode,
            # +1: a trial that reports max_t times then ends on its own, with its final
            # evaluation, checkpoint and figures, instead of being stopped at its last report.
            max_t=asha.max_t + 1,
            grace_period=asha.grace_period,
            reduction_factor=asha.reduction_factor,
        )
    search_alg, num_samples = None, 1
    if sweep.search is not None:
        # Proposed one after another; each proposal runs once per seed (index -> seed).
        param_space: dict[str, Any] = {
            "overrides": {path: _search_domain(d) for path, d in sweep.params.items()}
        }
        search_alg = _searcher(spec, sweep.search)
        num_samples = sweep.num_samples * len(spec.seeds)
    else:
        # The trials are expanded here (see `expand`), so Tune runs exactly this list.
        param_space = {
            "trial": tune.grid_search(
                [{"seed": t.seed, "overrides": t.overrides, "label": t.label} for t in trials]
            )
        }
    seeds = list(spec.seeds)
    progress = _Progress(notify, seeds, population)

    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials,
            # ASHA: a trial it stops never returns from `tune.report`, so its process is not
            # reusable. PBT: a paused trial's thread is ended (its run closed KILLED) before its
            # process takes the next trial, which then starts without importing anything.
            reuse_actors=population,
            # PBT: the label, which names the trial's run for good (see `_population_member`).
            trial_name_creator=(
                (lambda t: t.config["trial"]["label"])
                if population
                else (lambda t: run_name(spec, identity(t.config, seeds)[0]))
            ),
            trial_dirname_creator=lambda t: f"seed_{identity(t.config, seeds)[0]}_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            stop=_StopOnRequest(stop),
            name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{request.launch_id[:6]}",
            storage_path=str(storage),
            verbose=0,
            callbacks=[progress],
            # A trial whose worker dies is restarted; it continues its MLflow run from its
            # last checkpoint (`Tracker.find_run`, `Tracker.resume`).
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # PBT's exploits read a recent one (Tune warns of 2 or fewer being too few); the
            # rest go (DQN's hold its replay buffer).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
        ),
    )
    # Tune refuses a trial's final report without the scheduler's metric; a trial that failed
    # in its algorithm reports its status without one (rlgen checks the metric itself: at
    # validation, and in `_trainable` for a configuration that never logs it).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    results = tuner.fit()
    if stop.is_set():  # Ctrl-C: the trials Tune stopped were interrupted, not stopped early
        raise KeyboardInterrupt
    errors: dict[str, str] = {}
    stopped: set[str] = set()
    for i in range(len(results)):
        result = results[i]
        if not result.config:
            continue
        trial_id = str((result.metrics or {}).get("trial_id"))
        label = progress.labels.get(trial_id) or identity(result.config, seeds)[2]
        if result.error is not None:
            errors[label] = cause_of(result.error)
        elif not population and "status" not in (result.metrics or {}):
            stopped.add(label)  # ended without its final report: the scheduler stopped it
    return errors, stopped
