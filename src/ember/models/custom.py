"""``model.name: custom``: a module of your own, given in Python — ``ember.train(recipe, model=module)``.

The recipe says what the module does (``task``), ember's loop does the rest: exact
accumulation, the layouts that keep the module whole (single, ddp), checkpoints, bit-exact
resume, the run directory and its report.

- ``classify``: ``module(batch["x"])`` returns logits [B, classes]; ``batch["y"]`` the labels;
- ``lm``: ``module(batch["x"])`` returns logits [B, T, vocab]; ``batch["y"]`` the next tokens;
- ``loss``: ``module(batch)`` returns the loss *summed* over the batch's samples (a 0-d tensor);
  ember divides by the samples of the whole optimiser step, so accumulation stays exact.

The run's ``model.safetensors`` holds the module's weights; load them back into your own
class with ``safetensors.torch.load_model(module, "RUN/model.safetensors")`` (ember cannot
rebuild a class it was never told how to make, and never imports one by name).

Example::

    recipe = load_recipe(None, ["model.name=custom", "model.task=classify", "data.name=custom"])
    ember.train(recipe, model=MyNet(), data=my_dataset)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.zoo import register_model
from ember.schema import RecipeModel


class CustomConfig(RecipeModel):
    name: Literal["custom"] = "custom"
    task: Literal["classify", "lm", "loss"] = Field(
        "classify",
        description="what the module given to ember.train does: "
        "classify (logits per sample), lm (logits per token) or loss (its "
        "own loss, summed over the batch's samples)",
    )


@register_model("custom", CustomConfig, tasks=("classify", "lm", "loss"), given=True)
def build(cfg: CustomConfig, spec: DataSpec) -> nn.Module:
    raise EmberError(
        "model.name=custom is a module you give in Python: ember.train(recipe, model=module). ember cannot "
        "build it from a recipe or a run directory; load a custom run's weights into your own class with "
        "safetensors.torch.load_model(module, 'RUN/model.safetensors')."
    )
