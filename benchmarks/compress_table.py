"""The compression trade-off table: original vs int8 for digits classifiers and the demo GPT.

Each model is trained from its shipped recipe (the GPT shortened to ``--gpt-steps``),
quantised with ``ember quantize`` by both methods, and measured: parameters, MB of
weights on disk, median CPU ms per evaluation batch (1 thread, 20 timed passes after
warm-up) and quality on the val split (accuracy; loss for the GPT, over the recipe's
``eval.max_batches``). The CNN shows what int8 Linear quantisation does not reach
(convolutions); the ViT and the GPT are mostly Linear layers.

    python benchmarks/compress_table.py [--gpt-steps 200] [--keep runs/compress-bench]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from ember.compress.measure import format_table
from ember.compress.quantize import METHODS, quantize
from ember.config import load_recipe
from ember.training.loop import train

MODELS = {"cnn-digits": "recipes/cnn-digits.yaml", "vit-digits": "recipes/vit-digits.yaml", "gpt-tiny": "recipes/gpt-tiny.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt-steps", type=int, default=200, help="train.max_steps of the demo GPT")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--keep", help="keep the runs in this directory (finished ones are reused)")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ember-compress-bench-"))
    for name in args.models:
        path = MODELS[name]
        overrides = ["train.progress=false", "train.log_every=1000"]
        if name == "gpt-tiny":
            overrides.append(f"train.max_steps={args.gpt_steps}")
        recipe = load_recipe(path, overrides)
        run = root / name
        start = time.perf_counter()
        if not (run / "model.safetensors").is_file():
            train(recipe, run)
        trained = time.perf_counter() - start
        batches = recipe.eval.max_batches if recipe.data.name == "stdlib" else 0  # the GPT's val split is large
        rows = []
        for method in METHODS:
            out = root / f"{name}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            report = quantize(run, method=method, out=out, max_batches=batches)
            rows += report["rows"] if not rows else report["rows"][1:]  # the original once
        print(f"\n{name} ({path}, {recipe.train.max_steps} steps, trained in {trained:.0f} s)")
        print(format_table(rows))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
