"""``ember distill --teacher RUN --student RECIPE``: knowledge distillation, teacher → student.

The student is trained by the one training loop with a ``distill`` step plugin
(``ember.plugins.distill``, where the loss is described) added to its recipe: each
micro-batch also goes through the frozen teacher, and the teacher's soft targets (and,
with ``hidden_weight`` > 0, its hidden-state relations) join the loss on the labels.

Example::

    result = distill("runs/cnn-big", load_recipe("recipes/cnn-digits.yaml", ["model.width=8"]),
                     temperature=4, alpha=0.7)
    result.metrics["accuracy"]
"""

from __future__ import annotations

from pathlib import Path

from ember.config import Recipe, recipe_from_dict
from ember.errors import EmberError
from ember.training.loop import TrainResult, train


def distill(
    teacher: str | Path,
    student: Recipe,
    temperature: float = 2.0,
    alpha: float = 0.5,
    run_dir: str | Path | None = None,
    resume: str | None = None,
    hidden_weight: float = 0.0,
) -> TrainResult:
    """Train ``student`` taught by the finished run ``teacher``; returns train's TrainResult."""
    from ember.runs import require_existing_run

    require_existing_run(teacher, "ember distill --teacher")
    if not (Path(teacher) / "model.json").is_file():
        raise EmberError(
            f"--teacher {teacher} is not a finished run directory (no model.json). Name a run written "
            f"by ember train, e.g. runs/cnn."
        )
    raw = student.model_dump(mode="json")
    entry = {
        "name": "distill",
        "teacher": str(teacher),
        "temperature": temperature,
        "alpha": alpha,
        "hidden_weight": hidden_weight,
    }
    # --teacher is this command's: a student recipe's own distill entry (a run taught before) gives way to it.
    raw["plugins"] = [p for p in raw["plugins"] if p["name"] != "distill"] + [entry]
    return train(recipe_from_dict(raw, source="the student recipe"), run_dir=run_dir, resume=resume)
