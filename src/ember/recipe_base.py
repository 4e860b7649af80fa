"""Recipes that build on others: ``base: other.yaml`` merged under the recipe's own keys.

A recipe may name one ``base`` recipe, a path relative to its own file; the base may have a
base of its own. The chain is read base first, each file through the recipe reader (the
same hardened YAML loader and bounds), each in today's form (``ember.migrate``), and merged:

- a mapping (a section) merges key by key, the building recipe's value winning;
- a list (``plugins``, ``schedule.milestones``) is replaced whole, never concatenated;
- a ``model`` section naming another model replaces the base's: one model's keys mean
  nothing to another.

``--set`` overrides apply after the whole chain. A cycle, a missing base file, or a chain
longer than :data:`MAX_CHAIN` is refused with a message naming the files.

Example (``recipes/gpt-long.yaml`` holding ``base: gpt-tiny.yaml`` and ``train: {max_steps: 5000}``)::

    raw = read_with_bases("recipes/gpt-long.yaml", read_recipe_file)
    raw["train"]["max_steps"]  # 5000; every other key as in recipes/gpt-tiny.yaml
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.errors import EmberError
from ember.migrate import migrate_recipe

MAX_CHAIN = 16  # recipes built on recipes; a real chain is two or three long


def merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merged key by key (``child`` wins), anything else,
    lists included, taken from ``child``; a ``model`` of another name replaces the base's.
    Neither argument is changed."""
    merged = dict(base)
    for key, value in child.items():
        below = merged.get(key)
        other_model = key == "model" and isinstance(below, dict) and isinstance(value, dict)
        if other_model and "name" in value and value["name"] != below.get("name"):
            merged[key] = value
        elif isinstance(below, dict) and isinstance(value, dict):
            merged[key] = merge(below, value)
        else:
            merged[key] = value
    return merged


def read_with_bases(path: str | Path, read_file: Callable[[Path], Any]) -> dict:
    """The recipe mapping in ``path`` with its chain of ``base`` recipes merged under it (see the
    module docstring); ``read_file`` reads one YAML file (``ember.config.read_recipe_file``)."""
    return _resolve(Path(path), read_file, [])


def _resolve(path: Path, read_file: Callable[[Path], Any], chain: list[Path]) -> dict:
    raw = read_file(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise EmberError(
            f"Recipe {path} must be a mapping of sections (data, model, optim, ...), got {type(raw).__name__}."
        )
    if "base" not in raw:
        return raw
    raw = dict(raw)
    base = raw.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise EmberError(
            f"Recipe {path}: base must be the path of another recipe, relative to {path.name}'s folder "
            f"(e.g. base: gpt-tiny.yaml), got {base!r}."
        )
    chain = [*chain, path.resolve()]
    base_path = path.parent / base
    if base_path.resolve() in chain:
        loop = " -> ".join(str(p) for p in [*chain, base_path.resolve()])
        raise EmberError(
            f"Recipe {path} builds on {base}, which builds back on it ({loop}): a recipe cannot be its "
            f"own base. Remove the base: line that closes the loop."
        )
    if len(chain) >= MAX_CHAIN:
        raise EmberError(f"Recipe {path}: its base: chain is longer than {MAX_CHAIN} recipes; shorten it.")
    if not base_path.is_file():
        raise EmberError(
            f"Recipe {path} builds on base: {base}, but {base_path} does not exist. The path is relative to "
            f"the folder of {path.name}; fix it, or copy the base recipe there."
        )
    return merge(_today(_resolve(base_path, read_file, chain), base_path), _today(raw, path))


def _today(raw: dict, path: Path) -> dict:
    """``raw`` in today's form, before it is merged: an old key of one file and today's of another
    then land on the same place."""
    try:
        return migrate_recipe(raw)
    except ValueError as err:
        raise EmberError(
            f"The recipe {path} is not valid:\n  - recipe: {err}\nFix the recipe file and run again."
        ) from None
