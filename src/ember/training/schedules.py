"""Learning-rate schedules as multipliers of ``optim.lr``, counted in optimiser steps.

Each schedule is a plain function ``(step, cfg, max_steps) -> factor`` in one
table; ``lr_factor`` adds the linear warmup in front of any of them. The loop
calls ``scheduler.step()`` once per optimiser step, never per micro-batch, so
gradient accumulation and the number of ranks do not change the curve.

>>> cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
>>> round(lr_factor(5, cfg, 100), 3), round(lr_factor(100, cfg, 100), 3)
(0.6, 0.1)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ember.config import ScheduleConfig


def _progress(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    """Fraction of the post-warmup steps done, in [0, 1]."""
    warmup = cfg.warmup(max_steps)
    span = max(1, max_steps - warmup)
    return min(1.0, max(0.0, (step - warmup) / span))


def _constant(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    return 1.0


def _step(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    warmup = cfg.warmup(max_steps)
    return cfg.gamma ** ((step - warmup) // cfg.step_size) if step >= warmup else 1.0


def _multistep(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    return cfg.gamma ** sum(step >= m for m in cfg.milestones)


def _exponential(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    """The smooth form of ``step``: gamma per step_size steps, a little every step."""
    return cfg.gamma ** (max(0, step - cfg.warmup(max_steps)) / cfg.step_size)


def _cosine(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    p = _progress(step, cfg, max_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def _linear(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    return 1.0 - (1 - cfg.min_lr_ratio) * _progress(step, cfg, max_steps)


def _wsd(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    """Warmup-stable-decay: flat, then a linear decay over the last decay_fraction of the run."""
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - cfg.min_lr_ratio) * min(1.0, (step - decay_start) / decay_steps)


SCHEDULES: dict[str, Callable[[int, ScheduleConfig, int], float]] = {
    "constant": _constant,
    "step": _step,
    "multistep": _multistep,
    "exponential": _exponential,
    "cosine": _cosine,
    "linear": _linear,
    "wsd": _wsd,
}


def lr_factor(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of the base lr for optimiser step ``step`` (0-based)."""
    warmup = cfg.warmup(max_steps)
    if step < warmup:
        return (step + 1) / warmup
    return SCHEDULES[cfg.name](step, cfg, max_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state (last_epoch = optimiser steps taken) goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
