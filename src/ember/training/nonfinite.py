"""What a run does when its loss or gradients stop being numbers (``train.on_nonfinite``).

``stop`` (the default) records the first bad step on the device and reads it only at the
steps where the ranks sync anyway (log, validation, checkpoint), then ends the run without
saving those weights; ``skip`` agrees on every step (one small all-reduce) and skips the
update on every rank together, up to ``MAX_CONSECUTIVE_SKIPS`` in a row.

Example::

    policy = NonFinitePolicy("skip", device)
    if not policy.skip(outcome.bad, step, last_checkpoint):
        optimizer.step()
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ember.errors import EmberError
from ember.training.distributed import all_reduce_
from ember.training.parallelize import all_finite

MAX_CONSECUTIVE_SKIPS = 20  # on_nonfinite=skip: past this, the run is diverging, not hiccuping


def nonfinite_message(step: int, what: str, last_checkpoint: Path | None) -> str:
    kept = (
        f"The last good checkpoint, {last_checkpoint}, is untouched."
        if last_checkpoint
        else "No checkpoint was written."
    )
    return (
        f"The {what} became non-finite (NaN or inf) at optimiser step {step}, so training stopped without "
        f"saving those weights. {kept} Usual fixes: lower optim.lr, add warmup (schedule.warmup_fraction or warmup_steps), keep "
        f"optim.grad_clip on, prefer bf16 over fp16 — or set train.on_nonfinite=skip to skip such steps."
    )


def check_finite_weights(model: nn.Module, step: int, last_checkpoint: Path | None) -> None:
    """One device check over all weights (on every rank) before they are saved: a poisoned model is never written."""
    if not all_finite(model):
        raise EmberError(nonfinite_message(step, "model weights", last_checkpoint))


class NonFinitePolicy:
    """Holds its own counters: skips in a row (skip) or the first bad step (stop)."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        self.consecutive_skips = 0
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)

    def skip(self, bad: torch.Tensor, step: int, last_checkpoint: Path | None) -> bool:
        """Whether to skip the update of optimiser step ``step`` (the same answer on every rank)."""
        if self.mode != "skip":
            self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)  # read at check()
            return False
        skip = bool(all_reduce_(bad.int(), "max").item())  # a sync per step, the price of skipping
        self.consecutive_skips = self.consecutive_skips + 1 if skip else 0
        if self.consecutive_skips > MAX_CONSECUTIVE_SKIPS:
            raise EmberError(
                nonfinite_message(step, f"loss ({self.consecutive_skips} steps in a row)", last_checkpoint)
            )
        return skip

    def check(self, last_checkpoint: Path | None, distributed: bool) -> None:
        """At a sync step: end the run if any rank saw a bad step since the start (stop)."""
        if self.mode == "skip":
            return
        if distributed:
            all_reduce_(self.first_bad, "max")
        if (bad_step := int(self.first_bad.item())) >= 0:
            raise EmberError(nonfinite_message(bad_step, "training loss or gradient norm", last_checkpoint))
