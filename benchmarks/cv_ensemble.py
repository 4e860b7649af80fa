"""5-fold cross-validation of the digits CNN, then its fold models as ensembles.

``recipes/cnn-digits.yaml`` as shipped (400 steps; 10 % of the digits held out as a test
split that no fold trains or validates on) is cross-validated with ``ember cv
--stratified``: the figure is the held-out-fold accuracy, mean ± std (ddof = 1) over the
folds. The five fold models are then combined on the test split with each ensemble method
(mean of probabilities, majority vote, weight soup — the folds share their initial weights)
and compared with the best and the mean member on the same 180 test images.

    python benchmarks/cv_ensemble.py --folds 5 [--keep runs/cv-bench]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from ember.config import load_recipe
from ember.eval.crossval import cross_validate, format_cv
from ember.eval.ensemble import ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--keep", help="keep the fold runs in this directory (and resume there)")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ember-cv-bench-"))
    recipe = load_recipe("recipes/cnn-digits.yaml", ["train.progress=false"])
    start = time.perf_counter()
    cv = cross_validate(recipe, folds=args.folds, run_dir=root, stratified=True)
    print(format_cv(cv))
    acc = cv.summary["accuracy"]
    print(
        f"{args.folds}-fold CV accuracy of the digits CNN: {acc['mean']:.4f} ± {acc['std']:.4f} "
        f"(min {acc['min']:.4f}, max {acc['max']:.4f}; {time.perf_counter() - start:.0f} s)"
    )
    folds = sorted(root.glob("fold_*"))
    for method in ("mean", "vote", "soup"):
        report = ensemble(folds, method=method, split="test")
        for metric, best in (("accuracy", max), ("loss", min)):
            if metric not in report.ensemble["metrics"]:
                continue  # a vote has no probabilities, so no loss
            members = [m["metrics"][metric] for m in report.members]
            print(
                f"test {metric} ({report.samples} images), {method}: ensemble "
                f"{report.ensemble['metrics'][metric]:.4f}, best member {best(members):.4f}, "
                f"mean member {sum(members) / len(members):.4f}"
            )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
