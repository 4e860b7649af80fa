"""``ember eval RUN``: the full metrics of a finished run on one split, written to RUN/eval.json.

Classifiers get accuracy, precision, recall and F1 (macro, micro and weighted), the
confusion matrix and a per-class table, computed with torchmetrics; every model gets
its loss (and perplexity and bits per byte for language models). A seq2seq model also decodes the
split's sources (greedy, or ``beam``; the first ``decode_samples``): BLEU and exact match of its
answers (``ember.eval.decoded``). The split is streamed
batch by batch: logits are never all kept, only torchmetrics' per-class counts. Under
several processes (``ember eval RUN --nproc 2`` or torchrun) each rank reads its own
samples, each exactly once with nothing padded, and the counts are summed over ranks, so
the figures equal one process's.

Example::

    report = evaluate("runs/cnn")
    report.metrics["f1_macro"], report.per_class[0]["recall"]
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ember.atomic import write_json_atomic
from ember.config import load_recipe
from ember.data.build import Data, build_data
from ember.data.loader import BatchLoader
from ember.data.spec import IGNORE_INDEX
from ember.errors import EmberError
from ember.runs import load_trained_model, require_existing_run
from ember.training.device import resolve_device
from ember.training.distributed import DistContext, all_reduce_, barrier, setup, teardown
from ember.training.precision import autocast_factory
from ember.training.tasks import FORWARD, summed_loss
from ember.training.validation import validate

SPLITS = ("val", "train", "test")
AVERAGES = ("macro", "micro", "weighted")


@dataclass(frozen=True)
class EvalResult:
    """What ``evaluate`` returns; ``to_dict()`` is RUN/eval.json.

    ``metrics``: the loss, and for a classifier accuracy, precision, recall and F1 (macro, micro,
    weighted), for a language model perplexity and bits per byte. ``per_class`` (one
    ``{"class", "precision", "recall", "f1", "support"}`` per class, and ``"name"`` after ``"class"``
    when the data names its classes) and ``confusion_matrix``
    (rows: true class, columns: predicted): classifiers only, None otherwise.
    """

    run: str
    split: str
    task: str
    samples: int
    metrics: dict[str, float]
    per_class: list[dict[str, Any]] | None = None
    confusion_matrix: list[list[int]] | None = None
    decoding: dict[str, Any] | None = None  # seq2seq: {"samples": decoded, "beam": N} of bleu, decoded_exact_match

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (eval.json): every field, less the classifier tables of other models."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def evaluate(
    run_dir: str | Path,
    split: str = "val",
    batch_size: int = 0,
    device: str = "auto",
    max_batches: int = 0,
    data=None,
    beam: int = 1,
    decode_samples: int = 1000,
) -> EvalResult:
    """Metrics of ``run_dir``'s final model on ``split``; written to RUN/eval.json by rank 0.
    ``data`` (a DataConfig of the same shape) scores it on other data instead, e.g. an earlier
    task's (ember continue); that report is returned, not written. A seq2seq model's answers are
    decoded with ``beam`` (1 = greedy) for the first ``decode_samples`` samples (0 = all)."""
    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise EmberError(f"--split {split!r} is not a split; choose one of {', '.join(SPLITS)}.")
    if beam < 1 or decode_samples < 0:
        raise EmberError(f"beam={beam}, decode_samples={decode_samples}: beam is at least 1, decode_samples 0 or more.")
    if batch_size < 0 or max_batches < 0:
        raise EmberError(
            f"batch_size={batch_size}, max_batches={max_batches}: both count batches and must be 0 or "
            f"more (0: the recipe's eval batch size, the whole split)."
        )
    require_existing_run(run_dir, "ember eval")
    recipe = load_recipe(run_dir / "recipe.yaml") if (run_dir / "recipe.yaml").is_file() else None
    if recipe is None:
        raise EmberError(f"{run_dir} has no recipe.yaml: point ember eval at a run directory written by ember train.")
    ctx = setup("ddp", resolve_device(device if device != "auto" else recipe.train.device), recipe.parallel.timeout_s)
    try:
        batch_size = batch_size or recipe.eval.batch_size or recipe.train.batch_size
        if data is not None:
            recipe = recipe.model_copy(update={"data": data})
        decode = (beam, decode_samples)
        return _evaluate(run_dir, recipe, split, batch_size, max_batches, ctx, write=data is None, decode=decode)
    finally:
        teardown()


def _evaluate(
    run_dir: Path,
    recipe,
    split: str,
    batch_size: int,
    max_batches: int,
    ctx: DistContext,
    write: bool = True,
    decode: tuple[int, int] = (1, 1000),
) -> EvalResult:
    model, info = load_trained_model(run_dir, str(ctx.device))
    data, loader = split_data(recipe, split, batch_size, ctx)
    autocast = autocast_factory(recipe.train.precision, ctx.device)
    task = data.spec.task
    if task == "classify" or (task == "clip" and data.spec.num_classes):  # clip: zero-shot, one prompt per class
        report = _classifier_report(model, loader, data.spec.num_classes, ctx.device, autocast, max_batches, task)
        report["per_class"] = with_names(report["per_class"], data.spec.class_names)
    else:
        report = {
            "metrics": validate(model, loader, task, ctx.device, autocast, max_batches, data.bytes_per_token(split))
        }
    if task == "seq2seq":  # the answers the model writes, not only its teacher-forced guesses
        from ember.eval.decoded import decoded_metrics

        with autocast():
            decoded = decoded_metrics(model, loader, data.spec, limit=decode[1], beam=decode[0])
        report["decoding"] = {"samples": decoded.pop("samples"), "beam": decode[0]}
        report["metrics"].update(decoded)
    result = EvalResult(run=str(run_dir), split=split, task=task, samples=_count(loader, max_batches), **report)
    if ctx.is_main and write:
        write_json_atomic(run_dir / "eval.json", result.to_dict())
    barrier()
    return result


def split_data(recipe, split: str, batch_size: int, ctx: DistContext) -> tuple[Data, BatchLoader]:
    """The recipe's data on this rank, as scored (its own seed and objective), and the loader of ``split``."""
    data = build_data(
        recipe.data,
        batch_size,
        batch_size,
        seed=recipe.train.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        objective=recipe.objective,
    )
    return data, _split_loader(data, split, batch_size, recipe, ctx)


def _split_loader(data, split: str, batch_size: int, recipe, ctx: DistContext) -> BatchLoader:
    if split == "val":
        return data.val
    if split == "test":
        if data.test is None:
            raise EmberError(
                f"The {recipe.data.name} data of this run has no test split (data.test_fraction=0 when it was "
                f"prepared). Train again on data with one: --set data.test_fraction=0.1 for a bundled or generated "
                f"set, or `ember data prepare ... --test-fraction 0.1` for data.name=prepared; or evaluate on --split val."
            )
        return data.test
    # The training split once through, in order, every sample exactly once (training drops a remainder).
    # Validation's transform: normalisation without augmentation.
    return BatchLoader(
        data.train.dataset,
        batch_size,
        shuffle=False,
        seed=0,
        drop_last=False,
        rank=ctx.rank,
        world_size=ctx.world_size,
        transform=data.val.transform,
    )


def _count(loader: BatchLoader, max_batches: int) -> int:
    n = torch.tensor(min(loader.num_samples, max_batches * loader.batch_size) if max_batches else loader.num_samples)
    return int(all_reduce_(n).item())


@torch.no_grad()
def _classifier_report(
    model,
    loader: BatchLoader,
    num_classes: int,
    device: torch.device,
    autocast,
    max_batches: int,
    task: str = "classify",
) -> dict:
    tally = ClassifierMetrics(num_classes, device)
    model.eval()
    batches = loader.epoch_batches(device)
    for batch in itertools.islice(batches, max_batches) if max_batches else batches:
        with autocast():
            logits, y = FORWARD[task](model, batch)  # clip: each image's scores against the class prompts
        tally.update(logits, y)
    return tally.report()


class ClassifierMetrics:
    """One classifier's torchmetrics counts and summed loss over a split, fed batch by batch.

    ``update`` takes logits or log-probabilities (any scores whose argmax is the prediction
    when ``loss=False``, e.g. an ensemble's votes); ``report`` sums the counts over ranks.
    """

    def __init__(self, num_classes: int, device: torch.device, loss: bool = True) -> None:
        from torchmetrics import MetricCollection
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassConfusionMatrix,
            MulticlassF1Score,
            MulticlassPrecision,
            MulticlassRecall,
        )

        per_average = {
            f"{name}_{avg}": cls(num_classes, average=avg)
            for avg in AVERAGES
            for name, cls in (
                ("precision", MulticlassPrecision),
                ("recall", MulticlassRecall),
                ("f1", MulticlassF1Score),
            )
        }
        self.metrics = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(num_classes, average="micro"),
                **per_average,
                "per_class_precision": MulticlassPrecision(num_classes, average="none"),
                "per_class_recall": MulticlassRecall(num_classes, average="none"),
                "per_class_f1": MulticlassF1Score(num_classes, average="none"),
                "confusion": MulticlassConfusionMatrix(num_classes),
            }
        ).to(device)
        self.num_classes, self.loss = num_classes, loss
        self.totals = torch.zeros(2, device=device, dtype=torch.float64)  # summed loss, counted targets

    def update(self, scores: torch.Tensor, y: torch.Tensor) -> None:
        keep = y != IGNORE_INDEX
        if self.loss:
            self.totals[0] += summed_loss(scores.float(), y).double()
        self.totals[1] += keep.sum()
        self.metrics.update(scores.argmax(-1)[keep], y[keep])

    def report(self) -> dict:
        values = self.metrics.compute()  # torchmetrics sums each rank's counts when a process group is up
        totals = all_reduce_(self.totals.clone())
        confusion = values.pop("confusion").long()
        per_class = [
            {
                "class": c,
                "precision": values["per_class_precision"][c].item(),
                "recall": values["per_class_recall"][c].item(),
                "f1": values["per_class_f1"][c].item(),
                "support": int(confusion[c].sum().item()),
            }
            for c in range(self.num_classes)
        ]
        scalars = {k: v.item() for k, v in values.items() if not k.startswith("per_class")}
        loss = {"loss": (totals[0] / totals[1].clamp(min=1)).item()} if self.loss else {}
        return {"metrics": {**loss, **scalars}, "per_class": per_class, "confusion_matrix": confusion.tolist()}


def with_names(per_class: list[dict[str, Any]], names: tuple[str, ...]) -> list[dict[str, Any]]:
    """``per_class`` rows with each class's ``"name"`` after its number, when the data names its classes."""
    if not names:
        return per_class
    return [
        {"class": r["class"], "name": names[r["class"]], **{k: v for k, v in r.items() if k != "class"}}
        for r in per_class
    ]


def format_report(report: EvalResult) -> str:
    """The report as plain-text tables: the metrics, then per class and the confusion matrix."""
    lines = [f"{report.run}  split {report.split}  {report.samples:,} samples"]
    lines += [f"  {k:<18} {v:.4f}" for k, v in report.metrics.items()]
    if report.decoding is not None:
        how = "greedy" if report.decoding["beam"] == 1 else f"beam search ({report.decoding['beam']})"
        lines.append(f"  bleu, decoded_exact_match: {report.decoding['samples']:,} samples decoded, {how}")
    if report.per_class is not None:
        lines += format_class_tables(report.per_class, report.confusion_matrix)
    return "\n".join(lines)


def format_class_tables(per_class: list[dict[str, Any]], confusion: list[list[int]]) -> list[str]:
    """The per-class table and the confusion matrix, labelled by class name when the rows carry one."""
    names = [str(r.get("name", r["class"])) for r in per_class]
    w = max([5, *map(len, names)])
    lines = [f"  {'class':>{w}} {'precision':>10} {'recall':>8} {'f1':>8} {'support':>8}"]
    lines += [
        f"  {name:>{w}} {r['precision']:>10.4f} {r['recall']:>8.4f} {r['f1']:>8.4f} {r['support']:>8}"
        for name, r in zip(names, per_class)
    ]
    lines.append("  confusion matrix (rows: true class, columns: predicted)")
    if not any("name" in r for r in per_class):
        return lines + ["  " + " ".join(f"{n:>5}" for n in row) for row in confusion]
    cell = max([5, *(len(str(n)) for row in confusion for n in row), *(min(len(n), 12) for n in names)])
    lines.append("  " + " " * w + " " + " ".join(f"{n[:cell]:>{cell}}" for n in names))
    return lines + [f"  {name:>{w}} " + " ".join(f"{n:>{cell}}" for n in row) for name, row in zip(names, confusion)]
