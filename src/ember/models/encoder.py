"""Encoder: a bidirectional Transformer over tokens, trained by masked language modelling (task ``mlm``)
or classifying labelled text (task ``classify`` on token ids: ``EncoderClassifier``).

BERT's shape at toy scale: tokens and learned positions are embedded, run through
``n_layer`` pre-norm blocks whose attention sees the whole window both ways, normalised
and scored against the token embedding matrix (tied). The embedding has one row more
than the vocabulary: the mask token (id = vocabulary size) the ``mlm`` objective puts
in (``ember.objectives``); it is never predicted.
``model(x: Long[B, T]) -> logits Float[B, T, vocab_size]``; ``features(x)`` the final
hidden states ``Float[B, T, n_embd]``.

As a classifier, attention sees only each text's own tokens (a key mask hides the zeros after
it), and the head reads the mean of the text's final states:
``model(x: Long[B, L]) -> logits Float[B, num_classes]``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.gpt import embed
from ember.models.layers import (
    AttentionConfigBase,
    Block,
    ModelBase,
    check_heads,
    check_vocab,
    init_gpt2_,
    run_blocks,
    scale_residual_init_,
)
from ember.models.zoo import check_task, register_model


class EncoderConfig(AttentionConfigBase):
    name: Literal["encoder"] = "encoder"
    n_layer: int = Field(4, ge=1, le=512, description="Transformer blocks")
    block_size: int = Field(256, ge=1, le=1 << 20, description="longest window in tokens (learned positions)")


class Encoder(ModelBase):
    def __init__(self, cfg: EncoderConfig, vocab_size: int, train_len: int) -> None:
        super().__init__()
        self.vocab_size, self.block_size, self.train_len = vocab_size, cfg.block_size, train_len
        self.tok_emb = nn.Embedding(vocab_size + 1, cfg.n_embd)  # + the mask token
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        init_gpt2_(self)
        scale_residual_init_(self.blocks, 2 * cfg.n_layer)

    def features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states; ``mask`` (bool [B, 1, 1, T], True = attend) hides keys."""
        h = embed(self, x, "The encoder")
        h = run_blocks(self.blocks, h, mask, checkpoint=self.grad_checkpointing and self.training)
        return self.ln_f(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scored against the real tokens' rows only: the mask token is never a target.
        return F.linear(self.features(x), self.tok_emb.weight[: self.vocab_size])

    def flops_per_item(self) -> float:
        """Training FLOPs per token, GPT's estimate (``ember.models.gpt``): 6 N + 12 L C T, where N counts
        the blocks and the output projection (the tied embedding, used as a matmul there)."""
        n = sum(p.numel() for p in self.blocks.parameters()) + self.vocab_size * self.tok_emb.embedding_dim
        return float(6 * n + 12 * len(self.blocks) * self.tok_emb.embedding_dim * self.train_len)


class EncoderClassifier(Encoder):
    """The encoder with a classification head on the mean of each text's final states."""

    def __init__(self, cfg: EncoderConfig, vocab_size: int, train_len: int, num_classes: int, pad_id: int = 0) -> None:
        super().__init__(cfg, vocab_size, train_len)
        self.pad_id = pad_id
        self.head = nn.Linear(cfg.n_embd, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = x != self.pad_id  # the text's tokens; the pad id fills the row after it
        h = self.features(x, real[:, None, None, :])
        pooled = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
        return self.head(self.drop(pooled))

    def flops_per_item(self) -> float:
        """Per text: the blocks' 6 N + 12 L C T per token over its T tokens (the head is negligible)."""
        n = sum(p.numel() for p in self.blocks.parameters())
        c, t = self.tok_emb.embedding_dim, self.train_len
        return float(t * (6 * n + 12 * len(self.blocks) * c * t))


@register_model("encoder", EncoderConfig, tasks=("mlm", "classify"))
def build(cfg: EncoderConfig, spec: DataSpec) -> Encoder:
    """An encoder for ``spec``'s vocabulary: masked language modelling, or classifying labelled text."""
    if spec.task == "classify" and not spec.reads_tokens:
        raise EmberError(
            "model encoder reads token ids; this data's samples are images or table rows. Use model cnn, vit or "
            "mlp for them, or prepare labelled text (ember data prepare texts.jsonl --label COLUMN)."
        )
    if spec.task == "lm":
        raise EmberError(
            "model encoder reads its window both ways, so it cannot learn next-token prediction: set "
            "objective.name=mlm (masked language modelling), or use model gpt for data.task lm."
        )
    check_task("encoder", spec)
    check_vocab("encoder", spec)
    check_heads("encoder", cfg.n_embd, cfg.n_head)
    if spec.seq_len > cfg.block_size:
        raise EmberError(
            f"model encoder has block_size={cfg.block_size} but the data's windows are {spec.seq_len} "
            f"tokens long. Set model.block_size >= {spec.seq_len} or data.seq_len <= {cfg.block_size}."
        )
    if spec.task == "classify":
        return EncoderClassifier(cfg, spec.vocab_size, spec.seq_len, spec.num_classes, spec.pad_id)
    return Encoder(cfg, spec.vocab_size, spec.seq_len or cfg.block_size)
