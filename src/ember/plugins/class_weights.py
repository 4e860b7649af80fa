"""Class weights for imbalanced classes: each target's cross-entropy counts ``weights[class]`` times.

Recipe: ``plugins: [{name: class_weights}]`` (``weights: balanced``, the default: class c weighs
``N / (K * n_c)`` over the N training samples of the K classes present, scikit-learn's "balanced", so
a rare class counts as much in all as a common one), or ``weights: [1.0, 5.0, ...]``, one per class (or
per token for a language model).

The weighted loss is summed over the targets like the plain one and divided by the same target count,
not by the sum of the weights, so gradient accumulation and data parallelism stay exact; with balanced
weights the weights average 1 over the training set, so the loss keeps its scale. Validation reports the
unweighted loss and metrics: what the model is measured by does not change with how it is trained.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ember.data.spec import IGNORE_INDEX
from ember.errors import EmberError
from ember.plugins.registry import PluginConfigBase, register_plugin
from ember.training.plugin import PluginContext, StepPlugin


class ClassWeightsConfig(PluginConfigBase):
    name: Literal["class_weights"] = "class_weights"
    weights: Literal["balanced"] | list[float] = Field(
        "balanced",
        description="balanced (N / (K * n_c) from the training split's class counts) or one weight > 0 per class",
    )

    def layout_problem(self, strategy: str, sharded: bool) -> str | None:
        if strategy == "pp":
            return (
                "the class_weights plugin is not supported with parallel.strategy=pp (the pipeline computes the "
                "loss in its last stage): remove it (--set plugins.class_weights=null) or use ddp/fsdp"
            )
        return None


class ClassWeights(StepPlugin):
    name = "class_weights"

    def __init__(self, weights: torch.Tensor, label_smoothing: float) -> None:
        self.weights, self.label_smoothing = weights, label_smoothing

    def loss(self, batch: dict, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch's weighted cross-entropy, summed over its counted targets."""
        targets = batch["y"]
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            targets.reshape(-1),
            weight=self.weights.to(logits.device),
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )


def balanced_weights(counts: np.ndarray) -> np.ndarray:
    """N / (K * n_c) for each class present (K of them); 0 for a class with no training sample."""
    present = counts > 0
    weights = np.zeros(len(counts), dtype=np.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def _weights(cfg: ClassWeightsConfig, run: PluginContext, n_out: int) -> torch.Tensor:
    if cfg.weights != "balanced":
        if len(cfg.weights) != n_out or min(cfg.weights) <= 0:
            raise EmberError(
                f"plugins.class_weights.weights lists {len(cfg.weights)} weight(s) (smallest {min(cfg.weights)}), "
                f"but the model scores {n_out} classes. Give one weight > 0 per class, in label order, or "
                f"weights: balanced."
            )
        return torch.tensor(cfg.weights, dtype=torch.float32)
    labels = run.train_labels() if run.train_labels is not None and run.spec.task == "classify" else None
    if labels is None:
        raise EmberError(
            f"plugins.class_weights with weights: balanced counts the training split's classes; this data "
            f"({run.spec.task}) has no class labels to count. Give one weight per class (weights: [...]), or "
            f"remove the plugin."
        )
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_out)
    return torch.tensor(balanced_weights(counts), dtype=torch.float32)


@register_plugin(ClassWeightsConfig)
def build(cfg: ClassWeightsConfig, run: PluginContext) -> ClassWeights:
    if run.spec.task not in ("classify", "lm"):
        raise EmberError(
            f"plugins.class_weights weighs the cross-entropy of class (or token) targets; task {run.spec.task} "
            f"has none it can weigh. Remove the plugin (--set plugins.class_weights=null)."
        )
    n_out = run.spec.num_classes if run.spec.task == "classify" else run.spec.vocab_size
    return ClassWeights(_weights(cfg, run, n_out), run.label_smoothing)
