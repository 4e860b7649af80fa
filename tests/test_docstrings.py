"""Docstring examples: every ``>>>`` example in ember runs, as a doctest, in this file.

An example that would train a model, or that needs files which do not exist, is written as a
reST literal block instead (``Example::`` then an indented block without ``>>>``), which
doctest does not run. A new ``>>>`` example goes into a module listed in RUNNABLE (or its
module is added there), and must pass.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import ember

SRC = Path(ember.__file__).parent

# The modules whose examples run: cheap ones, a few seconds together.
RUNNABLE = (
    "ember.config",
    "ember.recipe_header",
    "ember.atomic",
    "ember.cores",
    "ember.data.folds",
    "ember.data.tokenizer",
    "ember.data.tokenizer_sample",
    "ember.models.registry",
    "ember.training.schedules",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def has_examples(path: Path) -> bool:
    """Whether a line of ``path`` starts (after indentation) with ``>>>``, as doctest's examples do."""
    return any(line.lstrip().startswith(">>>") for line in path.read_text(encoding="utf-8").splitlines())


def with_examples() -> set[str]:
    return {module_name(path) for path in SRC.rglob("*.py") if has_examples(path)}


@pytest.mark.parametrize("name", RUNNABLE)
def test_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example left: take it out of RUNNABLE"
    assert result.failed == 0, f"{result.failed} example(s) of {name} failed (doctest's report is above)"


def test_every_example_is_run() -> None:
    unrun = sorted(with_examples() - set(RUNNABLE))
    assert not unrun, (
        f"{unrun} hold >>> examples that no test runs: add the module to RUNNABLE in "
        f"tests/test_docstrings.py (its examples must pass), or write them as an Example:: literal block"
    )
