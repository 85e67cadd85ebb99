"""The spec models: the envelope every spec shares, and one spec model per algorithm whose
`params` is that algorithm's `Config`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    create_model,
    field_validator,
    model_validator,
)

from agents.envs import EnvSpec
from generative.data import DatasetSpec, DigitsDataset
from runctx import name_problem
from service.registry import ALGORITHMS
from service.spec.reading import Source, dump_yaml


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per trial (sets torch threads).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per trial; fractions share a GPU.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when the trial was given a GPU, else CPU."
    )
    system_metrics_s: float = Field(
        10.0,
        ge=0,
        description="Seconds between samples of the trial's CPU, memory and GPU use (MLflow's "
        "system metrics, the run's System metrics tab); 0: none, for tiny trials.",
    )

    @model_validator(mode="after")
    def _cuda_reserves_a_gpu(self) -> Resources:
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError(
                "device 'cuda' needs num_gpus > 0: a Ray trial sees only the GPUs it reserves "
                "(num_gpus: 1, or 0.5 to share one)"
            )
        return self


class DriverResources(BaseModel):
    """What the driver of a submitted experiment (`rlgen submit`, the HTTP API) reserves as a Ray
    Job entrypoint. It only coordinates the trials, which reserve their own `resources`; these
    place it, e.g. `resources: {head: 1}` with a custom resource on the head node."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_cpus: float = Field(0.0, ge=0, description="CPUs the job's driver reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs the job's driver reserves.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources the job's driver reserves."
    )


class Distribution(BaseModel):
    """Values one swept field takes: exactly one of `grid` (every value, crossed with the other
    grids and the seeds), `choice` (one at random per sample), `uniform` or `loguniform`
    ([low, high]). A bare list is a grid: `gamma: [0.9, 0.99]`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _bare_list_is_a_grid(cls, data: Any) -> Any:
        return {"grid": data} if isinstance(data, list) else data

    grid: list[Any] | None = Field(None, min_length=1, description="Every one of these values.")
    choice: list[Any] | None = Field(None, min_length=1, description="One of these at random.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], uniformly.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], log-uniformly.")

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform")
        for kind in ("uniform", "loguniform"):
            bounds = getattr(self, kind)
            if bounds is not None:
                if not bounds[0] < bounds[1]:
                    raise ValueError(f"{kind}: low must be below high")
                if kind == "loguniform" and bounds[0] <= 0:
                    raise ValueError("loguniform: bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k))

    def examples(self) -> list[Any]:
        """Values to validate against the algorithm's config: all listed ones, or the bounds."""
        return list(getattr(self, self.kind))


class Asha(BaseModel):
    """Asynchronous successive halving (Li et al. 2020): stops the trials whose `metric` trails
    at each rung. Time is counted in reports of `metric` (evaluations, epochs)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["asha"] = Field("asha", description="The scheduler.")
    metric: str = Field(description="The metric it compares, e.g. eval/return_mean.")
    mode: Literal["max", "min"] = Field(description="Whether higher or lower is better.")
    max_t: int = Field(
        100,
        gt=0,
        description="Reports a complete trial makes (set it to the number of evaluations); "
        "rungs sit at grace_period * reduction_factor^k below it.",
    )
    grace_period: int = Field(1, gt=0, description="Reports before a trial can be stopped.")
    reduction_factor: float = Field(3.0, gt=1, description="1/fraction kept at each rung.")


class Pbt(BaseModel):
    """Population-based training (Jaderberg et al. 2017), Ray Tune's `PopulationBasedTraining`:
    every `perturbation_interval` steps, a trial in the bottom `quantile_fraction` of the
    population by `metric` loads the checkpoint of one in the top fraction (exploit) and perturbs
    its hyperparameters (explore: x0.8 or x1.2, a neighbour in a list, or a fresh draw with
    `resample_probability`). Trials report at their checkpoints, so `params.checkpoint_every` is
    the finest grain of the population's decisions."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["pbt"] = Field(description="The scheduler.")
    metric: str = Field(description="The metric it ranks trials by, e.g. eval/return_mean.")
    mode: Literal["max", "min"] = Field(description="Whether higher or lower is better.")
    perturbation_interval: int = Field(
        gt=0, description="Steps (the metric's: timesteps, epochs) between exploit/explore."
    )
    hyperparam_mutations: dict[str, Distribution] = Field(
        min_length=1,
        description="Fields of `params` to explore, by dotted path: a list (grid or choice) "
        "is explored by moving to a neighbour, uniform/loguniform by scaling within bounds. "
        "Those not in sweep.params start at a random draw.",
    )
    quantile_fraction: float = Field(
        0.25, gt=0, le=0.5, description="Fraction of the population exploited and exploiting."
    )
    resample_probability: float = Field(
        0.25, ge=0, le=1, description="Chance of a fresh draw instead of a perturbation."
    )
    burn_in_period: int = Field(0, ge=0, description="Steps before the first perturbation.")
    synch: bool = Field(
        False,
        description="Perturb the whole population at once, when every trial has reached the "
        "interval (true), or each trial as it reaches it (false: no waiting).",
    )


class Optuna(BaseModel):
    """Model-based search: Ray Tune's `OptunaSearch` (TPE, Bergstra et al. 2011) proposes each
    next configuration from the results so far, instead of drawing them all up front. Each one
    runs once per seed (Tune's `Repeater`), and the seeds' mean is what the search learns from.
    Needs the `optuna` extra: pip install 'rlgen[optuna]'."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["optuna"] = Field(description="The searcher.")
    metric: str = Field(description="The metric it optimises (its last value in each trial).")
    mode: Literal["max", "min"] = Field(description="Whether higher or lower is better.")


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    params: dict[str, Distribution] = Field(
        min_length=1,
        description="Fields of `params` to vary, by dotted path (e.g. learning_rate, "
        "pretraining.epochs), with the values they take.",
    )
    num_samples: int = Field(
        1, ge=1, le=10_000, description="Repeats of the grid, each with fresh random draws."
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials running at once (default: as many as resources allow)."
    )
    scheduler: Asha | Pbt | None = Field(
        None,
        description="asha: early stopping of trailing trials; pbt: population-based training.",
    )
    search: Optuna | None = Field(
        None,
        description="How configurations are chosen: by default every grid point and "
        "`num_samples` random draws up front; optuna: proposed one after another from the "
        "results so far (num_samples configurations, grids read as categorical choices).",
    )

    @model_validator(mode="after")
    def _search_fits_the_scheduler(self) -> Sweep:
        if self.search is None:
            return self
        if isinstance(self.scheduler, Pbt):
            raise ValueError("search: optuna and scheduler: pbt exclude each other")
        if self.scheduler is not None and (
            (self.scheduler.metric, self.scheduler.mode) != (self.search.metric, self.search.mode)
        ):
            raise ValueError("search and scheduler must rank trials by the same metric and mode")
        return self

    def space(self) -> dict[str, Distribution]:
        """What the trials start from: the swept params, and the params PBT explores that are
        not swept (a random draw each, grids drawn as choices)."""
        space = dict(self.params)
        if isinstance(self.scheduler, Pbt):
            for path, dist in self.scheduler.hyperparam_mutations.items():
                if path not in space:
                    space[path] = Distribution(choice=dist.grid) if dist.grid else dist
        return space


class SpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=200, description="MLflow experiment name.")
    algorithm: str = Field(description="Algorithm: one of `rlgen algorithms`.")
    # MLflow keeps tag values (the description is one) in a column of 8,000 characters: a
    # tracking server on Postgres or MySQL refuses longer ones when the run is created.
    description: str = Field(
        "", max_length=8000, description="Free text, logged as the run description."
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1, description="One trial per seed."
    )
    resources: Resources = Field(default_factory=Resources, description="Per-trial resources.")
    driver: DriverResources = Field(
        default_factory=DriverResources,
        description="Entrypoint resources of the Ray Job when submitted to a cluster.",
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra MLflow tags.")
    sweep: Sweep | None = Field(None, description="Vary params across trials (Ray Tune).")
    report: list[str] = Field(
        default_factory=list,
        description="Metrics aggregated across seeds in the parent run (mean, std, 95% CI) "
        "and drawn as learning curves with bands; default: the headline metric.",
    )
    max_failures: int = Field(
        0,
        ge=0,
        le=1000,
        description="Restarts of a trial whose worker died (from its last checkpoint).",
    )
    continue_from: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{32}$",
        description="An MLflow run id (a trial, or a sweep's parent) whose trials this "
        "experiment trains further from their last checkpoints; only budget params may differ "
        "from that run's spec (`rlgen continue`).",
    )
    init_from: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{32}$",
        description="An MLflow run id of a trial of the same algorithm whose last checkpoint's "
        "weights start every trial (`rlgen run --init-from`); their shapes must fit.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not name.strip():  # an experiment nobody could find by name in the MLflow UI
            raise ValueError("must not be blank")
        return name

    # Where each field came from (set by `validate`), for errors found after validation.
    _source: Source | None = PrivateAttr(None)

    def where(self, *loc: str) -> str:
        """`spec.yaml:7` for `where("resources", "num_cpus")`: the line of that field, else of
        the nearest enclosing one, else the file; "spec" for a spec built in code."""
        return self._source.where(loc) if self._source is not None else "spec"

    def __eq__(self, other: object) -> bool:
        """Equal fields, equal specs: where they were read from is not part of the spec."""
        if not isinstance(other, SpecBase):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if any(s < 0 or s >= 2**32 for s in seeds):
            raise ValueError("seeds must lie in [0, 2**32)")
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: dict[str, str]) -> dict[str, str]:
        for key, value in tags.items():
            if why := _bad_tag_key(key):
                raise ValueError(f"tag {key[:60]!r}: {why}")
            if len(value) > 8000:
                raise ValueError(f"tag {key[:60]!r}: a value of at most 8000 characters")
        return tags


def _bad_tag_key(key: str) -> str | None:
    # Checked here, so that a bad name is a spec error and not a run left half-created.
    if key.startswith("mlflow."):  # mlflow.runName, mlflow.parentRunId: MLflow's own
        return "the mlflow.* tags are MLflow's own (the run name is the spec's name)"
    return name_problem(key)


class RLSpecBase(SpecBase):
    env: EnvSpec = Field(description="The gymnasium environment.")


class GenerativeSpecBase(SpecBase):
    dataset: DatasetSpec = Field(
        default_factory=DigitsDataset, description="The data (default: scikit-learn digits)."
    )


@cache
def spec_model(algorithm: str) -> type[SpecBase]:
    """The spec model of one algorithm: the shared envelope plus `params: <its Config>`."""
    algo = ALGORITHMS[algorithm]
    base = RLSpecBase if algo.family == "rl" else GenerativeSpecBase
    model = create_model(
        f"{''.join(p.title() for p in algorithm.split('_'))}Spec",
        __base__=base,
        algorithm=(Literal[algorithm], Field(description=algo.summary)),  # type: ignore[arg-type]
        params=(algo.config, Field(default_factory=algo.config, description="Algorithm config.")),
    )
    return model  # type: ignore[return-value]


def spec_json_schema() -> dict[str, Any]:
    """JSON schema of every spec: a union on `algorithm`, for editors to complete YAML."""
    models = tuple(spec_model(name) for name in ALGORITHMS)
    union: Any = (
        models[0]
        if len(models) == 1
        else Annotated[
            Union[models], Field(discriminator="algorithm")  # noqa: UP007
        ]
    )
    schema = TypeAdapter(union).json_schema()
    schema["title"] = "rlgen experiment spec"
    return schema


def resolved(spec: SpecBase) -> dict[str, Any]:
    """The spec with every default filled in: what actually ran."""
    return spec.model_dump(mode="json")


def to_yaml(spec: SpecBase) -> str:
    return dump_yaml(resolved(spec))


def spec_hash(spec: SpecBase) -> str:
    return hashlib.sha256(json.dumps(resolved(spec), sort_keys=True).encode()).hexdigest()[:16]


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"params.gamma": "0.99", ...}; lists become JSON text."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


# What a run's params hold: the spec's sections that change what is trained. Bookkeeping (name,
# description, resources, driver, tags, report, max_failures) stays in the run's spec.yaml and
# tags: in the MLflow UI's params table and its run comparison, every row is then a setting.
RUN_PARAM_SECTIONS = ("params", "env", "dataset")


def run_params(spec: Mapping[str, Any], **extra: Any) -> dict[str, str]:
    """A resolved spec's MLflow params: `algorithm`, every field of `params`, `env` and
    `dataset`, and the runs it starts from (`continue_from`, `init_from`) when it has any.
    `extra` adds others (a trial's `seed`; a parent's `seeds` and `sweep`)."""
    out = {"algorithm": str(spec["algorithm"])}
    out |= flatten({k: v for k, v in spec.items() if k in RUN_PARAM_SECTIONS})
    out |= {k: str(spec[k]) for k in ("continue_from", "init_from") if spec.get(k)}
    out |= flatten(_without_empty(extra))
    return out


def _without_empty(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` less its None, {} and [] values, at every depth (a sweep's unused fields)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            value = _without_empty(value)
        if value is not None and value != {} and value != []:
            out[key] = value
    return out
