"""What every experiment tracker is: the ``Tracker`` protocol, the table of registered trackers,
the check that a tracker's package is installed, and the recipe flattened into ``section.key`` pairs.

A tracker registers once, in its own module, with the decorator on its class::

    @register_tracker("mlflow", module="mlflow", extra="mlflow")
    class MlflowTracker: ...

``module`` is the package it needs and ``extra`` the ember extra that installs it
(``pip install 'ember[mlflow]'``); ``check_installed`` names that extra when it is missing.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ember.errors import EmberError


class Tracker(Protocol):
    """One tracker on rank 0. ``start`` returns what it needs to continue the same run on resume
    (kept in RUN/trackers.json as JSON and handed back as ``kept``; None for a fresh run)."""

    def start(self, recipe: dict, recipe_text: str, run_dir: Path, resumed_step: int, kept: dict | None) -> dict: ...

    def log_metrics(self, step: int, metrics: dict[str, float], split: str) -> None:
        """``split`` is "train" or "val"; ``metrics`` holds finite and non-finite floats, no None."""

    def log_text(self, step: int, tag: str, text: str) -> None: ...

    def finish(self, status: str) -> None:
        """``status``: "finished", "failed" or "killed" (Ctrl-C, a stop request)."""


@dataclass(frozen=True)
class TrackerEntry:
    name: str
    module: str  # the package it imports
    extra: str  # the ember extra that installs it
    make: Callable[[], Tracker]


TRACKERS: dict[str, TrackerEntry] = {}


def register_tracker(name: str, module: str, extra: str) -> Callable[[type], type]:
    """Class decorator: put the tracker in ``TRACKERS`` under ``name`` (a ``train.trackers`` value)."""

    def register(cls: type) -> type:
        TRACKERS[name] = TrackerEntry(name, module, extra, cls)
        return cls

    return register


def missing_package(name: str) -> EmberError:
    entry = TRACKERS[name]
    return EmberError(
        f"train.trackers names {name}, but its package ({entry.module}) is not installed. Install it with "
        f"pip install 'ember[{entry.extra}]', or take {name} out of train.trackers."
    )


def check_installed(names: list[str]) -> None:
    """Refuse, before anything is built, a tracker whose package is missing (not at its first log line)."""
    for name in names:
        if importlib.util.find_spec(TRACKERS[name].module) is None:
            raise missing_package(name)


def require(name: str) -> Any:
    """Import the package of tracker ``name``; when it fails, the EmberError naming its extra."""
    try:
        return importlib.import_module(TRACKERS[name].module)
    except ImportError:
        raise missing_package(name) from None


def flat_recipe(recipe: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``; lists and None as JSON text (``"[0.8, 1.2]"``,
    ``"null"``): every value a scalar a tracker's parameter table takes."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in recipe.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_recipe(value, name + "."))
        elif isinstance(value, (str, int, float, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat
