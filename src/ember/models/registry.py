"""The model tables, derived from the models' own registrations (``ember.models.zoo``).

Each model registers once, in its own module, with the decorator on its builder::

    @register_model("gpt", GPTConfig, tasks=("lm",))
    def build(cfg: GPTConfig, spec: DataSpec) -> GPT: ...

Adding a model is one module (copy ``gpt.py``: a config whose ``name`` is a ``Literal`` of
the registered name, an ``nn.Module``, ``build(cfg, spec)`` with the decorator) and its name in the
import line below. From the registrations this module derives ``MODELS`` (name ->
builder), ``MODEL_CONFIGS`` (name -> config class, to rebuild a config from a saved
model.json), ``ModelConfig`` (the recipe's ``model`` section: a union of the config
classes told apart by ``name``), the SimCLR bodies and which models serve a task.
``tests/test_models.py`` then asks for a tiny example of the new model and runs the
generic tests on it.

>>> from ember.models.gpt import GPTConfig
>>> model = build_model(GPTConfig(n_layer=2), DataSpec("lm", vocab_size=100, seq_len=64))
>>> model_summary(model)["params"] > 0
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field
from torch import nn

from ember.data.spec import DataSpec
from ember.errors import EmberError

# Imported for their registrations: a model is in the tables below once its module has run.
from ember.models import clip, cnn, custom, encoder, gpt, llama, mlp, rnn, seq2seq, vit  # noqa: F401
from ember.models.simclr import SimCLR
from ember.models.zoo import REGISTRY, models_serving
from ember.objectives import ObjectiveConfig

# By name, so that listings do not depend on the order the modules happen to import in.
MODELS: dict[str, Callable[[Any, DataSpec], nn.Module]] = {name: REGISTRY[name].build for name in sorted(REGISTRY)}

# Rebuild a config from a saved model.json: MODEL_CONFIGS[d["name"]].model_validate(d)
MODEL_CONFIGS: dict[str, type[BaseModel]] = {name: REGISTRY[name].config for name in sorted(REGISTRY)}

# The image models whose features(x) a SimCLR projection head can sit on.
SIMCLR_BODIES = tuple(models_serving("simclr"))


def model_config_union() -> Any:
    """The recipe's ``model`` section: any registered config, chosen by its ``name``."""
    # Union[] of a runtime tuple: the | form cannot take one (hence the noqa).
    return Annotated[Union[tuple(MODEL_CONFIGS.values())], Field(discriminator="name")]  # noqa: UP007


ModelConfig = model_config_union()


def build_model(cfg: BaseModel, spec: DataSpec, objective: ObjectiveConfig | None = None) -> nn.Module:
    """Build the model ``cfg.name`` names for the data ``spec`` describes; for task ``simclr``,
    the image model's body under ``objective``'s projection head.

    Raises EmberError when the name is unknown or the model cannot serve the data.
    """
    name = getattr(cfg, "name", None)
    if name not in MODELS:
        raise EmberError(f"Unknown model {name!r}. Set model.name to one of: {', '.join(MODELS)}.")
    if spec.task == "simclr":
        if name not in SIMCLR_BODIES:
            raise EmberError(
                f"objective.name=simclr puts a projection head on an image model's features; model {name} "
                f"is not one. Use model.name {' or '.join(SIMCLR_BODIES)}."
            )
        objective = objective or ObjectiveConfig(name="simclr")
        return SimCLR(MODELS[name](cfg, replace(spec, task="classify")), objective.proj_dim, objective.temperature)
    # Each builder starts with zoo.check_task, which refuses a task the model did not register
    # for and names the models that did; it may say more first (encoder on lm data says why).
    return MODELS[name](cfg, spec)


def model_summary(model: nn.Module) -> dict:
    """``{"params": unique parameter count, "flops_per_item": training FLOPs per token or sample}``.

    Accepts a ``torch.compile`` wrapper too.
    """
    model = getattr(model, "_orig_mod", model)
    if not hasattr(model, "num_params"):  # a module of the user's (model.name: custom): its FLOPs are unknown
        return {
            "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "flops_per_item": None,
        }
    return {"params": model.num_params(), "flops_per_item": model.flops_per_item()}
