"""Low-rank adapters (LoRA, Hu et al., 2021) on a model's ``nn.Linear`` layers: attach, freeze, merge.

Each target Linear stays where it is, with its parameter names unchanged (tensor-parallel
plans, FSDP units and Hugging Face name maps keep working); it gains two parameters,
``lora_A`` [r, in] (Kaiming-uniform, as ``nn.Linear`` and peft initialise) and ``lora_B``
[out, r] (zeros, so training starts from the base model exactly), and a forward hook adds

    dropout(x) @ A.T @ B.T * (alpha / r)

to its output. ``merge_adapters`` folds them into the weight (W += alpha/r · B @ A) and removes
them. This module holds only the mechanics, below ``ember.runs`` (which rebuilds the adapters
of a finished LoRA run before loading it); the recipe's plugin is ``ember.plugins.lora``.

Example::

    attach_adapters(model, rank=8, alpha=16, dropout=0.0, targets=["q", "v"])
    freeze_base(model, train_also=[])
    merge_adapters(model)   # plain Linear layers again, their weights updated
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import EmberError
from ember.models.layers import untied_layers


def _add_low_rank(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """The forward hook: the layer's output plus its adapters' low-rank update."""
    x = F.dropout(inputs[0], module.lora_dropout, training=module.training)
    return output + F.linear(F.linear(x, module.lora_A), module.lora_B) * module.lora_scale


def adapted_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every Linear that carries adapters."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "lora_A")]


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _target_layers(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    """The Linear layers whose last name component is a target; an unknown or tied target is refused."""
    linears = _linears(model)
    last = {name.rsplit(".", 1)[-1] for name, _ in linears}
    unknown = [t for t in targets if t not in last]
    if unknown:
        raise EmberError(
            f"The lora plugin's targets {unknown} name no Linear layer of this model; its Linear layers are "
            f"named {sorted(last)} (the last component of their names). Set plugins.lora.targets to some of them."
        )
    chosen = [(name, m) for name, m in linears if name.rsplit(".", 1)[-1] in targets]
    untied = {name for name, _ in untied_layers(model, (nn.Linear,))}
    tied = [name for name, _ in chosen if name not in untied]
    if tied:
        raise EmberError(
            f"The lora plugin cannot adapt {tied}: its weight is tied to another layer (the token embedding), "
            f"so an update folded into it would change both. Leave it out of plugins.lora.targets, or untie "
            f"it (model.tie_weights=false) and start a new run."
        )
    return chosen


def attach_adapters(
    model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str], fresh: bool = True
) -> list[str]:
    """Give each target Linear its adapters (``fresh``: initialised for training; else zeros, to be
    loaded); returns the adapted layers' names. A layer that already has adapters is refused."""
    chosen = _target_layers(model, targets)
    again = [name for name, m in chosen if hasattr(m, "lora_A")]
    if again:
        raise EmberError(f"{again} already carry LoRA adapters: merge them (merge_adapters) before adding new ones.")
    for _, layer in chosen:
        w = layer.weight
        a = torch.zeros(rank, layer.in_features, dtype=w.dtype, device=w.device)
        if fresh:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        layer.lora_A = nn.Parameter(a)
        layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, rank, dtype=w.dtype, device=w.device))
        layer.lora_scale, layer.lora_dropout = alpha / rank, dropout
        layer.lora_hook = layer.register_forward_hook(_add_low_rank)
    return [name for name, _ in chosen]


def freeze_base(model: nn.Module, train_also: list[str]) -> None:
    """Only the adapters and the parameters of modules named in ``train_also`` (last name component,
    or a whole dotted name) keep training; every other parameter is frozen."""
    names = {name for name, _ in model.named_modules() if name}
    short = {name.rsplit(".", 1)[-1] for name in names}
    unknown = [t for t in train_also if t not in names and t not in short]
    if unknown:
        raise EmberError(
            f"The lora plugin's train_also names {unknown}, which are no modules of this model; its top-level "
            f"modules are {sorted(n for n in names if '.' not in n)}. Name modules by their last name component "
            f"(ln_f, lm_head) or their whole dotted name."
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        if name and (name in train_also or name.rsplit(".", 1)[-1] in train_also):
            for p in module.parameters():
                p.requires_grad_(True)
    for _, layer in adapted_layers(model):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight (W += alpha/r · B @ A), in place, and remove the
    adapters and their hooks: the model computes the same with plain Linear layers. A model without
    adapters is returned as it is."""
    for _, layer in adapted_layers(model):
        update = (layer.lora_B.float() @ layer.lora_A.float()) * layer.lora_scale
        layer.weight.add_(update.to(layer.weight.dtype))
        layer.lora_hook.remove()
        del layer.lora_A, layer.lora_B, layer.lora_hook, layer.lora_scale, layer.lora_dropout
    return model
