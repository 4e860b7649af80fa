"""RNN: an LSTM or GRU for row-sequence classification or language modelling.

- task ``classify`` with input_shape (T, F): ``model(x: Float[B, T, F]) -> Float[B, num_classes]``,
  read from the final hidden state of the last layer (both directions when bidirectional).
- task ``classify`` on labelled text (token ids, zeros after each text): ``model(x: Long[B, L]) ->
  Float[B, num_classes]``; the tokens are embedded and packed (``pack_padded_sequence``), so the
  recurrence stops at each text's own end: padding costs nothing and changes nothing, and a
  bidirectional RNN's backward direction starts at the last real token.
- task ``lm``: ``model(x: Long[B, T]) -> Float[B, T, vocab_size]``; tokens are embedded
  and every step's output scores the next token. A forward-only RNN is causal by
  construction, which is why ``bidirectional`` is refused here.

``nn.LSTM`` / ``nn.GRU`` run the whole recurrence in one call, so there are no
blocks to checkpoint: ``grad_checkpointing`` is accepted and ignored. Under bf16
autocast on a CPU without native bf16 the recurrence runs in fp32 (oneDNN has no
emulated-bf16 LSTM; see ``ember.hardware.fp32_recurrence``).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.hardware import fp32_recurrence
from ember.models.layers import ModelBase, check_classes, check_vocab
from ember.models.zoo import check_task, register_model
from ember.schema import RecipeModel

GATES = {"lstm": 4, "gru": 3}  # weight matrices per layer: input/forget/cell/output; reset/update/new


class RNNConfig(RecipeModel):
    name: Literal["rnn"] = "rnn"
    kind: Literal["lstm", "gru"] = Field("lstm", description="recurrent cell")
    hidden_size: int = Field(128, ge=1, le=1 << 16, description="hidden state size per direction")
    num_layers: int = Field(1, ge=1, le=64, description="stacked recurrent layers")
    embd: int = Field(64, ge=1, le=1 << 16, description="lm and labelled text: token embedding size")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="on the embedding, between layers, before the head")
    bidirectional: bool = Field(False, description="classify only: also read the sequence (each text) backwards")


class RNN(ModelBase):
    def __init__(self, cfg: RNNConfig, spec: DataSpec) -> None:
        super().__init__()
        self.task = spec.task
        self.kind = cfg.kind
        self.seq_len = spec.input_shape[0] if spec.task == "classify" else 1
        self.packed = spec.reads_tokens  # labelled text: token ids, packed to each text's length
        self.pad_id = spec.pad_id  # what fills a row after its text
        tokens = spec.task == "lm" or self.packed
        self.embed = (
            nn.Embedding(spec.vocab_size, cfg.embd, padding_idx=self.pad_id if self.packed else None)
            if tokens
            else None
        )
        n_in = cfg.embd if tokens else spec.input_shape[1]
        rnn_cls = nn.LSTM if cfg.kind == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            n_in,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,  # torch applies it between layers only
            bidirectional=cfg.bidirectional,
        )
        self.drop = nn.Dropout(cfg.dropout)
        n_dir = 2 if cfg.bidirectional else 1
        n_out = spec.vocab_size if spec.task == "lm" else spec.num_classes
        self.head = nn.Linear(n_dir * cfg.hidden_size, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            _, h_n = self._recur(self.drop(self.embed(x)), lengths=(x != self.pad_id).sum(1).clamp(min=1))
        elif self.embed is not None:  # lm: a score for every next token
            out, _ = self._recur(self.drop(self.embed(x)))
            return self.head(self.drop(out))
        else:
            _, h_n = self._recur(x)
        if isinstance(h_n, tuple):  # LSTM: (h_n, c_n)
            h_n = h_n[0]
        # h_n: [num_layers * n_dir, B, H]; the last layer's directions are the last n_dir rows.
        n_dir = 2 if self.rnn.bidirectional else 1
        last = h_n[-n_dir:].transpose(0, 1).reshape(x.size(0), -1)
        return self.head(self.drop(last))

    def _recur(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple:
        """``self.rnn(x)`` (packed to ``lengths`` when given), in fp32 outside autocast where bf16 is
        emulated on this CPU (the head after it still runs under autocast)."""
        fp32 = fp32_recurrence(x)
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            x = x.float() if fp32 else x
            if lengths is None:
                return self.rnn(x)
            # pack_padded_sequence takes its lengths on the CPU (one small copy per batch on a GPU).
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            return self.rnn(packed)

    def _count_flops(self) -> float:
        """Training FLOPs, counted analytically (FlopCounterMode does not see inside
        the fused RNN kernels): per step, layer and direction, the gates cost
        2 * gates * H * (inputs + H); plus the head. Per token for lm (one step),
        per sample for classify (T steps, head once). Times 3 for forward + backward."""
        r = self.rnn
        n_dir = 2 if r.bidirectional else 1
        step = 0
        for layer in range(r.num_layers):
            n_in = r.input_size if layer == 0 else n_dir * r.hidden_size
            step += n_dir * 2 * GATES[self.kind] * r.hidden_size * (n_in + r.hidden_size)
        return 3.0 * (self.seq_len * step + 2 * self.head.in_features * self.head.out_features)


@register_model("rnn", RNNConfig, tasks=("classify", "lm"))
def build(cfg: RNNConfig, spec: DataSpec) -> RNN:
    """An RNN classifier for (T, F) rows or labelled text, or an RNN language model."""
    check_task("rnn", spec)
    if spec.task == "lm":
        check_vocab("rnn", spec)
        if cfg.bidirectional:
            raise EmberError(
                "model rnn with bidirectional=true cannot be a language model: the backward "
                "direction would read the very tokens it must predict. Set model.bidirectional=false "
                "for task lm (bidirectional is for classification)."
            )
    elif spec.reads_tokens:
        check_classes("rnn", spec)
    else:
        check_classes("rnn", spec)
        if len(spec.input_shape) == 1:
            raise EmberError(
                f"model rnn reads a sequence of steps (input_shape (T, F)), but the data's samples are single "
                f"rows of {spec.input_shape[0]} features (a table): the columns of a row are not steps in time, "
                f"so a recurrence over them would learn an order that means nothing. Use model.name=mlp for tables."
            )
        if len(spec.input_shape) != 2 or min(spec.input_shape) < 1:
            raise EmberError(
                f"model rnn classifies sequences of feature rows with input_shape (T, F), but the "
                f"data's input_shape is {tuple(spec.input_shape)}. Use a row dataset (e.g. "
                f"data.name=digits-rows), or model cnn / vit for images."
            )
    return RNN(cfg, spec)
