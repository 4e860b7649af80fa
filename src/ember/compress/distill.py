"""``ember distill --teacher RUN --student RECIPE``: knowledge distillation, teacher → student.

The student is trained by the one training loop with the recipe's ``distill`` section
set: each micro-batch also goes through the frozen teacher, and the loss is

    (1 - alpha) * cross-entropy(student, labels) + alpha * T² * KL(teacher_T || student_T)

where ``_T`` is the softmax at temperature T, summed over the same counted targets and
divided by their number like every ember loss (so accumulation and data parallelism stay
exact). Classifiers, language models and seq2seq models alike: the teacher must pose the
same task over the same classes or vocabulary. Hidden-state matching is not offered yet.

>>> result = distill("runs/cnn-big", load_recipe("recipes/cnn-digits.yaml", ["model.width=8"]), temperature=4, alpha=0.7)
>>> result.metrics["accuracy"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ember.config import DistillConfig, Recipe, recipe_from_dict
from ember.data.spec import DataSpec
from ember.errors import EmberError
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
                cfg: DistillConfig) -> torch.Tensor:
    """``loss`` (the summed cross-entropy on the labels) blended with the summed distillation term."""
    with torch.no_grad():
        teacher_logits, _ = FORWARD[task](teacher, batch)
    soft = distill_loss(logits, teacher_logits, targets_of(task, batch), cfg.temperature)
    return (1 - cfg.alpha) * loss + cfg.alpha * soft


def distill(teacher: str | Path, student: Recipe, temperature: float = 2.0, alpha: float = 0.5,
            run_dir: str | Path | None = None, resume: Optional[str] = None):
    """Train ``student`` taught by the finished run ``teacher``; returns train's TrainResult."""
    from ember.training.loop import train

    if not (Path(teacher) / "model.json").is_file():
        raise EmberError(f"--teacher {teacher} is not a finished run directory (no model.json). Name a run written "
                         f"by ember train, e.g. runs/cnn.")
    raw = student.model_dump(mode="json")
    raw["distill"] = {"teacher": str(teacher), "temperature": temperature, "alpha": alpha}
    return train(recipe_from_dict(raw, source="the student recipe"), run_dir=run_dir, resume=resume)
