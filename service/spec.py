"""Experiment specs: YAML in, a validated pydantic model out, or errors naming file, line and field.

    name: frozenlake-vi                 # the MLflow experiment
    algorithm: value_iteration          # a key of service.registry.ALGORITHMS
    env: {id: FrozenLake-v1, kwargs: {is_slippery: true}}
    params: {gamma: 0.99, tol: 1.0e-8}  # the algorithm's Config
    seeds: [0, 1]                       # one trial per seed
    resources: {num_cpus: 1, num_gpus: 0}

Validation runs in two stages so that every error has a clean field path: first the envelope
(`algorithm` must be a registry key), then the algorithm's own spec model, whose `params` is that
algorithm's `Config`. Checks that need the outside world (the env id exists and is allowed, data
files exist) come last. Nothing here starts Ray or touches MLflow: a spec that fails leaves nothing
behind.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from generative import data
from generative.data import DatasetSpec, DigitsDataset
from service.context import EnvSpec
from service.registry import ALGORITHMS, Algorithm
from service.settings import get_settings
from service.tracking import mlflow_name_problem

MAX_SPEC_BYTES = 1_000_000
MAX_YAML_NODES = 10_000  # a real spec has a few hundred; aliases expanding past this are a bomb
MAX_TRIALS = 10_000  # seeds x grid points x samples of one spec (a grid of 7 x 20 values: 1.3e9)

Loc = tuple[str | int, ...]


# -- errors ---------------------------------------------------------------------------------------
@dataclass
class Problem:
    where: str  # "spec.yaml:7", "--set params.gamma=2" or "spec.yaml"
    field: str  # "params.gamma", or "" for the document itself
    message: str

    def __str__(self) -> str:
        return (
            f"{self.where}: {self.field}: {self.message}"
            if self.field
            else f"{self.where}: {self.message}"
        )


class SpecError(Exception):
    """Invalid input. `str()` gives one line per problem: `file:line: field.path: message`."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))


# -- the spec models ------------------------------------------------------------------------------
class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per trial (sets torch threads).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per trial; fractions share a GPU.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when the trial was given a GPU, else CPU."
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
    scheduler: Asha | None = Field(None, description="Early stopping of trailing trials.")


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
    return mlflow_name_problem(key)


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


# -- YAML with line numbers -----------------------------------------------------------------------
@dataclass
class Source:
    """A document and where each field came from, for error messages."""

    name: str
    data: Any
    lines: dict[Loc, str] = field(default_factory=dict)  # loc -> "file:line" or "--set ..."

    def where(self, loc: Loc) -> str:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return self.name


def _walk(
    node: yaml.Node, loc: Loc, source: str, lines: dict[Loc, str], problems: list[Problem]
) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            here = (*loc, key)
            where = f"{source}:{key_node.start_mark.line + 1}"
            if key in seen:
                problems.append(Problem(where, _dotted(here), "duplicate key"))
            seen.add(key)
            lines[here] = where
            _walk(value_node, here, source, lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*loc, i)] = f"{source}:{item.start_mark.line + 1}"
            _walk(item, (*loc, i), source, lines, problems)


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Number of nodes once aliases are expanded (shared nodes count each time they appear)."""
    key = id(node)
    if key in active:
        raise ValueError("recursive YAML alias")
    if key not in memo:
        active.add(key)
        children: Iterable[yaml.Node] = ()
        if isinstance(node, yaml.MappingNode):
            children = (n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        total = 1
        for child in children:
            total += _expanded_size(child, memo, active)
            if total > MAX_YAML_NODES:
                break
        active.discard(key)
        memo[key] = total
    return memo[key]


class _Loader(yaml.SafeLoader):
    """SafeLoader (no !!python/* tags, nothing is ever imported) that also reads YAML 1.2 floats
    without a dot or a signed exponent, 1e5 and 3e-4: PyYAML's YAML 1.1 rules read them as
    strings, and `total_timesteps: 1e5` would be refused as not an integer."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes the strings `_Loader` would read as numbers ('9397861e0537', a hex
    id), so that what rlgen writes reads back the same."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )


def dump_yaml(data: Any) -> str:
    """YAML that `load_spec`/`load_spec_text` read back as `data` (keys in their order)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def parse_yaml(raw: bytes, name: str) -> Source:
    """Safe-load one YAML mapping, recording the line of every key and item."""
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([Problem(name, "", f"file is larger than {MAX_SPEC_BYTES} bytes")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SpecError([Problem(f"{name}:{line}", "", "file is not valid UTF-8 text")]) from None
    if not text.strip():
        raise SpecError(
            [Problem(name, "", "empty file: expected a mapping with name, algorithm, params")]
        )
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError([Problem(name, "", "empty document: expected a mapping")])
        try:
            size = _expanded_size(node, {}, set())
        except ValueError as e:
            raise SpecError([Problem(name, "", str(e))]) from None
        if size > MAX_YAML_NODES:
            raise SpecError(
                [
                    Problem(
                        name,
                        "",
                        f"document expands to more than {MAX_YAML_NODES} nodes (YAML alias bomb?)",
                    )
                ]
            )
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}" if mark else name
        msg = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise SpecError([Problem(where, "", f"YAML error: {msg}")]) from None
    except yaml.YAMLError as e:
        raise SpecError([Problem(name, "", f"YAML error: {e}")]) from None
    except RecursionError:  # PyYAML composes and constructs recursively
        raise SpecError([Problem(name, "", "the document is nested too deeply")]) from None
    except ValueError as e:  # from constructing a value: an integer of over 4300 digits
        raise SpecError([Problem(name, "", f"unreadable value: {str(e).split(';')[0]}")]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        where = f"{name}:{node.start_mark.line + 1}"
        raise SpecError(
            [Problem(where, "", f"the document must be a mapping, not a {type(data).__name__}")]
        )
    lines: dict[Loc, str] = {}
    problems: list[Problem] = []
    _walk(node, (), name, lines, problems)
    if problems:
        raise SpecError(problems)
    return Source(name, data, lines)


def apply_overrides(source: Source, overrides: Sequence[str]) -> Source:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a copy of the document."""
    data = json.loads(json.dumps(source.data, default=str))
    lines = dict(source.lines)
    for item in overrides:
        where = f"--set {item}"
        path, sep, raw_value = item.partition("=")
        keys = tuple(k.strip() for k in path.split("."))
        if not sep or not all(keys):
            raise SpecError(
                [Problem(where, "", "expected FIELD.PATH=VALUE, e.g. params.gamma=0.95")]
            )
        try:
            value = yaml.load(raw_value, Loader=_Loader) if raw_value.strip() else ""
        except yaml.YAMLError as e:
            raise SpecError(
                [Problem(where, ".".join(keys), f"value is not valid YAML: {e}")]
            ) from None
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise SpecError([Problem(where, ".".join(keys[: depth + 1]), "is not a mapping")])
            node = child
        node[keys[-1]] = value
        for n in range(1, len(keys) + 1):
            lines[keys[:n]] = where
        for loc in [loc for loc in lines if loc[: len(keys)] == keys and len(loc) > len(keys)]:
            lines[loc] = where
    return Source(source.name, data, lines)


# -- validation -----------------------------------------------------------------------------------
def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds: `X`, `X | None`, `X | list[X]` (dbn's
    per-layer `pretraining`) -> X."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Names of the fields of the sub-model at `loc` (for 'did you mean' hints and sweeps)."""
    current: type[BaseModel] | None = model
    for part in loc:
        info = current.model_fields.get(str(part)) if current else None
        current = _model_in(info.annotation) if info else None
    return list(current.model_fields) if current else []


def _problems(
    error: ValidationError, source: Source, model: type[BaseModel] | None
) -> list[Problem]:
    problems = []
    for e in error.errors(include_url=False):
        loc: Loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            known = _fields_at(model, loc[:-1]) if model else []
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            msg = f"unknown field '{loc[-1]}'"
            msg += (
                f"; did you mean '{hint[0]}'?"
                if hint
                else (f"; expected one of: {', '.join(known)}" if known else "")
            )
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            # Point at the discriminator field itself (dataset.name), not at the union.
            tag_field = str(e.get("ctx", {}).get("discriminator", "")).strip("'")
            loc = (*loc, tag_field) if tag_field else loc
            expected = str(e.get("ctx", {}).get("expected_tags", ""))
            found = e.get("ctx", {}).get("tag")
            msg = (
                f"unknown value {found!r}; one of: {expected}"
                if found is not None
                else "field required"
            )
        elif e["type"] == "missing":
            msg = "field required"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            if isinstance(value, (int, float, str, bool)) and len(repr(value)) < 60:
                msg += f" (got {value!r})"
        problems.append(Problem(source.where(loc), _dotted(loc), msg))
    return problems


def validate(source: Source) -> SpecBase:
    """Validate a parsed document; raise SpecError with every problem found."""
    data = source.data
    algorithm = data.get("algorithm")
    if algorithm is None:  # absent, or present and empty (then on its line)
        where = source.where(("algorithm",)) if "algorithm" in data else source.name
        raise SpecError(
            [Problem(where, "algorithm", "field required; one of: " + ", ".join(ALGORITHMS))]
        )
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        hint = difflib.get_close_matches(str(algorithm), list(ALGORITHMS), n=1)
        msg = f"unknown algorithm {algorithm!r}; " + (
            f"did you mean '{hint[0]}'?" if hint else "one of: " + ", ".join(ALGORITHMS)
        )
        raise SpecError([Problem(source.where(("algorithm",)), "algorithm", msg)])
    model = spec_model(algorithm)
    # A section left empty (`params:` with nothing under it) is YAML null: read it as absent, so
    # its default applies, rather than as a wrong type.
    fields = model.model_fields
    data = {
        k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()
    }
    try:
        spec = model.model_validate(data)
    except ValidationError as e:
        raise SpecError(_problems(e, source, model)) from None
    check_booleans(spec, source)
    check_data(spec, source)
    check_sweep(spec, source)
    check_metrics(spec, source)
    check_world(spec, source)
    spec._source = source
    return spec


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
        Problem(source.where(loc), _dotted(loc), NOT_A_BOOLEAN)
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
    raise SpecError([Problem(source.where(loc), _dotted(loc), reason)])


def check_metrics(spec: SpecBase, source: Source) -> None:
    """The scheduler's metric and the `report` list name metrics the algorithm logs: a sweep that
    ranks trials by a metric no trial reports would fail every trial at its end."""
    algo = ALGORITHMS[spec.algorithm]
    named: list[tuple[tuple[str | int, ...], str]] = [
        (("report", i), key) for i, key in enumerate(spec.report)
    ]
    if spec.sweep is not None and spec.sweep.scheduler is not None:
        named.append((("sweep", "scheduler", "metric"), spec.sweep.scheduler.metric))
    problems = []
    for loc, key in named:
        if algo.logs(key):
            continue
        known = [m for m in algo.metrics if "*" not in m]
        hint = difflib.get_close_matches(key, known, n=1)
        msg = f"{spec.algorithm} never logs {key!r}; " + (
            f"did you mean '{hint[0]}'?" if hint else "it logs: " + ", ".join(algo.metrics)
        )
        problems.append(Problem(source.where(loc), _dotted(loc), msg))
    if problems:
        raise SpecError(problems)


def set_dotted(data: dict[str, Any], path: str, value: Any) -> None:
    """data["a"]["b"] = value for path "a.b", creating mappings on the way."""
    *parents, last = path.split(".")
    for key in parents:
        child = data.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"'{key}' is not a mapping")
        data = child
    data[last] = value


def check_sweep(spec: SpecBase, source: Source) -> None:
    """Every swept path is a field of the algorithm's config and every value it may take is
    valid there, so no trial of a sweep can fail on its config."""
    if spec.sweep is None:
        return
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
    for path, dist in spec.sweep.params.items():
        loc = ("sweep", "params", path)
        parts = tuple(path.split("."))
        if parts[-1] not in _fields_at(config_model, parts[:-1]):
            known = _fields_at(config_model, ())
            hint = difflib.get_close_matches(path, known, n=1)
            msg = f"'{path}' is not a field of {spec.algorithm}'s params" + (
                f"; did you mean '{hint[0]}'?" if hint else ""
            )
            problems.append(Problem(source.where(loc), _dotted(loc), msg))
            continue
        for value in dist.examples():
            trial = json.loads(json.dumps(params))
            try:
                set_dotted(trial, path, value)
            except ValueError as e:  # params give a list where the path needs a mapping
                msg = f"cannot set '{path}': {e} in params (a per-layer list?)"
                problems.append(Problem(source.where(loc), _dotted(loc), msg))
                break
            try:
                config = config_model.model_validate(trial)
            except ValidationError as e:
                first = e.errors(include_url=False)[0]
                msg = first["msg"].removeprefix("Value error, ")
                problems.append(
                    Problem(source.where((*loc, dist.kind)), _dotted(loc), f"{value!r}: {msg}")
                )
                break
            reason = NOT_A_BOOLEAN if _booleans_read_as_numbers(trial, config) else None
            if reason is None and check_data is not None:
                reason = check_data(config, dataset)
            if reason is not None:
                problems.append(
                    Problem(source.where((*loc, dist.kind)), _dotted(loc), f"{value!r}: {reason}")
                )
                break
    if problems:
        raise SpecError(problems)


def check_world(spec: SpecBase, source: Source) -> None:
    """Checks that look outside the document: env ids and their models, data files."""
    env = getattr(spec, "env", None)
    if env is not None:
        check_env(env, ALGORITHMS[spec.algorithm], source)
    dataset = getattr(spec, "dataset", None)
    if dataset is not None:
        try:
            data.check(dataset)
            if ALGORITHMS[spec.algorithm].needs_labels and not data.has_labels(dataset):
                raise data.DatasetError("name", f"{spec.algorithm} needs a labelled data set")
        except data.DatasetError as e:
            loc = ("dataset", e.field)
            raise SpecError([Problem(source.where(loc), _dotted(loc), str(e))]) from None


def check_env(env: EnvSpec, algo: Algorithm, source: Source) -> None:
    import gymnasium as gym

    import agents  # noqa: F401  (registers rlgen/* envs)

    where = source.where(("env", "id"))
    if env.kwargs.get("render_mode") == "human":  # trials run on Ray workers, without a display
        loc = ("env", "kwargs", "render_mode")
        msg = (
            "'human' opens a window, and trials run headless on Ray workers; leave it out "
            "(`rlgen evaluate RUN_ID --render gif` records an episode)"
        )
        raise SpecError([Problem(source.where(loc), _dotted(loc), msg)])
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
        if (reason := algo.check_env(instance)) is not None:
            raise SpecError([Problem(where, "env.id", f"'{env.id}': {reason}")])
    finally:
        instance.close()


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SpecBase:
    """Read, parse, override and validate a spec file. Raises SpecError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError([Problem(str(path), "", "no such file")]) from None
    except IsADirectoryError:
        raise SpecError([Problem(str(path), "", "is a directory, not a spec file")]) from None
    except OSError as e:
        raise SpecError([Problem(str(path), "", f"cannot read: {e.strerror}")]) from None
    return load_spec_text(raw, str(path), overrides)


def load_spec_text(raw: bytes, name: str, overrides: Sequence[str] = ()) -> SpecBase:
    source = parse_yaml(raw, name)
    if overrides:
        source = apply_overrides(source, overrides)
    return validate(source)


# -- the resolved spec ----------------------------------------------------------------------------
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
