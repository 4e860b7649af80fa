"""Optimisers from the recipe, with weight decay (L2) only where it belongs.

Biases and norm weights (1-D, or inside a norm layer) are not decayed:
decaying them hurts and no mainstream recipe does it. Every other parameter
with two or more dimensions (matrices, convolution kernels, token and
position embeddings) is decayed. The explicit L1 penalty applies to the same
decayed set.

Example::

    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, nesterov=True))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ember.errors import EmberError

if TYPE_CHECKING:
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


def _adamw(groups: list[dict], cfg: OptimConfig, kernel: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kernel)


def _adam(groups: list[dict], cfg: OptimConfig, kernel: dict) -> torch.optim.Optimizer:
    # Adam's weight_decay is coupled L2 (added to the gradient): the classic definition.
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kernel)


def _sgd(groups: list[dict], cfg: OptimConfig, kernel: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kernel)


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig, dict], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
}


# Optimisers whose single-kernel (fused) implementation torch >= 2.4 has on the CPU as well as on CUDA.
FUSED_ON_CPU = ("adamw", "adam")


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimiser over two groups: decayed weights and everything else.

    ``fused`` asks for the single-kernel implementation (CUDA). Adam and AdamW take it on the CPU
    too, for plain (not DTensor) parameters: it reads each parameter, gradient and moment once
    instead of once per operation (2.5x faster at 12 M parameters). Same maths, within rounding.
    """
    decay, no_decay = split_decay(model)
    if not decay and not no_decay:  # else the first backward fails deep in autograd
        raise EmberError(
            "The model has no parameter with requires_grad=True, so training would change nothing. Unfreeze "
            "what should learn before calling ember.train (e.g. model.head.requires_grad_(True))."
        )
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    params = list(model.parameters())
    on_cpu = all(p.device.type == "cpu" and getattr(p, "device_mesh", None) is None for p in params)
    kernel = {"fused": fused or (cfg.name in FUSED_ON_CPU and on_cpu) or None}
    if len({getattr(p, "device_mesh", None) for p in params}) > 1:  # only DTensors have a mesh
        # Tensor parallelism leaves norms and embeddings plain (or, under fsdp+tp, on another
        # mesh) beside the block weights, and the multi-tensor kernels (fused, foreach) refuse
        # such a mix: update one tensor at a time.
        kernel = {"fused": None, "foreach": False}
    return OPTIMIZERS[cfg.name](groups, cfg, kernel)


def l1_penalty(params: list[nn.Parameter]) -> torch.Tensor:
    """Sum of absolute values of the decayed weights (the l1 plugin multiplies it by its weight)."""
    return torch.stack([p.abs().sum() for p in params]).sum()
