"""Resuming a run: which checkpoint, whether it fits the recipe, and the state it holds.

A checkpoint carries the whole resolved recipe. On resume every key must match
except those that only say how long to run and how to watch it
(``RESUMABLE_KEYS``): changing the optimiser, the batch or the seed midway
would silently make a different run than the one the directory records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ember.config import Recipe
from ember.errors import EmberError
from ember.train.checkpoint import latest_valid_checkpoint, list_checkpoints, rng_state, set_rng_state

# Keys a resumed run may change: length, reporting, and how (not what) it computes.
RESUMABLE_KEYS = {
    "train.max_steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.progress", "train.peak_flops", "train.compile", "train.device", "train.activation_checkpointing",
    "data.num_workers", "data.verify", "data.prepare_workers",  # how batches are fetched, not which
    "parallel.timeout_s",
}
RESUMABLE_SECTIONS = {"eval"}


@dataclass
class Progress:
    """Loop state outside the modules that resume needs: the step, early stopping, skips."""

    step: int = 0
    best: Optional[float] = None
    evals_since_best: int = 0
    skipped_steps: int = 0
    stopped_early: bool = False


def find_resume_checkpoint(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """None for a fresh run; the newest valid checkpoint for "auto"; else the named file."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_valid_checkpoint(run_dir / "checkpoints")
    path = Path(resume)
    if not path.is_file():
        raise EmberError(f"--resume {resume}: no such checkpoint file. Use --resume auto to take the newest valid one in {run_dir / 'checkpoints'}.")
    return path


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_compatible(saved_recipe: dict, recipe: Recipe, path: Path) -> None:
    """Refuse to resume when a key outside RESUMABLE_KEYS differs from the checkpoint's recipe."""
    saved, current = _flatten(saved_recipe), _flatten(recipe.model_dump(mode="json"))
    differ = [
        k for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k) and k not in RESUMABLE_KEYS and k.split(".")[0] not in RESUMABLE_SECTIONS
    ]
    if differ:
        shown = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs recipe {current.get(k)!r}" for k in differ)
        raise EmberError(
            f"Checkpoint {path} was written with a different recipe ({shown}). Resume with the recipe that wrote "
            f"it (RUN/recipe.yaml; `ember train --run-dir RUN --resume auto` without a recipe uses it), or start a "
            f"new run directory. Only {', '.join(sorted(RESUMABLE_KEYS))} and the eval section may change on resume."
        )


def drop_newer_checkpoints(directory: Path, step: int) -> list[Path]:
    """Delete checkpoints past ``step``: resuming from an older one abandons that future."""
    dropped = [p for p in list_checkpoints(directory) if int(p.stem.split("_")[1]) > step]
    for p in dropped:
        p.unlink(missing_ok=True)
        p.with_suffix(".json").unlink(missing_ok=True)
    return dropped


def training_state(model, optimizer, scheduler, scaler, ema, loader, progress: Progress, recipe: Recipe) -> dict:
    """Everything needed to continue exactly: weights, optimiser, schedule, scaler, EMA, RNGs, data position."""
    return {
        "step": progress.step,
        "progress": dataclasses.asdict(progress),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng": rng_state(),
        "rng_ranks": _gather(rng_state()),  # every rank's, so each continues its own dropout stream
        "data": loader.state_dict(),
        "recipe": recipe.model_dump(mode="json"),
    }


def _gather(obj) -> list:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def restore_training_state(state: dict, model, optimizer, scheduler, scaler, ema, loader, rank: int = 0) -> Progress:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    loader.load_state_dict(state["data"])
    ranks = state.get("rng_ranks") or [state["rng"]]
    # Same number of ranks: each continues exactly. Another number: rank r takes the saved
    # stream r (or rank 0's), so the run goes on, with other random draws than an unbroken one.
    set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
    return Progress(**state["progress"])
