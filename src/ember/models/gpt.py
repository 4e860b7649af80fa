"""GPT: a decoder-only Transformer language model (task ``lm``).

Tokens and learned positions are embedded, run through ``n_layer`` pre-norm
blocks of causal self-attention and MLP, normalised once more and projected back
onto the vocabulary, by default with the token embedding matrix itself (weight
tying). ``model(x: Long[B, T]) -> logits Float[B, T, vocab_size]``, T <= block_size.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.layers import (
    AttentionConfigBase,
    Block,
    ModelBase,
    check_decoder,
    init_gpt2_,
    run_blocks,
    scale_residual_init_,
)
from ember.models.zoo import register_model


class GPTConfig(AttentionConfigBase):
    name: Literal["gpt"] = "gpt"
    n_layer: int = Field(4, ge=1, le=512, description="Transformer blocks")
    block_size: int = Field(256, ge=1, le=1 << 20, description="longest context in tokens (learned positions)")
    bias: bool = Field(False, description="biases in Linear and LayerNorm layers")
    tie_weights: bool = Field(True, description="the LM head reuses the token embedding matrix")
    activation: Literal["gelu", "gelu_tanh"] = Field(
        "gelu", description="the MLP's GELU: exact, or its tanh approximation (GPT-2's gelu_new)"
    )
    vocab_size: int = Field(0, ge=0, description="embedding rows; 0 = the data's, else at least the data's")


class GPT(ModelBase):
    def __init__(self, cfg: GPTConfig, vocab_size: int, train_len: int | None = None) -> None:
        super().__init__()
        self.block_size = cfg.block_size
        self.train_len = train_len or cfg.block_size  # context the FLOP estimate assumes
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.n_embd, cfg.n_head, cfg.dropout, bias=cfg.bias, causal=True, activation=cfg.activation)
            for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_weights:
            # One matrix both reads tokens in and scores them out: fewer parameters,
            # and the output layer learns from every input token too.
            self.lm_head.weight = self.tok_emb.weight
        init_gpt2_(self)
        scale_residual_init_(self.blocks, 2 * cfg.n_layer)  # attention and MLP per block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = embed(self, x)
        h = run_blocks(self.blocks, h, checkpoint=self.grad_checkpointing and self.training)
        return self.lm_head(self.ln_f(h))

    def non_embedding_params(self) -> int:
        """Parameters that do matmul work per token: the blocks, the final norm and
        the LM head (tied or not). The token and position tables are lookups."""
        blocks = sum(p.numel() for p in self.blocks.parameters())
        return blocks + sum(p.numel() for p in self.ln_f.parameters()) + self.lm_head.weight.numel()

    def flops_per_item(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, the PaLM / nanoGPT estimate (Chowdhery et al. 2022, app. B):

            6 * N + 12 * n_layer * n_embd * T

        N = ``non_embedding_params()``; each parameter costs 2 FLOPs (multiply-add)
        forward and 4 backward. The second term is attention's scores and weighted
        sum (QK^T, AV: 2 * 2 * T * n_embd per layer forward), counted over the full
        T x T square even though the causal half is skipped. T is the context trained
        on: ``seq_len`` if given, else the data's seq_len the model was built for,
        else ``block_size`` (nanoGPT's choice, where the two are equal).
        """
        t = self.train_len if seq_len is None else seq_len
        n_layer, n_embd = len(self.blocks), self.tok_emb.embedding_dim
        return float(6 * self.non_embedding_params() + 12 * n_layer * n_embd * t)


def embed(model: nn.Module, x: torch.Tensor, name: str = "GPT") -> torch.Tensor:
    """Token plus position embeddings (with dropout) of ``x``, by ``model``'s ``tok_emb``,
    ``pos_emb`` and ``drop``: a GPT's, the first pipeline stage's, which holds the same, or
    the masked-LM encoder's; ``name`` names the model in the error."""
    t = x.size(1)
    if t > model.block_size:
        raise EmberError(
            f"{name} got a sequence of {t} tokens but its context (model.block_size) is "
            f"{model.block_size}. Feed at most block_size tokens (crop the context), or "
            f"train a model with a larger block_size."
        )
    pos = torch.arange(t, device=x.device)
    return model.drop(model.tok_emb(x) + model.pos_emb(pos))


@register_model("gpt", GPTConfig, tasks=("lm",))
def build(cfg: GPTConfig, spec: DataSpec) -> GPT:
    """A GPT for ``spec``'s vocabulary; rejects non-lm data and too short a context."""
    check_decoder("gpt", cfg, spec)
    return GPT(cfg, cfg.vocab_size or spec.vocab_size, spec.seq_len or None)
