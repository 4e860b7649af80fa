"""Is the loader ever the bottleneck? Loader tokens/s divided by training tokens/s.

Both use the demo recipe (``recipes/gpt-tiny.yaml``: the prepared stdlib shards, BPE,
batch 32 x 128 tokens). Each round, in alternating order:

- loader: ``BatchLoader.next_batch()`` of the recipe's training loader (memory-mapped
  shards, a shuffled window order, int64 batches) for ``--batches`` batches, in the
  training process (``data.num_workers=0``, the default); tokens handed out per second;
- training: ``ember.training.loop.train`` for ``--steps`` optimiser steps; the median of
  its logged tokens/s, the first log line (warm-up) left out.

The figure is the median over rounds of the per-round ratio; the goal is >= 20, so
that the data side costs at most 5 % of a step even with no prefetching at all.

Run from the repository root::

    PYTHONPATH=src python benchmarks/loader.py --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from ember.config import load_recipe
from ember.data.build import build_data
from ember.training.loop import train

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gpt-tiny.yaml"


def loader_tokens_per_s(batches: int) -> float:
    recipe = load_recipe(RECIPE)
    data = build_data(recipe.data, recipe.train.batch_size, recipe.train.batch_size, seed=0)
    data.train.next_batch()  # maps the shards
    start = time.perf_counter()
    for _ in range(batches):
        batch = data.train.next_batch()
    seconds = time.perf_counter() - start
    return batches * batch["x"].numel() / seconds


def train_tokens_per_s(steps: int) -> float:
    overrides = [
        f"train.max_steps={steps}",
        "train.log_every=5",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.progress=false",
        "eval.max_batches=1",
        "schedule.warmup_steps=1",
        "schedule.warmup_fraction=0",  # the recipe gives its warmup as a share; this one is in steps
        "train.peak_flops=1",
    ]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        train(load_recipe(RECIPE, overrides), Path(tmp) / "run")
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return statistics.median(speeds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    ratios, loads, trains = [], [], []
    for r in range(args.rounds):
        if r % 2 == 0:
            load, tr = loader_tokens_per_s(args.batches), train_tokens_per_s(args.steps)
        else:
            tr, load = train_tokens_per_s(args.steps), loader_tokens_per_s(args.batches)
        loads.append(load)
        trains.append(tr)
        ratios.append(load / tr)
        print(
            f"round {r + 1}: loader {load:,.0f} tokens/s, training {tr:,.0f} tokens/s, ratio {load / tr:.1f}",
            flush=True,
        )
    print(
        f"loader {statistics.median(loads):,.0f} tokens/s / training {statistics.median(trains):,.0f} tokens/s"
        f" = {statistics.median(ratios):.1f}x (goal >= 20)"
    )


if __name__ == "__main__":
    main()
