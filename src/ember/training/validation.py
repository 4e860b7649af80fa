"""Validation during training: exact sums over the whole split (or its first batches).

Every metric is a sum over counted targets divided by their number, so a
smaller last batch weighs exactly as much as its samples. Random batch rewrites (the
masks and views of self-supervised objectives) run under a fixed seed on a forked
generator: every evaluation scores the same masks and views, and training's own random
stream is left where it was.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable

import torch
from torch import nn

from ember.data.loader import BatchLoader
from ember.data.spec import IGNORE_INDEX
from ember.models.modes import evaluating
from ember.training.distributed import all_reduce_
from ember.training.tasks import FORWARD, task_loss

VALIDATION_SEED = 0


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: BatchLoader,
    task: str,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    max_batches: int = 0,
    bytes_per_token: float = 1.0,
    reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_,
    lockstep: bool = False,
) -> dict[str, float]:
    """Loss and accuracy (plus perplexity, bits per byte, exact match where they apply).

    ``reduce`` sums a tensor over the ranks that hold different samples. ``lockstep``: the
    model is sharded (FSDP, tensor parallel), so every rank must run as many forward passes
    as the busiest; ranks with fewer batches run their last one again and discard it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VALIDATION_SEED)
        totals = _sums(model, loader, task, device, autocast, max_batches, lockstep)
    # Each rank saw its own samples, each exactly once: the sums over ranks are the exact totals.
    return metrics_from_totals(reduce(totals), task, bytes_per_token)


def _sums(
    model: nn.Module, loader: BatchLoader, task: str, device: torch.device, autocast, max_batches: int, lockstep: bool
) -> torch.Tensor:
    """This rank's [loss, correct, counted targets, exact sequences, sequences, |error|, y, y²] over its
    batches (the last three: regress's sums, zeros for the other tasks)."""
    n_batches = min(max_batches or loader.batches_per_epoch, loader.batches_per_epoch)
    with evaluating(model):  # each submodule back in its own mode after (a frozen backbone stays in eval)
        return _eval_sums(model, loader, task, device, autocast, n_batches, lockstep)


def _eval_sums(
    model: nn.Module, loader: BatchLoader, task: str, device: torch.device, autocast, n_batches: int, lockstep: bool
) -> torch.Tensor:
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = torch.zeros((), device=device, dtype=torch.int64)
    exact = torch.zeros((), device=device, dtype=torch.int64)
    sequences = 0
    regress = torch.zeros(3, device=device, dtype=torch.float64)
    batch = None
    for batch in itertools.islice(loader.epoch_batches(device), n_batches):
        with autocast():
            logits, targets = FORWARD[task](model, batch)
        mask = targets != IGNORE_INDEX
        loss_sum += task_loss(task, logits.float(), targets).double()
        if task == "regress":  # no hits: mse, mae and r2 come from the sums
            mask = torch.ones_like(targets, dtype=torch.bool)
            regress += regress_sums(logits, targets)
        no_hits = task in ("loss", "regress")  # a module's own loss, or a number: nothing is hit or missed
        hit = mask & False if no_hits else (logits.argmax(-1) == targets) & mask
        correct += hit.sum()
        count += mask.sum()
        if task == "seq2seq":
            exact += (hit | ~mask).all(dim=-1).sum()
            sequences += targets.size(0)
    if lockstep:
        spare = batch if batch is not None else loader.padding_batch(device)
        for _ in range(int(all_reduce_(torch.tensor(n_batches, device=device), "max").item()) - n_batches):
            with autocast():
                FORWARD[task](model, spare)
    return torch.stack(
        [
            loss_sum,
            correct.double(),
            count.double(),
            exact.double(),
            torch.tensor(float(sequences), device=device, dtype=torch.float64),
            *regress,
        ]
    )


def regress_sums(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[sum |error|, sum y, sum y²] of a batch in float64: with the summed squared error (the loss) and
    the count, mse, mae and r2 follow exactly from sums over batches and ranks."""
    y = targets.double().reshape(-1)
    err = outputs.double().reshape(-1) - y
    return torch.stack([err.abs().sum(), y.sum(), (y * y).sum()])


def metrics_from_totals(totals: torch.Tensor, task: str, bytes_per_token: float = 1.0) -> dict[str, float]:
    """Metrics from the summed [loss, correct, counted targets, exact sequences, sequences] (+ regress's
    [|error|, y, y²]: r2 = 1 - SSE / SST, SST = sum y² - (sum y)² / n)."""
    loss_sum, correct, count, exact, sequences, *regress = totals.tolist()
    n = max(1.0, count)
    loss = loss_sum / n
    if task == "regress":
        abs_sum, y_sum, y2_sum = regress
        sst = y2_sum - y_sum * y_sum / n
        r2 = 1.0 - loss_sum / sst if sst > 0 else float("nan")  # constant targets: r2 undefined
        return {"loss": loss, "mse": loss, "mae": abs_sum / n, "r2": r2}
    metrics = {"loss": loss} if task == "loss" else {"loss": loss, "accuracy": correct / n}
    if task in ("lm", "seq2seq", "mlm"):
        metrics["ppl"] = math.exp(min(loss, 50.0))
    if task == "lm":
        metrics["bpb"] = loss / math.log(2) / bytes_per_token  # nats per token → bits per byte of text
    if task == "seq2seq":
        metrics["exact_match"] = exact / max(1.0, sequences)
    return metrics
