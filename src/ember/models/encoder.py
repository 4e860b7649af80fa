"""Encoder: a bidirectional Transformer over tokens, trained by masked language modelling (task ``mlm``).

BERT's shape at toy scale: tokens and learned positions are embedded, run through
``n_layer`` pre-norm blocks whose attention sees the whole window both ways, normalised
and scored against the token embedding matrix (tied). The embedding has one row more
than the vocabulary: the mask token (id = vocabulary size) the ``mlm`` objective puts
in (``ember.objectives``); it is never predicted.
``model(x: Long[B, T]) -> logits Float[B, T, vocab_size]``; ``features(x)`` the final
hidden states ``Float[B, T, n_embd]``.
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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = embed(self, x, "The encoder")
        h = run_blocks(self.blocks, h, checkpoint=self.grad_checkpointing and self.training)
        return self.ln_f(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scored against the real tokens' rows only: the mask token is never a target.
        return F.linear(self.features(x), self.tok_emb.weight[: self.vocab_size])

    def flops_per_item(self) -> float:
        """Training FLOPs per token, GPT's estimate (``ember.models.gpt``): 6 N + 12 L C T, where N counts
        the blocks and the output projection (the tied embedding, used as a matmul there)."""
        n = sum(p.numel() for p in self.blocks.parameters()) + self.vocab_size * self.tok_emb.embedding_dim
        return float(6 * n + 12 * len(self.blocks) * self.tok_emb.embedding_dim * self.train_len)


@register_model("encoder", EncoderConfig, tasks=("mlm",))
def build(cfg: EncoderConfig, spec: DataSpec) -> Encoder:
    """An encoder for ``spec``'s vocabulary; it learns by masked language modelling only."""
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
    return Encoder(cfg, spec.vocab_size, spec.seq_len or cfg.block_size)
