"""Parallel layouts as classes: how one model is spread over the ranks (Lightning Fabric's ``Strategy``).

Each layout answers the same questions for the loop — which module this rank trains
(``prepare``), what forward and backward run through (``wrap``), whether a backward
reduces gradients (``grad_sync``), how one optimiser step's micro-batches are run
(``forward_backward``), how validation runs (``validate``) and how the whole model's
weights come back to rank 0 (``full_state_dict``) — so the loop never tests a strategy
name. ``single`` and ``ddp`` keep whole parameters; ``fsdp``, ``tp`` and ``fsdp+tp``
swap in DTensors; ``pp`` cuts the model into stages (``ember.training.pipeline``). What
only one layout needs (DTensor, FSDP, ``torch.distributed.pipelining``) is imported by
that layout's methods, so a single-process run never pays for it.

Example::

    layout = build_layout(ctx, recipe)          # ctx.strategy: resolved, never "auto"
    model = layout.prepare(model)               # this rank's part
    forward_model = layout.wrap(model)          # before the optimiser: FSDP and tp swap parameters
    outcome = layout.forward_backward(micro_batches, step, model)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ember.config import Recipe
from ember.errors import EmberError
from ember.models.layers import repeated_blocks
from ember.training.distributed import DistContext
from ember.training.grad_norm import grad_norm_, total_grad_norm
from ember.training.plugin import Plugins
from ember.training.tasks import FORWARD, count_targets, targets_of, task_loss
from ember.training.validation import validate


@dataclass
class StepParts:
    """What one optimiser step's forward and backward use besides the batches."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager]
    task: str
    label_smoothing: float
    grad_clip: float
    plugins: Plugins


@dataclass
class StepOutcome:
    """Device tensors: the step's mean loss, its gradient norm, and whether either is non-finite."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    bad: torch.Tensor


class Layout:
    """One process, whole parameters: the base every layout refines."""

    name: ClassVar[str] = "single"
    sharded: ClassVar[bool] = False  # parameters are not whole on every rank

    def __init__(self, ctx: DistContext, recipe: Recipe) -> None:
        self.ctx, self.recipe = ctx, recipe
        self.forward_model: nn.Module | None = None

    def check(self) -> None:
        """Refuse what this layout cannot run (each plugin says which layouts it cannot)."""
        if self.sharded and self.recipe.model.name == "custom":
            raise EmberError(
                f"parallel.strategy={self.name} shards the model, and ember cannot rebuild a module of "
                f"your own (model.name=custom) to gather its weights for the export. Use "
                f"parallel.strategy=ddp (each rank holds the whole module) or single."
            )
        for plugin in self.recipe.plugins:
            problem = plugin.layout_problem(self.name, self.sharded)
            if problem:
                raise EmberError(f"{problem[0].upper()}{problem[1:]}.")

    def prepare(self, model: nn.Module) -> nn.Module:
        """The module this rank trains, checks and saves."""
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module forward and backward run through (in place for fsdp/tp); set before the optimiser."""
        self.forward_model = model
        return model

    def compile(self) -> None:
        """Forward and backward through ``torch.compile`` (train.compile)."""
        self.forward_model = torch.compile(self.forward_model)

    def grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Inside, backward reduces gradients over the data-parallel ranks (enabled) or only accumulates."""
        return contextlib.nullcontext()

    def forward_backward(self, micro_batches: list[dict], step: StepParts, model: nn.Module) -> StepOutcome:
        """Forward and backward over the step's micro-batches, then unscale and clip.

        Normalised by the targets of the whole step on all data-parallel ranks, so accumulation
        and data parallelism equal one big batch; DDP and FSDP average gradients over the W
        ranks, so each rank's share is scaled by W to make that average the sum.
        """
        ctx = self.ctx
        n_targets = ctx.dp_all_reduce_(sum(count_targets(targets_of(step.task, b)) for b in micro_batches))
        step_loss = torch.zeros((), device=ctx.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with self.grad_sync(enabled=last):  # only the last micro-batch's backward communicates
                with step.autocast():
                    logits, targets = FORWARD[step.task](self.forward_model, batch)
                    loss = step.plugins.loss(batch, logits, task_loss(step.task, logits, targets, step.label_smoothing))
                    loss = loss / n_targets
                step_loss += loss.detach()
                penalty = step.plugins.penalty() if last else None  # once per step, as on one big batch
                if penalty is not None:
                    loss = loss + penalty / ctx.dp_size
                step.scaler.scale(loss * ctx.dp_size).backward()
        step.scaler.unscale_(step.optimizer)
        # Measured even when nothing is clipped: a NaN gradient must be caught.
        grad_norm = (
            grad_norm_(model.parameters(), step.grad_clip)
            if step.grad_clip > 0
            else total_grad_norm(model.parameters())
        )
        bad = ~torch.isfinite(step_loss)
        if not step.scaler.is_enabled():  # fp16 overflow is the scaler's business: it skips those steps itself
            bad |= ~torch.isfinite(grad_norm)
        return StepOutcome(step_loss, grad_norm, bad)

    def validate(self, model: nn.Module, data, task: str, autocast, max_batches: int) -> dict[str, float]:
        return validate(
            model,
            data.val,
            task,
            self.ctx.device,
            autocast,
            max_batches,
            data.bytes_per_token(),
            reduce=self.ctx.dp_all_reduce_,
            lockstep=self.sharded,
        )

    def share_buffers(self, model: nn.Module) -> None:
        """Before validating: every data-parallel rank takes the first one's persistent buffers
        (BatchNorm statistics), so the metrics logged are those of the model rank 0 exports."""
        _broadcast_buffers_from_first(model, self.ctx)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0's CPU (None elsewhere); collective when sharded."""
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if self.ctx.is_main else None


class DataParallel(Layout):
    """ddp: ``DistributedDataParallel`` around the model, which itself stays plain."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.ctx.local_rank] if self.ctx.device.type == "cuda" else None
        self.forward_model = DistributedDataParallel(model, device_ids=device_ids)
        return self.forward_model

    def grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        inner = getattr(self.forward_model, "_orig_mod", self.forward_model)  # under torch.compile
        return contextlib.nullcontext() if enabled else inner.no_sync()


class Sharded(Layout):
    """Base of the layouts whose parameters are DTensors: their weights gather collectively."""

    sharded = True

    def grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        inner = getattr(self.forward_model, "_orig_mod", self.forward_model)
        if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2; tensor parallel alone has no data-parallel peers
            inner.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.ctx.is_main else None


class FullyShardedDataParallel(Sharded):
    """fsdp: FSDP2's ``fully_shard`` on each repeated block and on the root, with the recipe's
    mixed precision (gathered and computed in ``fsdp_param_dtype``, reduced in ``fsdp_reduce_dtype``)."""

    name = "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        _fully_shard(model, self.ctx, self.recipe)
        self.forward_model = model
        return model


class TensorParallel(Sharded):
    """tp: Megatron-style splits of every Transformer block over the "tp" mesh dimension."""

    name = "tp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from ember.training.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, self.ctx.mesh["tp"])
        self.forward_model = model
        return model


class FullyShardedTensorParallel(Sharded):
    """fsdp+tp: tensor parallel inside each group, FSDP across the groups (a 2-D mesh)."""

    name = "fsdp+tp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from ember.training.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, self.ctx.mesh["tp"])
        _fully_shard(model, self.ctx, self.recipe)
        self.forward_model = model
        return model


def _fully_shard(model: nn.Module, ctx: DistContext, recipe: Recipe) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    p = recipe.parallel
    bf16 = p.fsdp_param_dtype == "bf16" or (p.fsdp_param_dtype == "auto" and recipe.train.precision == "bf16")
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.bfloat16 if p.fsdp_reduce_dtype == "bf16" else torch.float32,
    )
    mesh = ctx.mesh["dp"]
    # One unit per block: its parameters are gathered just before it runs and freed after,
    # so at most a block or two are whole at a time.
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=p.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=p.reshard_after_forward)


def _broadcast_buffers_from_first(model: nn.Module, ctx: DistContext) -> None:
    """Training is unchanged by this: training-mode BatchNorm normalises by the batch's own
    statistics, and DDP broadcasts rank 0's buffers before each forward anyway."""
    if ctx.dp_size == 1:
        return
    import torch.distributed as dist

    from ember.training.resume import persistent_buffers

    group = None if ctx.dp_size == ctx.world_size else ctx.mesh["dp"].get_group()
    source = dist.get_global_rank(group, 0) if group is not None else 0
    for _, buffer in persistent_buffers(model):
        dist.broadcast(buffer.data, src=source, group=group)


class PipelineParallel(Layout):
    """pp: this rank trains one stage of the GPT's blocks; a GPipe or 1F1B schedule runs the step's
    micro-batches through all stages (``ember.training.pipeline``)."""

    name = "pp"
    sharded = True  # each stage holds only its own parameters

    def check(self) -> None:
        super().check()
        t = self.recipe.train
        refused = [
            (
                t.precision == "fp16",
                "train.precision=fp16 (the schedule runs backward itself, past the loss scaler): use bf16",
            ),
            (t.compile, "train.compile (stages are run by the schedule): set train.compile=false"),
            (
                bool(self.recipe.init.from_run),
                "starting from a finished run (init.from_run): fine-tune with ddp or fsdp",
            ),
        ]
        for bad, what in refused:
            if bad:
                raise EmberError(f"parallel.strategy=pp does not support {what}, or use another strategy.")

    def prepare(self, model: nn.Module) -> nn.Module:
        from ember.training.pipeline import split_gpt

        return split_gpt(model, self.ctx.pp_size, self.ctx.pp_rank)

    def wrap(self, model: nn.Module) -> nn.Module:
        from ember.training.pipeline import build_schedule, step_loss

        ctx, recipe = self.ctx, self.recipe
        self.forward_model = model
        self.schedule = build_schedule(
            model,
            ctx.pp_rank,
            ctx.pp_size,
            ctx.device,
            recipe.train.grad_accum,
            recipe.parallel.pp_schedule,
            functools.partial(step_loss, label_smoothing=recipe.train.label_smoothing),
        )
        return model

    def forward_backward(self, micro_batches: list[dict], step: StepParts, model: nn.Module) -> StepOutcome:
        """The schedule runs forward and backward over the micro-batches; the norm is taken over all stages."""
        from ember.training.pipeline import clip_grad_norm_across, pipeline_step

        ctx = self.ctx
        x, y = torch.cat([b["x"] for b in micro_batches]), torch.cat([b["y"] for b in micro_batches])
        with step.autocast():
            loss = pipeline_step(self.schedule, ctx.pp_rank, ctx.pp_size, x, y, n_targets=count_targets(y))
        grad_norm = clip_grad_norm_across(model.parameters(), step.grad_clip)
        return StepOutcome(loss, grad_norm, ~torch.isfinite(loss) | ~torch.isfinite(grad_norm))

    def validate(self, model: nn.Module, data, task: str, autocast, max_batches: int) -> dict[str, float]:
        from ember.training.pipeline import validate_pipeline

        ctx = self.ctx
        return validate_pipeline(
            model, data.val, ctx.pp_rank, ctx.pp_size, ctx.device, autocast, max_batches, data.bytes_per_token()
        )

    def share_buffers(self, model: nn.Module) -> None:
        """Nothing to share: a pipeline has no data-parallel peers (its stages hold different parameters)."""

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        import torch.distributed as dist

        parts: list = [None] * self.ctx.world_size  # each stage holds whole tensors of its own parameters
        dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in model.state_dict().items()})
        return {k: v for part in parts for k, v in part.items()} if self.ctx.is_main else None


LAYOUTS: dict[str, type[Layout]] = {
    cls.name: cls
    for cls in (
        Layout,
        DataParallel,
        FullyShardedDataParallel,
        TensorParallel,
        FullyShardedTensorParallel,
        PipelineParallel,
    )
}


def build_layout(ctx: DistContext, recipe: Recipe) -> Layout:
    """The layout ``ctx.strategy`` names (resolved, never "auto"), its refusals checked."""
    layout = LAYOUTS[ctx.strategy](ctx, recipe)
    layout.check()
    return layout
