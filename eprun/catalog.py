"""The bundled recipes: where they are, their names, and resolving a name to a file.

Recipes live in the repository's top-level ``recipes/`` folder. It is found through
``$EPRUN_RECIPES``, then ``./recipes``, then the folder beside the installed package.
A recipe is named by its path under that folder without ``.yaml``: ``quickstart``,
``ernoult2019/proto-mlp-1h``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from eprun.errors import RecipeError


@dataclass
class BundledRecipe:
    name: str
    path: Path
    description: str
    paper: str


def recipes_dirs() -> list[Path]:
    candidates = []
    if os.environ.get("EPRUN_RECIPES"):
        candidates.append(Path(os.environ["EPRUN_RECIPES"]))
    candidates.append(Path.cwd() / "recipes")
    candidates.append(Path(__file__).resolve().parent.parent / "recipes")
    seen, out = set(), []
    for c in candidates:
        if c.is_dir() and c.resolve() not in seen:
            seen.add(c.resolve())
            out.append(c)
    return out


def bundled() -> list[BundledRecipe]:
    """Every ``*.yaml`` under the first recipes folder found, with its description."""
    dirs = recipes_dirs()
    if not dirs:
        return []
    root = dirs[0]
    found = []
    for path in sorted(root.rglob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            data = {}
        data = data if isinstance(data, dict) else {}
        name = path.relative_to(root).with_suffix("").as_posix()
        found.append(BundledRecipe(name, path, str(data.get("description", "")), str(data.get("paper", ""))))
    return found


def resolve(name_or_path: str) -> Path:
    """A recipe file path, or the file of a bundled recipe name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for root in recipes_dirs():
        for candidate in (root / name_or_path, root / f"{name_or_path}.yaml"):
            if candidate.is_file():
                return candidate
    names = ", ".join(r.name for r in bundled()[:12])
    raise RecipeError(f"{name_or_path}: no such recipe file or bundled recipe (bundled: {names or 'none found'})")
