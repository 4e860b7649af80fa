"""``ember distill --teacher RUN --student RECIPE``: knowledge distillation, teacher → student.

The student is trained by the one training loop with the recipe's ``distill`` section
set: each micro-batch also goes through the frozen teacher, and the loss is

    (1 - alpha) * cross-entropy(student, labels) + alpha * T² * KL(teacher_T || student_T)

where ``_T`` is the softmax at temperature T, summed over the same counted targets and
divided by their number like every ember loss (so accumulation and data parallelism stay
exact). Classifiers, language models and seq2seq models alike: the teacher must pose the
same task over the same classes or vocabulary.

Hidden-state matching (``hidden_weight`` beta > 0) adds beta times a relation loss on the
last hidden states (the ones the head reads: a GPT's and ViT's final norm, the seq2seq
decoder's, a CNN's last feature map): within each sample, the cosine similarity of every
position with every other (tokens, patches, pixels) should be the teacher's — the
relations, not the vectors, so the student may be narrower without a learned projection
(in the spirit of MiniLM's relation distillation, Wang et al. 2020). Each counted target's
row of squared differences is averaged over the counted columns and summed like the other
terms, so accumulation stays exact. The teacher and student must see the same positions
(same patch size, same number of CNN stages); RNNs are not covered.

>>> result = distill("runs/cnn-big", load_recipe("recipes/cnn-digits.yaml", ["model.width=8"]), temperature=4, alpha=0.7)
>>> result.metrics["accuracy"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import DistillConfig, Recipe, recipe_from_dict
from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.data.spec import IGNORE_INDEX
from ember.training.tasks import FORWARD, distill_loss, targets_of


def load_teacher(cfg: DistillConfig, spec: DataSpec, device: torch.device) -> nn.Module:
    """The teacher run's model, frozen and in eval mode, after checking it fits the student's data."""
    from ember.runs import load_trained_model

    teacher_dir = Path(cfg.teacher)
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


def taught_loss(loss: torch.Tensor, logits: torch.Tensor, teacher: nn.Module, batch: dict, task: str,
                cfg: DistillConfig, hidden: Optional[tuple["LastHidden", "LastHidden"]] = None) -> torch.Tensor:
    """``loss`` (the summed cross-entropy on the labels) blended with the summed distillation terms;
    ``hidden``: the (student, teacher) last-hidden-state captures when ``cfg.hidden_weight`` > 0."""
    with torch.no_grad():
        teacher_logits, _ = FORWARD[task](teacher, batch)
    targets = targets_of(task, batch)
    taught = (1 - cfg.alpha) * loss + cfg.alpha * distill_loss(logits, teacher_logits, targets, cfg.temperature)
    if hidden is not None:
        student_states, teacher_states = (h.states() for h in hidden)
        if student_states.shape[1] != teacher_states.shape[1]:
            raise EmberError(
                f"Hidden-state matching compares positions, but the student's last hidden states cover "
                f"{student_states.shape[1]} positions and the teacher's {teacher_states.shape[1]} (another patch size "
                f"or number of CNN stages). Give the student the teacher's patch_size / stages, or set "
                f"distill.hidden_weight=0."
            )
        taught = taught + cfg.hidden_weight * relation_loss(student_states, teacher_states, targets)
    return taught


class LastHidden:
    """Keeps the output of the layer that produces a model's last hidden states, as [B, positions, width]."""

    def __init__(self, model: nn.Module) -> None:
        self.output: Optional[torch.Tensor] = None
        _last_hidden_layer(model).register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self.output = output

    def states(self) -> torch.Tensor:
        out = self.output
        return out.flatten(2).transpose(1, 2) if out.dim() == 4 else out  # a feature map: one position per pixel


def _last_hidden_layer(model: nn.Module) -> nn.Module:
    """The seq2seq decoder's final norm, a GPT's or ViT's final norm, a CNN's last residual block."""
    for name in ("ln_dec", "ln_f"):
        if hasattr(model, name):
            return getattr(model, name)
    if hasattr(model, "stem"):
        return model.blocks[-1]
    raise EmberError(f"Hidden-state matching covers the gpt, vit, cnn and seq2seq models, not {type(model).__name__}. "
                     f"Set distill.hidden_weight=0 (the soft targets still work).")


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


def distill(teacher: str | Path, student: Recipe, temperature: float = 2.0, alpha: float = 0.5,
            run_dir: str | Path | None = None, resume: Optional[str] = None, hidden_weight: float = 0.0):
    """Train ``student`` taught by the finished run ``teacher``; returns train's TrainResult."""
    from ember.training.loop import train

    if not (Path(teacher) / "model.json").is_file():
        raise EmberError(f"--teacher {teacher} is not a finished run directory (no model.json). Name a run written "
                         f"by ember train, e.g. runs/cnn.")
    raw = student.model_dump(mode="json")
    raw["distill"] = {"teacher": str(teacher), "temperature": temperature, "alpha": alpha, "hidden_weight": hidden_weight}
    return train(recipe_from_dict(raw, source="the student recipe"), run_dir=run_dir, resume=resume)
