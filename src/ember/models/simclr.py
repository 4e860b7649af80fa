"""SimCLR: an image model's body plus a projection head, scoring augmented views against each other (task ``simclr``).

Any image model with ``features(x)`` (cnn, vit) serves as the body; its classification
head is dropped. Each view's features go through a two-layer MLP projection (the paper
found a non-linear head keeps more information in the features beneath it), are
L2-normalised, and every view is compared with every other by cosine similarity over
``temperature``. ``model(x: Float[2B, C, H, W]) -> scores Float[2B, 2B]`` with a view's
score against itself at -inf (it is never a candidate). The representation kept for
later use (a linear probe, fine-tuning) is ``features(x)``, before the projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.layers import ModelBase, measure_forward_flops


class SimCLR(ModelBase):
    def __init__(self, body: nn.Module, proj_dim: int, temperature: float) -> None:
        super().__init__()
        body.head = nn.Identity()  # unused here; a later classifier gets a fresh one
        self.body = body
        self.input_shape = body.input_shape
        self.feature_dim = body.feature_dim
        d = body.feature_dim
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, proj_dim))
        self.temperature = temperature

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.body.grad_checkpointing = self.grad_checkpointing  # the trainer sets it on the outer model
        return self.body.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.projector(self.features(x)).float(), dim=-1)
        scores = z @ z.T / self.temperature
        return scores.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))

    def _count_flops(self) -> float:
        # Per sample: its two views, forward and backward.
        return 3 * measure_forward_flops(self, torch.zeros(2, *self.input_shape, device=self.device))
