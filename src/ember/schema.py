"""The base every recipe section derives from: what a recipe value must be before any range check.

Each section (``config.py``, and the config classes beside the models, objectives,
augmentation, cleaning and deduplication) derives from :class:`RecipeModel`, which

- refuses unknown keys (a misspelt key would otherwise be dropped silently);
- refuses non-finite floats (``.inf``, ``.nan``): no key means anything by them, and a
  ``timeout_s: .inf`` or ``eps: .nan`` fails only deep inside a run;
- refuses booleans and text where a number is expected: pydantic's lax mode would turn
  ``true`` into 1 and ``"7"`` into 7, changing what the user wrote without a word (DESIGN
  invariant 10). Integral floats (``1e3`` for an integer key) stay accepted: the value is kept.

:data:`Seed` is the one seed type: the range numpy's ``RandomState``, scikit-learn's
``random_state`` and ``torch.manual_seed`` all accept.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

SEED_MAX = 2**32 - 1  # numpy.random.RandomState and scikit-learn's random_state stop here


def _seed_in_range(value: int) -> int:
    if not 0 <= value <= SEED_MAX:
        raise ValueError(
            f"a seed must be an integer from 0 to {SEED_MAX} (2**32 - 1), the range numpy, "
            f"scikit-learn and torch all accept"
        )
    return value


Seed = Annotated[int, AfterValidator(_seed_in_range)]


def _kind(annotation: Any) -> str:
    return "an integer" if annotation is int else "a number"


def number_problem(annotation: Any, value: Any) -> str | None:
    """Why ``value`` cannot stand where ``annotation`` wants a number, or None.

    Walks lists, tuples, Optional and Annotated so that ``milestones: [true]`` and
    ``betas: ["0.9", 0.95]`` are caught too; anything else is left to pydantic.
    """
    origin = get_origin(annotation)
    if origin is Annotated:
        return number_problem(get_args(annotation)[0], value)
    if annotation in (int, float):
        if isinstance(value, bool):
            return (
                f"{_kind(annotation)} is expected, not the boolean {str(value).lower()} (YAML reads true/false, "
                f"yes/no and on/off as booleans); write a number"
            )
        if isinstance(value, str):
            return f"{_kind(annotation)} is expected, not the text {value!r}; write a number without quotes"
        return None
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        items = [a for a in get_args(annotation) if a is not Ellipsis] or [Any]
        for i, item in enumerate(value):
            problem = number_problem(items[min(i, len(items) - 1)], item)
            if problem:
                return f"item {i}: {problem}"
        return None
    if origin in (Union, types.UnionType) and value is not None:
        arms = [a for a in get_args(annotation) if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X decides; wider unions are left to pydantic
            return number_problem(arms[0], value)
    return None


class RecipeModel(BaseModel):
    """A recipe section: unknown keys, non-finite floats and non-numbers for numbers refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # A model-level check, not a field validator on "*": pydantic forbids "before" validators on
    # the discriminator field (model.name), and this one sees every key of a section at once.
    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                problem = field and number_problem(field.annotation, value)
                if problem:
                    # The key and value travel in the context: the error's own location is the section.
                    raise PydanticCustomError(
                        "number_expected", "{key}: {problem}", {"key": key, "problem": problem, "given": repr(value)}
                    )
        return data
