"""The recipe's keys as its pydantic models declare them: the one walk behind "did you mean",
``ember recipe explain`` and shell completion of ``--set`` keys.

A section is a pydantic model; a tagged section (``model``, the entries of ``plugins``) is a
union of models told apart by ``name``, so its keys depend on that name. This module knows
nothing of ember's sections: it is handed the root model (``ember.config.Recipe``).

Example::

    from ember.config import Recipe
    section_at(Recipe, ["train"])                       # TrainConfig
    variants(Recipe.model_fields["model"].annotation)   # {"gpt": GPTConfig, "llama": ..., ...}
    closest("max_step", TrainConfig.model_fields)        # ["max_steps"]
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def unwrap(annotation: Any) -> Any:
    """``annotation`` without Annotated, Optional and list[...]: what one value of it is."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated or origin is list:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType) and type(None) in get_args(annotation):
            arms = [a for a in get_args(annotation) if a is not type(None)]
            annotation = arms[0] if len(arms) == 1 else Union[tuple(arms)]  # noqa: UP007
        else:
            return annotation


def variants(annotation: Any) -> dict[str, type[BaseModel]]:
    """The members of a tagged union of models by their ``name`` (empty when it is not one)."""
    annotation = unwrap(annotation)
    if get_origin(annotation) not in (Union, types.UnionType):
        return {}
    found = {}
    for arm in get_args(annotation):
        if isinstance(arm, type) and issubclass(arm, BaseModel) and "name" in arm.model_fields:
            tag = get_args(arm.model_fields["name"].annotation)
            if get_origin(arm.model_fields["name"].annotation) is Literal and len(tag) == 1:
                found[tag[0]] = arm
    return found


def section_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (a section), or None for a value or a tagged union."""
    annotation = unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def section_at(root: type[BaseModel], parts: Iterable[Any]) -> type[BaseModel] | None:
    """The model whose keys sit at ``parts`` (a pydantic error location: list indexes and union
    tags included, ``("model", "gpt")``, ``("plugins", 0, "ema")``), or None when there is none."""
    model: Any = root
    pending: dict[str, type[BaseModel]] = {}
    for part in parts:
        if isinstance(part, int):
            continue
        if pending:  # a tagged union: this part is the tag
            model, pending = pending.get(part), {}
        elif isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            annotation = model.model_fields[part].annotation
            pending = variants(annotation)
            model = section_of(annotation)
            if model is None and not pending:
                return None
        else:
            return None
        if model is None and not pending:
            return None
    return model if not pending else None


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The choices spelt most like ``word`` (difflib's ratio 0.6 or more), best first."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)


def dotted_keys(root: type[BaseModel], prefix: str = "", _open: tuple = ()) -> Iterator[str]:
    """Every settable key under ``root`` as ``section.key``; a tagged union's keys once per distinct
    key (``model.n_layer``), a list of tagged entries as ``plugins.NAME.key``. A section inside
    itself (``data.replay.data``) is not entered again."""
    _open = (*_open, root)
    for name, field in root.model_fields.items():
        key = f"{prefix}{name}"
        arms = variants(field.annotation)
        listed = holds_list(field)
        if arms and listed:
            for tag, arm in arms.items():
                yield from (k for k in dotted_keys(arm, f"{key}.{tag}.", _open) if not k.endswith(".name"))
        elif arms:
            seen: dict[str, None] = {}
            for arm in arms.values():
                seen.update(dict.fromkeys(dotted_keys(arm, f"{key}.", _open)))
            yield from seen
        elif (section := section_of(field.annotation)) is not None:
            if section not in _open:
                yield from dotted_keys(section, f"{key}.", _open)
        else:
            yield key


def unwrap_annotated(annotation: Any) -> Any:
    """``annotation`` without Annotated (a list stays a list)."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def holds_list(field: FieldInfo) -> bool:
    """Whether ``field`` takes a list (``plugins``, ``schedule.milestones``) rather than one value or section."""
    return get_origin(unwrap_annotated(field.annotation)) is list


# Other trainers' names for a key, tried when the spelling alone finds nothing close.
ALIASES = {
    "learning_rate": "lr",
    "learningrate": "lr",
    "max_grad_norm": "grad_clip",
    "clip_grad_norm": "grad_clip",
    "gradient_clipping": "grad_clip",
    "gradient_accumulation_steps": "grad_accum",
    "accumulate_grad_batches": "grad_accum",
    "max_iters": "max_steps",
    "steps": "max_steps",
    "warmup": "warmup_steps",
    "per_device_train_batch_size": "batch_size",
    "optimizer": "optim",
    "scheduler": "schedule",
    "lr_scheduler": "schedule",
    "training": "train",
    "evaluation": "eval",
}


def _typed_path(root: type[BaseModel], parts: list[Any]) -> list[str]:
    """``parts`` (an error location) as the user writes the key: without list indexes, and without
    the tag of a tagged section (``model.gpt`` is written ``model``; ``plugins.0.ema`` is ``plugins.ema``)."""
    typed, model, pending, listed = [], root, {}, False
    for part in parts:
        if isinstance(part, int):
            continue
        if pending:
            if listed:
                typed.append(str(part))
            model, pending = pending.get(part), {}
            continue
        typed.append(str(part))
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            break
        pending = variants(field.annotation)
        listed = holds_list(field)
        model = section_of(field.annotation)
    return typed


def suggest(root: type[BaseModel], loc: tuple) -> list[str]:
    """For an unknown key at the error location ``loc``, the keys the user probably meant, written
    as ``--set`` takes them: spelt alike in the same section, or an other trainer's name for one,
    or the same key in another section (``train.warmup_steps`` -> ``schedule.warmup_steps``)."""
    parts = [p for p in loc if p != "function-after[_cross_checks(), Recipe]"]
    if not parts or not isinstance(parts[-1], str):
        return []
    word, where = parts[-1], parts[:-1]
    section = section_at(root, where)
    if section is None:
        return []
    prefix = "".join(f"{p}." for p in _typed_path(root, where))
    alias = ALIASES.get(word.lower().replace("-", "_"))
    found = closest(word, section.model_fields)
    if alias in section.model_fields and alias not in found:
        found.insert(0, alias)
    here = [prefix + key for key in found]
    if not where:
        return here
    target = alias or word  # the key itself in another section comes first: the likelier slip
    elsewhere = [
        f"{name}.{target}"
        for name, field in root.model_fields.items()
        if name != where[0] and (other := section_of(field.annotation)) is not None and target in other.model_fields
    ]
    return elsewhere + here
