"""The step plugin contract: how a method joins the loop without the loop knowing it.

A plugin (distillation, pruning masks, EWC, L1, EMA — ``ember.plugins``) overrides
only the hooks it needs; the loop calls every hook of every plugin at fixed points:

- ``loss(batch, logits, loss)``, for each micro-batch inside autocast: the micro-batch's
  loss, changed or as it is — *summed* over its counted targets like ``loss`` itself,
  before the division by the step's target count, so accumulation and data parallelism
  stay exact (invariant 1);
- ``penalty()``, once per optimiser step: a term on the weights (L1, EWC), added as
  on one big batch;
- ``after_step(model)``, after each applied (not skipped) optimiser step, in the
  order of ``order`` (weights are edited before they are observed);
- ``eval_model(model)``: the module validated and exported (EMA's average);
- ``state_dict()`` / ``load_state_dict()``: resumed with the checkpoint;
  ``rank_module`` names a module whose per-rank buffers resume keeps apart.

A plugin that changes the model itself (LoRA adds adapters and freezes the rest) does it
in its recipe config's ``prepare_model(model)`` (``ember.plugins.registry``), called on the
bare model right after it is built and before the layout moves, shards or wraps it (FSDP
shards parameters and DDP registers its buckets at wrap time); ``ember plan`` calls it on
the model it measures. With ``freezes_base`` the frozen parameters are the run's starting
point: checkpoints hold only what trains, and a resume checks the base's sha256.

Example::

    class Halve(StepPlugin):
        def penalty(self):
            return 0.5 * sum(p.pow(2).sum() for p in self.params)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ember.data.spec import DataSpec


class StepPlugin:
    """Every hook a no-op: a plugin overrides what it needs."""

    name: ClassVar[str] = "plugin"
    order: ClassVar[int] = 50  # after_step: weight editors (masks, 10) before observers (EMA, 90)
    rank_module: nn.Module | None = None

    def loss(self, batch: dict, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def penalty(self) -> torch.Tensor | None:
        return None

    def after_step(self, model: nn.Module) -> None:
        pass

    def eval_model(self, model: nn.Module) -> nn.Module:
        return model

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Plugins:
    """The run's plugins as one: what the loop calls."""

    def __init__(self, plugins: list[StepPlugin]) -> None:
        self.items = sorted(plugins, key=lambda p: p.order)  # stable: equal orders keep the recipe's order

    def __bool__(self) -> bool:
        return bool(self.items)

    def loss(self, batch: dict, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch's summed loss after every plugin has had its say, in order."""
        for plugin in self.items:
            loss = plugin.loss(batch, logits, loss)
        return loss

    def penalty(self) -> torch.Tensor | None:
        terms = [t for t in (p.penalty() for p in self.items) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_step(self, model: nn.Module) -> None:
        for plugin in self.items:
            plugin.after_step(model)

    def eval_model(self, model: nn.Module) -> nn.Module:
        for plugin in self.items:
            model = plugin.eval_model(model)
        return model

    def rank_modules(self) -> dict[str, nn.Module]:
        return {p.name: p.rank_module for p in self.items if p.rank_module is not None}

    def state_dict(self) -> dict[str, dict]:
        return {p.name: p.state_dict() for p in self.items}

    def load_state_dict(self, states: dict[str, dict]) -> None:
        for plugin in self.items:
            if plugin.name in states:
                plugin.load_state_dict(states[plugin.name])


@dataclass(frozen=True)
class PluginContext:
    """What a plugin is built from: the model being trained (after its layout wrapped it, before
    any step), the data it reads, where it runs, the run's seed and label smoothing, and
    ``train_labels()``: every training sample's class (None when the data has no labels)."""

    model: nn.Module
    spec: DataSpec
    device: torch.device
    seed: int
    label_smoothing: float = 0.0
    train_labels: Callable[[], Any] | None = None
