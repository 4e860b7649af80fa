"""When a run saves itself: every ``train.checkpoint_every`` steps, at the last step, and whenever
the run stops early (early stopping, a pruned trial, Ctrl-C) — never with non-finite weights.

Example::

    saver = Checkpointer(run_dir / "checkpoints", recipe.train, model, optimizer, state, is_main)
    saver.maybe_save(step, stopping=False)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ember.config import TrainConfig
from ember.training.checkpoint import save_checkpoint
from ember.training.nonfinite import check_finite_weights

logger = logging.getLogger(__name__)


class Checkpointer:
    """Decides when to save and saves; ``last`` is the newest good checkpoint (None before one),
    ``checked_step`` the step whose weights it last found finite (the export needs no second look)."""

    def __init__(
        self,
        directory: Path,
        cfg: TrainConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: Callable[[], dict],
        is_main: bool,
        last: Path | None = None,
    ) -> None:
        self.directory, self.cfg, self.model, self.optimizer = directory, cfg, model, optimizer
        self.trainer_state, self.is_main, self.last = trainer_state, is_main, last
        self.checked_step: int | None = None

    def should_save(self, step: int) -> bool:
        every = self.cfg.checkpoint_every
        return bool(every and step % every == 0) or step == self.cfg.max_steps

    def maybe_save(self, step: int, stopping: bool = False) -> Path | None:
        """Save at a scheduled step, or whenever the run is ``stopping`` here. Called by all ranks together."""
        if not (stopping or self.should_save(step)):
            return None
        check_finite_weights(self.model, step, self.last)
        self.checked_step = step
        self.last = save_checkpoint(
            self.directory,
            step,
            self.cfg.keep_checkpoints,
            self.model,
            self.optimizer,
            self.trainer_state(),
            self.is_main,
        )
        if self.is_main:
            logger.debug("step %6d  checkpoint %s", step, self.last)
        return self.last
