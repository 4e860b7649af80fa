"""Self-supervised objectives: what the model is asked to predict when the data has no labels for it.

The recipe's ``objective`` section turns the data's own task into another one, by
rewriting each batch on the training device (the data section is unchanged):

- ``mlm`` (masked language modelling, BERT-style) on token data: ``mask_prob`` of the
  positions are chosen; of those 80 % are replaced by a mask token (id = vocabulary size,
  one row the encoder adds), 10 % by a random token and 10 % are kept; the targets are the
  original tokens at the chosen positions and ignored elsewhere.
- ``simclr`` (contrastive image pre-training, Chen et al. 2020) on images: every image is
  augmented twice with the data section's augmentations; the model embeds the 2B views
  and scores each against the other 2B - 1; the target of view i is its twin. The loss is
  the cross-entropy over those scores (NT-Xent), the "accuracy" how often the twin scores
  highest. Negatives are the other views of the same micro-batch on the same rank.

Both keep the trainer's contract: a batch's ``(logits, targets)``, the loss summed over
counted targets. Random draws come from torch's global CPU generator, which checkpoints
save, so a resumed run draws the same masks and views; validation runs under a fixed seed
(``ember.training.validation``), so its masks and views are the same at every evaluation.

The image-text objective (CLIP-style) needs no rewriting: the ``digits-captions`` data
poses it (``ember.data.captions``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from ember.data.spec import IGNORE_INDEX
from ember.errors import EmberError
from ember.schema import RecipeModel

if TYPE_CHECKING:
    from ember.data.build import Datasets
    from ember.data.loader import Batch


class ObjectiveConfig(RecipeModel):
    name: Literal["auto", "mlm", "simclr"] = Field(
        "auto",
        description="auto: the data's own task (lm, classify, seq2seq; clip for digits-captions); "
        "mlm: masked language modelling (model encoder); simclr: contrastive image pre-training (model cnn or vit)",
    )
    mask_prob: float = Field(0.15, gt=0, lt=1, description="mlm: share of the positions the model must restore")
    temperature: float = Field(0.2, gt=0, le=10, description="simclr: the similarities are divided by it")
    proj_dim: int = Field(64, ge=1, le=1 << 16, description="simclr: width of the projection head's output")


def objective_task(objective: ObjectiveConfig | None, data_task: str | None) -> str | None:
    """The task a run trains on: the objective's, or the data's own."""
    if objective is None or objective.name == "auto":
        return data_task
    return objective.name


def apply_objective(sets: Datasets, objective: ObjectiveConfig | None, augmenting: bool) -> Datasets:
    """``sets`` rewritten for the objective: the spec's task and the batch transforms.
    ``augmenting``: the data section turns on at least one augmentation (simclr needs one)."""
    if objective is None or objective.name == "auto":
        return sets
    task = sets.spec.task
    if objective.name == "mlm":
        if task != "lm":
            raise EmberError(
                f"objective.name=mlm masks tokens of a text set; this data poses a {task!r} task. Use "
                f"data.name=stdlib or a prepared token directory, or objective.name=auto."
            )
        mask = masker(sets.spec.vocab_size, objective.mask_prob)
        return replace(
            sets,
            spec=replace(sets.spec, task="mlm"),
            train_transform=then(sets.train_transform, mask),
            val_transform=then(sets.val_transform, mask),
        )
    if task != "classify" or len(sets.spec.input_shape) != 3:
        raise EmberError(
            f"objective.name=simclr contrasts augmented views of images; this data poses a {task!r} task "
            f"with inputs of shape {list(sets.spec.input_shape)}. Use data.name=digits or a prepared "
            f"image directory, or objective.name=auto."
        )
    if not augmenting:
        raise EmberError(
            "objective.name=simclr learns by telling two random augmentations of each image apart from "
            "the other images, but data.augment turns every augmentation off. Set some, e.g. "
            "data.augment.crop=0.6, data.augment.rotation=15, data.augment.brightness=0.4."
        )
    # Both splits draw augmented views: validation scores the same task (under a fixed seed).
    views = two_views(sets.train_transform)
    return replace(sets, spec=replace(sets.spec, task="simclr"), train_transform=views, val_transform=views)


def then(first: Callable[[Batch], Batch] | None, second: Callable[[Batch], Batch]) -> Callable:
    return second if first is None else (lambda batch: second(first(batch)))


def masker(vocab_size: int, mask_prob: float) -> Callable[[Batch], Batch]:
    """A transform from language-model windows ``{"x", "y"}`` to masked inputs and their targets."""

    def mask(batch: Batch) -> Batch:
        x = batch["x"]
        # Drawn on the CPU (the generator checkpoints save), then moved: one copy per batch.
        chosen_draw, kind_draw = torch.rand(2, *x.shape).to(x.device)
        random_tokens = torch.randint(0, vocab_size, x.shape).to(x.device)
        chosen = chosen_draw < mask_prob
        inputs = torch.where(chosen & (kind_draw < 0.8), vocab_size, x)  # vocab_size: the mask token's id
        inputs = torch.where(chosen & (kind_draw >= 0.8) & (kind_draw < 0.9), random_tokens, inputs)
        return {"x": inputs, "y": torch.where(chosen, x, IGNORE_INDEX)}

    return mask


def two_views(augment: Callable[[Batch], Batch]) -> Callable[[Batch], Batch]:
    """A transform from a batch of B images to its 2B augmented views; view i's target is its twin."""

    def views(batch: Batch) -> Batch:
        x = torch.cat([augment(batch)["x"], augment(batch)["x"]])
        b = batch["x"].size(0)
        twin = torch.arange(2 * b, device=x.device).roll(b)  # i ↔ i + B
        return {"x": x, "y": twin}

    return views
