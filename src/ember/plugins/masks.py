"""Pruning masks held while training: conv and linear weights that are zero at the start stay zero.

Fine-tuning a magnitude-pruned model (``ember prune``) would otherwise regrow the pruned
weights (momentum and weight decay move them); after every optimiser step the masked
weights are zeroed again. Recipe: ``plugins: [{name: keep_zeros}]`` (formerly
``init.keep_zeros: true``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ember.models.layers import untied_layers
from ember.plugins.registry import PluginConfigBase, register_plugin
from ember.training.plugin import PluginContext, StepPlugin


class KeepZerosConfig(PluginConfigBase):
    name: Literal["keep_zeros"] = "keep_zeros"


def prunable_layers(model: nn.Module) -> list[nn.Module]:
    """The conv and linear layers whose weights are masked: every one but a head tied to an embedding."""
    return [m for _, m in untied_layers(model, (nn.Linear, nn.modules.conv._ConvNd))]


def zero_masks(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, weight != 0) of every prunable layer: what ``apply_masks`` holds at zero while training."""
    with torch.no_grad():
        return [(m.weight, m.weight != 0) for m in prunable_layers(model)]


def apply_masks(masks: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Zero the masked weights again after an optimiser step."""
    with torch.no_grad():
        for weight, keep in masks:
            weight.mul_(keep)


class KeepZeros(StepPlugin):
    name = "keep_zeros"
    order = 10  # edits the weights: before anything observes them

    def __init__(self, model: nn.Module) -> None:
        self.masks = zero_masks(model)  # built before any step: the pruned model's zeros

    def after_step(self, model: nn.Module) -> None:
        apply_masks(self.masks)


@register_plugin(KeepZerosConfig)
def build(cfg: KeepZerosConfig, run: PluginContext) -> KeepZeros:
    return KeepZeros(run.model)
