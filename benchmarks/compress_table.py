"""The compression trade-off table: original, pruned, distilled and int8 side by side.

For each model its shipped recipe is trained (the GPT optionally shortened with
``--gpt-steps``), then compressed every way ember offers, each result measured the same:
parameters, nonzero parameters, MB of weights on disk, CPU ms per evaluation batch (1 thread;
all runs of a model timed together in 9 interleaved rounds of 5 passes, the median round and
the range; speed per round against the original, "no measurable difference" when the rounds
disagree on which is faster: ``ember.compress.timing``) and quality on the val split
(accuracy; loss for the GPT, over the recipe's ``eval.max_batches``). Rows:

- ``global`` 50 % and 80 % (unstructured masks) and ``structured`` 50 % and 80 % (whole
  channels / heads / neurons), each in 2 rounds with ``--finetune`` of the training steps
  spent fine-tuning (``ember prune --iterative 2 --finetune-steps S``);
- a student about a quarter of the size (half the width), trained for the recipe's steps
  alone and distilled from the original (``ember distill``, T = 2, alpha = 0.5);
- ``int8-dynamic`` and ``int8-weight-only`` (``ember quantize``).

    python benchmarks/compress_table.py [--models cnn-digits gpt-tiny vit-digits] [--keep DIR]

Under CPU contention run it with OMP_NUM_THREADS=1: the latencies are taken on one thread anyway.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from ember.compress.compare import compare
from ember.compress.distill import distill
from ember.compress.measure import format_table
from ember.compress.prune import prune
from ember.compress.quantize import METHODS, quantize
from ember.config import load_recipe
from ember.training.loop import train

MODELS = {
    "cnn-digits": "recipes/cnn-digits.yaml",
    "vit-digits": "recipes/vit-digits.yaml",
    "gpt-tiny": "recipes/gpt-tiny.yaml",
}
HALF_WIDTH = {"cnn": "model.width", "vit": "model.n_embd", "gpt": "model.n_embd"}  # a quarter of the matmul weights
PRUNINGS = [("global", 0.5), ("global", 0.8), ("structured", 0.5), ("structured", 0.8)]
QUIET = ["train.progress=false", "train.log_every=1000"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt-steps", type=int, default=0, help="train.max_steps of the demo GPT (0: the recipe's)")
    parser.add_argument("--models", nargs="+", default=["cnn-digits", "gpt-tiny"], choices=list(MODELS))
    parser.add_argument(
        "--finetune", type=float, default=0.25, help="fine-tuning steps as a share of the training steps"
    )
    parser.add_argument("--keep", help="keep the runs in this directory (finished ones are reused)")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ember-compress-bench-"))
    for name in args.models:
        start = time.perf_counter()
        runs = compress_every_way(name, root, args.gpt_steps, args.finetune)
        rows = compare(runs, max_batches=_eval_batches(runs[0]))
        print(f"\n{name} ({MODELS[name]}, {time.perf_counter() - start:.0f} s)", flush=True)
        print(format_table(rows), flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def compress_every_way(name: str, root: Path, gpt_steps: int, finetune: float) -> list[Path]:
    """Train ``name``'s recipe and compress it every way; the run directories, the original first."""
    overrides = QUIET + ([f"train.max_steps={gpt_steps}"] if name == "gpt-tiny" and gpt_steps else [])
    recipe = load_recipe(MODELS[name], overrides)
    original = root / name
    if not (original / "model.safetensors").is_file():
        train(recipe, original, resume="auto")
    batches = _eval_batches(original)
    runs = [original]
    steps = round(finetune * recipe.train.max_steps)
    for method, amount in PRUNINGS:
        out = root / f"{name}-{method}-{round(100 * amount)}"
        if not (out / "prune.json").is_file():
            prune(
                original,
                amount,
                method,
                iterative=2,
                finetune_steps=steps,
                overrides=QUIET,
                out=out,
                max_batches=batches,
            )
        runs.append(out)
    width_key = HALF_WIDTH[recipe.model.name]
    half = getattr(recipe.model, width_key.split(".")[1]) // 2
    student = load_recipe(MODELS[name], overrides + [f"{width_key}={half}"])
    for kind, out in (("alone", root / f"{name}-student-alone"), ("distilled", root / f"{name}-student-distilled")):
        if not (out / "model.safetensors").is_file():
            if kind == "alone":
                train(student, out, resume="auto")
            else:
                distill(original, student, temperature=2.0, alpha=0.5, run_dir=out, resume="auto")
        runs.append(out)
    for method in METHODS:
        out = root / f"{name}-{method}"
        if not (out / "model.safetensors").is_file():
            quantize(original, method=method, out=out, max_batches=batches)
        runs.append(out)
    return runs


def _eval_batches(run: Path) -> int:
    recipe = load_recipe(run / "recipe.yaml")
    return recipe.eval.max_batches if recipe.data.name == "stdlib" else 0  # the GPT's val split is large


if __name__ == "__main__":
    main()
