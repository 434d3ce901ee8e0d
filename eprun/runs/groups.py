"""Runs grouped by their recipe without the seed, and each group's scores over its runs.

Two runs belong to one group when their resolved recipes (each run's ``recipe.yaml``, read again
through today's schema so that a key added since the run was written takes its default) are equal
once ``seed`` and ``name`` are removed: the same experiment, started from other random numbers.
A group's score is the mean and the sample standard deviation

    mean = (1/n) Σ xᵢ,    std = √( Σ (xᵢ − mean)² / (n − 1) )

over the runs that have the score (a run stopped early has no test accuracy); with n = 1 the std
is undefined and given as None. The keys whose values differ between the groups are the
*varying keys*; each group is labelled by its values of them.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable

#: recipe keys that do not make two runs different experiments
IGNORED_KEYS = ("seed", "name")
#: recipe keys of free text, which label nothing well
PROSE_KEYS = ("description", "paper")
#: the numeric columns of ``eprun compare`` that a group aggregates
SCORES = ("epochs", "best_val_accuracy", "test_accuracy", "wall_time_s", "samples_per_s",
          "angle_to_bptt_deg", "angle_to_bp_deg")


def without_seed(recipe: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in recipe.items() if k not in IGNORED_KEYS}


def resolved(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` with every default of today's schema filled in: a run written before a key
    existed (``train.log_to``, say) groups with one written after. A recipe today's schema no
    longer accepts is kept as stored."""
    from eprun import recipe as recipes, schema
    from eprun.errors import EprunError

    try:
        return schema.to_plain(recipes.from_plain(recipe))
    except (EprunError, TypeError, ValueError):
        return recipe


def _key(recipe: dict[str, Any]) -> str:
    return json.dumps(without_seed(resolved(recipe)), sort_keys=True, default=str)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": value}``; lists are values (``model.hidden: [512]``)."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample std, n) of the finite numbers among ``values``; std None for n < 2, both
    None for n = 0."""
    numbers = [float(v) for v in values
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not numbers:
        return None, None, 0
    mean = statistics.fmean(numbers)
    return mean, statistics.stdev(numbers) if len(numbers) > 1 else None, len(numbers)


def shares_a_recipe(recipes: list[dict[str, Any]]) -> bool:
    """Whether two of ``recipes`` differ at most in their seed (and name)."""
    keys = [_key(r) for r in recipes]
    return len(set(keys)) < len(keys)


@dataclass
class Group:
    """Runs of one recipe (seed aside): their indices in the input, what sets the group apart,
    and its scores."""

    recipe: dict[str, Any]  #: the shared recipe, seed and name removed
    members: list[int]
    varying: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.members)

    def label(self, fallback: str) -> str:
        """``rule.beta=0.1 model.hidden=[512]``: the group's values of the varying keys. Where
        the groups are different recipes (their prose keys differ), ``fallback`` (the first run's
        recipe name) leads and the prose is left out: ``proto-mlp-1h rule.T=40 rule.K=15``."""
        prose = [k for k in self.varying if k in PROSE_KEYS]
        settings = " ".join(f"{k}={_text(v)}" for k, v in self.varying.items() if k not in PROSE_KEYS)
        if prose:
            return f"{fallback} {settings}".strip()
        return settings or fallback


def group_runs(recipes: list[dict[str, Any]], rows: list[dict[str, Any]],
               scores: tuple[str, ...] = SCORES) -> list[Group]:
    """Group runs (their recipes and compare rows, in the same order) by recipe without the seed,
    groups in order of their first run; each group's ``scores[name] = {"mean", "std", "n"}``."""
    by_key: dict[str, Group] = {}
    for i, recipe in enumerate(recipes):
        key = _key(recipe)
        if key not in by_key:
            by_key[key] = Group(recipe=without_seed(resolved(recipe)), members=[])
        by_key[key].members.append(i)
    groups = list(by_key.values())
    flats = [flatten(g.recipe) for g in groups]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    for group, flat in zip(groups, flats):
        group.varying = {k: flat.get(k) for k in varying}
        for name in scores:
            mean, std, n = mean_std(rows[i].get(name) for i in group.members)
            group.scores[name] = {"mean": mean, "std": std, "n": n}
    return groups


def _text(value: Any) -> str:
    """A recipe value as typed on a command line: 0.1, [512, 512], sgd, null."""
    if isinstance(value, str):
        return value
    return json.dumps(value)
