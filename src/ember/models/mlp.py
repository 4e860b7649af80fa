"""MLP: a multilayer perceptron for tabular rows (rows (F,)): a classifier (task ``classify``), or a
regressor (task ``regress``: one output unit, the head's [B, 1] squeezed by the task).

``depth`` hidden blocks of ``Linear -> norm -> ReLU -> dropout``, all ``width`` wide, then a
linear head. The norm is LayerNorm (per row, the default: independent of the batch), BatchNorm
(per feature, over the batch) or none. An input of more than one dimension is flattened, so
the same model also reads 1x8x8 digits (as 64 features) as a smoke test. A table's categorical
columns given as indices (``DataSpec.embeddings``: many categories) are each looked up in an
embedding of ``min(16, (K + 1) // 2)`` dimensions, learned with the rest, and joined to the other
features before the first block.
``model(x: Float[B, F] or Float[B, *input_shape]) -> logits Float[B, num_classes]``;
``features(x)`` the last hidden block's output, before the head.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.layers import ModelBase, check_classes, refuse_tokens, run_blocks
from ember.models.zoo import check_task, register_model
from ember.schema import RecipeModel

Norm = Literal["batch", "layer", "none"]


class MLPConfig(RecipeModel):
    name: Literal["mlp"] = "mlp"
    depth: int = Field(2, ge=1, le=64, description="hidden layers")
    width: int = Field(128, ge=1, le=1 << 16, description="units in each hidden layer")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer's activation")
    norm: Norm = Field(
        "layer", description="normalisation after each hidden Linear: layer (per row), batch (per feature) or none"
    )


class MLPBlock(nn.Module):
    """One hidden layer: ``dropout(relu(norm(linear(x))))``."""

    def __init__(self, n_in: int, n_out: int, norm: Norm, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out, bias=norm != "batch")  # BatchNorm has the bias
        self.norm: nn.Module
        if norm == "batch":
            self.norm = nn.BatchNorm1d(n_out)
        elif norm == "layer":
            self.norm = nn.LayerNorm(n_out)
        else:
            self.norm = nn.Identity()
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        nn.init.kaiming_normal_(self.fc.weight, nonlinearity="relu")  # He init (fan_in): ReLU keeps the scale
        if self.fc.bias is not None:
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.norm(self.fc(x))))


class MLPClassifier(ModelBase):
    """Flatten, ``depth`` hidden blocks of ``width`` units, linear head."""

    def __init__(
        self,
        cfg: MLPConfig,
        input_shape: tuple[int, ...],
        num_classes: int,
        embeddings: tuple[tuple[int, int], ...] = (),
    ) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.in_features = math.prod(input_shape)
        self.index_columns = [position for position, _ in embeddings]
        self.plain_columns = [i for i in range(self.in_features) if i not in set(self.index_columns)]
        self.embeds = nn.ModuleList(nn.Embedding(codes, min(16, (codes + 1) // 2)) for _, codes in embeddings)
        n_in = len(self.plain_columns) + sum(e.embedding_dim for e in self.embeds)
        blocks = []
        for _ in range(cfg.depth):
            blocks.append(MLPBlock(n_in, cfg.width, cfg.norm, cfg.dropout))
            n_in = cfg.width
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = n_in
        self.head = nn.Linear(n_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the head reads: ``Float[B, feature_dim]``."""
        h = x.flatten(1)
        if h.size(1) != self.in_features:
            raise EmberError(
                f"model mlp was built for {self.in_features} input features (input_shape "
                f"{self.input_shape}), but the batch has {h.size(1)} per sample ({tuple(x.shape[1:])}). "
                f"Train and evaluate on data with the same columns."
            )
        if self.embeds:  # index columns: each code looked up in its embedding (out-of-range codes: 0, unseen)
            looked_up = [
                embed(h[:, p].long().clamp(0, embed.num_embeddings - 1) * (h[:, p] < embed.num_embeddings))
                for p, embed in zip(self.index_columns, self.embeds)
            ]
            h = torch.cat([h[:, self.plain_columns], *looked_up], dim=1)
        return run_blocks(self.blocks, h, checkpoint=self.grad_checkpointing and self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def _count_flops(self) -> float:
        """Training FLOPs per sample: every Linear is one [1, in] x [in, out] matmul forward, 2 FLOPs
        per multiply-add, and backward costs twice the forward: 6 x the weights' multiply-adds.
        Norms, activations and biases are left out, as FlopCounterMode leaves them out elsewhere."""
        macs = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * macs


@register_model("mlp", MLPConfig, tasks=("classify", "regress"))
def build(cfg: MLPConfig, spec: DataSpec) -> MLPClassifier:
    """An MLP for ``spec``'s rows (or any fixed-shape input, flattened): classes, or one number (regress)."""
    check_task("mlp", spec)
    if spec.task != "regress":
        check_classes("mlp", spec)
    refuse_tokens("mlp", spec)
    shape = tuple(spec.input_shape)
    if not shape or min(shape) < 1:
        raise EmberError(
            f"model mlp needs samples of a fixed shape, rows of F features (F,) or anything it can flatten, "
            f"but the data's input_shape is {shape}. Use a classification dataset that reports its input_shape."
        )
    return MLPClassifier(cfg, shape, 1 if spec.task == "regress" else spec.num_classes, spec.embeddings)
