"""When a run validates, and what it concludes: every ``train.eval_every`` steps and at the last
step; early stopping on ``eval.metric``; a caller's ``on_eval`` (``ember tune`` prunes trials with it).

Example::

    validator = Validator(layout, eval_model, data, autocast, recipe, log, on_eval)
    if validator.should_validate(step):
        metrics = validator.run(step, progress, last_checkpoint)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ember.config import Recipe
from ember.errors import EmberError
from ember.training.layouts import Layout
from ember.training.nonfinite import nonfinite_message
from ember.training.resume import Progress
from ember.training.runlog import RunLog
from ember.training.tasks import metric_mode


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class Validator:
    """Validates ``model`` (the EMA's average when there is one) through the run's layout."""

    def __init__(
        self,
        layout: Layout,
        model: nn.Module,
        data,
        autocast,
        recipe: Recipe,
        log: RunLog,
        on_eval: Callable[[int, dict], bool] | None = None,
    ) -> None:
        self.layout, self.model, self.data, self.autocast, self.recipe = layout, model, data, autocast, recipe
        self.log, self.on_eval = log, on_eval
        self.halted = False  # on_eval asked to stop

    def should_validate(self, step: int) -> bool:
        every = self.recipe.train.eval_every
        return bool(every and step % every == 0) or step == self.recipe.train.max_steps

    def metrics(self, step: int, last_checkpoint: Path | None) -> dict[str, float]:
        """The validation metrics at ``step``; a non-finite loss ends the run."""
        self.layout.share_buffers(self.model)
        metrics = self.layout.validate(
            self.model, self.data, self.data.spec.task, self.autocast, self.recipe.eval.max_batches
        )
        if not math.isfinite(metrics["loss"]):
            raise EmberError(nonfinite_message(step, "validation loss", last_checkpoint))
        return metrics

    def run(self, step: int, progress: Progress, last_checkpoint: Path | None) -> dict[str, float]:
        """Validate, log, and decide on early stopping and ``on_eval`` (never at the last step)."""
        metrics = self.metrics(step, last_checkpoint)
        self.log.validation(step, metrics)
        is_last = step == self.recipe.train.max_steps
        progress.stopped_early = _early_stop(progress, metrics[self.recipe.eval.metric], self.recipe) and not is_last
        self.halted = self.on_eval is not None and bool(self.on_eval(step, metrics)) and not is_last
        return metrics


def _early_stop(progress: Progress, value: float, recipe: Recipe) -> bool:
    mode = metric_mode(recipe.eval.metric, recipe.eval.mode)
    if improved(value, progress.best, mode, recipe.eval.min_delta):
        progress.best, progress.evals_since_best = value, 0
        return False
    progress.evals_since_best += 1
    return recipe.eval.patience > 0 and progress.evals_since_best >= recipe.eval.patience
