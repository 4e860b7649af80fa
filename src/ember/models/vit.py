"""ViT: a Vision Transformer image classifier (task ``classify``, images (C, H, W)).

The image is cut into patch_size x patch_size patches, each projected to a token
(a strided convolution), given a learned position embedding and run through
bidirectional pre-norm Transformer blocks. The class logits come from the mean of
the final tokens: on small data, mean pooling trains more easily than a class token.
``model(x: Float[B, C, H, W]) -> logits Float[B, num_classes]``; ``features(x)`` the pooled
representation before the head.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.layers import (
    INIT_STD,
    AttentionConfigBase,
    Block,
    ModelBase,
    check_heads,
    check_image,
    image_train_flops,
    init_gpt2_,
    run_blocks,
    scale_residual_init_,
)
from ember.models.zoo import register_model


class ViTConfig(AttentionConfigBase):
    name: Literal["vit"] = "vit"
    patch_size: int = Field(2, ge=1, le=1024, description="side of the square patches; must divide H and W")
    n_layer: int = Field(4, ge=1, le=512, description="Transformer blocks")
    # Redeclared from AttentionConfigBase: narrower by default, and the dropout also reaches the head.
    n_embd: int = Field(64, ge=1, le=1 << 16, description="width of the residual stream")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="on embeddings, attention, residual branches, head")


class ViT(ModelBase):
    def __init__(self, cfg: ViTConfig, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.input_shape = input_shape
        n_patches = (h // cfg.patch_size) * (w // cfg.patch_size)
        self.patch_embed = nn.Conv2d(c, cfg.n_embd, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_emb = nn.Parameter(torch.zeros(1, n_patches, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.feature_dim = cfg.n_embd
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.n_embd, num_classes))
        init_gpt2_(self)
        nn.init.normal_(self.pos_emb, mean=0.0, std=INIT_STD)
        scale_residual_init_(self.blocks, 2 * cfg.n_layer)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled representation the head reads: ``Float[B, n_embd]``."""
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, C', H/p, W/p] -> [B, patches, C']
        h = self.drop(h + self.pos_emb)
        h = run_blocks(self.blocks, h, checkpoint=self.grad_checkpointing and self.training)
        return self.ln_f(h).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def _count_flops(self) -> float:
        return image_train_flops(self)


# "simclr": a SimCLR projection head can sit on features() (ember.models.registry builds it).
@register_model("vit", ViTConfig, tasks=("classify", "simclr"))
def build(cfg: ViTConfig, spec: DataSpec) -> ViT:
    """A ViT for ``spec``'s images; rejects non-image data and sides patch_size does not divide."""
    c, h, w = check_image("vit", spec)
    check_heads("vit", cfg.n_embd, cfg.n_head)
    if h % cfg.patch_size or w % cfg.patch_size:
        raise EmberError(
            f"model vit has patch_size={cfg.patch_size}, which does not divide the data's "
            f"{h}x{w} images. Pick a patch_size that divides both sides (e.g. 1, 2 or 4 for 8x8 digits)."
        )
    return ViT(cfg, (c, h, w), spec.num_classes)
