"""Recipes you can discover: the resolved recipe, one key explained, and the JSON schema for editors.

Everything here is read from the recipe's pydantic models (``ember.config.Recipe``): a key's type,
allowed values, range (its ``ge``/``gt``/``le``/``lt`` constraints), default and description.
The ``model`` section's keys depend on ``model.name`` and a ``plugins`` entry's on its name, so
those are explained per model or plugin.

Example::

    print(show_recipe("recipes/gpt-tiny.yaml", ["train.max_steps=50"]))  # every key, defaults filled in
    print(explain_key("optim.lr"))            # type, range, default, description
    print(explain_key("model.n_layer"))       # for each model that has it
    print(explain_key("train"))               # the section's keys, one line each
    schema = recipe_json_schema()             # json.dump it; point the editor's YAML schema at it
"""

from __future__ import annotations

import copy
from typing import Any, Literal, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ember.config import Recipe, load_recipe
from ember.errors import EmberError
from ember.recipe_keys import closest, holds_list, section_of, suggest, unwrap_annotated, variants

BASE_HELP = (
    "another recipe this one builds on, relative to this file: its keys are merged under this "
    "recipe's (lists replaced whole; a model of another name replaces the model section); --set applies last"
)


def show_recipe(path: str | None, overrides: list[str] | None = None) -> str:
    """The recipe in ``path`` as ember runs it: its ``base:`` chain merged, ``--set`` applied, every
    default filled in (the model's own keys included), as YAML that loads back equal.

    Example::

        show_recipe("recipes/cnn-digits.yaml", ["optim.lr=0.01"])  # "...optim:\\n  name: adamw\\n  lr: 0.01\\n..."
    """
    recipe = load_recipe(path, overrides or [])
    sets = "".join(f" --set {o}" for o in overrides or [])
    return f"# {path or '(defaults)'}{sets}: resolved, every default filled in\n{recipe.to_yaml()}"


def explain_key(key: str = "", model_name: str | None = None) -> str:
    """What a recipe key is: its type, allowed values or range, default and description; for a
    section, its keys one line each; for ``""``, the sections. A ``model.*`` key is explained for
    ``model_name`` (or ``model.NAME.key``), else for every model that has it.

    Example::

        explain_key("train.max_steps")
        # 'train.max_steps\\n  type     integer\\n  range    >= 1\\n  default  1000\\n  about    optimiser steps'
    """
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        return _list_section("", Recipe)
    if parts == ["base"]:  # read before validation (ember.recipe_base), so no model declares it
        return f"base\n  type     text (a path)\n  default  none\n  about    {BASE_HELP}"
    return _explain(Recipe, parts, [], model_name)


def _explain(model: type[BaseModel], parts: list[str], done: list[str], model_name: str | None) -> str:
    """``parts`` looked up under ``model`` (reached by the path ``done``)."""
    part, rest = parts[0], parts[1:]
    field = model.model_fields.get(part)
    if field is None:
        raise _unknown(done, part, model)
    path = [*done, part]
    arms = variants(field.annotation)
    if arms:
        return _explain_tagged(field, arms, rest, path, model_name)
    section = section_of(field.annotation)
    if section is not None:
        return _explain(section, rest, path, model_name) if rest else _list_section(".".join(path), section)
    if rest:
        raise EmberError(f"{'.'.join(path)} is a value, not a section: `ember recipe explain {'.'.join(path)}`.")
    return describe_field(".".join(path), field)


def _explain_tagged(
    field: FieldInfo, arms: dict[str, type[BaseModel]], rest: list[str], path: list[str], model_name: str | None
) -> str:
    """A section whose keys depend on its ``name``: one variant, or every variant that has the key."""
    where = ".".join(path)
    listed = holds_list(field)
    tag = rest[0] if rest and rest[0] in arms else None if listed else model_name
    if rest and rest[0] in arms:
        rest = rest[1:]
    if tag is not None:
        if tag not in arms:
            hint = closest(tag, arms, n=1)
            raise EmberError(
                f"{where} has no variant {tag!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                f"choose one of {', '.join(arms)}."
            )
        if listed:
            path = [*path, tag]
        if rest:
            return _explain(arms[tag], rest, path, None)
        return _list_section(".".join(path), arms[tag], "" if listed else tag)
    if not rest:
        return _list_variants(where, arms, listed, field.description)
    if listed:
        raise EmberError(f"{where}.{rest[0]}: name the entry first, one of {', '.join(arms)} (e.g. {where}.ema.decay).")
    return _across_variants(path, arms, rest)


def _across_variants(path: list[str], arms: dict[str, type[BaseModel]], rest: list[str]) -> str:
    """``model.KEY`` for every model that has KEY; models whose explanation is the same share one."""
    texts: dict[str, list[str]] = {}
    for tag, arm in arms.items():
        try:
            texts.setdefault(_explain(arm, rest, path, None), []).append(tag)
        except EmberError:
            continue
    key = ".".join([*path, *rest])
    if not texts:
        keys = {k for arm in arms.values() for k in arm.model_fields}
        hint = " or ".join(f"{path[0]}.{h}" for h in closest(rest[0], keys, n=3))
        raise EmberError(
            f"No model has the key {key}{f'; did you mean {hint}?' if hint else '.'} "
            f"`ember recipe explain {path[0]} --model NAME` lists one model's keys."
        )
    blocks = [f"{text}\n  models   {', '.join(tags)}" for text, tags in texts.items()]
    missing = [t for t in arms if not any(t in tags for tags in texts.values())]
    tail = f"\n(not a key of: {', '.join(missing)})" if missing else ""
    return "\n\n".join(blocks) + tail


def _unknown(done: list[str], part: str, model: type[BaseModel]) -> EmberError:
    where = ".".join(done)
    prefix = f"{where}." if where else ""
    hint = suggest(Recipe, (*done, part)) or [prefix + h for h in closest(part, model.model_fields)]
    mean = f"; did you mean {' or '.join(hint)}?" if hint else "."
    listing = f"`ember recipe explain {where}` lists its keys" if where else "`ember recipe explain` lists the sections"
    return EmberError(f"The recipe has no key {prefix}{part}{mean} {listing}.")


def _list_variants(where: str, arms: dict[str, type[BaseModel]], listed: bool, description: str | None) -> str:
    lines = [f"{where}: {description or ('a list of entries' if listed else 'chosen by its name')}"]
    for tag, arm in arms.items():
        lines.append(f"  {tag:<16}{len(arm.model_fields)} keys")
    example = f"{where}.{next(iter(arms))}" if listed else f"{where} --model {next(iter(arms))}"
    lines.append(f"`ember recipe explain {example}` lists one's keys.")
    return "\n".join(lines)


def _list_section(where: str, model: type[BaseModel], variant: str = "") -> str:
    """A section's keys, one line each: name, type and range, default, description. ``variant``: the
    model's name, for a ``model`` section (its keys are that model's)."""
    fields = model.model_fields
    title = (
        f"{where}{f' (name: {variant})' if variant else ''}: {len(fields)} keys" if where else "The recipe's sections"
    )
    width = max(len(name) for name in fields) + 2
    lines = [title]
    for name, field in fields.items():
        kind = _kind_in_listing(field)
        bounds = describe_range(field)
        default = "defaults" if section_of(field.annotation) else describe_default(field)
        arms = variants(field.annotation)
        about = f"by name: {', '.join(arms)}" if arms else _short(field.description or "", 70)
        lines.append(
            f"  {name:<{width}}{_short(kind + (', ' + bounds if bounds else ''), 34):<35}"
            f"{_short(default, 12):<13}{about}".rstrip()
        )
    if not where:
        lines.append(f"  {'base':<{width}}{'text':<35}{'none':<13}another recipe this one builds on")
    full = f"{where}.KEY{f' --model {variant}' if variant else ''}" if where else "SECTION"
    lines.append(f"`ember recipe explain {full}` tells one in full.")
    return "\n".join(lines)


def _kind_in_listing(field: FieldInfo) -> str:
    arms = variants(field.annotation)
    if (section := section_of(field.annotation)) is not None:
        return f"a section of {len(section.model_fields)} keys" + (" or null" if field.default is None else "")
    if not arms:
        return describe_type(field.annotation)
    return "list of named entries" if holds_list(field) else "a section, by name"


def describe_field(key: str, field: FieldInfo) -> str:
    """One key in full: type, range, default and description, a line each."""
    lines = [key, f"  type     {_schema_choices(field) or describe_type(field.annotation)}"]
    if bounds := describe_range(field):
        lines.append(f"  range    {bounds}")
    lines.append(f"  default  {describe_default(field)}")
    if field.description:
        lines.append(f"  about    {field.description}")
    return "\n".join(lines)


def _schema_choices(field: FieldInfo) -> str:
    """Choices a field learns when its schema is made (``json_schema_extra`` as a function, e.g. the trackers
    registered then), as ``describe_type`` words them; "" when it has none."""
    if not callable(field.json_schema_extra):
        return ""
    schema: dict[str, Any] = {}
    field.json_schema_extra(schema)
    choices = schema.get("items", {}).get("enum") or schema.get("enum")
    if not choices:
        return ""
    return f"{'list of ' if 'items' in schema else ''}one of: {', '.join(map(str, choices))}"


_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "<="))
_BOUNDS += ((annotated_types.Lt, "lt", "<"),)


def describe_range(field: FieldInfo | Any) -> str:
    """The numeric bounds on a field (or on the items of a list, from their Annotated metadata)."""
    metadata = list(getattr(field, "metadata", []))
    annotation = unwrap_annotated(field.annotation) if isinstance(field, FieldInfo) else field
    if not metadata and get_origin(annotation) is list:  # list[Annotated[int, Field(ge=1)]]: each item's
        item = get_args(annotation)[0]
        metadata = [m for m in getattr(item, "__metadata__", ()) for m in getattr(m, "metadata", [m])]
        return "each " + describe_bounds(metadata) if describe_bounds(metadata) else ""
    return describe_bounds(metadata)


def describe_bounds(metadata: list) -> str:
    found = [
        f"{sign} {_number(getattr(m, attr))}" for m in metadata for cls, attr, sign in _BOUNDS if isinstance(m, cls)
    ]
    return " and ".join(found)


def _number(value: Any) -> str:
    if isinstance(value, int) and value >= 1 << 16 and (value & (value - 1)) == 0:
        return f"{value} (2**{value.bit_length() - 1})"
    return repr(value)


def describe_type(annotation: Any) -> str:
    """A type as a user reads it: integer, number, true or false, text, one of: a, b, a section."""
    annotation = unwrap_annotated(annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin is list:
        return f"list of {_plural(describe_type(args[0]))}"
    if origin is tuple:
        return f"list of {len(args)} {_plural(describe_type(args[0]))}"
    if args and type(None) in args:
        return " or ".join(describe_type(a) for a in args if a is not type(None)) + " or null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a section"
    names = {int: "integer", float: "number", bool: "true or false", str: "text", dict: "a mapping"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _plural(kind: str) -> str:
    return {"integer": "integers", "number": "numbers", "text": "texts"}.get(kind, kind)


def describe_default(field: FieldInfo) -> str:
    """The default as it would be written in a recipe; ``required`` when there is none."""
    if field.default_factory is not None:
        value = field.default_factory()
        return "its keys' defaults" if isinstance(value, BaseModel) else _yaml(value)
    return "required" if field.default is PydanticUndefined else _yaml(field.default)


def _yaml(value: Any) -> str:
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).removesuffix("\n...\n").strip()


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def recipe_json_schema() -> dict:
    """The JSON schema of a recipe file, for editors to check and complete (VS Code's YAML extension:
    ``yaml.schemas``). It is pydantic's, made to suit editors: ``base:`` allowed and, with it,
    ``model`` no longer required; each model and plugin requires its ``name`` so that exactly one
    variant matches.

    Example::

        json.dumps(recipe_json_schema())  # '{"$schema": "https://json-schema.org/draft/2020-12/schema", ...}'
    """
    schema = copy.deepcopy(Recipe.model_json_schema())
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    schema["title"] = "ember recipe"
    schema["properties"] = {
        "base": {"type": "string", "description": BASE_HELP},
        **schema["properties"],
    }
    required = [r for r in schema.pop("required", []) if r != "model"]
    schema["anyOf"] = [{"required": ["model", *required]}, {"required": ["base", *required]}]
    for name in _tagged_definitions(schema):
        definition = schema["$defs"][name]
        definition["required"] = sorted({"name", *definition.get("required", [])})
    return schema


def _tagged_definitions(node: Any) -> set[str]:
    """The $defs names a discriminated union (``oneOf`` with a ``discriminator``) refers to."""
    found: set[str] = set()
    if isinstance(node, dict):
        if "discriminator" in node:
            found.update(ref.rpartition("/")[2] for ref in node["discriminator"].get("mapping", {}).values())
        for value in node.values():
            found |= _tagged_definitions(value)
    elif isinstance(node, list):
        for value in node:
            found |= _tagged_definitions(value)
    return found
