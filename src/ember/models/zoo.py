"""Where each model registers itself: name, config class, builder and the tasks it serves.

A model module ends its ``build`` with the decorator, so the facts about a model live
beside its code and nowhere else::

    @register_model("gpt", GPTConfig, tasks=("lm",))
    def build(cfg: GPTConfig, spec: DataSpec) -> GPT: ...

This module imports no model (the models import it); ``ember.models.registry`` imports
them all and derives the recipe's tables from :data:`REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ember.data.spec import DataSpec, Task
from ember.errors import EmberError

if TYPE_CHECKING:
    from pydantic import BaseModel
    from torch import nn

Builder = TypeVar("Builder", bound=Callable[..., Any])


@dataclass(frozen=True)
class ModelEntry:
    """One registered model. ``tasks``: the DataSpec tasks ``build`` serves; "simclr" marks an
    image model whose ``features(x)`` a SimCLR projection head can sit on (built as "classify")."""

    name: str
    config: type[BaseModel]
    build: Callable[[Any, DataSpec], nn.Module]
    tasks: tuple[Task, ...]
    given: bool = False  # a module the user gives to ember.train (model.name: custom), never built by ember


# name -> entry, in registration (import) order; read it through ember.models.registry,
# which imports every bundled model first.
REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, config: type[BaseModel], tasks: tuple[Task, ...], given: bool = False
) -> Callable[[Builder], Builder]:
    """Decorator for a model module's ``build(cfg, spec)``: records it under ``name`` and returns it unchanged."""

    def record(build: Builder) -> Builder:
        # Both are programming errors, caught at import: a second model under one name would
        # silently replace the first, and a config whose name differs could never be chosen.
        # (The same module registering again is a reload, not a clash.)
        if name in REGISTRY and REGISTRY[name].build.__module__ != build.__module__:
            first = REGISTRY[name].build.__module__
            raise ValueError(f"model {name!r} is registered twice ({first}, {build.__module__})")
        if config.model_fields["name"].default != name:
            raise ValueError(f"{config.__name__}.name must default to {name!r}, the name it is registered under")
        REGISTRY[name] = ModelEntry(name, config, build, tuple(tasks), given)
        return build

    return record


def models_serving(task: str) -> list[str]:
    """The registered models ember builds that serve ``task``, by name."""
    return sorted(entry.name for entry in REGISTRY.values() if task in entry.tasks and not entry.given)


def _either(names: list[str]) -> str:
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_task(model: str, spec: DataSpec, allowed: tuple[Task, ...] | None = None) -> None:
    """Raise EmberError when the data's task is not one ``model`` serves: ``allowed``, or else the
    tasks it registered. The message names the models that do serve it."""
    allowed = REGISTRY[model].tasks if allowed is None else allowed
    if spec.task not in allowed:
        fits = _either(models_serving(spec.task)) or "none"
        raise EmberError(
            f"model {model} cannot serve the data's task {spec.task!r}: it handles "
            f"{' and '.join(repr(t) for t in allowed)} only. Choose a model that fits the data "
            f"(for {spec.task!r}: {fits}) or a dataset with a task {model} supports."
        )
