"""``ember ensemble RUN... --method mean|vote|soup``: several runs as one model, scored beside each member.

mean: the members' probabilities averaged (classifiers, language models, seq2seq); the
ensemble's loss is -log of the mean probability of the target. For regression, the members'
predictions averaged, scored by mse, mae and r2. vote: each member's predicted
class is one vote, the majority wins, ties go to the class of higher mean probability
(classifiers; a vote has no probability, so no loss). soup: the members' weights averaged into
one model, written as a run directory that ``ember eval`` and ``ember generate`` read; only runs
that share an initialisation (the same ``model`` section and ``train.seed``) may be souped.

All members and the ensemble are scored on the same samples, the split built from the first
member's recipe, in one pass: each batch goes through every member once, with the metrics of
``ember eval`` (torchmetrics for classifiers); every member is held on the device at once, and
only one batch of outputs (a running log-sum of probabilities) is kept. Under several processes
each rank reads its own samples and the counts are summed, as in ``ember eval``. The report is written to
``<common parent of the runs>/ensemble-<method>.json``.

Example::

    report = ensemble(["runs/cv/fold_0", "runs/cv/fold_1", "runs/cv/fold_2"], method="mean", split="test")
    report.ensemble["metrics"]["accuracy"], [m["metrics"]["accuracy"] for m in report.members]
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ember.atomic import atomic_path, read_json, write_json_atomic, write_text_atomic
from ember.config import Recipe, load_recipe
from ember.data.spec import IGNORE_INDEX
from ember.errors import EmberError
from ember.eval.evaluate import SPLITS, ClassifierMetrics, _count, split_data
from ember.runs import read_model_info, require_existing_run, verify_weights, write_model_info
from ember.training.device import resolve_device
from ember.training.distributed import all_reduce_, barrier, setup, teardown
from ember.training.tasks import FORWARD, squared_error, summed_loss
from ember.training.validation import metrics_from_totals, regress_sums

METHODS = ("mean", "vote", "soup")
# Keys of the data section that may differ between members: which fold a cross-validation run
# held out (its test split is the same), and settings that change speed, not samples.
MEMBER_DATA_KEYS = ("folds", "fold", "stratified_folds", "num_workers", "verify", "prepare_workers")
# Columns of the table, and the metrics of the "ensemble vs members" line, per task.
COLUMNS = {
    "classify": ("loss", "accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted"),
    "lm": ("loss", "ppl", "bpb", "accuracy"),
    "seq2seq": ("loss", "ppl", "accuracy", "exact_match"),
    "clip": ("loss", "accuracy"),  # zero-shot with class prompts, else in-batch retrieval
    "regress": ("loss", "mse", "mae", "r2"),
}
HEADLINE = {
    "classify": ("accuracy", "f1_macro", "loss"),
    "lm": ("loss", "accuracy"),
    "seq2seq": ("exact_match", "accuracy", "loss"),
    "clip": ("accuracy", "loss"),
    "regress": ("r2", "mse", "mae"),
}
LOWER_IS_BETTER = {"loss", "ppl", "bpb", "mse", "mae"}


@dataclass(frozen=True)
class EnsembleResult:
    """What ``ensemble`` returns; ``to_dict()`` is the report file (ensemble-METHOD.json).

    ``members``: one ``{"run", "metrics"}`` per run, scored alone; ``ensemble``: the ensemble's
    ``{"metrics"}`` (classifiers also ``"per_class"`` and ``"confusion_matrix"``, as in ``evaluate``);
    ``gains[metric]``: ``{"vs_best", "vs_mean"}``, the ensemble minus the best and the mean member
    (positive = better); ``soup_run``: the soup's run directory (method soup), else None.
    """

    method: str
    split: str
    task: str
    samples: int
    runs: list[str]
    members: list[dict[str, Any]]
    ensemble: dict[str, Any]
    soup_run: str | None
    gains: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: every field, ``soup_run`` only for a soup."""
        return {k: v for k, v in asdict(self).items() if k != "soup_run" or v is not None}


def ensemble(
    runs: list[str | Path],
    method: str = "mean",
    split: str = "val",
    batch_size: int = 0,
    out: str | Path | None = None,
    device: str = "auto",
    max_batches: int = 0,
) -> EnsembleResult:
    """Score the ensemble of ``runs`` and each run alone on ``split``; rank 0 writes the report to ``out``."""
    runs = [Path(r) for r in runs]
    if method not in METHODS:
        raise EmberError(f"--method {method!r} is not an ensemble method; choose one of {', '.join(METHODS)}.")
    if split not in SPLITS:
        raise EmberError(f"--split {split!r} is not a split; choose one of {', '.join(SPLITS)}.")
    if len(runs) < 2:
        raise EmberError(f"An ensemble needs at least two runs, got {len(runs)}. Name every member run directory.")
    recipes, infos = zip(*(_member(run) for run in runs))
    check_members(runs, list(recipes), list(infos), method, split)
    out = report_path(runs, method, out)
    soup_dir = out.with_suffix("") if method == "soup" else None  # ensemble-soup.json beside ensemble-soup/
    if soup_dir:
        _check_soup_dir(soup_dir)
    first = recipes[0]
    ctx = setup("ddp", resolve_device(device if device != "auto" else first.train.device), first.parallel.timeout_s)
    try:
        if soup_dir:
            if ctx.is_main:
                write_soup(runs, soup_dir)
            barrier()
        report = _score(runs, list(recipes), method, split, batch_size, max_batches, ctx, soup_dir)
        if ctx.is_main:
            write_json_atomic(out, report.to_dict())
        barrier()
        return report
    finally:
        teardown()


def report_path(runs: list[str | Path], method: str, out: str | Path | None = None) -> Path:
    """Where the report goes: ``out``, or ensemble-<method>.json in the runs' common parent directory."""
    if out:
        return Path(out)
    common = Path(os.path.commonpath([os.path.abspath(r) for r in runs]))
    parent = common.parent if common in {Path(os.path.abspath(r)) for r in runs} else common
    return parent / f"ensemble-{method}.json"


def _member(run: Path) -> tuple[Recipe, dict]:
    require_existing_run(run, "ember ensemble")
    if not (run / "recipe.yaml").is_file() or not (run / "model.json").is_file():
        raise EmberError(
            f"{run} is not a finished run directory (it needs recipe.yaml and model.json, written when training "
            f"ends). Name run directories written by ember train or ember cv, or finish the run with --resume auto."
        )
    return load_recipe(run / "recipe.yaml"), read_model_info(run)


def check_members(runs: list[Path], recipes: list[Recipe], infos: list[dict], method: str, split: str) -> None:
    """Refuse members that cannot be compared on the same samples, or combined by ``method``."""
    first = _data_settings(recipes[0])
    for run, recipe, info in zip(runs[1:], recipes[1:], infos[1:]):
        theirs = _data_settings(recipe)
        if theirs != first or info["data"] != infos[0]["data"]:
            keys = sorted(k for k in first.keys() | theirs.keys() if first.get(k) != theirs.get(k)) or ["the data spec"]
            raise EmberError(
                f"{run} was trained on other data than {runs[0]} (differing: {', '.join(keys)}). Members are scored "
                f"on the same samples, built from the first member's recipe: ensemble runs of one data set (they may "
                f"differ only in data.fold)."
            )
    folded = [run for run, recipe in zip(runs, recipes) if getattr(recipe.data, "folds", 0)]
    if split == "val" and folded:
        raise EmberError(
            f"{folded[0]} is a cross-validation fold run: its val split is its own held-out fold, a different one for "
            f"each fold run, and each trained on the others' folds. Score fold runs with --split test (prepare "
            f"the data with data.test_fraction > 0 so a test split exists)."
        )
    task = infos[0]["data"]["task"]
    if method == "vote" and task != "classify":
        raise EmberError(
            f"--method vote counts each member's predicted class, which needs classifiers; {runs[0]} is a {task} "
            f"model, whose predictions are "
            f"{'scores against prompts or captions' if task == 'clip' else 'token sequences'}. Use --method mean "
            f"(average probabilities) or soup."
        )
    if method == "soup":
        quantized = [run for run, info in zip(runs, infos) if "quantization" in info]
        if quantized:
            raise EmberError(
                f"{quantized[0]} is a quantised run: its int8 weights and scales cannot be averaged. "
                f"Soup the float runs, then quantise the soup (ember quantize SOUP_RUN)."
            )
        _check_shared_init(runs, recipes)


def _data_settings(recipe: Recipe) -> dict:
    return {k: v for k, v in recipe.data.model_dump(mode="json").items() if k not in MEMBER_DATA_KEYS}


def _check_shared_init(runs: list[Path], recipes: list[Recipe]) -> None:
    # In ember the initial weights are a function of the model section and train.seed alone.
    first = (recipes[0].model.model_dump(mode="json"), recipes[0].train.seed)
    for run, recipe in zip(runs[1:], recipes[1:]):
        if (recipe.model.model_dump(mode="json"), recipe.train.seed) != first:
            raise EmberError(
                f"--method soup averages weights, which only works for runs that started from the same initial "
                f"weights; {run} and {runs[0]} differ in their model section or train.seed ({recipe.train.seed} vs "
                f"{first[1]}). Train the members with one model section and one train.seed (vary max_steps, lr or "
                f"batch_size instead), or use --method mean or vote."
            )


def write_soup(runs: list[Path], soup_dir: Path) -> Path:
    """A run directory whose weights are the uniform average of ``runs``' (recipe from the first run)."""
    import safetensors.torch

    first = runs[0]
    infos = [read_model_info(run) for run in runs]
    # The soup reads the members' files itself, not through load_trained_model: each is checked here.
    metadata = [verify_weights(run, info) for run, info in zip(runs, infos)][0]
    state = average_weights([run / "model.safetensors" for run in runs])
    soup_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(soup_dir / "model.safetensors") as tmp:
        safetensors.torch.save_file(state, str(tmp), metadata=metadata)
    for name in ("recipe.yaml", "tokenizer.json"):  # what ember eval and ember generate read besides the weights
        if (first / name).is_file():
            write_text_atomic(soup_dir / name, (first / name).read_text())
    info = {k: v for k, v in infos[0].items() if k not in ("step", "metrics")}  # the first member's, not the soup's
    write_model_info(soup_dir, {**info, "soup_of": [str(r) for r in runs]})
    return soup_dir


def _check_soup_dir(soup_dir: Path) -> None:
    info = soup_dir / "model.json"
    is_soup = info.is_file() and "soup_of" in read_json(info, "Give --out another path, e.g. ensemble-soup.json.")
    if (soup_dir / "recipe.yaml").is_file() and not is_soup:
        raise EmberError(
            f"{soup_dir} holds a run that is not a soup, and the soup would be written over it (a soup's run "
            f"directory is its report's path without .json). Give --out another path, e.g. ensemble-soup.json."
        )


def average_weights(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The mean of each floating tensor over ``paths`` (safetensors files); other tensors from the first."""
    import safetensors.torch

    total = safetensors.torch.load_file(paths[0])
    shapes = {k: (t.shape, t.dtype) for k, t in total.items()}
    total = {
        k: t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t for k, t in total.items()
    }
    for path in paths[1:]:  # one member in memory at a time
        state = safetensors.torch.load_file(path)
        if {k: (t.shape, t.dtype) for k, t in state.items()} != shapes:
            raise EmberError(
                f"{path} holds other parameter names or shapes than {paths[0]}; a soup needs members "
                f"of one architecture. Check that both runs finished with the same model section."
            )
        for k, t in state.items():
            if t.is_floating_point():
                total[k] += t
    return {k: (t / len(paths)).to(shapes[k][1]) if t.is_floating_point() else t for k, t in total.items()}


@torch.no_grad()
def _score(
    runs: list[Path],
    recipes: list[Recipe],
    method: str,
    split: str,
    batch_size: int,
    max_batches: int,
    ctx,
    soup_dir: Path | None,
) -> EnsembleResult:
    from ember.runs import load_trained_model
    from ember.training.precision import autocast_factory

    first = recipes[0]
    batch_size = batch_size or first.eval.batch_size or first.train.batch_size
    data, loader = split_data(first, split, batch_size, ctx)
    models = [load_trained_model(run, str(ctx.device))[0] for run in runs]
    autocasts = [autocast_factory(r.train.precision, ctx.device) for r in recipes]
    soup = load_trained_model(soup_dir, str(ctx.device))[0] if soup_dir else None
    task = data.spec.task
    bytes_per_token = data.bytes_per_token(split)
    tallies = [_tally(task, data, ctx.device, bytes_per_token) for _ in runs]
    combined = _tally(task, data, ctx.device, bytes_per_token, loss=method != "vote")
    batches = loader.epoch_batches(ctx.device)
    for batch in itertools.islice(batches, max_batches) if max_batches else batches:
        scores, targets = _members_on(batch, task, models, autocasts, tallies, method)
        if soup is not None:
            with autocasts[0]():
                scores = FORWARD[task](soup, batch)[0].float()
        combined.update(scores, targets)
    members = [{"run": str(run), "metrics": tally.report()["metrics"]} for run, tally in zip(runs, tallies)]
    scores = combined.report()
    return EnsembleResult(
        method=method,
        split=split,
        task=task,
        samples=_count(loader, max_batches),
        runs=[str(r) for r in runs],
        members=members,
        ensemble=scores,
        soup_run=str(soup_dir) if soup_dir else None,
        gains=gains(task, members, scores["metrics"]),
    )


def _members_on(batch: dict, task: str, models: list, autocasts: list, tallies: list, method: str):
    """Score every member on ``batch``; return the ensemble's scores (mean: the log of the mean
    probability; vote: the votes plus half the mean probability, which breaks ties and never
    outweighs one vote) and the targets."""
    lse = votes = targets = total = None
    for model, autocast, tally in zip(models, autocasts, tallies):
        with autocast():
            logits, targets = FORWARD[task](model, batch)
        logits = logits.float()
        tally.update(logits, targets)
        if method == "soup":
            continue  # the soup model scores itself
        if task == "regress":  # the members' predictions averaged
            total = logits if total is None else total + logits
            continue
        logp = logits.log_softmax(-1)
        lse = logp if lse is None else torch.logaddexp(lse, logp)  # log of the summed probabilities, stably
        if method == "vote":
            votes = torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)) + (0 if votes is None else votes)
    if total is not None:
        return total / len(models), targets
    if lse is None:
        return None, targets
    mean_logp = lse - math.log(len(models))
    return (mean_logp if votes is None else votes + 0.5 * mean_logp.exp()), targets


def _tally(task: str, data, device: torch.device, bytes_per_token: float, loss: bool = True):
    if task == "classify":
        return ClassifierMetrics(data.spec.num_classes, device, loss=loss)
    if task == "regress":
        return RegressMetrics(device)
    return TokenMetrics(task, device, bytes_per_token)


class RegressMetrics:
    """A regression's summed squared error, count and [|error|, y, y²] sums, as ``ember.training.validation``
    keeps them: mse, mae and r2 exact over batches and ranks."""

    def __init__(self, device: torch.device) -> None:
        self.totals = torch.zeros(8, device=device, dtype=torch.float64)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        outputs = outputs.reshape(targets.shape)
        self.totals[0] += squared_error(outputs, targets).double()
        self.totals[2] += targets.numel()
        self.totals[5:] += regress_sums(outputs, targets)

    def report(self) -> dict:
        return {"metrics": metrics_from_totals(all_reduce_(self.totals.clone()), "regress")}


class TokenMetrics:
    """A language or seq2seq model's summed loss, correct and counted targets, exact sequences: the sums
    of ``ember.training.validation`` fed batch by batch, summed over ranks by ``report``."""

    def __init__(self, task: str, device: torch.device, bytes_per_token: float = 1.0) -> None:
        self.task, self.bytes_per_token = task, bytes_per_token
        self.totals = torch.zeros(5, device=device, dtype=torch.float64)

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        mask = targets != IGNORE_INDEX
        hit = (scores.argmax(-1) == targets) & mask
        seq2seq = self.task == "seq2seq"
        exact = (hit | ~mask).all(dim=-1).sum() if seq2seq else torch.zeros((), device=mask.device)
        self.totals += torch.stack(
            [
                summed_loss(scores.float(), targets).double(),
                hit.sum().double(),
                mask.sum().double(),
                exact.double(),
                torch.tensor(float(targets.size(0) if seq2seq else 0), device=mask.device).double(),
            ]
        )

    def report(self) -> dict:
        return {"metrics": metrics_from_totals(all_reduce_(self.totals.clone()), self.task, self.bytes_per_token)}


def gains(task: str, members: list[dict[str, Any]], metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """The ensemble's headline ``metrics`` minus the best member's and the members' mean (positive = better)."""
    out = {}
    for metric in HEADLINE[task]:
        if metric not in metrics:
            continue  # a vote has no loss
        values = [m["metrics"][metric] for m in members]
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        best = max(values, key=lambda v: sign * v)
        ours = metrics[metric]
        out[metric] = {"vs_best": sign * (ours - best), "vs_mean": sign * (ours - sum(values) / len(values))}
    return out


def format_ensemble(report: EnsembleResult) -> str:
    """Each member's metrics, the ensemble's, and a line: the ensemble against the best and the mean member."""
    columns = COLUMNS[report.task]
    names = [m["run"] for m in report.members] + [f"ensemble ({report.method})"]
    width, cell = max(len(n) for n in names), max(len(c) for c in columns) + 1
    rows = [m["metrics"] for m in report.members] + [report.ensemble["metrics"]]
    lines = [
        f"{len(report.members)} runs, method {report.method}, split {report.split}, {report.samples:,} samples",
        f"  {'run':<{width}}" + "".join(f"{c:>{cell}}" for c in columns),
    ]
    for name, metrics in zip(names, rows):
        cells = (f"{metrics[c]:>{cell}.4f}" if c in metrics else f"{'-':>{cell}}" for c in columns)
        lines.append(f"  {name:<{width}}" + "".join(cells))
    shown = report.gains.items()
    lines.append(
        "  ensemble vs best member / mean member (positive = better): "
        + ", ".join(f"{k} {g['vs_best']:+.4f} / {g['vs_mean']:+.4f}" for k, g in shown)
    )
    if report.soup_run:
        lines.append(f"  the soup is a run directory: {report.soup_run} (ember eval / ember generate read it)")
    return "\n".join(lines)
