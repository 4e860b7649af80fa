"""Experiment trackers: where a run's metrics go besides ``metrics.jsonl`` (``train.trackers``).

``train.trackers: [tensorboard, mlflow, wandb]`` picks any of the registered trackers
(``TRACKERS``; each is one module, registered where it is defined with ``register_tracker``,
see ``base``; the recipe accepts whatever is registered). The built-in ones each need their own
extra (``ember[tb]``, ``ember[mlflow]``, ``ember[wandb]``); ``check_installed`` refuses a
missing one when the run is built, before the first step (``ember.extras`` names the extra).
They run on rank 0 only: ``Trackers`` starts them with the recipe, sends each log line and
validation to all of them, and ends them with the run's status. What a tracker needs to
continue the same run on resume (MLflow's and W&B's run ids) is kept in RUN/trackers.json.

Example::

    trackers = Trackers(["tensorboard"], recipe, Path("runs/demo"), resumed_step=0, resuming=False)
    trackers.log_metrics(10, {"loss": 2.31, "lr": 3e-4}, "train")
    trackers.finish("finished")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ember.atomic import read_json, write_json_atomic
from ember.training.trackers import mlflow_tracker, tensorboard, wandb_tracker  # noqa: F401 (registrations)
from ember.training.trackers.base import TRACKERS, Tracker, check_installed, register_tracker

if TYPE_CHECKING:  # ember.config reads TRACKERS to check a recipe: no import of it at load
    from ember.config import Recipe

__all__ = ["TRACKERS", "Tracker", "Trackers", "check_installed", "register_tracker"]
STATE_FILE = "trackers.json"


class Trackers:
    """The run's trackers (none is fine: every call is then a no-op)."""

    def __init__(
        self, names: list[str], recipe: Recipe | None, run_dir: Path, resumed_step: int, resuming: bool
    ) -> None:
        self.trackers: list[Tracker] = []
        self.last_step = resumed_step
        if not names:
            return
        path = run_dir / STATE_FILE
        state = read_json(path, f"Delete {path} to start new tracker runs.") if resuming and path.is_file() else {}
        self.path, self.names = path, list(names)
        plain, text = recipe.model_dump(mode="json"), recipe.to_yaml()
        try:
            for name in names:
                tracker = TRACKERS[name].make()
                started = tracker.start(plain, text, run_dir, resumed_step, state.get(name))
                state[name] = {**state.get(name, {}), **started}
                self.trackers.append(tracker)
        except BaseException:
            for tracker in self.trackers:  # the ones already started do not stay open (MLflow: RUNNING)
                tracker.finish("failed")
            raise
        self.state = state
        write_json_atomic(path, state)

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    def log_metrics(self, step: int, record: dict, split: str) -> None:
        """The record's numbers (not its step, split or None fields) under ``split/``."""
        numbers = {
            k: float(v)
            for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for tracker in self.trackers:
            tracker.log_metrics(step, numbers, split)
        self.last_step = max(self.last_step, step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        for tracker in self.trackers:
            tracker.log_text(step, tag, text)

    def finish(self, status: str) -> None:
        """End each tracker's run and note the last step they hold (``logged_up_to``): a resume from an
        earlier checkpoint does not send W&B those steps again (lost only if the process is killed)."""
        for tracker in self.trackers:
            tracker.finish(status)
        if self.trackers:
            for name in self.names:
                kept = self.state[name]
                kept["logged_up_to"] = max(kept.get("logged_up_to", 0), self.last_step)
            write_json_atomic(self.path, self.state)
