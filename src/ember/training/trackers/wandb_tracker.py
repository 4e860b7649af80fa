"""Weights & Biases (``train.trackers: [wandb]``, extra ``ember[wandb]``): offline unless you say otherwise.

The run is written under RUN/wandb (``offline-run-<time>-<id>/run-<id>.wandb``) and needs no
network: mode ``offline`` unless ``$WANDB_MODE`` is set (``WANDB_MODE=online`` with a login sends
it live; ``wandb sync RUN/wandb/offline-run-*`` uploads an offline one later). Project:
``$WANDB_PROJECT`` or ``ember``; run name: the run directory's name. Recorded: the recipe as the
run's config (nested sections, as in recipe.yaml), history rows ``train/<key>`` and
``val/<metric>`` at their step, a language model's samples as HTML ``val/sample``, and the
exit code (0 finished, 1 failed, 255 killed). W&B's console capture is off (ember's own progress
bar stays as it is), and so are its own ``wandb:`` lines unless ember's logger shows debug messages
(``ember -v``): ember's last line names RUN/wandb. On resume the same W&B run id continues (``resume="allow"``; offline, in a
new ``offline-run-*`` directory: sync them in order), without the steps the run had already sent
(RUN/trackers.json's ``logged_up_to``, written when a run ends, also by Ctrl-C or an error; a
killed process leaves the older figure, and those steps are sent again).
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path

from ember.errors import EmberError
from ember.training.trackers.base import register_tracker, tracker_package

logger = logging.getLogger(__name__)

EXIT_CODES = {"finished": 0, "failed": 1, "killed": 255}


@register_tracker("wandb", module="wandb", extra="wandb")
class WandbTracker:
    def start(self, recipe: dict, recipe_text: str, run_dir: Path, resumed_step: int, kept: dict | None) -> dict:
        wandb = tracker_package("wandb")
        self.wandb = wandb
        # Steps this run sent before it was interrupted are not sent again (W&B's steps only go up).
        self.logged_up_to = (kept or {}).get("logged_up_to", 0)
        try:  # the user's W&B settings ($WANDB_MODE, a login) are theirs to fix: said in one paragraph
            self.run = wandb.init(
                dir=str(run_dir),
                mode=None if os.environ.get("WANDB_MODE") else "offline",  # the user's choice, else no network
                project=os.environ.get("WANDB_PROJECT", "ember"),
                name=run_dir.resolve().name,
                id=(kept or {}).get("run_id"),  # None: W&B makes a new one
                resume="allow",
                config=recipe,
                settings=wandb.Settings(console="off", quiet=True, silent=not logger.isEnabledFor(logging.DEBUG)),
            )
        except (wandb.errors.Error, ValueError) as err:
            details = err.errors() if callable(getattr(err, "errors", None)) else None  # pydantic's, from Settings
            cause = details[0]["msg"] if details else (str(err).strip() or type(err).__name__).splitlines()[0]
            raise EmberError(
                f"W&B could not start a run (WANDB_MODE={os.environ.get('WANDB_MODE') or 'offline'}: {cause}). "
                f"Unset WANDB_MODE to write offline under RUN/wandb (wandb sync uploads it later), or fix the "
                f"setting (online needs `wandb login` or WANDB_API_KEY); or take wandb out of train.trackers."
            ) from None
        return {"run_id": self.run.id}

    def log_metrics(self, step: int, metrics: dict[str, float], split: str) -> None:
        if step <= self.logged_up_to:
            return
        self.run.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        if step <= self.logged_up_to:
            return
        self.run.log({f"val/{tag}": self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=EXIT_CODES[status])
