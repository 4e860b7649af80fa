"""What a task feeds the model and what it scores: one small function each.

A task's ``forward`` returns (logits, targets); the loss is always summed over
the targets — cross-entropy over those that are not ``IGNORE_INDEX``, or for
``regress`` the squared error of every sample's float target — so the loop can
divide by the true number of targets in the whole optimiser step — that is
what makes gradient accumulation exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ember.data.spec import IGNORE_INDEX
from ember.errors import EmberError


def _x_to_y(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return model(batch["x"]), batch["y"]


def _regress(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One number per sample: a model's [B, 1] output is squeezed to [B]."""
    out = model(batch["x"])
    return (out.squeeze(-1) if out.dim() == 2 and out.size(-1) == 1 else out), batch["y"]


def _seq2seq(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return model(batch["src"], batch["tgt_in"]), batch["tgt_out"]


def _clip(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Training: each image scored against every caption of the batch and each caption against
    every image (the symmetric loss), the true pair the target. With class ``prompts``
    (validation): each image against one prompt per class, its label the target — zero-shot."""
    images, texts, scale = model(batch["x"], batch["prompts"] if "prompts" in batch else batch["text"])
    scores = scale * images @ texts.T
    if "prompts" in batch:
        return scores, batch["y"]
    pair = torch.arange(len(scores), device=scores.device)
    return torch.cat([scores, scores.T]), torch.cat([pair, pair])


def _own_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A module that scores itself: it takes the whole batch and returns its loss summed over the
    samples; every sample is one target (``ember.train(recipe, model=module)``, model.task=loss)."""
    return model(batch), targets_of("loss", batch)


FORWARD: dict[str, Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]] = {
    "lm": _x_to_y,
    "classify": _x_to_y,
    "regress": _regress,
    "seq2seq": _seq2seq,
    "mlm": _x_to_y,  # the objective's transform masked x and set y (ember.objectives)
    "simclr": _x_to_y,  # x: 2B views, y: each view's twin; the model returns view-by-view scores
    "clip": _clip,
    "loss": _own_loss,
}

# Metrics each task's validation reports; eval.metric must be one of them.
METRICS: dict[str, tuple[str, ...]] = {
    "lm": ("loss", "ppl", "bpb", "accuracy"),
    "classify": ("loss", "accuracy"),
    "regress": ("loss", "mse", "mae", "r2"),  # loss = mse: the mean squared error in the target's units²
    "seq2seq": ("loss", "ppl", "accuracy", "exact_match"),
    "mlm": ("loss", "ppl", "accuracy"),  # over the masked positions
    "simclr": ("loss", "accuracy"),  # accuracy: the twin view scores highest
    "clip": ("loss", "accuracy"),  # validation: zero-shot classification with the class prompts
    "loss": ("loss",),  # a module scoring itself: nothing else is known about it
}


# Metrics where higher is better; eval.mode "auto" follows this.
MAXIMISED = {"accuracy", "exact_match", "r2"}


def metric_mode(metric: str, mode: str) -> str:
    """ "min" or "max" for early stopping; "auto" picks by the metric's meaning."""
    if mode != "auto":
        return mode
    return "max" if metric in MAXIMISED else "min"


def targets_of(task: str, batch: dict) -> torch.Tensor:
    if task == "loss":  # one (unnamed) target per sample
        return torch.zeros(len(next(iter(batch.values()))), dtype=torch.long, device=next(iter(batch.values())).device)
    return batch["tgt_out"] if task == "seq2seq" else batch["y"]


def count_targets(targets: torch.Tensor) -> torch.Tensor:
    """Number of targets that count in the loss (a tensor: no device sync). Float targets (regress)
    all count: one per sample, whatever its value."""
    if targets.is_floating_point():
        return torch.ones_like(targets, dtype=torch.long).sum()
    return (targets != IGNORE_INDEX).sum()


def task_loss(task: str, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The micro-batch's summed loss: ``summed_loss``, or for task ``loss`` what the module returned."""
    if task == "loss":
        if logits.dim() != 0:
            raise EmberError(
                f"A module with model.task=loss returns its loss summed over the batch's samples, one "
                f"number; it returned a tensor of shape {list(logits.shape)}. Return loss.sum() (ember "
                f"divides by the samples of the whole optimiser step itself)."
            )
        return logits
    if logits.dim() == 0:
        raise EmberError(
            f"The model returned one number for task {task}, where logits per "
            f"{'sample' if task == 'classify' else 'target'} are needed. A module that computes its own "
            f"loss is model.task=loss."
        )
    if task == "regress":
        return squared_error(logits, targets)
    return summed_loss(logits, targets, label_smoothing)


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error summed (not averaged) over the samples; outputs [B] (or [B, 1]) against targets [B]."""
    if outputs.shape != targets.shape:
        outputs = outputs.reshape(targets.shape) if outputs.numel() == targets.numel() else outputs
    if outputs.shape != targets.shape:
        raise EmberError(
            f"A regression model returns one number per sample ([B] or [B, 1]); it returned shape "
            f"{list(outputs.shape)} for {targets.numel()} target(s). Give the model one output unit."
        )
    return (outputs.float() - targets.float()).pow(2).sum()


def summed_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy summed (not averaged) over the counted targets."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="sum",
    )


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T² (so its
    gradients keep their size as T changes), summed over the counted targets like ``summed_loss``."""
    t = temperature
    log_student = F.log_softmax(student.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / t, dim=-1)
    per_target = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return (per_target * (targets != IGNORE_INDEX)).sum() * t * t
