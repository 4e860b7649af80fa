"""Processes working together through ``torch.distributed``: start-up, reductions.

``ember train RECIPE --nproc N`` re-runs itself under ``torch.distributed.run`` (what
``torchrun`` is), which sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT for each
process; started directly by ``torchrun`` (one node or many) the same environment is
there. ``setup`` joins the process group — NCCL on CUDA, gloo on the CPU — with the
recipe's timeout, so a rank that stops answering ends the job instead of hanging it.

Example::

    ctx = with_layout(setup("fsdp", torch.device("cpu"), timeout_s=300), "fsdp", tp=1)
    ctx.rank, ctx.world_size, ctx.dp_size, ctx.is_main
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ember.errors import EmberError


@dataclass(frozen=True)
class DistContext:
    """Who this process is, and how the ranks are laid out.

    ``dp_*`` is the data-parallel view: ranks with different dp_rank read different
    samples; the ranks of one tensor-parallel group or one pipeline share a dp_rank and
    read the same samples. ``mesh`` (a DeviceMesh with dims among "dp", "tp", "pp") is
    None in a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "single"
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    pp_rank: int = 0
    mesh: DeviceMesh | None = field(default=None, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def dp_all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place sum (or max) over the data-parallel ranks only: tensor-parallel and pipeline
        peers hold the same samples and must not be counted twice."""
        if self.dp_size == 1:
            return tensor
        group = None if self.dp_size == self.world_size else self.mesh["dp"].get_group()
        return all_reduce_(tensor, op, group)


def launched_world_size() -> int:
    """The number of processes torchrun started (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank among those torchrun (or a scheduler) started; 0 when run plainly."""
    return int(os.environ.get("RANK", "0"))


def setup(strategy: str, device: torch.device, timeout_s: float) -> DistContext:
    """Join the process group when torchrun started several processes; check the strategy fits."""
    world = launched_world_size()
    if world == 1:
        return DistContext(device=device)
    if strategy == "single":
        raise EmberError(
            f"{world} processes were started but parallel.strategy is 'single'. Set parallel.strategy=auto or "
            f"ddp (--set parallel.strategy=ddp), or start one process."
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistContext(rank, world, local_rank, device)


def with_layout(ctx: DistContext, strategy: str, tp: int) -> DistContext:
    """``ctx`` with the device mesh of ``strategy`` (resolved, not auto): dp for ddp/fsdp, tp,
    pp, or dp x tp for fsdp+tp with ``tp`` ranks per tensor-parallel group."""
    world = ctx.world_size
    if world == 1:
        return replace(ctx, strategy="single")
    if strategy == "fsdp+tp" and (tp < 2 or world % tp or tp == world):
        raise EmberError(
            f"parallel.strategy=fsdp+tp needs parallel.tp (ranks per tensor-parallel group, now {tp}) to divide "
            f"the {world} processes into at least 2 groups of at least 2. Set parallel.tp to a divisor of {world} "
            f"between 2 and {world // 2}, or use strategy tp or fsdp."
        )
    dims = {"ddp": ("dp",), "fsdp": ("dp",), "tp": ("tp",), "pp": ("pp",), "fsdp+tp": ("dp", "tp")}[strategy]
    shape = (world // tp, tp) if strategy == "fsdp+tp" else (world,)
    mesh = init_device_mesh(ctx.device.type, shape, mesh_dim_names=dims)
    sizes = dict(zip(dims, shape))
    dp_rank = mesh.get_local_rank("dp") if "dp" in sizes else 0
    pp_rank = mesh.get_local_rank("pp") if "pp" in sizes else 0
    return replace(
        ctx,
        strategy=strategy,
        mesh=mesh,
        dp_rank=dp_rank,
        dp_size=sizes.get("dp", 1),
        tp_size=sizes.get("tp", 1),
        pp_size=sizes.get("pp", 1),
        pp_rank=pp_rank,
    )


_HELD = [0]  # open shared_process_group blocks: train and evaluate leave the group up inside them


def teardown() -> None:
    if dist.is_initialized() and not _HELD[0]:
        dist.destroy_process_group()


@contextlib.contextmanager
def shared_process_group(device: torch.device, timeout_s: float) -> Iterator[DistContext]:
    """One process group for several runs in a row (cv folds, tune trials): the ``train`` and
    ``evaluate`` calls inside join it and leave it up; it goes down when the block ends."""
    ctx = setup("auto", device, timeout_s)
    _HELD[0] += 1
    try:
        yield ctx
    finally:
        _HELD[0] -= 1
        teardown()


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place sum or max over the ranks of ``group`` (default: all); a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return tensor


def is_distributed() -> bool:
    """A process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (e.g. a decision only rank 0 can make)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
