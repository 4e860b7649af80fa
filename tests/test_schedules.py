"""Schedules: shapes, warmup, and counting optimiser steps (not micro-batches)."""

import math

import pytest
import torch

from ember.config import ScheduleConfig
from ember.training.schedules import SCHEDULES, build_scheduler, lr_factor


def curve(cfg, max_steps=100):
    return [lr_factor(s, cfg, max_steps) for s in range(max_steps)]


def test_warmup_is_linear_then_hands_over():
    cfg = ScheduleConfig(name="constant", warmup_steps=4)
    assert curve(cfg, 6) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_ends_at_floor_and_is_monotone():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    c = curve(cfg, 101)
    assert c[10] == pytest.approx(1.0)
    assert lr_factor(101, cfg, 101) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(c[10:], c[11:]))
    assert c[10 + 45] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 91)))


def test_step_multistep_exponential_linear():
    assert curve(ScheduleConfig(name="step", step_size=3, gamma=0.5), 7) == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert curve(ScheduleConfig(name="multistep", milestones=[2, 4], gamma=0.1), 5) == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01]
    )
    assert curve(ScheduleConfig(name="exponential", gamma=0.5, step_size=2), 5) == pytest.approx(
        [1, 0.5**0.5, 0.5, 0.5**1.5, 0.25]
    )
    lin = ScheduleConfig(name="linear", min_lr_ratio=0.0)
    assert lr_factor(50, lin, 100) == pytest.approx(0.5)


def test_wsd_is_flat_then_decays_in_the_last_fraction():
    cfg = ScheduleConfig(name="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    c = curve(cfg, 100)
    assert c[5:80] == [1.0] * 75
    assert c[90] == pytest.approx(0.5)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.0)


def test_every_schedule_has_a_test_above():
    assert set(SCHEDULES) == {"constant", "step", "multistep", "exponential", "cosine", "linear", "wsd"}


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler(opt, ScheduleConfig(name="step", step_size=2, gamma=0.5), 10)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [2.0, 2.0, 1.0, 1.0, 0.5]
