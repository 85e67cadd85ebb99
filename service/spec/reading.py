"""Reading a spec's YAML: with the line of every field, guards against hostile documents (size,
alias bombs, duplicate keys), `--set` overrides, and writing YAML back."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from service.spec.errors import Loc, Problem, SpecError, dotted

MAX_SPEC_BYTES = 1_000_000
MAX_YAML_NODES = 10_000  # a real spec has a few hundred; aliases expanding past this are a bomb


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
                problems.append(Problem(where, dotted(here), "duplicate key"))
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
