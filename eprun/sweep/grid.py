"""A sweep's grid: the ``-s KEY=V1,V2,…`` options, split into fixed overrides and axes, and the
points of their cartesian product.

Splitting rule: an option's value (after the first ``=``) is cut at every comma that lies outside
brackets ``[]``, braces ``{}`` and quotes (``'…'``, ``"…"``). So ``model.hidden=[512,512]`` is one
YAML value, ``model.hidden=[256],[512]`` two, and ``description='a, b'`` one. An option with one
value is a fixed override, applied to every point; one with several is an axis. Each value stays
the text that was typed: it reaches the recipe through the same override parsing as
``eprun train -s`` (YAML), so a sweep point and a hand-started run read a value alike.

Points are the cartesian product of the axes in the order they were given, the last axis varying
fastest: ``-s seed=0,1 -s rule.beta=0.1,0.2`` gives (0, 0.1), (0, 0.2), (1, 0.1), (1, 0.2).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from eprun.errors import SweepError

#: the most points one sweep may hold (a product of axes grows fast; a typo should not start thousands)
MAX_POINTS = 10_000

_CLOSING = {"[": "]", "{": "}"}


@dataclass(frozen=True)
class Axis:
    """One swept key: its dotted path and the values listed for it, as typed."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Grid:
    """The parsed ``-s`` options: overrides every point shares, and the axes."""

    fixed: tuple[str, ...]
    axes: tuple[Axis, ...]

    def points(self) -> list[dict[str, str]]:
        """Each point's value on every axis (``{key: value}``, axis order), in product order."""
        keys = [axis.key for axis in self.axes]
        return [dict(zip(keys, combo)) for combo in itertools.product(*(axis.values for axis in self.axes))]

    def as_dict(self) -> dict[str, list[str]]:
        """``{key: [values]}`` in axis order (what sweep.json records as the grid)."""
        return {axis.key: list(axis.values) for axis in self.axes}


def split_values(text: str) -> list[str]:
    """``text`` cut at the commas outside brackets, braces and quotes; items are stripped.

    An unclosed bracket or quote keeps the rest of the text in one item (the recipe's YAML
    parsing then names what is wrong with it)."""
    items, current, depth, quote = [], [], [], None
    for char in text:
        if quote is not None:
            current.append(char)
            if char == quote:
                quote = None
            continue
        if char in ("'", '"'):
            quote = char
        elif char in _CLOSING:
            depth.append(_CLOSING[char])
        elif depth and char == depth[-1]:
            depth.pop()
        elif char == "," and not depth:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    items.append("".join(current).strip())
    return items


def parse_grid(options: list[str]) -> Grid:
    """The grid of ``-s`` options (each ``KEY.PATH=VALUE[,VALUE…]``).

    Refused with a :class:`SweepError` naming the option: no ``=``, an empty key or an empty
    value between commas, a key given twice, a value listed twice for one key, and more than
    :data:`MAX_POINTS` points."""
    fixed, axes, seen = [], [], set()
    for option in options:
        if "=" not in option:
            raise SweepError(f"-s '{option}': expected KEY.PATH=VALUE or KEY.PATH=V1,V2,…, e.g. -s seed=0,1,2")
        key, raw = (part.strip() for part in option.split("=", 1))
        if not key or not all(part.strip() for part in key.split(".")):
            raise SweepError(f"-s '{option}': empty key in '{key}'; expected KEY.PATH=V1,V2,…, "
                             f"e.g. -s rule.beta=0.1,0.2")
        if key in seen:
            raise SweepError(f"-s {key} is given twice; list all its values in one option, e.g. -s {key}=V1,V2")
        seen.add(key)
        values = split_values(raw)
        if len(values) > 1 and not all(values):
            raise SweepError(f"-s '{option}': an empty value between commas; list the values as "
                             f"{key}=V1,V2 (a comma inside [...], {{...}} or quotes does not split)")
        for i, value in enumerate(values):
            if value in values[:i]:
                raise SweepError(f"-s '{option}': the value {value} is listed twice for {key}")
        if len(values) == 1:
            fixed.append(f"{key}={raw}")
        else:
            axes.append(Axis(key, tuple(values)))
    count = 1
    for axis in axes:
        count *= len(axis.values)
    if count > MAX_POINTS:
        shape = " × ".join(f"{len(a.values)} ({a.key})" for a in axes)
        raise SweepError(f"the grid has {count:,} points ({shape}); a sweep may hold at most {MAX_POINTS:,}")
    return Grid(tuple(fixed), tuple(axes))


def point_overrides(grid: Grid, values: dict[str, str]) -> list[str]:
    """The overrides of one point: the fixed ones, then ``key=value`` for each axis."""
    return list(grid.fixed) + [f"{key}={value}" for key, value in values.items()]
