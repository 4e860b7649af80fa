"""Seq2seq: an encoder-decoder Transformer for sequence transduction (task ``seq2seq``).

The encoder reads the source with bidirectional self-attention, ignoring
``spec.pad_id`` positions; the decoder reads the shifted target causally and
attends to the encoder's output (cross-attention, again ignoring source padding).
Source and target share one token embedding, tied to the output head by default.
``model(src: Long[B, S], tgt_in: Long[B, T]) -> logits Float[B, T, vocab_size]``.
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
    check_heads,
    check_vocab,
    init_gpt2_,
    key_padding_mask,
    measure_forward_flops,
    run_blocks,
    scale_residual_init_,
)
from ember.models.zoo import check_task, register_model


class Seq2SeqConfig(AttentionConfigBase):
    name: Literal["seq2seq"] = "seq2seq"
    n_encoder_layer: int = Field(2, ge=1, le=512, description="encoder blocks")
    n_decoder_layer: int = Field(2, ge=1, le=512, description="decoder blocks")
    max_len: int = Field(64, ge=1, le=1 << 20, description="longest source and longest target (learned positions)")
    tie_weights: bool = Field(True, description="the output head reuses the token embedding matrix")


class Seq2Seq(ModelBase):
    def __init__(self, cfg: Seq2SeqConfig, spec: DataSpec) -> None:
        super().__init__()
        c, h, p = cfg.n_embd, cfg.n_head, cfg.dropout
        self.pad_id = spec.pad_id
        self.max_len = cfg.max_len
        # Lengths of the example that flops_per_item() measures.
        self.src_len = spec.src_len or cfg.max_len
        self.tgt_len = spec.seq_len or cfg.max_len
        self.tok_emb = nn.Embedding(spec.vocab_size, c)
        self.src_pos = nn.Embedding(cfg.max_len, c)
        self.tgt_pos = nn.Embedding(cfg.max_len, c)
        self.drop = nn.Dropout(p)
        self.encoder = nn.ModuleList(Block(c, h, p) for _ in range(cfg.n_encoder_layer))
        self.ln_enc = nn.LayerNorm(c)
        self.decoder = nn.ModuleList(Block(c, h, p, causal=True, cross=True) for _ in range(cfg.n_decoder_layer))
        self.ln_dec = nn.LayerNorm(c)
        self.lm_head = nn.Linear(c, spec.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        init_gpt2_(self)
        scale_residual_init_(self.encoder, 2 * cfg.n_encoder_layer)  # attention + MLP
        scale_residual_init_(self.decoder, 3 * cfg.n_decoder_layer)  # self-, cross-attention + MLP

    def _embed(self, tokens: torch.Tensor, pos_emb: nn.Embedding, what: str) -> torch.Tensor:
        n = tokens.size(1)
        if n > self.max_len:
            raise EmberError(
                f"seq2seq got a {what} of {n} tokens but model.max_len is {self.max_len}. "
                f"Raise model.max_len to at least {n}, or shorten the data's sequences."
            )
        return self.drop(self.tok_emb(tokens) + pos_emb(torch.arange(n, device=tokens.device)))

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source tokens -> (memory Float[B, S, C], key mask Bool[B, 1, 1, S])."""
        mask = key_padding_mask(src, self.pad_id)
        h = self._embed(src, self.src_pos, "source")
        h = run_blocks(self.encoder, h, mask, checkpoint=self.grad_checkpointing and self.training)
        return self.ln_enc(h), mask

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Shifted target tokens and the encoder's output -> logits Float[B, T, V]."""
        h = self._embed(tgt_in, self.tgt_pos, "target")
        # Target padding needs no mask: it sits after EOS, where causal attention keeps
        # it out of every real position, and its own outputs are IGNORE_INDEX in the loss.
        h = run_blocks(self.decoder, h, None, memory, mask, checkpoint=self.grad_checkpointing and self.training)
        return self.lm_head(self.ln_dec(h))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, mask = self.encode(src)
        return self.decode(tgt_in, memory, mask)

    def _count_flops(self) -> float:
        """Training FLOPs per target token: 3 x the counted forward of one example of
        src_len source and tgt_len target tokens, divided by tgt_len (the encoder's
        cost is spread over the target tokens it serves)."""
        # Token values do not matter: the mask changes no matmul's size.
        src = torch.zeros(1, self.src_len, dtype=torch.long, device=self.device)
        tgt = torch.zeros(1, self.tgt_len, dtype=torch.long, device=self.device)
        return 3 * measure_forward_flops(self, src, tgt) / self.tgt_len


@register_model("seq2seq", Seq2SeqConfig, tasks=("seq2seq",))
def build(cfg: Seq2SeqConfig, spec: DataSpec) -> Seq2Seq:
    """An encoder-decoder for ``spec``'s vocabulary; rejects non-seq2seq data and long sequences."""
    check_task("seq2seq", spec)
    check_vocab("seq2seq", spec)
    check_heads("seq2seq", cfg.n_embd, cfg.n_head)
    longest = max(spec.src_len, spec.seq_len)
    if longest > cfg.max_len:
        raise EmberError(
            f"model seq2seq has max_len={cfg.max_len} but the data's sources are up to "
            f"{spec.src_len} and targets up to {spec.seq_len} tokens. Set model.max_len >= {longest}."
        )
    return Seq2Seq(cfg, spec)
