"""The self-supervised and multimodal recipes as shipped, each against its baseline, in one run.

- ``simclr-digits``: linear-probe accuracy on the val digits of the SimCLR body's frozen
  features, against the same probe on the randomly initialised body (same seed) and on the
  body of the same CNN trained with labels (the supervised ceiling).
- ``clip-digits``: zero-shot accuracy (ten prompts, chance 0.1) and the image tower's probe.
- ``mlm-stdlib``: masked-token loss and accuracy on the fixed val masks, against the unigram
  baseline (the training split's token frequencies) on the same masked positions.

    python benchmarks/selfsup.py [--keep runs/selfsup-bench] [--skip-mlm]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from ember.config import load_recipe
from ember.data.build import build_data
from ember.data.spec import IGNORE_INDEX
from ember.eval.probe import probe
from ember.training.loop import train

QUIET = ["train.progress=false"]


def timed_train(recipe_path: str, run_dir: Path, overrides: list[str] = ()):
    start = time.perf_counter()
    result = train(load_recipe(recipe_path, QUIET + list(overrides)), run_dir)
    return result, time.perf_counter() - start


def simclr(root: Path) -> None:
    result, seconds = timed_train("recipes/simclr-digits.yaml", root / "simclr")
    report = probe(root / "simclr")
    # The supervised ceiling: the same CNN body trained with the labels.
    body = ["model.width=32", "model.depth=1", "model.stages=2", "data.test_fraction=0.1"]
    timed_train("recipes/cnn-digits.yaml", root / "supervised", body)
    ceiling = probe(root / "supervised", baseline=False)
    print(
        f"simclr-digits ({seconds:.0f} s): twin-view accuracy {result.metrics['accuracy']:.4f}; linear probe "
        f"{report.trained['accuracy']:.4f} vs random-init body {report.random_init['accuracy']:.4f} vs "
        f"supervised body {ceiling.trained['accuracy']:.4f}"
    )


def clip(root: Path) -> None:
    result, seconds = timed_train("recipes/clip-digits.yaml", root / "clip")
    report = probe(root / "clip")
    print(
        f"clip-digits ({seconds:.0f} s): zero-shot accuracy {result.metrics['accuracy']:.4f} (chance 0.1000); image "
        f"tower probe {report.trained['accuracy']:.4f} vs random init {report.random_init['accuracy']:.4f}"
    )


def unigram_baseline(recipe) -> tuple[float, float]:
    """(loss, accuracy) on the val masked positions of predicting by training-split token frequency."""
    size = recipe.eval.batch_size or recipe.train.batch_size  # the run's validation batches: the same masks
    data = build_data(recipe.data, size, size, seed=0, objective=recipe.objective)
    counts = torch.ones(data.spec.vocab_size, dtype=torch.float64)  # add-one smoothing
    train_set = data.train.dataset
    for start in range(0, len(train_set), 256):
        counts += torch.bincount(
            train_set.get(torch.arange(start, min(start + 256, len(train_set))))["x"].flatten(),
            minlength=data.spec.vocab_size,
        ).double()
    log_p = (counts / counts.sum()).log()
    torch.manual_seed(0)  # validation's own seed: the same masks as the run's evaluations
    n = loss = hits = 0
    for i, batch in enumerate(data.val.epoch_batches(torch.device("cpu"))):
        if i == recipe.eval.max_batches:
            break
        y = batch["y"][batch["y"] != IGNORE_INDEX]
        n, loss, hits = n + len(y), loss - log_p[y].sum().item(), hits + (y == log_p.argmax()).sum().item()
    return loss / n, hits / n


def mlm(root: Path) -> None:
    result, seconds = timed_train("recipes/mlm-stdlib.yaml", root / "mlm")
    base_loss, base_acc = unigram_baseline(load_recipe("recipes/mlm-stdlib.yaml"))
    m = result.metrics
    print(
        f"mlm-stdlib ({seconds:.0f} s): masked-token loss {m['loss']:.4f} (ppl {m['ppl']:.1f}), accuracy "
        f"{m['accuracy']:.4f} vs unigram loss {base_loss:.4f} (ppl {math.exp(base_loss):.1f}), accuracy {base_acc:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="keep the runs in this directory")
    parser.add_argument("--skip-mlm", action="store_true", help="leave out the 5-minute masked-LM run")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ember-selfsup-bench-"))
    simclr(root)
    clip(root)
    if not args.skip_mlm:
        mlm(root)


if __name__ == "__main__":
    main()
