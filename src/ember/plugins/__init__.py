"""Step plugins: methods the training loop runs without knowing them.

Each module here defines one plugin — its recipe config, the :class:`StepPlugin` and a
builder registered with :func:`register_plugin` — and this package derives the rest:
``PluginConfig``, the tagged union the recipe's ``plugins:`` list holds, and
:func:`build_plugins`, which turns that list into what the loop calls. A new plugin is a
new module here and a line in the import below.

Example::

    recipe = load_recipe("recipes/cnn-digits.yaml", ["plugins=[{name: ema, decay: 0.99}]"])
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field
from torch import nn

from ember.plugins import class_weights, distill, ema, ewc, l1, lora, masks  # noqa: F401 (each registers itself)
from ember.plugins.registry import PLUGINS, PluginConfigBase
from ember.training.checkpoint import mark_frozen_base
from ember.training.low_rank import merge_adapters
from ember.training.plugin import PluginContext, Plugins

# Union[] of a runtime tuple: the | form cannot take one (hence the noqa).
PluginConfig = Annotated[Union[tuple(config for config, _ in PLUGINS.values())], Field(discriminator="name")]  # noqa: UP007


def build_plugins(configs: list[PluginConfigBase], run: PluginContext) -> Plugins:
    """The recipe's plugins, built in the order listed, for the model in ``run``."""
    return Plugins([PLUGINS[cfg.name][1](cfg, run) for cfg in configs])


def prepare_model(configs: list[PluginConfigBase], model: nn.Module) -> dict:
    """Before the layout: the recipe's plugins change the bare model (``prepare_model``); returns the
    entries they add to the run's model.json. A model that starts from a LoRA run trains with that
    run's adapters merged into its weights (new adapters, if any, go on top)."""
    merge_adapters(model)
    for cfg in configs:
        cfg.prepare_model(model)
    if any(cfg.freezes_base for cfg in configs):
        mark_frozen_base(model)
    return {k: v for cfg in configs for k, v in cfg.model_entries().items()}
