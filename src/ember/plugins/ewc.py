"""Elastic weight consolidation (Kirkpatrick et al., 2017): keep the weights that mattered for old data.

Before a continued run trains on new data, the diagonal of the empirical Fisher
information is estimated on samples of the old training data at the starting weights
θ*: F_i = mean over samples of (∂ loss / ∂ θ_i)², one sample at a time (the model in eval
mode: no dropout, batch norm on its running statistics). Each optimiser step then adds

    lambda / 2 * Σ_i F_i (θ_i − θ*_i)²

once, like the L1 penalty, so weights that carried the old task are pulled back to their
old values in proportion to how much they carried.

Recipe: ``plugins: [{name: ewc, strength: 100, data: {name: digits, ...}}]`` (formerly
``continual.ewc`` with ``continual.old_data``); ``ember continue --ewc`` sets it.

Example::

    anchor = ElasticAnchor(model, old_samples(old_data, 512, seed=0, device=cpu), "classify")
    loss = loss + strength * anchor.penalty()
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ember.data.build import build_sets
from ember.data.config import DataConfig
from ember.models.modes import evaluating
from ember.plugins.registry import PluginConfigBase, register_plugin
from ember.training.plugin import PluginContext, StepPlugin
from ember.training.tasks import FORWARD, count_targets, task_loss


class EWCConfig(PluginConfigBase):
    name: Literal["ewc"] = "ewc"
    strength: float = Field(gt=0, description="elastic weight consolidation strength lambda")
    samples: int = Field(512, ge=1, description="samples of data the Fisher information is estimated on")
    data: DataConfig = Field(description="the data the starting run was trained on")

    def layout_problem(self, strategy: str, sharded: bool) -> str | None:
        if sharded:
            return (
                f"the ewc plugin (continual.ewc) is not supported with parallel.strategy={strategy}: its Fisher "
                f"information is held per full weight. Use parallel.strategy=ddp (or single), or remove it "
                f"(--set plugins.ewc=null; continual.ewc=0 in an older recipe)"
            )
        return None


class ElasticAnchor:
    """The starting weights θ* and their Fisher information on the old data."""

    def __init__(self, model: nn.Module, samples: dict[str, torch.Tensor], task: str) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params]
        self.fisher = [torch.zeros_like(p) for p in self.params]
        n = len(next(iter(samples.values())))
        with evaluating(model):  # each submodule back in its own mode after
            for i in range(n):
                one = {k: v[i : i + 1] for k, v in samples.items()}
                logits, targets = FORWARD[task](model, one)
                loss = task_loss(task, logits, targets) / max(count_targets(targets), 1)
                for f, g in zip(self.fisher, torch.autograd.grad(loss, self.params, allow_unused=True)):
                    if g is not None:
                        f += g.detach().pow(2) / n

    def penalty(self) -> torch.Tensor:
        """½ Σ F (θ − θ*)² over every trainable weight."""
        return 0.5 * sum((f * (p - a).pow(2)).sum() for p, a, f in zip(self.params, self.anchor, self.fisher))


def old_samples(cfg: DataConfig, count: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``count`` samples of ``cfg``'s training split drawn by ``seed``, as the model sees them in
    validation (normalised, not augmented)."""
    sets = build_sets(cfg)
    chosen = np.sort(
        np.random.default_rng(seed).choice(len(sets.train), size=min(count, len(sets.train)), replace=False)
    )
    batch = {k: v.to(device) for k, v in sets.train.get(torch.as_tensor(chosen)).items()}
    return sets.val_transform(batch) if sets.val_transform is not None else batch


class EWC(StepPlugin):
    name = "ewc"

    def __init__(self, strength: float, anchor: ElasticAnchor) -> None:
        self.strength, self.anchor = strength, anchor

    def penalty(self) -> torch.Tensor:
        return self.strength * self.anchor.penalty()


@register_plugin(EWCConfig)
def build(cfg: EWCConfig, run: PluginContext) -> EWC:
    """The Fisher information of the old data at the weights the run starts from."""
    samples = old_samples(cfg.data, cfg.samples, run.seed, run.device)
    return EWC(cfg.strength, ElasticAnchor(run.model, samples, run.spec.task))
