"""CLIP: an image tower and a text tower trained to agree on which caption belongs to which image (task ``clip``).

The image tower is ember's ResNet (``model.image``, a cnn section) whose head projects
the pooled features into the joint space; the text tower is a small causal Transformer
over the caption's ids (bytes for ``digits-captions``; a prepared captions set's BPE or bytes)
whose state at the caption's last id before the padding (id 0) is projected there too.
Both embeddings are L2-normalised; their dot products, times a learned scale (initialised
to 1 / 0.07 and capped at 100, as in Radford et al. 2021), are the scores.
``model(x: Float[B, C, H, W], text: Long[K, L]) -> (images Float[B, E], texts Float[K, E], scale)``;
the ``clip`` task turns them into a symmetric contrastive loss in training and a zero-shot
classification (each image against one prompt per class) in validation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.cnn import CNNConfig, ResNet
from ember.models.layers import (
    Block,
    ModelBase,
    check_vocab,
    heads_problem,
    init_gpt2_,
    measure_forward_flops,
    run_blocks,
    scale_residual_init_,
)
from ember.models.zoo import check_task, register_model
from ember.schema import RecipeModel

MAX_SCALE = 100.0


class ClipConfig(RecipeModel):
    name: Literal["clip"] = "clip"
    image: CNNConfig = Field(
        default_factory=lambda: CNNConfig(width=16, depth=1, stages=2), description="the image tower: a cnn section"
    )
    text_layers: int = Field(2, ge=1, le=64, description="Transformer blocks of the text tower")
    text_heads: int = Field(4, ge=1, le=256, description="attention heads of the text tower; must divide text_embd")
    text_embd: int = Field(64, ge=1, le=1 << 14, description="width of the text tower")
    embed_dim: int = Field(64, ge=1, le=1 << 14, description="width of the joint image-text space")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout in the text tower")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ClipConfig:
        problem = heads_problem(self.text_embd, self.text_heads)
        if problem:
            raise ValueError(f"text tower: {problem.replace('n_embd', 'text_embd').replace('n_head', 'text_heads')}")
        return self


class Clip(ModelBase):
    def __init__(self, cfg: ClipConfig, spec: DataSpec) -> None:
        super().__init__()
        c = cfg.text_embd
        self.input_shape, self.text_len, self.pad_id = tuple(spec.input_shape), spec.seq_len, spec.pad_id
        self.image_tower = ResNet(cfg.image, self.input_shape, cfg.embed_dim)  # its head: the image projection
        self.tok_emb = nn.Embedding(spec.vocab_size, c)
        self.pos_emb = nn.Embedding(spec.seq_len, c)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(c, cfg.text_heads, cfg.dropout, causal=True) for _ in range(cfg.text_layers))
        self.ln_f = nn.LayerNorm(c)
        self.text_proj = nn.Linear(c, cfg.embed_dim, bias=False)
        for part in (self.tok_emb, self.pos_emb, self.blocks, self.text_proj):
            init_gpt2_(part)
        scale_residual_init_(self.blocks, 2 * cfg.text_layers)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(x).float(), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.tok_emb(text) + self.pos_emb(torch.arange(text.size(1), device=text.device)))
        h = self.ln_f(run_blocks(self.blocks, h, checkpoint=self.grad_checkpointing and self.training))
        # Causal attention and padding on the right: the last real byte has read the whole caption.
        last = ((text != self.pad_id).sum(dim=1) - 1).clamp(min=0)
        return F.normalize(self.text_proj(h[torch.arange(len(text), device=text.device), last]).float(), dim=-1)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(x), self.encode_text(text), self.logit_scale.exp().clamp(max=MAX_SCALE)

    def _count_flops(self) -> float:
        # Per image-caption pair, forward and backward (the B x B score matrix is left out).
        image = torch.zeros(1, *self.input_shape, device=self.device)
        text = torch.ones(1, self.text_len, dtype=torch.long, device=self.device)
        return 3 * measure_forward_flops(self, image, text)


@register_model("clip", ClipConfig, tasks=("clip",))
def build(cfg: ClipConfig, spec: DataSpec) -> Clip:
    """A CLIP model for ``spec``'s captioned images (data.name=digits-captions, or a directory prepared
    with ``ember data prepare FOLDER --captions FILE``)."""
    check_task("clip", spec)
    check_vocab("clip", spec)
    if len(spec.input_shape) != 3:
        raise EmberError(f"model clip needs images of shape (C, H, W); the data's are {list(spec.input_shape)}.")
    return Clip(cfg, spec)
