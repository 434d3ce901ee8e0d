"""Typed, line-aware validation of plain YAML data against dataclasses.

A recipe is YAML; its schema is a tree of dataclasses. :func:`build` turns the parsed mapping
into those dataclasses, checking every key and type, and raises :class:`RecipeError` with
``file:line: key.path: what was wrong (what is allowed)`` — one line a user can act on.

Polymorphic sections (``model:``, ``rule:`` …) are chosen by their ``kind:`` key from a
registry: a field whose metadata holds ``registry=`` (a callable returning
``{kind: ConfigClass}``) is built with the class its ``kind`` names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union

from eprun import yaml_reading
from eprun.errors import RecipeError

KeyPath = tuple[str, ...]


@dataclass
class Source:
    """Where the data came from, to name it in errors: a file and the line of each key path."""

    name: str
    lines: dict[KeyPath, int] = field(default_factory=dict)
    overrides: dict[KeyPath, str] = field(default_factory=dict)

    def where(self, path: KeyPath) -> str:
        """``file:line`` of the deepest known key on ``path``, or the override that set it."""
        for depth in range(len(path), -1, -1):
            prefix = path[:depth]
            if prefix in self.overrides:
                return f"override '{self.overrides[prefix]}'"
            if prefix in self.lines:
                return f"{self.name}:{self.lines[prefix]}"
        return self.name

    def error(self, path: KeyPath, message: str) -> RecipeError:
        dotted = ".".join(path) if path else "(top level)"
        return RecipeError(f"{self.where(path)}: {dotted}: {message}")


class Section:
    """A recipe section's dataclass: :meth:`check` yields (key, message) for every value that is
    not allowed, once the section's keys and types are known to be right."""

    def check(self):
        return iter(())


def polymorphic(registry: Callable[[], dict[str, type]], default_kind: str) -> Any:
    """A dataclass field chosen by its ``kind:`` key among ``registry()``'s config classes."""
    return field(default=None, metadata={"registry": registry, "default_kind": default_kind})


# --------------------------------------------------------------------------- YAML reading


def parse_yaml(text: str, name: str) -> tuple[dict, Source]:
    """Parse YAML text into a mapping, remembering the line of every key (see
    :mod:`eprun.yaml_reading` for what is refused: duplicate keys, aliases past a bound)."""
    data, lines = yaml_reading.load(text, name)
    if data is None:
        raise RecipeError(f"{name}: the recipe is empty; a recipe is a YAML mapping of sections "
                          f"(data, model, rule, optim, schedule, train), e.g. recipes/quickstart.yaml")
    if not isinstance(data, dict):
        raise RecipeError(f"{name}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    source = Source(name)
    source.lines.update(lines or {})
    return data, source


def read_yaml(path: Path) -> tuple[dict, Source]:
    """Read and parse a YAML file; a missing or unreadable file is a RecipeError."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc})") from None
    return parse_yaml(text, str(path))


def apply_override(data: dict, assignment: str, source: Source) -> None:
    """Apply one dotted override ``a.b.c=value`` (value parsed as YAML) to ``data`` in place."""
    if "=" not in assignment:
        raise RecipeError(f"override '{assignment}': expected KEY.PATH=VALUE, e.g. rule.beta=0.2")
    dotted, raw = assignment.split("=", 1)
    path = tuple(part.strip() for part in dotted.strip().split("."))
    if not all(path):
        raise RecipeError(f"override '{assignment}': empty key in '{dotted}'")
    try:
        value = yaml_reading.load_value(raw, f"override '{assignment}'") if raw.strip() else None
    except RecipeError as error:
        if "YAML syntax error" not in str(error):
            raise
        value = raw
    node = data
    for depth, key in enumerate(path[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise RecipeError(
                f"override '{assignment}': {'.'.join(path[: depth + 1])} is a value, not a section"
            )
        node = child
    node[path[-1]] = value
    source.overrides[path] = assignment


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true/false"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


INT_LIMIT = 1 << 63
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value: Any, tp: Any, path: KeyPath, source: Source) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (int → float, list → tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return build(tp, value, source, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and "on" in allowed and "off" in allowed:
            return "on" if value else "off"  # YAML 1.1 reads a bare on / off as true / false
        if value not in allowed:
            raise _Mismatch
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, path, source)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            items = [_convert(v, a, path + (str(i),), source) for i, (v, a) in enumerate(zip(value, args))]
            return tuple(items)
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, path + (str(i),), source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is type(None):
        if value is not None:
            raise _Mismatch
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        if not -INT_LIMIT < value < INT_LIMIT:
            raise source.error(path, f"{value} is out of range: integers must lie within ±(2⁶³ − 1)")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; take it as the number meant
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        if isinstance(value, int) and not -INT_LIMIT < value < INT_LIMIT:
            raise source.error(path, f"{value} is out of range for a number here")
        if not math.isfinite(value):
            raise source.error(path, f"must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    raise TypeError(f"schema: unsupported annotation {tp!r}")


def _did_you_mean(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""


def build(cls: type, data: dict, source: Source, path: KeyPath = ()) -> Any:
    """Build dataclass ``cls`` from mapping ``data``, validating keys and types."""
    if not isinstance(data, dict):
        raise source.error(path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    allowed = sorted(fields)
    for key in data:
        if key not in fields:
            raise source.error(
                path + (str(key),),
                f"unknown key; {_did_you_mean(str(key), allowed)}(allowed: {', '.join(allowed)})",
            )
    kwargs = {}
    for name, f in fields.items():
        sub = path + (name,)
        registry = f.metadata.get("registry")
        if registry is not None:
            kwargs[name] = _build_polymorphic(registry(), f.metadata["default_kind"], data.get(name), source, sub)
            continue
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise source.error(sub, f"missing required key ({_type_name(hints[name])})")
            continue
        try:
            kwargs[name] = _convert(data[name], hints[name], sub, source)
        except _Mismatch:
            raise source.error(
                sub, f"expected {_type_name(hints[name])}, got {data[name]!r}"
            ) from None
    instance = cls(**kwargs)
    if isinstance(instance, Section):
        for key, message in instance.check():
            raise source.error(path + (tuple(key.split(".")) if key else ()), message)
    return instance


def _build_polymorphic(registry: dict[str, type], default_kind: str, data: Any, source: Source, path: KeyPath):
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise source.error(path, f"expected a mapping with a 'kind' key, got {data!r}")
    kind = data.get("kind", default_kind)
    if kind not in registry:
        allowed = sorted(registry)
        raise source.error(
            path + ("kind",),
            f"unknown kind {kind!r}; {_did_you_mean(str(kind), allowed)}(allowed: {', '.join(allowed)})",
        )
    return build(registry[kind], {**data, "kind": kind}, source, path)


def to_plain(instance: Any) -> Any:
    """A dataclass tree as plain YAML-safe data (tuples become lists)."""
    if dataclasses.is_dataclass(instance):
        return {f.name: to_plain(getattr(instance, f.name)) for f in dataclasses.fields(instance) if f.init}
    if isinstance(instance, (list, tuple)):
        return [to_plain(v) for v in instance]
    if isinstance(instance, dict):
        return {k: to_plain(v) for k, v in instance.items()}
    return instance
