"""``ember cv RECIPE --folds K``: K-fold cross-validation, the mean ± std of every metric.

Fold i is an ordinary run directory, ``CV/fold_i``, trained by ``train`` with
``data.folds=K, data.fold=i`` (see ember.data.folds: train and val are pooled, fold i is
held out as the run's validation split) and then scored by ``evaluate`` on that fold.
Every fold starts from the same seed, so the fold models share their initial weights and
can be ensembled or souped (``ember ensemble CV/fold_* --split test``). ``CV/cv.json``
holds each fold's metrics and their mean, standard deviation (ddof=1), minimum and maximum.

Resumable: run the same command again and finished folds are read back, not retrained; a
fold stopped mid-training continues from its newest checkpoint.

Example::

    report = cross_validate(load_recipe("recipes/cnn-digits.yaml"), folds=5, run_dir="runs/cv-digits")
    report.summary["accuracy"]["mean"], report.summary["accuracy"]["std"]
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ember.atomic import read_json, write_json_atomic, write_text_atomic
from ember.config import Recipe, require_recipe
from ember.errors import EmberError
from ember.eval.evaluate import evaluate
from ember.runs import default_run_dir
from ember.training.device import resolve_device
from ember.training.distributed import barrier, broadcast_object, shared_process_group
from ember.training.loop import train

logger = logging.getLogger(__name__)

# The metrics the table shows by default; cv.json holds every one.
HEADLINE = ("loss", "accuracy", "f1_macro", "precision_macro", "recall_macro", "ppl", "bpb", "exact_match")


def fold_recipe(recipe: Recipe, folds: int, fold: int, stratified: bool) -> Recipe:
    """``recipe`` training on all folds but ``fold`` and validating on it."""
    data = recipe.data.model_copy(update={"folds": folds, "fold": fold, "stratified_folds": stratified})
    return recipe.model_copy(update={"data": data})


def fold_state(fold_dir: Path, recipe: Recipe) -> str:
    """What a fold directory still needs: "train" (new or unfinished), "evaluate", or "done"."""
    saved = fold_dir / "recipe.yaml"
    if not saved.is_file():
        return "train"
    if saved.read_text() != recipe.to_yaml():
        raise EmberError(
            f"{fold_dir} holds a fold of a different recipe (its recipe.yaml differs from this one). Run "
            f"`ember cv` with the recipe and settings that started it to resume, or give a new --run-dir."
        )
    model, report = fold_dir / "model.safetensors", fold_dir / "eval.json"
    if not model.is_file():
        return "train"
    if (
        report.is_file()
        and report.stat().st_mtime >= model.stat().st_mtime
        and read_json(report, _REDO).get("split") == "val"
    ):
        return "done"
    return "evaluate"


_REDO = "Delete that fold's eval.json and run the same ember cv command again: the fold is scored anew."


@dataclass(frozen=True)
class CvResult:
    """What ``cross_validate`` returns; ``to_dict()`` is CV/cv.json.

    ``fold_metrics[i]`` and ``fold_samples[i]``: fold i's ``evaluate`` metrics and sample count;
    ``summary[metric]``: ``{"mean", "std", "min", "max"}`` over the folds (std with ddof=1).
    """

    recipe: str
    folds: int
    stratified: bool
    fold_metrics: list[dict[str, float]]
    fold_samples: list[int]
    summary: dict[str, dict[str, float]]
    run_dir: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (cv.json): every field but ``run_dir``, the directory that holds it."""
        return {k: v for k, v in asdict(self).items() if k != "run_dir"}


def cross_validate(
    recipe: Recipe, folds: int = 5, run_dir: str | Path | None = None, stratified: bool = False
) -> CvResult:
    """Train and score ``folds`` fold runs of ``recipe`` under ``run_dir``; returns the cv.json report."""
    require_recipe(recipe, "ember.cross_validate")
    if folds < 2:
        raise EmberError(f"--folds {folds}: cross-validation needs at least 2 folds (5 or 10 are usual).")
    if recipe.data.folds:
        raise EmberError(
            "This recipe already sets data.folds (it is one fold's recipe). Give ember cv the recipe "
            "without data.folds / data.fold; --folds sets them for every fold."
        )
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir("cv")
    with shared_process_group(resolve_device(recipe.train.device), recipe.parallel.timeout_s) as ctx:
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
        scores = []  # each fold's (metrics, samples)
        for i in range(folds):
            one = fold_recipe(recipe, folds, i, stratified)
            fold_dir = run_dir / f"fold_{i}"
            state = broadcast_object(fold_state(fold_dir, one) if ctx.is_main else None)
            if ctx.is_main:
                shown = "done, read back" if state == "done" else state
                logger.info("ember cv: fold %d/%d (%s) → %s", i + 1, folds, shown, fold_dir)
            if state == "done":
                saved = read_json(fold_dir / "eval.json", _REDO)
                scores.append((saved["metrics"], saved["samples"]))
                continue
            if state == "train":
                try:
                    train(one, run_dir=fold_dir, resume="auto")
                except KeyboardInterrupt:
                    raise KeyboardInterrupt(
                        f"cross-validation interrupted in fold {i}; finished folds and the fold's "
                        f"checkpoints are kept. Run the same ember cv command with --run-dir {run_dir} "
                        f"to go on."
                    ) from None
            scored = evaluate(fold_dir, split="val")
            scores.append((scored.metrics, scored.samples))
        metrics = [m for m, _ in scores]
        result = CvResult(
            recipe=str(run_dir / "recipe.yaml"),
            folds=folds,
            stratified=stratified,
            fold_metrics=metrics,
            fold_samples=[n for _, n in scores],
            summary=summarize(metrics),
            run_dir=str(run_dir),
        )
        if ctx.is_main:
            write_json_atomic(run_dir / "cv.json", result.to_dict())
        barrier()
    return result


def summarize(fold_metrics: list[dict]) -> dict:
    """Mean, sample standard deviation (ddof=1), min and max of each metric every fold has."""
    keys = [k for k in fold_metrics[0] if all(isinstance(m.get(k), (int, float)) for m in fold_metrics)]
    out = {}
    for key in keys:
        values = [float(m[key]) for m in fold_metrics]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "min": min(values), "max": max(values)}
    return out


def format_cv(report: CvResult, metrics: list[str] | None = None) -> str:
    """One row per fold, then mean ± std, for ``metrics`` (default: the headline ones; cv.json has all)."""
    keys = metrics or [k for k in HEADLINE if k in report.summary]
    lines = [
        f"{report.folds}-fold cross-validation{' (stratified)' if report.stratified else ''}: {report.run_dir}",
        "  " + f"{'fold':>6} {'samples':>8} " + " ".join(f"{k:>14}" for k in keys),
    ]
    for i, (m, n) in enumerate(zip(report.fold_metrics, report.fold_samples)):
        lines.append("  " + f"{i:>6} {n:>8} " + " ".join(f"{m[k]:>14.4f}" for k in keys))
    s = report.summary
    lines.append("  " + f"{'mean':>6} {'':>8} " + " ".join(f"{s[k]['mean']:>14.4f}" for k in keys))
    lines.append("  " + f"{'± std':>6} {'':>8} " + " ".join(f"{s[k]['std']:>14.4f}" for k in keys))
    return "\n".join(lines)
