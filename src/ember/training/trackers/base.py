"""What every experiment tracker is: the ``Tracker`` protocol, the table of registered trackers
(``TRACKERS``, what ``train.trackers`` accepts), the check that a tracker's package is installed,
and the recipe flattened into ``section.key`` pairs.

A tracker registers once, in its own module, with the decorator on its class::

    @register_tracker("mlflow", module="mlflow", extra="mlflow")
    class MlflowTracker: ...

``module`` is the package it needs and ``extra`` the ember extra that installs it
(``pip install 'ember[mlflow]'``): ``ember.extras`` names that extra when the package is
missing, before the run is built (``check_installed``) and where the tracker imports it
(``tracker_package``). A tracker of one's own registers the same way, without ``module`` and
``extra`` (its imports are its own); once its module is imported, a recipe may name it.
This module imports nothing heavy: ``ember.config`` reads ``TRACKERS`` to check a recipe.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol

from ember.extras import USER_EXTRAS, require, require_installed


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
    module: str | None  # the package it imports (None: the tracker's imports are its own concern)
    extra: str | None  # the ember extra that installs it
    make: Callable[[], Tracker]


TRACKERS: dict[str, TrackerEntry] = {}


def register_tracker(name: str, module: str | None = None, extra: str | None = None) -> Callable[[type], type]:
    """Class decorator: put the tracker in ``TRACKERS`` under ``name`` (a ``train.trackers`` value).
    ``module`` and ``extra`` go together: the package the tracker needs and the ember extra with it."""
    if (module is None) != (extra is None) or (extra is not None and extra not in USER_EXTRAS):
        raise ValueError(f"register_tracker({name!r}): give both module and extra (one of ember's extras), or neither")

    def register(cls: type) -> type:
        TRACKERS[name] = TrackerEntry(name, module, extra, cls)
        return cls

    return register


def _feature(name: str) -> tuple[str, str]:
    """What ``ember.extras`` says needs the package, and what the user may do instead of installing it."""
    return f"The {name} tracker (train.trackers)", f"take {name} out of train.trackers"


def check_installed(names: list[str]) -> None:
    """Refuse, before anything is built, a tracker whose package is missing (not at its first log line)."""
    for name in names:
        entry = TRACKERS[name]
        if entry.module is not None:
            require_installed(entry.module, entry.extra, *_feature(name))


def tracker_package(name: str) -> ModuleType:
    """Import the package of tracker ``name``; when it fails, the EmberError naming its extra."""
    entry = TRACKERS[name]
    if entry.module is None:
        raise ValueError(f"tracker {name!r} was registered without a package: it imports its own")
    return require(entry.module, entry.extra, *_feature(name))


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
