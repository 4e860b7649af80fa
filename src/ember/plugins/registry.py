"""The plugin table: each plugin registers its recipe config and its builder once, where it is defined.

A plugin's config is a recipe section with a ``name`` tag (the tagged union in the
recipe's ``plugins:`` list is derived from this table, as the model union is from the
model table); its builder turns the config and a :class:`PluginContext` into the
:class:`StepPlugin` the loop runs.

Example::

    class MyConfig(PluginConfigBase):
        name: Literal["mine"] = "mine"

    @register_plugin(MyConfig)
    def build(cfg: MyConfig, run: PluginContext) -> StepPlugin: ...
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from torch import nn

from ember.schema import RecipeModel
from ember.training.plugin import PluginContext, StepPlugin


class PluginConfigBase(RecipeModel):
    """A plugin's recipe entry. ``layout_problem`` names a parallel layout it cannot run under."""

    name: str
    freezes_base: ClassVar[bool] = False  # prepare_model freezes parameters: checkpoints hold only what trains

    def prepare_model(self, model: nn.Module) -> None:
        """Change the bare model before its layout moves and wraps it (LoRA's adapters); also run on the
        fake model ``ember plan`` measures."""

    def model_entries(self) -> dict:
        """Entries the run's model.json gains, to rebuild the trained model from it (LoRA's settings)."""
        return {}

    def layout_problem(self, strategy: str, sharded: bool) -> str | None:
        """None when the plugin runs under ``strategy``, else what to do instead (one sentence)."""
        return None

    def state_bytes(self, params: int, buffer_bytes: int) -> int:
        """Memory per rank the plugin keeps for a model of ``params`` fp32 parameters (``ember plan``)."""
        return 0

    def weights_file(self) -> Path | None:
        """A teacher's file of frozen weights, loaded on every rank: the memory check counts it."""
        return None


Builder = Callable[[PluginConfigBase, PluginContext], StepPlugin]
PLUGINS: dict[str, tuple[type[PluginConfigBase], Builder]] = {}


def register_plugin(config: type[PluginConfigBase]) -> Callable[[Builder], Builder]:
    """Decorator: ``build`` makes the plugin ``config``'s ``name`` tag names."""
    name = config.model_fields["name"].default

    def register(build: Builder) -> Builder:
        if name in PLUGINS:
            raise ValueError(f"plugin {name!r} is registered twice")
        PLUGINS[name] = (config, build)
        return build

    return register
