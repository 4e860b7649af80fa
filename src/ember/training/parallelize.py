"""Which parallel layout a run uses, and checks that hold whatever the layout.

``choose_strategy`` turns ``parallel.strategy`` (possibly ``auto``) into the layout for
this many processes; ``ember.training.layouts`` holds the layouts themselves.

Example::

    strategy, tp = choose_strategy(recipe, ctx)   # ("ddp", 1) for a small model on 2 ranks
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ember.config import Recipe
from ember.errors import EmberError
from ember.training.distributed import DistContext, all_reduce_, broadcast_object


def choose_strategy(recipe: Recipe, ctx: DistContext) -> tuple[str, int]:
    """(strategy, tp degree) for this run: the recipe's, or for ``auto`` the simplest layout
    ``ember plan`` predicts to fit this device's memory (decided on rank 0, shared)."""
    p = recipe.parallel
    if not ctx.distributed:
        return "single", 1
    if p.strategy != "auto":
        return p.strategy, p.tp if p.strategy == "fsdp+tp" else 1
    if recipe.model.name == "custom":  # a module of the user's: nothing to plan with; each rank holds it whole
        return "ddp", 1
    choice = _auto_layout(recipe, ctx) if ctx.is_main else None
    choice = broadcast_object(choice)
    if isinstance(choice, str):  # rank 0's error, raised on every rank
        raise EmberError(choice)
    return choice


def _auto_layout(recipe: Recipe, ctx: DistContext) -> tuple[str, int] | str:
    from ember.training.memory import format_bytes, plan
    from ember.training.precision import resolve_precision, with_precision

    recipe = with_precision(recipe, resolve_precision(recipe.train.precision, ctx.device).precision)  # auto: here
    memory = device_memory(ctx.device)
    result = plan(recipe, gpus=ctx.world_size, gpu_memory=memory)
    layout = result.recommended
    if layout is None:
        return (
            f"parallel.strategy=auto found no layout of {recipe.model.name} that fits {ctx.world_size} devices "
            f"of {format_bytes(memory)}. Run `ember plan RECIPE --gpus {ctx.world_size}` to see each layout's "
            f"memory, then turn on train.activation_checkpointing, lower train.batch_size, or use more devices."
        )
    return layout.strategy, layout.tp


def device_memory(device: torch.device) -> int:
    """Bytes one rank may use: the GPU's memory, or this machine's RAM shared by its local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def all_finite(model: nn.Module) -> bool:
    """Every weight finite on every rank (one all-reduce when the model is sharded)."""
    flags = [local(p).isfinite().all() for p in model.parameters()]
    bad = (~torch.stack(flags).all()).int() if flags else torch.zeros((), dtype=torch.int)
    return not bool(all_reduce_(bad.to(next(model.parameters()).device if flags else "cpu"), "max").item())
