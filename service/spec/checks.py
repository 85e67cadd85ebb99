"""Checks after the models validated a spec: booleans read as numbers, the data suits the model,
sweeps and metrics name what exists, and the outside world (env ids, data files)."""

from __future__ import annotations

import difflib
import json
from typing import Any

from pydantic import BaseModel, ValidationError

from agents.envs import EnvSpec, MissingExtra, ensure_registered, is_ale
from generative import data
from service.registry import ALGORITHMS, Algorithm
from service.settings import get_settings
from service.spec.errors import Loc, Problem, SpecError, dotted, fields_at
from service.spec.models import Distribution, Pbt, SpecBase
from service.spec.reading import Source

MAX_TRIALS = 10_000  # seeds x grid points x samples of one spec (a grid of 7 x 20 values: 1.3e9)


def _booleans_read_as_numbers(raw: Any, value: Any, loc: Loc = ()) -> list[Loc]:
    """Where the document `raw` has `true`/`false` and its validated `value` a number: pydantic
    reads booleans as 1 and 0, so a slip such as `total_timesteps: yes` would train one step."""
    if isinstance(raw, bool):
        return [loc] if isinstance(value, (int, float)) and not isinstance(value, bool) else []
    found: list[Loc] = []
    if isinstance(raw, dict):
        for key, item in raw.items():
            if isinstance(value, BaseModel):
                found += _booleans_read_as_numbers(
                    item, getattr(value, str(key), None), (*loc, key)
                )
            elif isinstance(value, dict):
                found += _booleans_read_as_numbers(item, value.get(key), (*loc, key))
    elif isinstance(raw, list) and isinstance(value, (list, tuple)):
        for i, (item, got) in enumerate(zip(raw, value, strict=False)):
            found += _booleans_read_as_numbers(item, got, (*loc, i))
    return found


NOT_A_BOOLEAN = "expected a number, not a boolean"


def check_booleans(spec: SpecBase, source: Source) -> None:
    problems = [
        Problem(source.where(loc), dotted(loc), NOT_A_BOOLEAN)
        for loc in _booleans_read_as_numbers(source.data, spec)
    ]
    if problems:
        raise SpecError(problems)


def check_data(spec: SpecBase, source: Source) -> None:
    """The data set suits the model (e.g. a Bernoulli likelihood needs pixels in [0, 1])."""
    check = ALGORITHMS[spec.algorithm].check_data
    params = spec.params  # type: ignore[attr-defined]
    if check is None or (reason := check(params, getattr(spec, "dataset", None))) is None:
        return
    loc = ("dataset", "scale") if "scale" in source.data.get("dataset", {}) else ("dataset",)
    raise SpecError([Problem(source.where(loc), dotted(loc), reason)])


def check_metrics(spec: SpecBase, source: Source) -> None:
    """The scheduler's metric and the `report` list name metrics the algorithm logs: a sweep that
    ranks trials by a metric no trial reports would fail every trial at its end."""
    algo = ALGORITHMS[spec.algorithm]
    named: list[tuple[tuple[str | int, ...], str]] = [
        (("report", i), key) for i, key in enumerate(spec.report)
    ]
    if spec.sweep is not None and spec.sweep.scheduler is not None:
        named.append((("sweep", "scheduler", "metric"), spec.sweep.scheduler.metric))
    if spec.sweep is not None and spec.sweep.search is not None:
        named.append((("sweep", "search", "metric"), spec.sweep.search.metric))
    problems = []
    for loc, key in named:
        if algo.logs(key):
            continue
        known = [m for m in algo.metrics if "*" not in m]
        hint = difflib.get_close_matches(key, known, n=1)
        msg = f"{spec.algorithm} never logs {key!r}; " + (
            f"did you mean '{hint[0]}'?" if hint else "it logs: " + ", ".join(algo.metrics)
        )
        problems.append(Problem(source.where(loc), dotted(loc), msg))
    if problems:
        raise SpecError(problems)


def check_resume(spec: SpecBase, source: Source) -> None:
    """Restarts (`max_failures`) and PBT's exploits continue a trial from a checkpoint; refuse
    them for a config whose checkpoint would not continue the same trajectory."""
    problem = ALGORITHMS[spec.algorithm].resume_problem
    pbt = spec.sweep is not None and isinstance(spec.sweep.scheduler, Pbt)
    if problem is None or (spec.max_failures == 0 and not pbt):
        return
    if (reason := problem(spec.params)) is not None:  # type: ignore[attr-defined]
        loc = ("max_failures",) if spec.max_failures else ("sweep", "scheduler", "type")
        what = f"max_failures {spec.max_failures}" if spec.max_failures else "pbt"
        msg = f"{what} needs an exact resume: {reason}"
        raise SpecError([Problem(source.where(loc), dotted(loc), msg)])


def set_dotted(data: dict[str, Any], path: str, value: Any) -> None:
    """data["a"]["b"] = value for path "a.b", creating mappings on the way."""
    *parents, last = path.split(".")
    for key in parents:
        child = data.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"'{key}' is not a mapping")
        data = child
    data[last] = value


def with_value(params: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A trial's params: a copy of the JSON `params` with `value` at `path` (`set_dotted`)."""
    trial = json.loads(json.dumps(params))
    set_dotted(trial, path, value)
    return trial


def swept(spec: SpecBase) -> list[tuple[Loc, str, Distribution]]:
    """(where in the spec, params path, distribution) of each swept param: the sweep's params
    and the PBT scheduler's mutations."""
    if spec.sweep is None:
        return []
    explored = {}
    if isinstance(spec.sweep.scheduler, Pbt):
        explored = spec.sweep.scheduler.hyperparam_mutations
    found: list[tuple[Loc, str, Distribution]] = [
        (("sweep", "params", p), p, d) for p, d in spec.sweep.params.items()
    ]
    found += [
        (("sweep", "scheduler", "hyperparam_mutations", p), p, d) for p, d in explored.items()
    ]
    return found


def check_sweep(spec: SpecBase, source: Source) -> None:
    """Every swept path is a field of the algorithm's config and every value it may take is
    valid there, so no trial of a sweep can fail on its config."""
    if spec.sweep is None:
        return
    if isinstance(spec.sweep.scheduler, Pbt) and spec.continue_from is not None:
        msg = "PBT members change their params as they train: continue a member on its own"
        raise SpecError([Problem(source.where(("continue_from",)), "continue_from", msg)])
    pbt = spec.sweep.scheduler
    every = getattr(getattr(spec, "params", None), "checkpoint_every", None)
    # Members report at checkpoints, the first at step >= checkpoint_every; Ray Tune's
    # synchronous PBT never resumes the members it perturbs at their first report.
    if (
        isinstance(pbt, Pbt)
        and pbt.synch
        and every is not None
        and pbt.burn_in_period + pbt.perturbation_interval <= every
    ):
        at = ("sweep", "scheduler", "perturbation_interval")
        msg = (
            f"{pbt.perturbation_interval} (+ burn_in_period {pbt.burn_in_period}) would "
            f"perturb at the first checkpoint (params.checkpoint_every {every}), where "
            "synchronous PBT stalls: make it larger than checkpoint_every"
        )
        raise SpecError([Problem(source.where(at), dotted(at), msg)])
    if spec.sweep.search is not None:
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            msg = "optuna is not installed: pip install 'rlgen[optuna]'"
            where = source.where(("sweep", "search", "type"))
            raise SpecError([Problem(where, "sweep.search.type", msg)])
        if spec.continue_from is not None:
            msg = "a search proposes new configurations; continue its trials one by one"
            raise SpecError([Problem(source.where(("continue_from",)), "continue_from", msg)])
    count = len(spec.seeds) * spec.sweep.num_samples
    for dist in spec.sweep.params.values():
        count *= len(dist.grid) if dist.grid is not None else 1
    if count > MAX_TRIALS:
        msg = (
            f"expands to {count:,} trials (seeds x grid points x num_samples); at most "
            f"{MAX_TRIALS:,}: sample the space (choice, uniform, num_samples) instead"
        )
        raise SpecError([Problem(source.where(("sweep",)), "sweep", msg)])
    config_model = ALGORITHMS[spec.algorithm].config
    check_data, dataset = ALGORITHMS[spec.algorithm].check_data, getattr(spec, "dataset", None)
    params = spec.params.model_dump(mode="json")  # type: ignore[attr-defined]
    problems = []
    for loc, path, dist in swept(spec):
        parts = tuple(path.split("."))
        if parts[-1] not in fields_at(config_model, parts[:-1]):
            known = fields_at(config_model, ())
            hint = difflib.get_close_matches(path, known, n=1)
            msg = f"'{path}' is not a field of {spec.algorithm}'s params" + (
                f"; did you mean '{hint[0]}'?" if hint else ""
            )
            problems.append(Problem(source.where(loc), dotted(loc), msg))
            continue
        for value in dist.examples():
            try:
                trial = with_value(params, path, value)
            except ValueError as e:  # params give a list where the path needs a mapping
                msg = f"cannot set '{path}': {e} in params (a per-layer list?)"
                problems.append(Problem(source.where(loc), dotted(loc), msg))
                break
            try:
                config = config_model.model_validate(trial)
            except ValidationError as e:
                first = e.errors(include_url=False)[0]
                msg = first["msg"].removeprefix("Value error, ")
                problems.append(
                    Problem(source.where((*loc, dist.kind)), dotted(loc), f"{value!r}: {msg}")
                )
                break
            reason = NOT_A_BOOLEAN if _booleans_read_as_numbers(trial, config) else None
            if reason is None and check_data is not None:
                reason = check_data(config, dataset)
            if reason is not None:
                problems.append(
                    Problem(source.where((*loc, dist.kind)), dotted(loc), f"{value!r}: {reason}")
                )
                break
    if problems:
        raise SpecError(problems)


def check_world(spec: SpecBase, source: Source) -> None:
    """Checks that look outside the document: env ids and their models, data files."""
    env = getattr(spec, "env", None)
    if env is not None:
        check_env(spec, env, ALGORITHMS[spec.algorithm], source)
    dataset = getattr(spec, "dataset", None)
    if dataset is not None:
        try:
            data.check(dataset)
            if ALGORITHMS[spec.algorithm].needs_labels and not data.has_labels(dataset):
                raise data.DatasetError("name", f"{spec.algorithm} needs a labelled data set")
        except data.DatasetError as e:
            loc = ("dataset", e.field)
            raise SpecError([Problem(source.where(loc), dotted(loc), str(e))]) from None


def param_at_fault(algo: Algorithm, env: Any, params: BaseModel) -> str | None:
    """The param the spec sets whose default would let `algo` run on `env` (a `network` the
    env's observations cannot go through), or None when the env itself is the problem."""
    assert algo.check_env is not None
    if algo.check_env(env, params) is None:
        return None
    defaults = algo.config()
    for name in sorted(params.model_fields_set):
        default = params.model_copy(update={name: getattr(defaults, name)})
        if algo.check_env(env, default) is None:
            return name
    return None


def check_env(spec: SpecBase, env: EnvSpec, algo: Algorithm, source: Source) -> None:
    import gymnasium as gym

    import agents  # noqa: F401  (registers rlgen/* envs)

    where = source.where(("env", "id"))
    if env.kwargs.get("render_mode") == "human":  # trials run on Ray workers, without a display
        loc: Loc = ("env", "kwargs", "render_mode")
        msg = (
            "'human' opens a window, and trials run headless on Ray workers; leave it out "
            "(`rlgen evaluate RUN_ID --render gif` records an episode)"
        )
        raise SpecError([Problem(source.where(loc), dotted(loc), msg)])
    try:
        ensure_registered(env.id)
    except MissingExtra as e:
        raise SpecError([Problem(where, "env.id", f"'{env.id}': {e}")]) from None
    if env.preprocessing is not None and not is_ale(env.id):
        loc = ("env", "preprocessing")
        msg = (
            f"Atari preprocessing needs an ALE game (ALE/Pong-v5, PongNoFrameskip-v4), "
            f"not '{env.id}'"
        )
        raise SpecError([Problem(source.where(loc), dotted(loc), msg)])
    if ":" in env.id:
        module = env.id.split(":", 1)[0]
        allowed = get_settings().allowed_env_modules
        if module not in allowed:
            raise SpecError(
                [
                    Problem(
                        where,
                        "env.id",
                        f"'{env.id}' would make gymnasium import "
                        f"module '{module}'; allow it with RLGEN_ALLOWED_ENV_MODULES",
                    )
                ]
            )
    elif env.id not in gym.registry:
        hint = difflib.get_close_matches(env.id, list(gym.registry), n=1, cutoff=0.6)
        msg = f"unknown environment '{env.id}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
        raise SpecError([Problem(where, "env.id", msg)])
    if algo.check_env is None:
        return
    # Build the env once: catches bad kwargs and envs the algorithm cannot run on, up front.
    try:
        instance = env.make()
    except Exception as e:  # gymnasium raises many types for bad ids and kwargs
        raise SpecError(
            [Problem(source.where(("env", "kwargs")), "env", f"cannot create '{env.id}': {e}")]
        ) from None
    try:
        params = spec.params  # type: ignore[attr-defined]
        if (reason := algo.check_env(instance, params)) is not None:
            if (name := param_at_fault(algo, instance, params)) is None:
                raise SpecError([Problem(where, "env.id", f"'{env.id}': {reason}")])
            loc = ("params", name)
            msg = f"{getattr(params, name)!r} on '{env.id}': {reason}"
            raise SpecError([Problem(source.where(loc), dotted(loc), msg)])
        # Every value a sweep may give (check_sweep validated them): a network that cannot
        # take the env's observations would fail its trials.
        raw = params.model_dump(mode="json")
        for loc, path, dist in swept(spec):
            for value in dist.examples():
                trial = algo.config.model_validate(with_value(raw, path, value))
                reason = algo.check_env(instance, trial)
                if reason is not None:
                    msg = f"{value!r} on '{env.id}': {reason}"
                    raise SpecError([Problem(source.where(loc), dotted(loc), msg)])
    finally:
        instance.close()
