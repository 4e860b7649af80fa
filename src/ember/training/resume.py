"""Resuming a run: which checkpoint, whether it fits the recipe, and the state it holds.

A checkpoint carries the whole resolved recipe. On resume every key must match
except those that only say how long to run, how to watch it and how the work is
laid out (``RESUMABLE_KEYS``, the eval and parallel sections): changing the
optimiser or the seed midway would silently make a different run than the one
the directory records. The global batch (``train.batch_size x train.grad_accum x``
data-parallel ranks) must stay; how it is split may change, so a run saved on 2
ranks resumes on 1 (with twice the batch or accumulation) and vice versa.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from ember.config import Recipe
from ember.errors import EmberError
from ember.migrate import migrate_recipe
from ember.training.checkpoint import (
    FROZEN_BASE,
    checkpoint_step,
    latest_valid_checkpoint,
    list_checkpoints,
    load_trainer_state,
    rng_state,
    set_rng_state,
)
from ember.training.plugin import Plugins

# Keys a resumed run may change: length, reporting, and how (not what) it computes.
RESUMABLE_KEYS = {
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.progress",
    "train.profile.start",
    "train.profile.steps",
    "train.profile.memory",
    "train.peak_flops",
    "train.trackers",
    "train.compile",
    "train.device",
    "train.activation_checkpointing",
    "data.num_workers",
    "data.verify",
    "data.prepare_workers",  # how batches are fetched, not which
    "parallel.timeout_s",
}
RESUMABLE_SECTIONS = {"eval", "parallel"}
BATCH_KEYS = {"train.batch_size", "train.grad_accum"}  # may change when the global batch does not


@dataclass
class Progress:
    """Loop state outside the modules that resume needs: the step, early stopping, skips."""

    step: int = 0
    best: float | None = None
    evals_since_best: int = 0
    skipped_steps: int = 0
    stopped_early: bool = False


# Keys that change neither a finished run's exported weights nor how its final metrics were computed.
_NOT_IN_THE_RESULT = {
    "train.max_steps",  # compared on its own: a run finished when it reached it
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.progress",
    "train.peak_flops",
    "train.compile",
    "data.num_workers",
    "data.verify",
    "data.prepare_workers",
    "parallel.timeout_s",
}


def already_finished(run_dir: Path, recipe: Recipe) -> tuple[dict, bool] | None:
    """(RUN/model.json, stopped early) when ``--resume auto`` would only rebuild the run to write
    the same model and metrics again: the newest valid checkpoint reached train.max_steps (or
    stopped early), model.safetensors was exported from it and matches its sha256, and the recipe
    differs from the checkpoint's only in keys that do not enter the result. None otherwise: the
    full resume then trains on, or refuses, or re-exports, as it always did."""
    from ember.runs import read_model_info, verify_weights

    if not (run_dir / "model.json").is_file() or not (run_dir / "model.safetensors").is_file():
        return None
    checkpoint = latest_valid_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        return None
    state = load_trainer_state(checkpoint, verify=False)  # just verified
    progress = state.get("progress") or {}
    if not (progress.get("step", -1) >= recipe.train.max_steps or progress.get("stopped_early")):
        return None
    try:
        info = read_model_info(run_dir)
        verify_weights(run_dir, info)
    except EmberError:  # a damaged export: the full resume writes it again
        return None
    exported_from_it = info.get("step") == state.get("step") == checkpoint_step(checkpoint)
    if not exported_from_it or not isinstance(state.get("recipe"), dict):
        return None
    saved, current = _flatten(_as_today(state["recipe"], checkpoint)), _flatten(recipe.model_dump(mode="json"))
    if any(saved.get(k) != current.get(k) for k in set(saved) | set(current) if k not in _NOT_IN_THE_RESULT):
        return None
    return info, bool(progress.get("stopped_early"))


def find_resume_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """None for a fresh run; the newest valid checkpoint for "auto"; else the named file."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_valid_checkpoint(run_dir / "checkpoints")
    path = Path(resume)
    if not path.is_dir():
        raise EmberError(
            f"--resume {resume}: no such checkpoint directory. Use --resume auto to take the newest valid one in {run_dir / 'checkpoints'}."
        )
    return path


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def global_batch(recipe: dict, dp_size: int) -> int:
    return recipe["train"]["batch_size"] * recipe["train"]["grad_accum"] * dp_size


def check_compatible(trainer: dict, recipe: Recipe, path: Path, dp_size: int = 1) -> None:
    """Refuse to resume when a key outside RESUMABLE_KEYS differs from the checkpoint's recipe,
    or when the global batch differs (``dp_size``: this run's data-parallel ranks)."""
    if not isinstance(trainer.get("recipe"), dict) or not isinstance(trainer["recipe"].get("train"), dict):
        raise EmberError(
            f"Checkpoint {path}'s trainer.pt holds no recipe: it was not written by ember's training loop. "
            f"Resume from another checkpoint (--resume PATH), or start a new run directory."
        )
    saved_recipe = _as_today(trainer["recipe"], path)
    current_recipe = recipe.model_dump(mode="json")
    saved, current = _flatten(saved_recipe), _flatten(current_recipe)
    saved_batch = global_batch(saved_recipe, trainer.get("dp_size", 1))
    batch = global_batch(current_recipe, dp_size)
    if saved_batch != batch:
        raise EmberError(
            f"Checkpoint {path} was trained with a global batch of {saved_batch} samples per optimiser step "
            f"(train.batch_size={saved['train.batch_size']} x train.grad_accum={saved['train.grad_accum']} x "
            f"{trainer.get('dp_size', 1)} data-parallel rank(s)); this run's is {batch} (train.batch_size="
            f"{current['train.batch_size']} x train.grad_accum={current['train.grad_accum']} x {dp_size}). Set "
            f"train.batch_size and train.grad_accum so that their product x {dp_size} is {saved_batch}."
        )
    differ = [
        k
        for k in sorted(set(saved) | set(current))
        if saved.get(k, _default(k)) != current.get(k)
        and k not in RESUMABLE_KEYS | BATCH_KEYS
        and k.split(".")[0] not in RESUMABLE_SECTIONS
    ]
    if differ:
        shown = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs recipe {current.get(k)!r}" for k in differ)
        raise EmberError(
            f"Checkpoint {path} was written with a different recipe ({shown}). Resume with the recipe that wrote "
            f"it (RUN/recipe.yaml; `ember train --run-dir RUN --resume auto` without a recipe uses it), or start a "
            f"new run directory. Only {', '.join(sorted(RESUMABLE_KEYS))}, the eval and parallel sections, and the "
            f"split of the global batch may change on resume."
        )


def _as_today(saved: dict, path: Path) -> dict:
    """A checkpoint's recipe as today's ember writes it: an earlier version's sections migrated, keys
    added since then at their defaults (what that run ran with). One that no longer validates is
    compared as it is, key by key."""
    try:
        migrated = migrate_recipe(saved)
    except ValueError as err:
        raise EmberError(
            f"Checkpoint {path}'s recipe cannot be read as today's ({err}). Start a new run directory."
        ) from None
    try:
        return Recipe.model_validate(migrated).model_dump(mode="json")
    except ValidationError:
        return migrated


def _default(key: str):
    """A recipe key's default: what a checkpoint written before the key existed ran with."""
    section, *path = key.split(".")
    field = Recipe.model_fields.get(section)
    node = field.default_factory() if field is not None and field.default_factory is not None else None
    for part in path:
        node = getattr(node, part, None)
    return list(node) if isinstance(node, tuple) else node  # as the saved recipe's JSON holds it


def drop_newer_checkpoints(directory: Path, step: int) -> list[Path]:
    """Delete checkpoints past ``step``: resuming from an older one abandons that future."""
    dropped = [p for p in list_checkpoints(directory) if checkpoint_step(p) > step]
    for p in dropped:
        shutil.rmtree(p, ignore_errors=True)
    return dropped


def trainer_state(
    scheduler,
    scaler,
    plugins: Plugins,
    loader,
    progress: Progress,
    recipe: Recipe,
    dp_size: int,
    model: nn.Module | None = None,
) -> dict:
    """Everything besides weights and optimiser needed to continue exactly: schedule, scaler,
    plugins, every rank's RNG and buffers, the data position, the recipe and the data-parallel size."""
    own = {"model": own_buffers(model), "plugins": {k: own_buffers(m) for k, m in plugins.rank_modules().items()}}
    return {
        "step": progress.step,
        "progress": dataclasses.asdict(progress),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "plugins": plugins.state_dict(),
        "rng": rng_state(),
        "rng_ranks": _gather(rng_state()),  # every rank's, so each continues its own dropout stream
        "buffers_ranks": _gather(own),  # see own_buffers
        "data": loader.state_dict(),
        "recipe": recipe.model_dump(mode="json"),
        "dp_size": dp_size,
        FROZEN_BASE: getattr(model, FROZEN_BASE, None),  # the base the checkpoint's adapters were trained on
    }


def check_frozen_base(state: dict, model: nn.Module, path: Path) -> None:
    """Refuse a checkpoint whose frozen base (left out of it: see ``mark_frozen_base``) is not the
    one this run rebuilt: its trainable weights were trained on top of other weights."""
    saved, ours = state.get(FROZEN_BASE), getattr(model, FROZEN_BASE, None)
    if saved != ours:
        raise EmberError(
            f"Checkpoint {path} was trained on top of frozen base weights (sha256 {saved}) other than the "
            f"ones this run starts from (sha256 {ours}): the run it starts from (init.from_run, init.from_hf) "
            f"or its model has changed since. Point the recipe at the starting point the run was begun with, "
            f"or start a new run directory."
        )


def own_buffers(module: nn.Module | None) -> dict[str, torch.Tensor]:
    """This rank's copy of ``module``'s persistent whole-tensor buffers (BatchNorm running statistics,
    an EMA's count), on the CPU.

    Data-parallel ranks keep these apart: each updates them from its own batches (FSDP never
    syncs them; DDP broadcasts rank 0's before each forward, so rank 1's differ again after it).
    The DCP checkpoint keeps one copy of such a replicated tensor, taken from whichever rank
    its planner picks per tensor, so every rank's own copy is kept here and restored to it.
    """
    return {name: buffer.detach().cpu().clone() for name, buffer in persistent_buffers(module)}


def persistent_buffers(module: nn.Module | None):
    """(name, buffer) of the buffers ``module.state_dict()`` holds, less sharded (DTensor) ones."""
    if module is None:
        return
    for prefix, sub in module.named_modules():
        for name, buffer in sub._buffers.items():  # persistence has no public accessor
            sharded = hasattr(buffer, "device_mesh")  # a DTensor (without importing DTensor)
            if buffer is not None and name not in sub._non_persistent_buffers_set and not sharded:
                yield (f"{prefix}.{name}" if prefix else name), buffer


def _restore_buffers(module: nn.Module | None, saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` (one rank's ``own_buffers``) into ``module``'s buffers of the same name and
    shape; the others keep what the DCP checkpoint gave them (another layout may name others)."""
    current = dict(persistent_buffers(module))
    with torch.no_grad():
        for name, value in saved.items():
            buffer = current.get(name)
            if buffer is not None and buffer.shape == value.shape:
                buffer.copy_(value)


def _gather(obj) -> list:
    import torch.distributed as dist

    from ember.training.distributed import is_distributed

    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def load_scaler(scaler, saved: dict) -> None:
    """The checkpoint's loss scale into this run's scaler. A checkpoint that ran without fp16 (train.precision
    auto on other hardware) has none: this run's fp16 scaler starts at its initial scale and finds its own
    in a few steps. A disabled scaler (bf16, fp32) ignores a saved one."""
    if saved or not scaler.is_enabled():
        scaler.load_state_dict(saved)


def restore_trainer_state(
    state: dict, scheduler, scaler, plugins: Plugins, loader, rank: int = 0, model: nn.Module | None = None
) -> Progress:
    """Load ``trainer_state`` into the run's components, after the weights (which this refines:
    ``model`` gets back this rank's own buffers)."""
    scheduler.load_state_dict(state["scheduler"])
    load_scaler(scaler, state["scaler"])
    plugin_states = state.get("plugins")
    if plugin_states is None:  # written before plugins: the EMA was kept on its own
        plugin_states = {"ema": state["ema"]} if state.get("ema") is not None else {}
    plugins.load_state_dict(plugin_states)
    loader.load_state_dict(state["data"])
    ranks = state.get("rng_ranks") or [state["rng"]]
    # Same number of ranks: each continues exactly. Another number: rank r takes the saved
    # stream r (or rank 0's), so the run goes on, with other random draws than an unbroken one.
    set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
    buffers = state.get("buffers_ranks") or [{}]  # none in checkpoints written before they were kept
    own = buffers[rank] if rank < len(buffers) else buffers[0]  # the same rule as for the RNG
    _restore_buffers(model, own.get("model", {}))
    plugin_buffers = own.get("plugins", {"ema": own["ema"]} if "ema" in own else {})
    for name, module in plugins.rank_modules().items():
        _restore_buffers(module, plugin_buffers.get(name, {}))
    return Progress(**state["progress"])
