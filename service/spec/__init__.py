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
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from service.registry import ALGORITHMS
from service.spec.checks import (
    MAX_TRIALS,
    check_booleans,
    check_data,
    check_metrics,
    check_resume,
    check_sweep,
    check_world,
    set_dotted,
)
from service.spec.errors import Problem, SpecError, problems
from service.spec.models import (
    SpecBase,
    flatten,
    resolved,
    run_params,
    spec_hash,
    spec_json_schema,
    spec_model,
    to_yaml,
)
from service.spec.reading import MAX_SPEC_BYTES, Source, apply_overrides, dump_yaml, parse_yaml

__all__ = [
    "MAX_SPEC_BYTES",
    "MAX_TRIALS",
    "Problem",
    "Source",
    "SpecBase",
    "SpecError",
    "dump_yaml",
    "flatten",
    "load_spec",
    "load_spec_text",
    "parse_yaml",
    "resolved",
    "run_params",
    "set_dotted",
    "spec_hash",
    "spec_json_schema",
    "spec_model",
    "to_yaml",
    "validate",
]


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
        raise SpecError(problems(e, source, model)) from None
    check_booleans(spec, source)
    check_data(spec, source)
    check_sweep(spec, source)
    check_metrics(spec, source)
    check_resume(spec, source)
    check_world(spec, source)
    spec._source = source
    return spec


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
