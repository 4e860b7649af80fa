"""CNN: a small ResNet image classifier with BatchNorm (task ``classify``, images (C, H, W)).

A 3x3 stem, then ``stages`` stages of ``depth`` residual blocks each; every stage
after the first doubles the channels and halves the resolution with a stride-2
block. Global average pooling makes the head independent of the image size, so
the same recipe serves 1x8x8 digits and 3x32x32 photos (no stem max-pool, which
would waste the little resolution digits have).
``model(x: Float[B, C, H, W]) -> logits Float[B, num_classes]``; ``features(x)`` the pooled
representation before the head.

On labelled text (token ids, zeros after each text) the same recipe builds ``TokenCNN``: tokens
embedded in ``width`` channels, then ``stages`` stages of ``depth`` residual 1-D convolution blocks
(kernel 3; each stage after the first doubles the channels, the length is kept), and the maximum
over each text's own positions (padding never wins the max): a CNN over tokens in the style of
Kim (2014), deepened with residual blocks.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ember.data.spec import DataSpec
from ember.models.layers import (
    ModelBase,
    check_classes,
    check_image,
    image_train_flops,
    measure_forward_flops,
    run_blocks,
)
from ember.models.zoo import register_model
from ember.schema import RecipeModel


class CNNConfig(RecipeModel):
    name: Literal["cnn"] = "cnn"
    width: int = Field(32, ge=1, le=4096, description="channels of the first stage")
    depth: int = Field(2, ge=1, le=64, description="residual blocks per stage")
    stages: int = Field(2, ge=1, le=8, description="stages; each after the first doubles channels, halves H and W")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the classifier")


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)  # BN has the bias


class ResidualBlock(nn.Module):
    """ResNet basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:  # project when the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(ModelBase):
    """Stem, then `stages` of `depth` residual blocks (channels double, resolution halves), pooled head."""

    def __init__(self, cfg: CNNConfig, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.stem = nn.Sequential(conv3x3(input_shape[0], cfg.width), nn.BatchNorm2d(cfg.width), nn.ReLU())
        blocks, c_in = [], cfg.width
        for stage in range(cfg.stages):
            c_out = cfg.width * 2**stage
            for i in range(cfg.depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(ResidualBlock(c_in, c_out, stride))
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = c_in
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(c_in, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init for ReLU nets, as in torchvision's ResNet
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled representation the head reads: ``Float[B, feature_dim]``."""
        h = self.stem(x)
        h = run_blocks(self.blocks, h, checkpoint=self.grad_checkpointing and self.training)
        return h.mean(dim=(2, 3))  # global average pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def _count_flops(self) -> float:
        return image_train_flops(self)


class TokenBlock(nn.Module):
    """relu(conv(relu(conv(x))) + shortcut(x)) over [B, C, L]; padding positions are zeroed after each
    convolution so they never leak into a text's edge."""

    def __init__(self, c_in: int, c_out: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel_size=3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.shortcut: nn.Module = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x)) * keep
        h = self.conv2(self.drop(h)) * keep
        return F.relu(h + self.shortcut(x))


class TokenCNN(ModelBase):
    """Embedding, residual 1-D convolution stages, max over each text's positions, linear head."""

    def __init__(self, cfg: CNNConfig, vocab_size: int, seq_len: int, num_classes: int, pad_id: int = 0) -> None:
        super().__init__()
        self.pad_id = pad_id  # what fills a row after its text
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, cfg.width, padding_idx=pad_id)
        blocks, c_in = [], cfg.width
        for stage in range(cfg.stages):
            c_out = cfg.width * 2**stage
            for _ in range(cfg.depth):
                blocks.append(TokenBlock(c_in, c_out, cfg.dropout))
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = c_in
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(c_in, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The max over each text's positions of the last stage: ``Float[B, feature_dim]``."""
        keep = (x != self.pad_id)[:, None, :]  # [B, 1, L]
        h = self.embed(x).transpose(1, 2)  # [B, width, L]
        h = run_blocks(self.blocks, h, keep.to(h.dtype), checkpoint=self.grad_checkpointing and self.training)
        return h.masked_fill(~keep, float("-inf")).amax(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def _count_flops(self) -> float:
        """3 x the counted forward of one text of the data's longest length."""
        x = torch.ones(1, self.seq_len, dtype=torch.long, device=self.device)
        return 3 * measure_forward_flops(self, x)


# "simclr": a SimCLR projection head can sit on features() (ember.models.registry builds it).
@register_model("cnn", CNNConfig, tasks=("classify", "simclr"))
def build(cfg: CNNConfig, spec: DataSpec) -> ResNet | TokenCNN:
    """A ResNet for ``spec``'s images, or a TokenCNN for labelled text; rejects other data."""
    if spec.reads_tokens:
        check_classes("cnn", spec)
        return TokenCNN(cfg, spec.vocab_size, spec.seq_len, spec.num_classes, spec.pad_id)
    c, h, w = check_image("cnn", spec)
    return ResNet(cfg, (c, h, w), spec.num_classes)
