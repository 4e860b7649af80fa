"""How one model is spread over the ranks: the strategy, the wrapping, and the way back.

``choose_strategy`` turns ``parallel.strategy`` (possibly ``auto``) into the layout for
this many processes; ``parallelize`` applies it to the freshly built model before the
optimiser is made, because FSDP and tensor parallelism replace parameters by DTensors:

- ddp: ``DistributedDataParallel`` around the model (the model itself stays plain);
- fsdp: FSDP2's ``fully_shard`` on each repeated block and on the root, with the
  recipe's mixed precision policy (gathered and computed in ``fsdp_param_dtype``,
  gradients reduced in ``fsdp_reduce_dtype``);
- tp: Megatron-style splits of every Transformer block over the "tp" mesh dimension;
- fsdp+tp: tensor parallel inside each group, FSDP across groups (a 2-D mesh);
- pp: the loop has already cut the model to this rank's stage (``ember.training.pipeline``);
  the pipeline schedule runs it.

>>> forward_model = parallelize(model, ctx, recipe)
>>> with grad_sync(forward_model, enabled=False):  # accumulate without communicating
...     loss.backward()
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from ember.config import Recipe
from ember.errors import EmberError
from ember.models.layers import repeated_blocks
from ember.training.distributed import DistContext, all_reduce_, broadcast_object

SHARDED = ("fsdp", "tp", "fsdp+tp", "pp")  # strategies whose parameters are not whole on every rank


def choose_strategy(recipe: Recipe, ctx: DistContext) -> tuple[str, int]:
    """(strategy, tp degree) for this run: the recipe's, or for ``auto`` the simplest layout
    ``ember plan`` predicts to fit this device's memory (decided on rank 0, shared)."""
    p = recipe.parallel
    if not ctx.distributed:
        return "single", 1
    if p.strategy != "auto":
        return p.strategy, p.tp if p.strategy == "fsdp+tp" else 1
    choice = _auto_layout(recipe, ctx) if ctx.is_main else None
    choice = broadcast_object(choice)
    if isinstance(choice, str):  # rank 0's error, raised on every rank
        raise EmberError(choice)
    return choice


def _auto_layout(recipe: Recipe, ctx: DistContext) -> tuple[str, int] | str:
    from ember.plan import format_bytes, plan

    memory = device_memory(ctx.device)
    result = plan(recipe, gpus=ctx.world_size, gpu_memory=memory)
    layout = result.recommended
    if layout is None:
        return (f"parallel.strategy=auto found no layout of {recipe.model.name} that fits {ctx.world_size} devices "
                f"of {format_bytes(memory)}. Run `ember plan RECIPE --gpus {ctx.world_size}` to see each layout's "
                f"memory, then turn on train.activation_checkpointing, lower train.batch_size, or use more devices.")
    return layout.strategy, layout.tp


def device_memory(device: torch.device) -> int:
    """Bytes one rank may use: the GPU's memory, or this machine's RAM shared by its local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_supported(recipe: Recipe, strategy: str) -> None:
    """Refuse the combinations a sharded layout cannot run, each with its fix."""
    if strategy in SHARDED and recipe.continual.ewc > 0:
        raise EmberError(f"continual.ewc is not supported with parallel.strategy={strategy}: its Fisher information is "
                         f"held per full weight. Use parallel.strategy=ddp (or single), or set continual.ewc=0.")
    if strategy in SHARDED and recipe.train.ema_decay > 0:
        raise EmberError(
            f"train.ema_decay is not supported with parallel.strategy={strategy}: the EMA copy would need the "
            f"same sharding as the model. Set train.ema_decay=0, or use parallel.strategy=ddp."
        )
    if strategy != "pp":
        return
    t = recipe.train
    refused = [(t.precision == "fp16", "train.precision=fp16 (the schedule runs backward itself, past the loss "
                                       "scaler): use bf16"),
               (recipe.optim.l1 > 0, "optim.l1 (the penalty's gradient would bypass the schedule): set optim.l1=0"),
               (t.compile, "train.compile (stages are run by the schedule): set train.compile=false"),
               (bool(recipe.distill.teacher), "distillation (the stages' loss sees no teacher): distill with ddp or fsdp"),
               (bool(recipe.init.from_run), "starting from a finished run (init.from_run): fine-tune with ddp or fsdp")]
    for bad, what in refused:
        if bad:
            raise EmberError(f"parallel.strategy=pp does not support {what}, or use another strategy.")


def parallelize(model: nn.Module, ctx: DistContext, recipe: Recipe) -> nn.Module:
    """Apply ``ctx.strategy`` to ``model`` (in place for fsdp/tp) and return the module to run
    forward and backward through. The optimiser, checkpoints and validation use ``model``."""
    strategy = ctx.strategy
    check_supported(recipe, strategy)
    if strategy == "single":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    if strategy == "pp":  # the model is already this rank's stage; the schedule runs it
        return model
    if strategy in ("tp", "fsdp+tp"):
        from ember.training.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, ctx.mesh["tp"])
    if strategy in ("fsdp", "fsdp+tp"):
        _fully_shard(model, ctx, recipe)
    return model


def _fully_shard(model: nn.Module, ctx: DistContext, recipe: Recipe) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    p = recipe.parallel
    bf16 = p.fsdp_param_dtype == "bf16" or (p.fsdp_param_dtype == "auto" and recipe.train.precision == "bf16")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.bfloat16 if p.fsdp_reduce_dtype == "bf16" else torch.float32)
    mesh = ctx.mesh["dp"]
    # One unit per block: its parameters are gathered just before it runs and freed after,
    # so at most a block or two are whole at a time.
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=p.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=p.reshard_after_forward)


def grad_sync(forward_model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Inside, backward accumulates gradients locally (enabled=False) or reduces them over the
    data-parallel ranks (enabled=True): the no_sync of DDP and FSDP2 behind one name."""
    inner = getattr(forward_model, "_orig_mod", forward_model)  # under torch.compile
    if hasattr(inner, "no_sync"):  # DDP
        return contextlib.nullcontext() if enabled else inner.no_sync()
    if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t



def all_finite(model: nn.Module) -> bool:
    """Every weight finite on every rank (one all-reduce when the model is sharded)."""
    flags = [local(p).isfinite().all() for p in model.parameters()]
    bad = (~torch.stack(flags).all()).int() if flags else torch.zeros((), dtype=torch.int)
    return not bool(all_reduce_(bad.to(next(model.parameters()).device if flags else "cpu"), "max").item())


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0's CPU (None elsewhere); collective when sharded."""
    if ctx.strategy not in SHARDED:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if ctx.is_main else None
    if ctx.strategy == "pp":  # each stage holds whole tensors of its own parameters: gather them
        import torch.distributed as dist

        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in model.state_dict().items()})
        return {k: v for part in parts for k, v in part.items()} if ctx.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if ctx.is_main else None
