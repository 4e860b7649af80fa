"""What an experiment tracker costs a run: whole-process wall time with each of ``train.trackers``
against the same run with none, side by side.

Each side is a fresh process running ``ember.train`` on the demo recipe (``recipes/gpt-tiny.yaml``,
its prepared data cached by an untimed run first) for ``--steps`` steps, a log line every
``--log-every`` steps and a validation of one batch every ``--eval-every``; the sides run in
rotated order each round, and each figure is the median of the rounds. A tracker's cost is what it
adds to the whole process: its import, opening its store or run, every line and validation (with a
language model's text sample), and closing. Printed: seconds per side, the ratio to no tracker,
and the added seconds.

    PYTHONPATH=src python benchmarks/trackers.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("none", "tensorboard", "mlflow", "wandb")

CHILD = """
import sys
import ember
steps, every, evals, tracker, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
trackers = "[]" if tracker == "none" else f"[{tracker}]"
recipe = ember.load_recipe("recipes/gpt-tiny.yaml", [
    f"train.max_steps={steps}", f"train.log_every={every}", f"train.eval_every={evals}", "train.progress=false",
    "eval.max_batches=1", f"train.trackers={trackers}",
])
ember.train(recipe, run_dir=run_dir)
"""


def run_side(tracker: str, args: argparse.Namespace, work: Path, round_: int) -> float:
    """Seconds from start to exit of one fresh process training with ``tracker``."""
    run_dir = work / f"{tracker}-{round_}"
    argv = [sys.executable, "-c", CHILD, str(args.steps), str(args.log_every), str(args.eval_every), tracker]
    started = time.perf_counter()
    subprocess.run([*argv, str(run_dir)], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated, of " + ", ".join(SIDES))
    args = parser.parse_args()
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_side("none", args, work, -1)  # untimed: prepares (or finds) the demo data, warms the caches
        times: dict[str, list[float]] = {s: [] for s in sides}
        for r in range(args.rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            for side in order:
                times[side].append(run_side(side, args, work, r))
    base = statistics.median(times["none"]) if "none" in times else None
    lines, vals = args.steps // args.log_every, args.steps // args.eval_every
    print(f"{args.steps} steps, {lines} log lines, {vals} validations; median of {args.rounds} rounds")
    for side in sides:
        med = statistics.median(times[side])
        rel = f"  {med / base:.2f}x none  +{med - base:.2f} s" if base and side != "none" else ""
        print(f"{side:12s} {med:7.2f} s{rel}   rounds: {', '.join(f'{t:.2f}' for t in times[side])}")


if __name__ == "__main__":
    main()
