"""L1 penalty: ``weight * Σ|w|`` over the decayed weights (matrices and kernels), once per optimiser step.

Recipe: ``plugins: [{name: l1, weight: 1e-4}]`` (formerly ``optim.l1``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ember.plugins.registry import PluginConfigBase, register_plugin
from ember.training.optim import l1_penalty, split_decay
from ember.training.plugin import PluginContext, StepPlugin


class L1Config(PluginConfigBase):
    name: Literal["l1"] = "l1"
    weight: float = Field(
        gt=0, description="L1 strength: weight * sum of |w| over the decayed weights is added to the loss"
    )

    def layout_problem(self, strategy: str, sharded: bool) -> str | None:
        if strategy == "pp":
            return (
                "the l1 plugin (optim.l1) is not supported with parallel.strategy=pp (the penalty's gradient "
                "would bypass the schedule): remove it (--set plugins.l1=null; optim.l1=0 in an older recipe)"
            )
        return None


class L1(StepPlugin):
    name = "l1"

    def __init__(self, weight: float, params: list[torch.nn.Parameter]) -> None:
        self.weight, self.params = weight, params

    def penalty(self) -> torch.Tensor:
        return self.weight * l1_penalty(self.params)


@register_plugin(L1Config)
def build(cfg: L1Config, run: PluginContext) -> L1:
    return L1(cfg.weight, split_decay(run.model)[0])
