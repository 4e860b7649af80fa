"""TensorBoard (``train.trackers: [tensorboard]``, extra ``ember[tb]``): events in RUN/tb.

Scalars ``train/<key>`` and ``val/<metric>`` at their step; the flattened recipe as the
HParams plugin's session (``train.lr``, ``model.n_layer``, ...); the recipe text as text
``recipe``; a language model's sample at each validation as text ``sample``. On resume,
events past the resumed step are purged (``purge_step``), so the curves read as one run.
"""

from __future__ import annotations

from pathlib import Path

from ember.training.trackers.base import flat_recipe, register_tracker, tracker_package


@register_tracker("tensorboard", module="tensorboard", extra="tb")
class TensorBoardTracker:
    def start(self, recipe: dict, recipe_text: str, run_dir: Path, resumed_step: int, kept: dict | None) -> dict:
        tracker_package("tensorboard")
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when a run starts
        from torch.utils.tensorboard.summary import hparams

        # Events at steps <= resumed_step were logged before the checkpoint and stay.
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resumed_step + 1 if resumed_step else None)
        if not resumed_step:  # written once, in the run's own event file (add_hparams would make a sub-run)
            metrics = {"train/loss": 0.0, f"val/{recipe['eval']['metric']}": 0.0}
            for summary in hparams(flat_recipe(recipe), metrics):
                self.writer.file_writer.add_summary(summary)
        self.log_text(resumed_step, "recipe", recipe_text)
        return {}

    def log_metrics(self, step: int, metrics: dict[str, float], split: str) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"{split}/{key}", value, step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, as_markdown_code(text), step)

    def finish(self, status: str) -> None:
        self.writer.close()


def as_markdown_code(text: str) -> str:
    """TensorBoard renders text as Markdown: an indented block shows code and indentation as they are."""
    return "\n".join("    " + line for line in text.splitlines())
