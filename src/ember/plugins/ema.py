"""Exponential moving average of the weights: validated and exported instead of the raw weights.

After every applied optimiser step, ``ema = decay * ema + (1 - decay) * weights`` (buffers
copied: ``use_buffers``). Recipe: ``plugins: [{name: ema, decay: 0.999}]`` (formerly
``train.ema_decay``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ember.plugins.registry import PluginConfigBase, register_plugin
from ember.training.plugin import PluginContext, StepPlugin


class EMAConfig(PluginConfigBase):
    name: Literal["ema"] = "ema"
    decay: float = Field(
        gt=0, lt=1, description="weight of the running average per step (0.999: about the last 1000 steps)"
    )

    def layout_problem(self, strategy: str, sharded: bool) -> str | None:
        if sharded:
            return (
                f"the ema plugin (train.ema_decay) is not supported with parallel.strategy={strategy}: the EMA "
                f"copy would need the same sharding as the model. Remove it (--set plugins.ema=null; train.ema_decay=0 in an older recipe), or use "
                f"parallel.strategy=ddp"
            )
        return None

    def state_bytes(self, params: int, buffer_bytes: int) -> int:
        return 4 * params + buffer_bytes  # an fp32 copy of the model and its buffers


class EMA(StepPlugin):
    name = "ema"
    order = 90  # observes the weights after every editor (masks) has acted

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.average = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True
        )
        self.rank_module = self.average  # its BatchNorm statistics are each rank's own

    def after_step(self, model: nn.Module) -> None:
        self.average.update_parameters(model)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.average.module

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)


@register_plugin(EMAConfig)
def build(cfg: EMAConfig, run: PluginContext) -> EMA:
    return EMA(run.model, cfg.decay)
