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

A file's old sections are checked as they were (an out-of-range value is refused under
its old name, even in a section that was off) and a key that was off (0, false, no
teacher) simply goes; a file giving one method both ways is refused rather than one
silently winning. A ``--set`` or search key in the old form is the same as its new one
(``train.ema_decay=0.99`` sets ``plugins.ema.decay``; 0 removes the entry). A run
directory's ``recipe.yaml`` and the recipe inside its checkpoints are migrated the same way.

Example::

    migrate_recipe({"model": {"name": "cnn"}, "optim": {"l1": 1e-4}})
    # {"model": {"name": "cnn"}, "optim": {}, "plugins": [{"name": "l1", "weight": 0.0001}]}
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError

from ember.schema import RecipeModel


class _OldDistill(RecipeModel):
    teacher: str = ""
    temperature: float = Field(2.0, gt=0, le=100)
    alpha: float = Field(0.5, ge=0, le=1)
    hidden_weight: float = Field(0.0, ge=0)


class _OldContinual(RecipeModel):
    old_data: dict | None = None
    replay: float = Field(0.0, ge=0, lt=1)
    ewc: float = Field(0.0, ge=0)
    ewc_samples: int = Field(512, ge=1)


class _OldKeys(RecipeModel):
    l1: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.0, ge=0, lt=1)
    keep_zeros: bool = False


# An old key given as an override or search key -> (plugin, its key); None: the entry itself (a switch).
OLD_KEYS = {
    ("optim", "l1"): ("l1", "weight"),
    ("train", "ema_decay"): ("ema", "decay"),
    ("init", "keep_zeros"): ("keep_zeros", None),
    ("continual", "ewc"): ("ewc", "strength"),
    ("continual", "ewc_samples"): ("ewc", "samples"),
    **{("distill", k): ("distill", k) for k in _OldDistill.model_fields},
}
SWITCHES = {("l1", "weight"), ("ema", "decay"), ("keep_zeros", None), ("ewc", "strength"), ("distill", "teacher")}


def today_path(path: list[str], value: Any) -> tuple[list[str], bool]:
    """The path an override of ``path`` sets today, and whether it removes that plugin (an old switch
    set off: 0, false or no teacher). Paths that did not move come back as they are."""
    moved = OLD_KEYS.get(tuple(path)) if len(path) == 2 else None
    if moved is None:
        return path, False
    plugin, key = moved
    off = moved in SWITCHES and value in (0, False, "")
    return (["plugins", plugin] + ([key] if key else [])), off


def migrate_recipe(raw: Any) -> Any:
    """A copy of the recipe mapping ``raw`` in today's form (anything else is returned as is,
    for validation to refuse). Raises ValueError when the old and new forms conflict."""
    if not isinstance(raw, dict):
        return raw
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    keys, distill, continual = _old(raw)
    added = [*keys, *_continual(raw, continual), *distill]  # ewc before distill: the order they were built in
    if not added:
        return raw
    plugins = raw.get("plugins", [])
    if not isinstance(plugins, list):
        return raw  # refused by validation, with its location
    named = {p.get("name") for p in plugins if isinstance(p, dict)}
    for entry, old in added:
        if entry["name"] in named:
            raise ValueError(
                f"{old} and a plugins entry named {entry['name']!r} are both given; they are the same "
                f"method. Keep the plugins entry and remove {old}"
            )
    raw["plugins"] = [*plugins, *(entry for entry, _ in added)]
    return raw


def _checked(model: type[BaseModel], values: dict, where: str) -> BaseModel:
    """``values`` validated as the old section was, an error naming the old keys."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(
            f"{where}{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (given: {e.get('input')!r})" for e in err.errors()
        )
        raise ValueError(problems) from None


def _old(raw: dict) -> tuple[list[tuple[dict, str]], list[tuple[dict, str]], _OldContinual | None]:
    """The plugins of optim.l1, train.ema_decay, init.keep_zeros and the distill section; the continual section."""
    moved: dict[str, Any] = {}
    for section, key in (("optim", "l1"), ("train", "ema_decay"), ("init", "keep_zeros")):
        if isinstance(raw.get(section), dict) and key in raw[section]:
            moved[key] = _checked(_OldKeys, {key: raw[section].pop(key)}, f"{section}.").model_dump()[key]
    old = _OldKeys(**moved)
    keys = [({"name": "l1", "weight": old.l1}, "optim.l1")] if old.l1 else []
    keys += [({"name": "ema", "decay": old.ema_decay}, "train.ema_decay")] if old.ema_decay else []
    keys += [({"name": "keep_zeros"}, "init.keep_zeros")] if old.keep_zeros else []
    section = raw.pop("distill", None)
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"distill must be a mapping (teacher, temperature, alpha, hidden_weight), given {section!r}")
    distill = _checked(_OldDistill, section, "distill.") if section else _OldDistill()
    distilled = [({"name": "distill", **distill.model_dump()}, "the distill section")] if distill.teacher else []
    section = raw.pop("continual", None)
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"continual must be a mapping (old_data, replay, ewc, ewc_samples), given {section!r}")
    return keys, distilled, _checked(_OldContinual, section, "continual.") if section else None


def _continual(raw: dict, old: _OldContinual | None) -> list[tuple[dict, str]]:
    """continual.ewc becomes a plugin; continual.replay becomes data.replay."""
    if old is None:
        return []
    if (old.replay or old.ewc) and old.old_data is None:
        raise ValueError(
            "continual.replay and continual.ewc need continual.old_data: the data the starting run was "
            "trained on (ember continue sets it)"
        )
    if old.replay:
        data = raw.setdefault("data", {})
        if not isinstance(data, dict) or data.get("replay") is not None:
            raise ValueError("continual.replay and data.replay are both given; keep data.replay")
        data["replay"] = {"data": old.old_data, "share": old.replay}
    if not old.ewc:
        return []
    return [({"name": "ewc", "strength": old.ewc, "samples": old.ewc_samples, "data": old.old_data}, "continual.ewc")]
