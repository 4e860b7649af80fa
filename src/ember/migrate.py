"""Recipes of earlier ember versions, read as today's: old keys move to where they live now.

The step methods used to be recipe keys of their own; they are entries of ``plugins:``
now, and replay is part of the data:

==========================================  =============================================
earlier                                     today
==========================================  =============================================
``optim.l1: W``                             ``plugins: [{name: l1, weight: W}]``
``train.ema_decay: D``                      ``plugins: [{name: ema, decay: D}]``
``init.keep_zeros: true``                   ``plugins: [{name: keep_zeros}]``
``distill: {teacher: RUN, ...}``            ``plugins: [{name: distill, teacher: RUN, ...}]``
``continual: {old_data: OLD, ewc: L,``      ``plugins: [{name: ewc, strength: L,``
``ewc_samples: N, ...}``                    ``samples: N, data: OLD}]``
``continual: {old_data: OLD, replay: S}``   ``data: {replay: {data: OLD, share: S}}``
==========================================  =============================================

A key that was off (0, false, no teacher) simply goes. Giving a method both ways is
refused rather than one silently winning. A run directory's ``recipe.yaml`` and the recipe
inside its checkpoints are migrated the same way, so old runs resume.

Example::

    migrate_recipe({"model": {"name": "cnn"}, "optim": {"l1": 1e-4}})
    # {"model": {"name": "cnn"}, "optim": {}, "plugins": [{"name": "l1", "weight": 0.0001}]}
"""

from __future__ import annotations

from typing import Any

CONTINUAL_KEYS = {"old_data", "replay", "ewc", "ewc_samples"}


def migrate_recipe(raw: Any) -> Any:
    """A copy of the recipe mapping ``raw`` in today's form (anything else is returned as is,
    for validation to refuse). Raises ValueError when the old and new forms conflict."""
    if not isinstance(raw, dict):
        return raw
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    added = [*_moved_keys(raw), *_distill(raw.pop("distill", None)), *_continual(raw, raw.pop("continual", None))]
    if not added:
        return raw
    plugins = raw.get("plugins", [])
    if not isinstance(plugins, list):
        return raw  # refused by validation, with its location
    named = {p.get("name") for p in plugins if isinstance(p, dict)}
    for entry, old in added:
        if entry["name"] in named:
            raise ValueError(f"{old} and a plugins entry named {entry['name']!r} are both given; they are the same "
                             f"method. Keep the plugins entry and remove {old}")
    raw["plugins"] = [*plugins, *(entry for entry, _ in added)]
    return raw


def _moved_keys(raw: dict) -> list[tuple[dict, str]]:
    """optim.l1, train.ema_decay and init.keep_zeros, when on."""
    added = []
    for section, key, plugin, field in (("optim", "l1", "l1", "weight"), ("train", "ema_decay", "ema", "decay")):
        if isinstance(raw.get(section), dict) and key in raw[section]:
            value = raw[section].pop(key)
            if value != 0:
                added.append(({"name": plugin, field: value}, f"{section}.{key}"))
    init = raw.get("init")
    if isinstance(init, dict) and "keep_zeros" in init:
        keep = init.pop("keep_zeros")
        if keep not in (True, False):
            raise ValueError(f"init.keep_zeros must be true or false (given: {keep!r})")
        if keep:
            added.append(({"name": "keep_zeros"}, "init.keep_zeros"))
    return added


def _distill(section: Any) -> list[tuple[dict, str]]:
    if section is None:
        return []
    if not isinstance(section, dict):
        raise ValueError(f"distill must be a mapping (teacher, temperature, alpha, hidden_weight), given {section!r}")
    return [({"name": "distill", **section}, "the distill section")] if section.get("teacher") else []


def _continual(raw: dict, section: Any) -> list[tuple[dict, str]]:
    """continual.ewc becomes a plugin; continual.replay becomes data.replay."""
    if section is None:
        return []
    if not isinstance(section, dict) or set(section) - CONTINUAL_KEYS:
        raise ValueError(f"continual must be a mapping of {', '.join(sorted(CONTINUAL_KEYS))}, given {section!r}")
    old, replay, ewc = section.get("old_data"), section.get("replay", 0), section.get("ewc", 0)
    if (replay or ewc) and old is None:
        raise ValueError("continual.replay and continual.ewc need continual.old_data: the data the starting run was "
                         "trained on (ember continue sets it)")
    if replay:
        data = raw.setdefault("data", {})
        if not isinstance(data, dict) or data.get("replay") is not None:
            raise ValueError("continual.replay and data.replay are both given; keep data.replay")
        data["replay"] = {"data": old, "share": replay}
    if not ewc:
        return []
    entry = {"name": "ewc", "strength": ewc, "data": old, **({"samples": section["ewc_samples"]}
                                                             if "ewc_samples" in section else {})}
    return [(entry, "continual.ewc")]
