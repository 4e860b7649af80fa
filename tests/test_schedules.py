"""Schedules: shapes, warmup, and counting optimiser steps (not micro-batches)."""

import math
from pathlib import Path

import pytest
import torch

from ember.config import ScheduleConfig, load_recipe
from ember.errors import EmberError
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


# --- issue #20: warmup as a share of the run -------------------------------------------------
RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
# The warmup each shipped recipe had in steps before it gave it as a share: at the recipe's own
# max_steps the share must give the same step count, so `make demo` trains exactly as before.
WARMUP_AT_DEFAULT = {
    "clip-captions": 20, "clip-digits": 20, "cnn-digits": 20, "continual-digits-0-4": 10, "encoder-text": 20,
    "gpt-tiny": 30, "llama-lora-instruct": 20, "llama-tiny": 30, "mlm-stdlib": 40, "mlp-digits": 20,
    "mlp-table": 10, "rnn-digits": 20, "seq2seq-addition": 50, "seq2seq-pairs": 50, "simclr-digits": 20,
    "vit-digits": 50,
}  # fmt: skip


def test_warmup_fraction_rounds_half_up_and_stays_below_the_run():
    cfg = ScheduleConfig(name="constant", warmup_fraction=0.05)
    assert [cfg.warmup(n) for n in (400, 10, 9, 5, 1)] == [20, 1, 0, 0, 0]  # 0.5 -> 1, 0.45 -> 0
    assert ScheduleConfig(warmup_fraction=0.9).warmup(2) == 1  # round(1.8) = 2 would never reach the peak
    assert curve(cfg, 40)[:3] == [0.5, 1.0, 1.0]  # warmup of 2 steps at 40: 1/2, 2/2, then the schedule
    assert curve(ScheduleConfig(name="constant", warmup_steps=2), 40) == curve(cfg, 40)


def test_warmup_steps_and_fraction_are_one_or_the_other():
    with pytest.raises(EmberError, match=r"both given.*schedule.warmup_fraction=0"):
        load_recipe(RECIPES[0].parent / "gpt-tiny.yaml", ["schedule.warmup_steps=5"])
    recipe = load_recipe(RECIPES[0].parent / "gpt-tiny.yaml", ["schedule.warmup_steps=5", "schedule.warmup_fraction=0"])
    assert recipe.schedule.warmup(recipe.train.max_steps) == 5
    with pytest.raises(EmberError, match=r"warmup_steps \(30\) must be smaller.*warmup_fraction"):
        load_recipe(None, ["model.name=gpt", "schedule.warmup_steps=30", "train.max_steps=30"])


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_gives_warmup_as_a_share_and_runs_short(path):
    recipe = load_recipe(path)
    assert recipe.schedule.warmup_steps == 0 and recipe.schedule.warmup_fraction > 0
    assert recipe.schedule.warmup(recipe.train.max_steps) == WARMUP_AT_DEFAULT[path.stem]
    short = load_recipe(path, ["train.max_steps=5"])  # refused before warmup could be a share
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, short.schedule, short.train.max_steps)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and all(0 < lr <= 1.0 for lr in lrs)  # no warmup left in 5 steps; decays from the peak
