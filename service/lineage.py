"""Runs that start from other runs' checkpoints.

- `continue_from` (`rlgen continue RUN_ID --set params.epochs=40`): each trial goes on from the
  newest checkpoint of the same trial of the earlier run (a trial run, or a sweep's parent and
  its children), in a new MLflow run tagged with the run it continues; only the budget params
  (the registry's `budget`) may differ from the earlier run's spec.
- `init_from` (`rlgen run SPEC --init-from RUN_ID`): every trial starts from the weights of one
  trial run of the same algorithm; optimizers and counters start afresh.

Everything is checked here, before Ray starts or any run exists: a run that is missing, still
running, of another algorithm or without a checkpoint, a changed non-budget field, and weights whose
shapes do not fit the spec's models (found by building them: see `check_init_shapes`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from runctx import InMemoryWriter, RunContext
from runctx.checkpoints import CheckpointError, InitChecked
from service.registry import ALGORITHMS
from service.spec import SpecBase, SpecError, flatten, load_spec_text, resolved
from service.spec.errors import Problem
from service.store import client_for
from service.sweeps import Trial, expand
from service.tracking import TAG_EXPLOITS, TAG_PARENT, TAG_SEED, TAG_TRIAL

# Fields that may differ between a run and its continuation besides the budget: they change
# where and how it is recorded and scheduled, not the trajectory.
FREE_FIELDS = ("name", "description", "tags", "report", "resources", "driver", "max_failures")
LINK_FIELDS = ("continue_from", "init_from")


@dataclass(frozen=True)
class Sources:
    """Which run each trial of a launch continues (trial label -> run id); the run whose
    weights start every trial is the spec's `init_from`."""

    continue_from: dict[str, str] = field(default_factory=dict)


def refuse(spec: SpecBase, field_name: str, message: str) -> SpecError:
    """`field_name` dotted: params.learning_rate."""
    return SpecError([Problem(spec.where(*field_name.split(".")), field_name, message)])


def resolve(spec: SpecBase, tracking_uri: str) -> Sources:
    """Check the spec's `continue_from` and `init_from` against the tracking store at
    `tracking_uri` (read only when the spec names a run); raise `SpecError` naming the problem,
    else say which run each trial starts from."""
    if spec.continue_from is None and spec.init_from is None:
        return Sources()
    client = client_for(tracking_uri)
    if spec.init_from is not None:
        _check_init(spec, client, spec.init_from)
    if spec.continue_from is None:
        return Sources()
    return Sources(continue_from=_continuations(spec, client))


def _get_run(spec: SpecBase, client: MlflowClient, field_name: str, run_id: str) -> Any:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise refuse(spec, field_name, f"run {run_id} not found in the tracking store") from None


def _has_checkpoint(client: MlflowClient, run_id: str) -> bool:
    return any(f.path.endswith(".pt") for f in client.list_artifacts(run_id, "checkpoints"))


def _check_algorithm(spec: SpecBase, field_name: str, run: Any) -> None:
    theirs = run.data.tags.get("rlgen.algorithm")
    if theirs != spec.algorithm:
        raise refuse(
            spec,
            field_name,
            f"run {run.info.run_id} is {'a ' + theirs if theirs else 'not an rlgen'} run, "
            f"not {spec.algorithm}",
        )


def _continuations(spec: SpecBase, client: MlflowClient) -> dict[str, str]:
    run_id = spec.continue_from
    assert run_id is not None
    run = _get_run(spec, client, "continue_from", run_id)
    _check_algorithm(spec, "continue_from", run)
    if run.info.status in ("RUNNING", "SCHEDULED"):
        raise refuse(spec, "continue_from", f"run {run_id} is still {run.info.status}")
    _check_budget_only(spec, client, run_id)
    trials = expand(spec)
    if TAG_SEED in run.data.tags:  # one trial
        if len(trials) != 1:
            raise refuse(spec, "continue_from", f"run {run_id} is one trial, not {len(trials)}")
        found = {trials[0].label: run}
    else:  # a sweep's or several seeds' parent: each trial continues its own child
        runs = client.search_runs(
            [run.info.experiment_id], f"tags.`{TAG_PARENT}` = '{run_id}'", max_results=10_000
        )
        found = {r.data.tags.get(TAG_TRIAL, ""): r for r in runs}
    missing = [t.label for t in trials if t.label not in found]
    if missing:
        raise refuse(spec, "continue_from", f"run {run_id} has no trial {missing[0]!r}")
    children = {label: r.info.run_id for label, r in found.items()}
    for trial in trials:
        if TAG_EXPLOITS in found[trial.label].data.tags:
            raise refuse(
                spec,
                "continue_from",
                f"run {children[trial.label]} exploited other PBT members: its params are no "
                "longer its spec's",
            )
        if not _has_checkpoint(client, children[trial.label]):
            which = "" if children[trial.label] == run_id else f"'s trial {trial.label!r}"
            raise refuse(
                spec, "continue_from", f"run {run_id}{which} has no checkpoint to continue from"
            )
    return {t.label: children[t.label] for t in trials}


def _check_budget_only(spec: SpecBase, client: MlflowClient, run_id: str) -> None:
    """Only the budget params (and bookkeeping, `FREE_FIELDS`) may differ from the run's spec."""
    try:
        with tempfile.TemporaryDirectory() as d:
            raw = Path(client.download_artifacts(run_id, "spec.yaml", d)).read_bytes()
    except (MlflowException, OSError):
        raise refuse(spec, "continue_from", f"run {run_id} has no spec.yaml") from None
    before, after = (
        {
            k: v
            for k, v in flatten(resolved(s)).items()
            if k.split(".")[0] not in (*FREE_FIELDS, *LINK_FIELDS)
        }
        for s in (load_spec_text(raw, f"run {run_id}:spec.yaml"), spec)
    )
    budget = {f"params.{name}" for name in ALGORITHMS[spec.algorithm].budget}
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key) and key not in budget:
            allowed = ", ".join(sorted(budget)) or "none"
            raise refuse(
                spec,
                key,
                f"a continued run may change only its budget ({allowed}), not this "
                f"({before.get(key, 'unset')} -> {after.get(key, 'unset')})",
            )


def _check_init(spec: SpecBase, client: MlflowClient, run_id: str) -> None:
    run = _get_run(spec, client, "init_from", run_id)
    _check_algorithm(spec, "init_from", run)
    if TAG_SEED not in run.data.tags:
        raise refuse(spec, "init_from", f"run {run_id} is a parent run; name one of its trials")
    with tempfile.TemporaryDirectory() as d:
        try:
            paths = [f.path for f in client.list_artifacts(run_id, "checkpoints")]
            newest = max((p for p in paths if p.endswith(".pt")), default=None)
            if newest is None:
                raise refuse(spec, "init_from", f"run {run_id} has no checkpoint")
            local = client.download_artifacts(run_id, newest, d)
        except (MlflowException, OSError) as e:
            raise refuse(
                spec, "init_from", f"run {run_id}: cannot read its checkpoint ({e})"
            ) from None
        state = torch.load(local, map_location="cpu", weights_only=True)
        check_init_shapes(spec, state, run_id)


def check_init_shapes(spec: SpecBase, state: dict[str, Any], run_id: str) -> None:
    """Build each distinct trial's models as its run would (the algorithm runs up to its
    `ctx.checkpoints.restore`, which checks every tensor's shape and stops there)."""
    from service.trial import spec_of_trial

    algo = ALGORITHMS[spec.algorithm]
    seen: set[str] = set()
    for trial in expand(spec):
        key = repr(sorted(trial.overrides.items()))
        if key in seen:  # seeds of one configuration build the same shapes
            continue
        seen.add(key)
        trial_spec = spec_of_trial(resolved(spec), trial.seed, trial.overrides)
        _probe(spec, trial_spec, algo, state, run_id, trial)


def _probe(
    spec: SpecBase,
    trial_spec: SpecBase,
    algo: Any,
    state: dict[str, Any],
    run_id: str,
    trial: Trial,
) -> None:
    with tempfile.TemporaryDirectory() as d:
        ctx = RunContext(
            seed=trial.seed,
            writer=InMemoryWriter(),
            workdir=Path(d),
            env=getattr(trial_spec, "env", None),
            dataset=getattr(trial_spec, "dataset", None),
            init_from=state,
            check_only=True,
        )
        try:
            algo.train(trial_spec.params, ctx)  # type: ignore[attr-defined]
        except InitChecked:
            return
        except CheckpointError as e:
            where = f" (trial {trial.label})" if trial.overrides else ""
            raise refuse(spec, "init_from", f"run {run_id}'s checkpoint{where}: {e}") from None
        finally:
            ctx.close()
    raise RuntimeError(f"{algo.name} never restored its checkpoint: it cannot start from weights")
