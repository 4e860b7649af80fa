"""A run's parts, built from the recipe in the order that keeps runs reproducible.

The checkpoint to resume is found first (rank 0 verifies it, the others read the verified
one); the run directory, the data and the model follow; the layout wraps the model before
the optimiser is made (FSDP and tensor parallelism swap in DTensor parameters); the step
plugins are built from the model as it starts (those that change the model itself, LoRA,
``prepare_model`` before the layout); the checkpoint's state is loaded last.

Example::

    run = build_run(recipe, Path("runs/cnn"), resume=None, ctx=DistContext())
    run.layout.forward_backward(batches, run.parts, run.model)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.atomic import write_text_atomic
from ember.config import Recipe
from ember.data.build import build_data
from ember.data.custom import custom_data
from ember.data.folds import labels_of
from ember.errors import EmberError
from ember.models.registry import model_summary
from ember.plugins import build_plugins, prepare_model
from ember.runs import prepare_run_dir, starting_model
from ember.training.checkpoint import load_model_and_optimizer, load_trainer_state
from ember.training.device import configure_determinism
from ember.training.distributed import DistContext, barrier, broadcast_object
from ember.training.layouts import Layout, StepParts, build_layout
from ember.training.memory import check_memory
from ember.training.optim import build_optimizer
from ember.training.plugin import PluginContext, Plugins
from ember.training.precision import (
    ResolvedPrecision,
    autocast_factory,
    build_scaler,
    resolve_precision,
    with_precision,
)
from ember.training.resume import (
    Progress,
    check_compatible,
    check_frozen_base,
    drop_newer_checkpoints,
    find_resume_checkpoint,
    restore_trainer_state,
)
from ember.training.schedules import build_scheduler


@dataclass
class Run:
    """Everything the loop drives. ``model`` is this rank's module (a pipeline stage under pp):
    what it trains, checks and saves."""

    recipe: Recipe
    ctx: DistContext
    run_dir: Path
    data: Any  # ember.data.build.Data
    model: nn.Module
    summary: dict
    carried: dict  # model.json entries the source run passes on (pruning)
    layout: Layout
    optimizer: torch.optim.Optimizer
    scheduler: Any
    parts: StepParts
    plugins: Plugins
    progress: Progress
    resumed_from: Path | None
    precision: ResolvedPrecision  # what the run computes in: train.precision, auto resolved for its device

    @property
    def items_per_step(self) -> int:
        """Samples or tokens per optimiser step, over all data-parallel ranks."""
        t = self.recipe.train
        return t.batch_size * t.grad_accum * self.data.items_per_sample * self.ctx.dp_size


def build_run(
    recipe: Recipe,
    run_dir: Path,
    resume: str | None,
    ctx: DistContext,
    model: nn.Module | None = None,
    dataset: Any = None,
) -> Run:
    """The run's parts, the checkpoint's state loaded into them when resuming; ``model`` and
    ``dataset``: a user's own module and map-style dataset instead of the recipe's (``model.name:
    custom``, ``data.name: custom``)."""
    check_given(recipe, model, dataset)
    cfg, device = recipe.train, ctx.device
    precision = resolve_precision(cfg.precision, device)  # once; the recipe saved keeps what the user wrote
    concrete = with_precision(recipe, precision.precision)
    checkpoint = broadcast_object(find_resume_checkpoint(run_dir, resume) if ctx.is_main else None)
    state = load_trainer_state(checkpoint, verify=ctx.is_main and resume != "auto") if checkpoint is not None else None
    if state is not None:
        check_compatible(state, recipe, checkpoint, ctx.dp_size)
    if ctx.is_main:
        prepare_run_dir(run_dir, recipe, resuming=resume is not None)
    barrier()
    configure_determinism(cfg.deterministic, device)
    torch.manual_seed(cfg.seed)
    data = _data(recipe, ctx, dataset)
    if data.codec_json and ctx.is_main:  # the tokenizer travels with the run, for generate
        write_text_atomic(run_dir / "tokenizer.json", data.codec_json)
    layout = build_layout(ctx, concrete)
    if model is None:
        # Before the model exists: a model too large for this device is refused, not allocated until killed.
        check_memory(concrete, data.spec, device, ctx.strategy, ctx.world_size, ctx.tp_size)
        # The same seed: the same weights on every rank.
        model, carried = starting_model(recipe, data.spec, data.codec_json, resuming=state is not None)
        model.grad_checkpointing = cfg.activation_checkpointing
    else:
        carried = {}  # a module of the user's: its own settings stay
    carried = {**carried, **prepare_model(recipe.plugins, model)}  # before the layout shards or wraps it (LoRA)
    model = model.to(device)
    summary = model_summary(model)
    model = layout.prepare(model)
    layout.wrap(model)  # before the optimiser: FSDP and tp swap in DTensor parameters
    run = _with_step_parts(recipe, ctx, run_dir, data, model, summary, carried, layout, precision)
    if ctx.distributed:  # dropout and augmentation differ between data-parallel ranks, as their data do;
        torch.manual_seed(cfg.seed + ctx.dp_rank)  # tensor-parallel peers must draw the same masks
    if state is not None:
        _restore(run, checkpoint, state)
    if cfg.compile:
        layout.compile()
    return run


def check_given(recipe: Recipe, model: nn.Module | None, dataset: Any) -> None:
    """A module or dataset given in Python takes the place of the recipe's section that says so."""
    if (model is not None) != (recipe.model.name == "custom"):
        raise EmberError(
            f"ember.train was given {'a module' if model is not None else 'no module'} and the recipe's "
            f"model.name is {recipe.model.name!r}: a module of your own goes with model.name=custom "
            f"(and model.task: classify, lm or loss), a model ember builds with no model argument."
        )
    if (dataset is not None) != (recipe.data.name == "custom"):
        raise EmberError(
            f"ember.train was given {'a dataset' if dataset is not None else 'no dataset'} and the "
            f"recipe's data.name is {recipe.data.name!r}: a dataset of your own goes with "
            f"data.name=custom, ember's data with no data argument."
        )
    if model is not None and not isinstance(model, nn.Module):
        raise EmberError(f"ember.train(model=...) takes a torch.nn.Module, not a {type(model).__name__}.")


def _data(recipe: Recipe, ctx: DistContext, dataset: Any):
    cfg = recipe.train
    sizes = dict(
        batch_size=cfg.batch_size,
        eval_batch_size=recipe.eval.batch_size or cfg.batch_size,
        seed=cfg.seed,
        rank=ctx.dp_rank,
        world_size=ctx.dp_size,
        grad_accum=cfg.grad_accum,
    )
    if dataset is None:
        return build_data(recipe.data, objective=recipe.objective, replay=True, **sizes)
    task = recipe.model.task if recipe.model.name == "custom" else None  # None: described for ember's model
    return custom_data(dataset, recipe.data, task, **sizes)


def _with_step_parts(
    recipe: Recipe,
    ctx: DistContext,
    run_dir: Path,
    data,
    model: nn.Module,
    summary: dict,
    carried: dict,
    layout: Layout,
    precision: ResolvedPrecision,
) -> Run:
    """The run with its optimiser, schedule, precision and plugins, for the wrapped model."""
    cfg, device = recipe.train, ctx.device
    optimizer = build_optimizer(model, recipe.optim, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, recipe.schedule, cfg.max_steps)
    autocast = autocast_factory(precision.precision, device)
    scaler = build_scaler(precision.precision, device)
    labels = lambda: labels_of(data.train.dataset)  # noqa: E731 (read only by a plugin that counts classes)
    context = PluginContext(model, data.spec, device, cfg.seed, cfg.label_smoothing, labels)
    plugins = build_plugins(recipe.plugins, context)
    parts = StepParts(optimizer, scaler, autocast, data.spec.task, cfg.label_smoothing, recipe.optim.grad_clip, plugins)
    return Run(
        recipe,
        ctx,
        run_dir,
        data,
        model,
        summary,
        carried,
        layout,
        optimizer,
        scheduler,
        parts,
        plugins,
        Progress(),
        None,
        precision,
    )


def _restore(run: Run, checkpoint: Path, state: dict) -> None:
    """Weights and optimiser from the checkpoint's shards, then everything else it holds."""
    check_frozen_base(state, run.model, checkpoint)
    load_model_and_optimizer(checkpoint, run.model, run.optimizer)
    run.progress = restore_trainer_state(
        state, run.scheduler, run.parts.scaler, run.plugins, run.data.train, run.ctx.rank, run.model
    )
    run.resumed_from = checkpoint
    saved = state.get("precision")  # absent in checkpoints written before auto
    if saved is not None and saved != run.precision.precision:  # auto resolved otherwise on this machine
        reason = f"{run.precision.reason}; the checkpoint was trained in {saved}"
        run.precision = ResolvedPrecision(run.precision.precision, reason)
    if run.ctx.is_main:
        drop_newer_checkpoints(run.run_dir / "checkpoints", run.progress.step)
