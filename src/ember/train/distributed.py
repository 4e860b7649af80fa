"""Processes working together through ``torch.distributed``: start-up, reductions, launch.

``ember train RECIPE --nproc N`` re-runs itself under ``torch.distributed.run`` (what
``torchrun`` is), which sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT for each
process; started directly by ``torchrun`` (one node or many) the same environment is
there. ``setup`` joins the process group — NCCL on CUDA, gloo on the CPU — with the
recipe's timeout, so a rank that stops answering ends the job instead of hanging it.

>>> ctx = setup("ddp", torch.device("cpu"), timeout_s=300)
>>> ctx.rank, ctx.world_size, ctx.is_main
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ember.errors import EmberError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """The number of processes torchrun started (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(strategy: str, device: torch.device, timeout_s: float) -> DistContext:
    """Join the process group when torchrun started several processes; check the strategy fits."""
    world = launched_world_size()
    if world == 1:
        return DistContext(device=device)
    if strategy == "single":
        raise EmberError(
            f"{world} processes were started but parallel.strategy is 'single'. Set parallel.strategy=ddp "
            f"(--set parallel.strategy=ddp), or start one process."
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistContext(rank, world, local_rank, device)


def wrap_parallel(model: torch.nn.Module, strategy: str, ctx: DistContext) -> torch.nn.Module:
    """The module the loop runs forward and backward through: the model itself, or DDP around it.

    The optimiser, checkpoints, validation and export keep using the plain model.
    """
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum or max over ranks; a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (e.g. a decision only rank 0 can make)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``ember`` with ``argv`` in ``nproc`` processes on this machine via torch.distributed.run.

    torchrun's agent watches the processes: when one fails, the others are stopped and the
    exit status is non-zero, so a crash on any rank ends the whole job.
    """
    if nproc < 1:
        raise EmberError(f"--nproc must be at least 1, got {nproc}.")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ember", *argv]
    return subprocess.call(cmd)
