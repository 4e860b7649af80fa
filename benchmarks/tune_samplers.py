"""TPE vs random search on the demo GPT: the best validation loss after N trials.

Both searches run here, one after the other, on the same space, trial budget, sampler
seed and shortened demo recipe (``recipes/gpt-tiny.yaml`` with ``--steps`` optimiser
steps instead of 800, so that a search fits in minutes on a CPU). No pruning, so every
trial trains to the end and the comparison is of the samplers alone. TPE's first
``--startup`` trials are random (Optuna's TPE needs observations before it models them).

The space: learning rate (log 3e-4 .. 3e-2), weight decay (0 .. 0.3), warm-up steps
(0 .. 60) and dropout (0 .. 0.2). Printed: the best validation loss after each trial for
both samplers, then the figure, ``best val loss after N trials: tpe X, random Y``.

    python benchmarks/tune_samplers.py --trials 12 --steps 150
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from ember.config import load_recipe
from ember.search import SPACE, TuneResult, tune

SEARCH = {
    "optim.lr": {"type": "float", "low": 3e-4, "high": 3e-2, "log": True},
    "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.3},
    "schedule.warmup_steps": {"type": "int", "low": 0, "high": 60, "step": 10},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.2},
}


def best_so_far(report: TuneResult) -> list[float]:
    """The best completed value after trials 0, 1, ..., in the order they ran."""
    values = sorted((t["trial"], t["value"]) for t in report.trials if t["state"] == "complete")
    out, best = [], float("inf")
    for _, v in values:
        best = min(best, v)
        out.append(best)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--steps", type=int, default=150, help="optimiser steps per trial")
    parser.add_argument("--startup", type=int, default=5, help="TPE's random trials first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="keep the two studies in this directory")
    args = parser.parse_args()

    recipe = load_recipe(
        "recipes/gpt-tiny.yaml",
        [
            f"train.max_steps={args.steps}",
            f"train.eval_every={args.steps}",
            f"train.checkpoint_every={args.steps}",
            "train.progress=false",
            "train.log_every=1000",
            "eval.max_batches=20",
            "schedule.warmup_fraction=0",  # the search sets warmup_steps; the recipe gives a share
        ],
    )
    space = SPACE.validate_python(SEARCH)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ember-tune-bench-"))
    curves = {}
    for sampler in ("random", "tpe"):
        shutil.rmtree(root / sampler, ignore_errors=True)
        start = time.perf_counter()
        report = tune(
            recipe,
            space,
            sampler=sampler,
            trials=args.trials,
            run_dir=root / sampler,
            pruner="none",
            seed=args.seed,
            startup_trials=args.startup,
        )
        curves[sampler] = best_so_far(report)
        print(f"{sampler}: {args.trials} trials in {time.perf_counter() - start:.0f} s; best {report.best['params']}")
    print("trial  " + "  ".join(f"{s:>8}" for s in curves))
    for i in range(args.trials):
        print(f"{i + 1:>5}  " + "  ".join(f"{c[i]:>8.4f}" if i < len(c) else f"{'-':>8}" for c in curves.values()))
    print(
        f"best val loss after {args.trials} trials ({args.steps} steps each): tpe {curves['tpe'][-1]:.4f}, "
        f"random {curves['random'][-1]:.4f}"
    )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
