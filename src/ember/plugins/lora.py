"""LoRA (Hu et al., 2021): fine-tune low-rank adapters on a frozen model.

Recipe: ``plugins: [{name: lora, rank: 8, alpha: 16, dropout: 0.0, targets: [q, v]}]``. Before
the layout wraps the model (``prepare_model``), each ``nn.Linear`` whose last name component
is a target gains ``lora_A`` and ``lora_B`` (``ember.training.low_rank``), and every other
parameter is frozen, except those of the modules in ``train_also`` (e.g. ``[ln_f]``). Only
the trainable tensors enter the optimiser and the training checkpoints; the frozen base is
rebuilt at resume from where the run started (a fresh seeded init, ``init.from_run``) and
checked against the sha256 the checkpoint recorded. The run's model.safetensors holds base
and adapters, its model.json the settings (``lora``), so ``ember generate`` and ``ember eval``
load it as it is; ``merge_adapters`` folds the adapters into the weights (``ember export --merge``).

Example::

    recipe = load_recipe("recipes/gpt-tiny.yaml", ["plugins=[{name: lora, rank: 4, targets: [q, v]}]"])
    merge_adapters(load_trained_model(run_dir)[0])
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from ember.plugins.registry import PluginConfigBase, register_plugin
from ember.training.low_rank import attach_adapters, freeze_base, merge_adapters
from ember.training.plugin import PluginContext, StepPlugin

__all__ = ["LoRA", "LoRAConfig", "merge_adapters"]


class LoRAConfig(PluginConfigBase):
    name: Literal["lora"] = "lora"
    rank: int = Field(8, ge=1, description="rank r of each adapter pair (A: r x in, B: out x r)")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    targets: list[str] = Field(
        default_factory=lambda: ["q", "v"],
        min_length=1,
        description="Linear layers adapted, by the last component of their names (q, k, v, proj, fc, gate, up)",
    )
    train_also: list[str] = Field(
        default_factory=list, description="modules whose own parameters keep training besides the adapters (ln_f)"
    )
    freezes_base: ClassVar[bool] = True

    def layout_problem(self, strategy: str, sharded: bool) -> str | None:
        if strategy in ("tp", "fsdp+tp", "pp"):
            return (
                f"the lora plugin is not supported with parallel.strategy={strategy}: its adapters are not split "
                f"by tensor parallelism nor cut into pipeline stages. Use parallel.strategy=fsdp (or ddp, single): "
                f"with the base frozen, its gradients and optimiser state are small"
            )
        return None

    def prepare_model(self, model: nn.Module) -> None:
        attach_adapters(model, self.rank, self.alpha, self.dropout, self.targets)
        freeze_base(model, self.train_also)

    def model_entries(self) -> dict:
        return {"lora": self.model_dump(mode="json")}


class LoRA(StepPlugin):
    """Nothing to do in the step: the adapters are parameters the optimiser trains."""

    name = "lora"


@register_plugin(LoRAConfig)
def build(cfg: LoRAConfig, run: PluginContext) -> LoRA:
    return LoRA()
