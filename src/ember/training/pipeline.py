"""Pipeline parallelism for the gpt and llama models: each process holds a contiguous slice of
the blocks (a *stage*) and micro-batches flow through the stages, activations
forward and their gradients backward, with ``torch.distributed.pipelining``.

Stage 0 holds the embeddings and its blocks, the last stage its blocks, the
final norm and the LM head; parameter names stay those of the full model, so
each stage's state dict is a subset of the full model's and a checkpoint can be
resharded across any number of stages.

One optimiser step is one schedule step over the step's micro-batches
concatenated along the batch dimension; GPipe (all forwards, then all
backwards) and 1F1B (one forward, one backward in the steady state: fewer
activations alive) are offered. The loss is normalised as in
the other layouts' ``Layout.forward_backward`` (summed cross-entropy / the step's target
count), so the gradients equal single-process training on the same batch; with
dropout the random streams differ, so only dropout=0 matches bit for bit.

Example::

    stage = split_gpt(model, n_stages=2, stage_index=rank)
    schedule = build_schedule(stage, rank, 2, torch.device("cpu"), n_microbatches=4, kind="1f1b")
    loss = pipeline_step(schedule, rank, 2, x, y)          # x, y: [4 * micro_batch, T]
    clip_grad_norm_across(stage.parameters(), 1.0)
    optimizer.step()
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from ember.data.spec import IGNORE_INDEX
from ember.errors import EmberError
from ember.models.gpt import GPT, embed
from ember.models.layers import run_blocks
from ember.models.llama import Llama, embed_tokens, rope_tables
from ember.models.modes import evaluating
from ember.training.tasks import count_targets, summed_loss

ScheduleKind = Literal["gpipe", "1f1b"]
SCHEDULES: dict[str, type[PipelineScheduleSingle]] = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_blocks(n_layer: int, n_stages: int) -> list[range]:
    """The block indices of each stage: contiguous, sizes differing by at most one.

    The first ``n_layer % n_stages`` stages take the extra blocks: the last stage
    already carries the LM head and the loss, the largest matmul of a small GPT.
    """
    if n_stages < 1 or n_layer < n_stages:
        raise EmberError(
            f"cannot split {n_layer} blocks over {n_stages} pipeline stages: every stage "
            f"needs at least one block. Use at most {n_layer} stages or set model.n_layer >= {n_stages}."
        )
    base, extra = divmod(n_layer, n_stages)
    ranges, start = [], 0
    for s in range(n_stages):
        size = base + (s < extra)
        ranges.append(range(start, start + size))
        start += size
    return ranges


class GPTStage(nn.Module):
    """One stage of a GPT: a slice of its blocks, plus the embeddings on the first
    stage and the final norm and LM head on the last.

    Shares its modules with the GPT it was cut from (no copy). Blocks live in an
    ``nn.ModuleDict`` keyed by their index in the full model, so parameter names
    ("blocks.3.attn.q.weight") are the full model's. Input: token ids [B, T] on
    the first stage, the residual stream [B, T, n_embd] elsewhere; output: the
    residual stream, or logits [B, T, vocab] on the last stage.
    """

    def __init__(self, model: GPT, blocks: range, first: bool, last: bool) -> None:
        super().__init__()
        self.block_size = model.block_size
        self.grad_checkpointing: bool = model.grad_checkpointing
        # Modules a stage does not run are None: they then appear neither in
        # parameters() (the optimiser) nor in the state dict.
        self.tok_emb = model.tok_emb if first else None
        self.pos_emb = model.pos_emb if first else None
        self.drop = model.drop if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        self.ln_f = model.ln_f if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = embed(self, x) if self.tok_emb is not None else x
        h = run_blocks(self.blocks.values(), h, checkpoint=self.grad_checkpointing and self.training)
        if self.lm_head is not None:
            return self.lm_head(self.ln_f(h))
        return h


class LlamaStage(nn.Module):
    """One stage of a Llama, as :class:`GPTStage` is of a GPT: its blocks, the token embedding on
    the first stage, the final norm and LM head on the last. Each stage computes the RoPE tables
    its blocks need (positions 0..T-1 of the stream it receives)."""

    def __init__(self, model: Llama, blocks: range, first: bool, last: bool) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.block_size = model.block_size
        self.grad_checkpointing: bool = model.grad_checkpointing
        self.tok_emb = model.tok_emb if first else None
        self.drop = model.drop if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        self.norm_f = model.norm_f if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = embed_tokens(self, x) if self.tok_emb is not None else x
        cos, sin = rope_tables(self.cfg, h.size(1), h.device)
        h = run_blocks(self.blocks.values(), h, cos, sin, checkpoint=self.grad_checkpointing and self.training)
        if self.lm_head is not None:
            return self.lm_head(self.norm_f(h))
        return h


STAGES: dict[type[nn.Module], type[nn.Module]] = {GPT: GPTStage, Llama: LlamaStage}  # the models pp can split


def split_gpt(model: nn.Module, n_stages: int, stage_index: int) -> GPTStage | LlamaStage:
    """This rank's stage of ``model`` (a GPT or a Llama); every rank must pass identical weights."""
    stage = next((stage for cls, stage in STAGES.items() if isinstance(model, cls)), None)
    if stage is None:
        raise EmberError(
            f"pipeline parallelism (pp) supports models gpt and llama only, got {type(model).__name__}. "
            f"Use parallel.strategy=ddp for this model, or model.name=gpt or llama."
        )
    if not 0 <= stage_index < n_stages:
        raise EmberError(f"pipeline stage {stage_index} does not exist in a pipeline of {n_stages} stages.")
    if n_stages > 1 and model.lm_head.weight is model.tok_emb.weight:
        raise EmberError(
            f"the {type(model).__name__} ties its LM head to its token embedding (model.tie_weights=true), but a "
            f"{n_stages}-stage pipeline puts the embedding on the first stage and the LM head on the "
            f"last, on different processes, so one matrix cannot be both. Set model.tie_weights=false "
            f"to train with pipeline parallelism (the head then gets its own matrix)."
        )
    ranges = stage_blocks(len(model.blocks), n_stages)
    return stage(model, ranges[stage_index], first=stage_index == 0, last=stage_index == n_stages - 1)


def step_loss(
    logits: torch.Tensor, targets: torch.Tensor, n_targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """One micro-batch's share of the step loss: summed cross-entropy / the step's target count.

    The sum over micro-batches is then the mean over all targets of the step, as in
    the training loop; a per-micro-batch mean would weight micro-batches with fewer
    targets (ignored positions) too heavily.
    """
    return summed_loss(logits, targets, label_smoothing) / n_targets


def build_schedule(
    stage_module: nn.Module,
    stage_index: int,
    n_stages: int,
    device: torch.device,
    n_microbatches: int,
    kind: ScheduleKind = "1f1b",
    loss_fn: Callable[..., torch.Tensor] | None = None,
    group: dist.ProcessGroup | None = None,
) -> PipelineScheduleSingle:
    """A GPipe or 1F1B schedule running ``stage_module`` as stage ``stage_index`` of ``group``.

    ``loss_fn(logits, targets, n_targets=...)`` defaults to :func:`step_loss`;
    :func:`pipeline_step` passes the step's target count through the schedule's
    ``loss_kwargs``.
    """
    if kind not in SCHEDULES:
        raise EmberError(f"unknown pipeline schedule {kind!r}; choose one of {', '.join(SCHEDULES)}.")
    if kind == "1f1b" and n_microbatches < n_stages:
        raise EmberError(
            f"the 1F1B schedule needs at least as many micro-batches as stages, got {n_microbatches} "
            f"micro-batches for {n_stages} stages. Raise the micro-batch count (train.grad_accum) or use gpipe."
        )
    stage = PipelineStage(stage_module, stage_index, n_stages, device, group=group)
    # scale_grads=False: the loss is already divided by the step's target count, so
    # the schedule's default division of the gradients by n_microbatches would shrink
    # them n_microbatches times.
    return SCHEDULES[kind](stage, n_microbatches, loss_fn=loss_fn or step_loss, scale_grads=False)


def pipeline_step(
    schedule: PipelineScheduleSingle,
    stage_index: int,
    n_stages: int,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    n_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward and backward of one optimiser step over all its micro-batches.

    ``inputs`` and ``targets`` are the step's micro-batches concatenated along the
    batch dimension (every rank may pass them; only the first stage reads the inputs
    and the last the targets). The batch must split into equal micro-batches and
    keep its shape from step to step: the stages size their receive buffers from the
    first micro-batch they see. Gradients accumulate into the stage's ``.grad``
    (zero them before). ``n_targets`` is the step's target count; by default that of
    ``targets``, which is right for one pipeline; with data parallelism on top pass
    the count summed over the data-parallel ranks. Returns the step's mean loss per
    target, the same on every stage (all-reduced over ``group``, the pipeline's
    ranks) so that all ranks agree on skipping a non-finite step.
    """
    n_micro = schedule._n_microbatches  # torch keeps it private; tensor_split would chunk unevenly
    if inputs.size(0) % n_micro:
        raise EmberError(
            f"a pipeline step needs a batch that splits into {n_micro} equal micro-batches, got "
            f"{inputs.size(0)} rows. Make train.batch_size a multiple of the micro-batch count."
        )
    is_first, is_last = stage_index == 0, stage_index == n_stages - 1
    args = (inputs,) if is_first else ()
    losses: list[torch.Tensor] = []
    if is_last:
        n_targets = count_targets(targets) if n_targets is None else n_targets
        schedule.step(*args, target=targets, losses=losses, return_outputs=False, loss_kwargs={"n_targets": n_targets})
    else:
        schedule.step(*args, return_outputs=False)
    loss = torch.stack([mb.detach() for mb in losses]).sum() if losses else torch.zeros((), device=inputs.device)
    if n_stages > 1:
        dist.all_reduce(loss, group=group)  # zeros everywhere but the last stage: a broadcast
    return loss


@torch.no_grad()
def pipeline_eval(
    schedule: PipelineScheduleSingle,
    stage_index: int,
    n_stages: int,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Forward only: (logits [B, T, vocab], summed cross-entropy) on the last stage,
    (None, 0) elsewhere.

    Put the stage module in eval mode first (dropout). Switching the schedule
    between training and evaluation re-runs its shape inference (one extra
    forward of the first micro-batch and a few messages), so evaluate rarely.
    """
    is_first, is_last = stage_index == 0, stage_index == n_stages - 1
    args = (inputs,) if is_first else ()
    if not is_last:
        schedule.eval(*args)
        return None, torch.zeros((), device=inputs.device)
    losses: list[torch.Tensor] = []
    one = torch.ones((), device=inputs.device)  # n_targets=1: step_loss is then the plain sum
    logits = schedule.eval(*args, target=targets, losses=losses, loss_kwargs={"n_targets": one})
    return logits, torch.stack(losses).sum()


def clip_grad_norm_across(
    params: Iterable[torch.nn.Parameter], max_norm: float, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Total gradient norm over all stages of ``group`` (each holds only its own
    parameters), and, when ``max_norm`` > 0, scale the gradients down to it exactly
    as ``torch.nn.utils.clip_grad_norm_`` would on the whole model."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else None)
    for g in grads:
        sq += g.detach().float().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(sq, group=group)
    total = sq.sqrt()
    if max_norm > 0:
        # Same coefficient as clip_grad_norm_ (the 1e-6 guards a zero norm), multiplied
        # in even when it is 1 so that a NaN norm poisons every gradient and gets caught.
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.detach().mul_(coef.to(g.dtype))
    return total


@torch.no_grad()
def validate_pipeline(
    stage: GPTStage | LlamaStage,
    loader,
    stage_index: int,
    n_stages: int,
    device: torch.device,
    autocast,
    max_batches: int = 0,
    bytes_per_token: float = 1.0,
) -> dict[str, float]:
    """Validation metrics of the whole pipeline, the same on every stage.

    Batch by batch, without the schedule (validation batches vary in size; the schedule
    sizes its buffers once): each stage runs its part and sends the activations on, the
    last scores them; its sums are then shared with all stages.
    """
    from ember.training.validation import metrics_from_totals

    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, correct, count, exact, sequences
    n_batches = min(max_batches or loader.batches_per_epoch, loader.batches_per_epoch)
    with evaluating(stage):  # each submodule back in its own mode after
        for batch in itertools.islice(loader.epoch_batches(device), n_batches):
            h = batch["x"] if stage_index == 0 else _receive(stage_index - 1, device)
            with autocast():
                out = stage(h)
            if stage_index < n_stages - 1:
                _send(out, stage_index + 1)
                continue
            y = batch["y"]
            mask = y != IGNORE_INDEX
            sums[0] += summed_loss(out.float(), y).double()
            sums[1] += ((out.argmax(-1) == y) & mask).sum()
            sums[2] += mask.sum()
    if n_stages > 1:
        dist.all_reduce(sums)  # zeros on every stage but the last: a broadcast
    return metrics_from_totals(sums, "lm", bytes_per_token)


def _send(h: torch.Tensor, dst: int) -> None:
    dist.send(torch.tensor(h.shape, dtype=torch.long, device=h.device), dst)  # NCCL sends device tensors only
    dist.send(h.float().contiguous(), dst)  # float32 whatever autocast made: the receiver knows the dtype


def _receive(src: int, device: torch.device) -> torch.Tensor:
    shape = torch.empty(3, dtype=torch.long, device=device)
    dist.recv(shape, src)
    h = torch.empty(*shape.tolist(), device=device)
    dist.recv(h, src)
    return h
