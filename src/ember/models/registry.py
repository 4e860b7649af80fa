"""The model table: recipe ``model.name`` -> config class and builder.

This is the one place that knows every model; adding one means a module with a
config and ``build(cfg, spec)``, and a line in each table below.

>>> model = build_model(GPTConfig(n_layer=2), DataSpec("lm", vocab_size=100, seq_len=64))
>>> model_summary(model)["params"] > 0
True
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

from pydantic import BaseModel
from torch import nn

from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models import clip, cnn, encoder, gpt, rnn, seq2seq, vit
from ember.models.clip import ClipConfig
from ember.models.cnn import CNNConfig
from ember.models.encoder import EncoderConfig
from ember.models.gpt import GPTConfig
from ember.models.rnn import RNNConfig
from ember.models.seq2seq import Seq2SeqConfig
from ember.models.simclr import SimCLR
from ember.models.vit import ViTConfig
from ember.objectives import ObjectiveConfig

MODELS: dict[str, Callable[[Any, DataSpec], nn.Module]] = {
    "gpt": gpt.build,
    "seq2seq": seq2seq.build,
    "vit": vit.build,
    "cnn": cnn.build,
    "rnn": rnn.build,
    "encoder": encoder.build,
    "clip": clip.build,
}

# The image models whose features(x) a SimCLR projection head can sit on.
SIMCLR_BODIES = ("cnn", "vit")

# Rebuild a config from a saved model.json: MODEL_CONFIGS[d["name"]].model_validate(d)
MODEL_CONFIGS: dict[str, type[BaseModel]] = {
    "gpt": GPTConfig,
    "seq2seq": Seq2SeqConfig,
    "vit": ViTConfig,
    "cnn": CNNConfig,
    "rnn": RNNConfig,
    "encoder": EncoderConfig,
    "clip": ClipConfig,
}


def build_model(cfg: BaseModel, spec: DataSpec, objective: Optional[ObjectiveConfig] = None) -> nn.Module:
    """Build the model ``cfg.name`` names for the data ``spec`` describes; for task ``simclr``,
    the image model's body under ``objective``'s projection head.

    Raises EmberError when the name is unknown or the model cannot serve the data.
    """
    name = getattr(cfg, "name", None)
    if name not in MODELS:
        raise EmberError(f"Unknown model {name!r}. Set model.name to one of: {', '.join(MODELS)}.")
    if spec.task == "simclr":
        if name not in SIMCLR_BODIES:
            raise EmberError(f"objective.name=simclr puts a projection head on an image model's features; model {name} "
                             f"is not one. Use model.name cnn or vit.")
        objective = objective or ObjectiveConfig(name="simclr")
        return SimCLR(MODELS[name](cfg, replace(spec, task="classify")), objective.proj_dim, objective.temperature)
    return MODELS[name](cfg, spec)


def model_summary(model: nn.Module) -> dict:
    """``{"params": unique parameter count, "flops_per_item": training FLOPs per token or sample}``.

    Accepts a ``torch.compile`` wrapper too.
    """
    model = getattr(model, "_orig_mod", model)
    return {"params": model.num_params(), "flops_per_item": model.flops_per_item()}
