"""Optimisers from the recipe, with weight decay (L2) only where it belongs.

Biases and norm weights (1-D, or inside a norm layer) are not decayed:
decaying them hurts and no mainstream recipe does it. Every other parameter
with two or more dimensions (matrices, convolution kernels, token and
position embeddings) is decayed. The explicit L1 penalty applies to the same
decayed set.

>>> opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, nesterov=True))
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ember.config import OptimConfig


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed): matrices and kernels vs biases, norm weights and scalars."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))  # tied weights appear in two modules; one group only
            (no_decay if is_norm or p.ndim < 2 else decay).append(p)
    return decay, no_decay


def _adamw(groups: list[dict], cfg: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def _adam(groups: list[dict], cfg: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    # Adam's weight_decay is coupled L2 (added to the gradient): the classic definition.
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def _sgd(groups: list[dict], cfg: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused or None)


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig, bool], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
}


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimiser over two groups: decayed weights and everything else.

    ``fused`` uses the single-kernel implementation (CUDA); the maths is the same.
    """
    decay, no_decay = split_decay(model)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return OPTIMIZERS[cfg.name](groups, cfg, fused)


def l1_penalty(params: list[nn.Parameter]) -> torch.Tensor:
    """Sum of absolute values of the decayed weights (multiply by optim.l1)."""
    return torch.stack([p.abs().sum() for p in params]).sum()
