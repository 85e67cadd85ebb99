"""Spec errors that name file, line and field: `spec.yaml:7: params.gamma: message`.

Pydantic's errors carry a field path (`loc`); `problems` maps each to the line the field came from
(`Source.where`) and words it for a person ("did you mean ...?").
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from service.spec.reading import Source

Loc = tuple[str | int, ...]


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


def dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds: `X`, `X | None`, `X | list[X]` (dbn's
    per-layer `pretraining`) -> X."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Names of the fields of the sub-model at `loc` (for 'did you mean' hints and sweeps)."""
    current: type[BaseModel] | None = model
    for part in loc:
        info = current.model_fields.get(str(part)) if current else None
        current = model_in(info.annotation) if info else None
    return list(current.model_fields) if current else []


def problems(
    error: ValidationError, source: Source, model: type[BaseModel] | None
) -> list[Problem]:
    problems = []
    for e in error.errors(include_url=False):
        loc: Loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            known = fields_at(model, loc[:-1]) if model else []
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
        problems.append(Problem(source.where(loc), dotted(loc), msg))
    return problems
