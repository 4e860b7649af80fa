"""Knowledge distillation as a step plugin: a frozen teacher's soft targets (and, optionally, its
hidden-state relations) join each micro-batch's loss.

The loss becomes

    (1 - alpha) * cross-entropy(student, labels) + alpha * T² * KL(teacher_T || student_T)
        + beta * relation loss of the last hidden states

where ``_T`` is the softmax at temperature T, every term summed over the same counted targets
and divided by their number like every ember loss (so accumulation and data parallelism stay
exact). Classifiers, language models and seq2seq models alike: the teacher must pose the same
task over the same classes or vocabulary. A regression student (one value per sample) takes the
teacher's prediction as a second target: (1 - alpha) * squared error to the label + alpha *
squared error to the teacher (the temperature plays no part).

Hidden-state matching (``hidden_weight`` beta > 0) compares the last hidden states (the ones
the head reads: a GPT's and ViT's final norm, the seq2seq decoder's, a CNN's last feature
map): within each sample, the cosine similarity of every position with every other (tokens,
patches, pixels) should be the teacher's — the relations, not the vectors, so the student may
be narrower without a learned projection (in the spirit of MiniLM's relation distillation,
Wang et al. 2020). The teacher and student must see the same positions (same patch size, same
number of CNN stages); RNNs are not covered.

Recipe: ``plugins: [{name: distill, teacher: runs/big, temperature: 2, alpha: 0.5}]``
(formerly the ``distill`` section); ``ember distill`` sets it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ember.data.spec import IGNORE_INDEX, DataSpec
from ember.errors import EmberError
from ember.plugins.registry import PluginConfigBase, register_plugin
from ember.runs import load_trained_model
from ember.training.plugin import PluginContext, StepPlugin
from ember.training.tasks import FORWARD, distill_loss, squared_error


class DistillConfig(PluginConfigBase):
    name: Literal["distill"] = "distill"
    teacher: str = Field(min_length=1, description="a finished run directory whose model teaches this one")
    temperature: float = Field(
        2.0, gt=0, le=100, description="softens both distributions; the KL term is scaled by T^2"
    )
    alpha: float = Field(
        0.5, ge=0, le=1, description="weight of the teacher's soft targets; 1 - alpha on the true labels"
    )
    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the hidden-state relation loss (each position's cosine "
        "similarities with the others, student vs teacher); 0 = off",
    )

    def layout_problem(self, strategy: str, sharded: bool) -> str | None:
        if strategy == "pp":
            return (
                "distillation (the stages' loss sees no teacher) is not supported with parallel.strategy=pp: "
                "distill with ddp or fsdp"
            )
        return None

    def weights_file(self) -> Path | None:
        return Path(self.teacher) / "model.safetensors"


class Distill(StepPlugin):
    """The teacher's terms for each micro-batch; the loop never sees the teacher."""

    name = "distill"

    def __init__(self, cfg: DistillConfig, student: nn.Module, teacher: nn.Module, task: str) -> None:
        self.cfg, self.teacher, self.task = cfg, teacher, task
        self.hidden = (LastHidden(student), LastHidden(teacher)) if cfg.hidden_weight > 0 else None

    def loss(self, batch: dict, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` (on the labels) blended with the teacher's soft targets [+ beta * relation loss]."""
        with torch.no_grad():
            # The targets the task scores (clip: each pair's index in the batch's score matrix).
            teacher_logits, targets = FORWARD[self.task](self.teacher, batch)
        cfg = self.cfg
        if self.task == "regress":  # one value: the teacher's prediction is a second target (squared error)
            soft = squared_error(logits.reshape(targets.shape), teacher_logits.reshape(targets.shape).float())
        else:
            soft = distill_loss(logits, teacher_logits, targets, cfg.temperature)
        taught = (1 - cfg.alpha) * loss + cfg.alpha * soft
        if self.hidden is not None:
            taught = taught + cfg.hidden_weight * _hidden_relation(self.hidden, targets)
        return taught


@register_plugin(DistillConfig)
def build(cfg: DistillConfig, run: PluginContext) -> Distill:
    return Distill(cfg, run.model, load_teacher(cfg.teacher, run.spec, run.device), run.spec.task)


def _hidden_relation(hidden: tuple[LastHidden, LastHidden], targets: torch.Tensor) -> torch.Tensor:
    student_states, teacher_states = (h.states() for h in hidden)
    if student_states.shape[1] != teacher_states.shape[1]:
        raise EmberError(
            f"Hidden-state matching compares positions, but the student's last hidden states cover "
            f"{student_states.shape[1]} positions and the teacher's {teacher_states.shape[1]} (another patch size "
            f"or number of CNN stages). Give the student the teacher's patch_size / stages, or set "
            f"the distill plugin's hidden_weight to 0 (ember distill --hidden-weight 0)."
        )
    return relation_loss(student_states, teacher_states, targets)


def load_teacher(teacher: str, spec: DataSpec, device: torch.device) -> nn.Module:
    """The teacher run's model, frozen and in eval mode, after checking it fits the student's data."""
    teacher_dir = Path(teacher)
    model, info = load_trained_model(teacher_dir, str(device))
    theirs = DataSpec.from_dict(info["data"])
    same = theirs.task == spec.task and theirs.num_classes == spec.num_classes and theirs.vocab_size == spec.vocab_size
    if not same:
        raise EmberError(
            f"The teacher {teacher_dir} was trained for {_what(theirs)}, the student's data is {_what(spec)}. A teacher "
            f"must predict the same classes or tokens as its student: give a teacher trained on the same data."
        )
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _what(spec: DataSpec) -> str:
    if spec.task == "classify":
        return f"classification into {spec.num_classes} classes"
    return f"{spec.task} over a {spec.vocab_size}-token vocabulary"


class LastHidden:
    """Keeps the output of the layer that produces a model's last hidden states, as [B, positions, width]."""

    def __init__(self, model: nn.Module) -> None:
        self.output: torch.Tensor | None = None
        _last_hidden_layer(model).register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self.output = output

    def states(self) -> torch.Tensor:
        out = self.output
        return out.flatten(2).transpose(1, 2) if out.dim() == 4 else out  # a feature map: one position per pixel


def _last_hidden_layer(model: nn.Module) -> nn.Module:
    """The seq2seq decoder's final norm, a GPT's, Llama's or ViT's final norm, a CNN's last residual block."""
    for name in ("ln_dec", "ln_f", "norm_f"):
        if hasattr(model, name):
            return getattr(model, name)
    if hasattr(model, "stem"):
        return model.blocks[-1]
    raise EmberError(
        f"Hidden-state matching covers the gpt, llama, vit, cnn and seq2seq models, not {type(model).__name__}. "
        f"Set the distill plugin's hidden_weight to 0 (ember distill --hidden-weight 0; the soft targets still work)."
    )


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared differences of the within-sample cosine-similarity matrices of two [B, L, C] states,
    averaged over each row's counted columns and summed over the counted targets (rows of a
    sequence task; whole samples of a classifier, which has one target each)."""

    def relations(h: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(h.float(), dim=-1)
        return unit @ unit.transpose(1, 2)

    squared = (relations(student) - relations(teacher)).pow(2)  # [B, L, L]
    counted = targets != IGNORE_INDEX
    if counted.dim() == 1:  # classification: one target per sample, all positions count
        return (squared.mean(dim=(1, 2)) * counted).sum()
    columns = counted.unsqueeze(1).float()
    rows = (squared * columns).sum(-1) / columns.sum(-1).clamp(min=1)
    return (rows * counted).sum()
