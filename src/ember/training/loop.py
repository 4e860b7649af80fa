"""The training loop: one function, top to bottom.

``train(recipe)`` builds data, model, optimiser and schedule from the recipe,
resumes from a checkpoint when asked, then runs optimiser steps until
``train.max_steps`` (or early stopping), validating, logging and
checkpointing on the way, and finally exports the weights.

>>> from ember.config import load_recipe
>>> result = train(load_recipe("recipes/cnn-digits.yaml"), run_dir="runs/cnn")
>>> result.metrics["accuracy"]
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ember.config import Recipe
from ember.atomic import write_text_atomic
from ember.data.build import build_data
from ember.errors import EmberError
from ember.eval.validate import validate
from ember.models.registry import model_summary
from ember.plan import check_memory
from ember.runs import build_run_model, default_run_dir, prepare_run_dir, save_trained_model, starting_model
from ember.compress.distill import LastHidden, load_teacher, taught_loss
from ember.compress.prune import apply_masks, zero_masks
from ember.training.checkpoint import load_model_and_optimizer, load_trainer_state, save_checkpoint
from ember.training.distributed import DistContext, all_reduce_, barrier, broadcast_object, setup, teardown, with_layout
from ember.training.ewc import ElasticAnchor, old_samples
from ember.training.flops import MfuMeter, peak_flops
from ember.training.interrupt import StopRequest
from ember.training.optim import build_optimizer, l1_penalty, split_decay
from ember.training import pipeline
from ember.training.pipeline import build_schedule, clip_grad_norm_across, pipeline_step, split_gpt, validate_pipeline
from ember.training.parallelize import SHARDED, all_finite, choose_strategy, full_state_dict, grad_sync, parallelize
from ember.training.precision import autocast_factory, build_scaler
from ember.training.resume import (
    Progress, check_compatible, drop_newer_checkpoints, find_resume_checkpoint, persistent_buffers, restore_trainer_state,
    trainer_state,
)
from ember.training.runlog import QuietLog, RunLog
from ember.training.schedules import build_scheduler
from ember.training.tensor_parallel import grad_norm_, total_grad_norm
from ember.training.tasks import FORWARD, count_targets, metric_mode, summed_loss, targets_of

MAX_CONSECUTIVE_SKIPS = 20  # on_nonfinite=skip: past this, the run is diverging, not hiccuping


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict = field(default_factory=dict)  # last validation
    stopped_early: bool = False
    halted: bool = False  # on_eval asked to stop (e.g. a search pruned this trial)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EmberError("train.device=cuda but PyTorch sees no CUDA device. Use train.device=auto or cpu, or install a CUDA build of torch.")
    return torch.device(name)


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    if deterministic or torch.are_deterministic_algorithms_enabled():  # the call itself imports inductor (~1 s)
        torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    if device.type == "cuda" and not deterministic:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def improved(value: float, best: Optional[float], mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def nonfinite_message(step: int, what: str, last_checkpoint: Optional[Path]) -> str:
    kept = f"The last good checkpoint, {last_checkpoint}, is untouched." if last_checkpoint else "No checkpoint was written."
    return (
        f"The {what} became non-finite (NaN or inf) at optimiser step {step}, so training stopped without "
        f"saving those weights. {kept} Usual fixes: lower optim.lr, add warmup (schedule.warmup_steps), keep "
        f"optim.grad_clip on, prefer bf16 over fp16 — or set train.on_nonfinite=skip to skip such steps."
    )


def check_finite_weights(model: torch.nn.Module, step: int, last_checkpoint: Optional[Path]) -> None:
    """One device check over all weights (on every rank) before they are saved: a poisoned model is never written."""
    if not all_finite(model):
        raise EmberError(nonfinite_message(step, "model weights", last_checkpoint))


def train(recipe: Recipe, run_dir: str | Path | None = None, resume: Optional[str] = None,
          on_eval: Optional[Callable[[int, dict], bool]] = None) -> TrainResult:
    """Train the recipe's model; returns the run directory, final step and last validation metrics.

    ``on_eval(step, metrics)``, called on every rank after each validation, may return True
    to stop the run there (checkpointed and exported as usual); it must answer the same on
    every rank. ``ember tune`` prunes trials with it.
    """
    cfg = recipe.train
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(recipe.model.name)
    ctx = setup(recipe.parallel.strategy, resolve_device(cfg.device), recipe.parallel.timeout_s)
    try:
        ctx = with_layout(ctx, *choose_strategy(recipe, ctx))
        return _train(recipe, run_dir, resume, ctx, on_eval)
    finally:
        teardown()


def _train(recipe: Recipe, run_dir: Path, resume: Optional[str], ctx: DistContext, on_eval) -> TrainResult:
    cfg, device = recipe.train, ctx.device
    # Rank 0 finds and verifies the checkpoint; the others read the verified one.
    checkpoint = broadcast_object(find_resume_checkpoint(run_dir, resume) if ctx.is_main else None)
    state = load_trainer_state(checkpoint, verify=ctx.is_main and resume != "auto") if checkpoint is not None else None
    if state is not None:
        check_compatible(state, recipe, checkpoint, ctx.dp_size)
    if ctx.is_main:
        prepare_run_dir(run_dir, recipe, resuming=resume is not None)
    barrier()

    # ---- build everything from the recipe ----
    configure_determinism(cfg.deterministic, device)
    torch.manual_seed(cfg.seed)
    continual = recipe.continual
    data = build_data(recipe.data, cfg.batch_size, recipe.eval.batch_size or cfg.batch_size, seed=cfg.seed,
                      rank=ctx.dp_rank, world_size=ctx.dp_size, grad_accum=cfg.grad_accum,
                      replay=(continual.old_data, continual.replay) if continual.old_data else None,
                      objective=recipe.objective)
    if data.codec_json and ctx.is_main:  # the tokenizer travels with the run, for generate
        write_text_atomic(run_dir / "tokenizer.json", data.codec_json)
    task = data.spec.task
    # Before the model exists: a model too large for this device is refused, not allocated until killed.
    check_memory(recipe, data.spec, device, ctx.strategy, ctx.world_size, ctx.tp_size)
    model, carried = starting_model(recipe, data.spec)  # the same seed: the same weights on every rank
    model = model.to(device)
    model.grad_checkpointing = cfg.activation_checkpointing
    summary = model_summary(model)
    if ctx.strategy == "pp":  # from here on, "model" is this rank's stage: what it trains, checks and saves
        model = split_gpt(model, ctx.pp_size, ctx.pp_rank)
    forward_model = parallelize(model, ctx, recipe)  # before the optimiser: FSDP and tp swap in DTensor parameters
    masks = zero_masks(model) if recipe.init.keep_zeros else []  # a pruned model's zeros, before any step
    optimizer = build_optimizer(model, recipe.optim, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, recipe.schedule, cfg.max_steps)
    autocast = autocast_factory(cfg.precision, device)
    scaler = build_scaler(cfg.precision, device)
    ema = _build_ema(model, cfg.ema_decay)
    eval_model = ema.module if ema is not None else model
    penalty = _step_penalty(model, recipe, device, task)
    teacher = load_teacher(recipe.distill, data.spec, device) if recipe.distill.teacher else None
    hidden = None  # ember distill --hidden-weight: the student's and the teacher's last hidden states
    if teacher is not None and recipe.distill.hidden_weight > 0:
        hidden = (LastHidden(model), LastHidden(teacher))
    progress = Progress()
    if ctx.distributed:  # dropout and augmentation differ between data-parallel ranks, as their data do;
        torch.manual_seed(cfg.seed + ctx.dp_rank)  # tensor-parallel peers must draw the same masks
    if state is not None:
        load_model_and_optimizer(checkpoint, model, optimizer)
        progress = restore_trainer_state(state, scheduler, scaler, ema, data.train, ctx.rank, model)
        if ctx.is_main:
            drop_newer_checkpoints(run_dir / "checkpoints", progress.step)
        state = None
    forward_model = torch.compile(forward_model) if cfg.compile else forward_model
    schedule = None
    if ctx.strategy == "pp":
        schedule = build_schedule(model, ctx.pp_rank, ctx.pp_size, device, cfg.grad_accum, recipe.parallel.pp_schedule,
                                  functools.partial(pipeline.step_loss, label_smoothing=cfg.label_smoothing))

    # ---- the loop ----
    items_per_step = cfg.batch_size * cfg.grad_accum * data.items_per_sample * ctx.dp_size
    peak = peak_flops(device, cfg.precision, cfg.peak_flops) * ctx.world_size
    unit = "samples" if data.items_per_sample == 1 else "tokens"
    log = RunLog(run_dir, progress.step, cfg.max_steps, unit, cfg.progress) if ctx.is_main else QuietLog()
    mfu = MfuMeter(peak, log.message, measured=device.type == "cpu" and not cfg.peak_flops > 0)
    layout = f", {ctx.strategy} x {ctx.world_size}" if ctx.distributed else ""
    log.message(f"[bold]ember[/bold] {recipe.model.name}: {summary['params']:,} parameters, {device}{layout}, {cfg.precision} → {run_dir}")
    if checkpoint is not None:
        log.message(f"resumed from {checkpoint} at step {progress.step}")
    last_checkpoint = checkpoint
    loss_window = torch.zeros((), device=device)
    nonfinite_at = torch.full((), -1, device=device, dtype=torch.long)
    window_start, window_steps, window_skips, consecutive_skips = time.perf_counter(), 0, 0, 0
    metrics: dict = {}
    try:
        with StopRequest() as stop:
            stopping = halted = False
            while progress.step < cfg.max_steps and not (stopping or halted or progress.stopped_early):
                if schedule is not None:
                    step_loss, grad_norm, bad = pipeline_optimizer_step(schedule, model, data.train, autocast, recipe, ctx)
                else:
                    step_loss, grad_norm, bad = optimizer_step(
                        forward_model, model, data.train, task, optimizer, scaler, autocast, recipe, ctx, penalty, teacher,
                        hidden)
                # A sync per step, the price of skipping; all ranks skip together.
                skip = cfg.on_nonfinite == "skip" and bool(all_reduce_(bad.int(), "max").item())
                if skip:
                    window_skips, consecutive_skips = window_skips + 1, consecutive_skips + 1
                    if consecutive_skips > MAX_CONSECUTIVE_SKIPS:
                        raise EmberError(nonfinite_message(progress.step + 1, f"loss ({consecutive_skips} steps in a row)", last_checkpoint))
                else:
                    consecutive_skips = 0
                    scaler.step(optimizer)
                    apply_masks(masks)
                progress.skipped_steps += skip
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                scheduler.step()
                progress.step += 1
                if ema is not None and not skip:
                    ema.update_parameters(model)
                if cfg.on_nonfinite == "stop":  # recorded on the device; read only at the checks below
                    nonfinite_at = torch.where(bad & (nonfinite_at < 0), progress.step, nonfinite_at)
                if not skip:
                    loss_window += step_loss
                window_steps += 1
                step = progress.step
                is_last = step == cfg.max_steps
                wants_log = step % cfg.log_every == 0 or is_last
                wants_eval = (cfg.eval_every and step % cfg.eval_every == 0) or is_last
                wants_checkpoint = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or is_last
                stopping = stop.requested
                if ctx.distributed:  # decide together, at log/eval/checkpoint steps: a Ctrl-C or a NaN seen by one rank
                    stopping = False
                    if wants_log or wants_eval or wants_checkpoint:
                        stopping = bool(all_reduce_(torch.tensor(int(stop.requested), device=device), "max").item())
                        all_reduce_(nonfinite_at, "max")
                if (wants_log or wants_eval or wants_checkpoint or stopping) and (bad_step := int(nonfinite_at.item())) >= 0:
                    raise EmberError(nonfinite_message(bad_step, "training loss or gradient norm", last_checkpoint))
                if wants_log:
                    now = time.perf_counter()
                    items_per_s = items_per_step * window_steps / (now - window_start)
                    good_steps = window_steps - window_skips
                    ctx.dp_all_reduce_(loss_window)  # each data-parallel rank holds its share of the global mean
                    log.train_step({
                        "step": step, "loss": loss_window.item() / good_steps if good_steps else float("nan"), "lr": lr,
                        f"{log.unit}_per_s": items_per_s,
                        "mfu": mfu(summary["flops_per_item"], items_per_s),
                        "grad_norm": grad_norm.item(),
                        **({"skipped_steps": progress.skipped_steps} if cfg.on_nonfinite == "skip" else {}),
                    })
                    loss_window.zero_()
                    window_start, window_steps, window_skips = now, 0, 0  # the logging itself counts in the next window
                else:
                    log.advance(step)
                pause_start = time.perf_counter()
                if wants_eval:
                    metrics = _validate(eval_model, data, task, ctx, autocast, recipe, step, last_checkpoint)
                    log.validation(step, metrics)
                    progress.stopped_early = _early_stop(progress, metrics[recipe.eval.metric], recipe) and not is_last
                    halted = on_eval is not None and bool(on_eval(step, metrics)) and not is_last
                if ctx.distributed and wants_eval and not stopping:  # a Ctrl-C during validation
                    stopping = bool(all_reduce_(torch.tensor(int(stop.requested), device=device), "max").item())
                elif not ctx.distributed:
                    stopping = stop.requested
                if wants_checkpoint or progress.stopped_early or halted or stopping:
                    check_finite_weights(model, step, last_checkpoint)
                    trainer = trainer_state(scheduler, scaler, ema, data.train, progress, recipe, ctx.dp_size, model)
                    last_checkpoint = save_checkpoint(run_dir / "checkpoints", step, cfg.keep_checkpoints, model,
                                                      optimizer, trainer, ctx.is_main)
                window_start += time.perf_counter() - pause_start  # throughput counts training time only
        if stopping:
            saved = f"checkpoint saved in {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise KeyboardInterrupt(f"interrupted at step {progress.step}; {saved}. Resume with --resume auto.")
        if progress.stopped_early:
            log.message(f"early stopping at step {progress.step}: {recipe.eval.metric} did not improve for {recipe.eval.patience} evaluations")
        if halted:
            log.message(f"stopped at step {progress.step}: asked to by on_eval (a pruned search trial)")
        if not metrics:  # resumed a run that had already finished its steps
            metrics = _validate(eval_model, data, task, ctx, autocast, recipe, progress.step, last_checkpoint)
    finally:
        log.close()
    check_finite_weights(eval_model, progress.step, last_checkpoint)
    _export(eval_model, ctx, run_dir, recipe, data.spec, {**summary, "step": progress.step, "metrics": metrics, **carried})
    barrier()
    return TrainResult(run_dir=run_dir, step=progress.step, metrics=metrics, stopped_early=progress.stopped_early,
                       halted=halted)


def _step_penalty(model: torch.nn.Module, recipe: Recipe, device: torch.device,
                  task: str) -> Optional[Callable[[], torch.Tensor]]:
    """The weight penalties added once per optimiser step: L1 (optim.l1) and EWC (continual.ewc), or None."""
    terms = []
    if recipe.optim.l1 > 0:
        l1_params = split_decay(model)[0]
        terms.append(lambda: recipe.optim.l1 * l1_penalty(l1_params))
    continual = recipe.continual
    if continual.ewc > 0:  # the Fisher information of the old data, at the weights the run starts from
        anchor = ElasticAnchor(model, old_samples(continual.old_data, continual.ewc_samples, recipe.train.seed, device),
                               task)
        terms.append(lambda: continual.ewc * anchor.penalty())
    return (lambda: sum(term() for term in terms)) if terms else None


def _export(model: torch.nn.Module, ctx: DistContext, run_dir: Path, recipe: Recipe, spec, info: dict) -> None:
    """Write model.safetensors on rank 0: the model itself, or, when it is sharded, a plain copy
    holding the weights gathered from every rank."""
    if ctx.strategy in SHARDED:
        state = full_state_dict(model, ctx)
        if not ctx.is_main:
            return
        model = build_run_model(recipe, spec)
        model.load_state_dict(state)
    if ctx.is_main:
        save_trained_model(run_dir, model, recipe, spec, info)


def _validate(model, data, task, ctx: DistContext, autocast, recipe: Recipe, step: int, last_checkpoint: Optional[Path]) -> dict:
    _rank_0_buffers(model, ctx)
    if ctx.strategy == "pp":
        metrics = validate_pipeline(model, data.val, ctx.pp_rank, ctx.pp_size, ctx.device, autocast,
                                    recipe.eval.max_batches, data.bytes_per_token())
    else:
        metrics = validate(model, data.val, task, ctx.device, autocast, recipe.eval.max_batches, data.bytes_per_token(),
                           reduce=ctx.dp_all_reduce_, lockstep=ctx.strategy in SHARDED)
    if not math.isfinite(metrics["loss"]):
        raise EmberError(nonfinite_message(step, "validation loss", last_checkpoint))
    return metrics


def _rank_0_buffers(model: torch.nn.Module, ctx: DistContext) -> None:
    """Give every data-parallel rank the first one's BatchNorm statistics before validating, so the
    logged metrics are those of the model exported (rank 0's). Training is unchanged: training-mode
    BatchNorm normalises by the batch's own statistics, and DDP broadcasts rank 0's buffers anyway."""
    import torch.distributed as dist

    if ctx.dp_size == 1 or ctx.strategy == "pp":
        return
    group = None if ctx.dp_size == ctx.world_size else ctx.mesh["dp"].get_group()
    source = dist.get_global_rank(group, 0) if group is not None else 0
    for _, buffer in persistent_buffers(model):
        dist.broadcast(buffer.data, src=source, group=group)


def optimizer_step(forward_model, model, loader, task, optimizer, scaler, autocast, recipe: Recipe, ctx: DistContext,
                   penalty=None, teacher=None, hidden=None):
    """Forward and backward over ``grad_accum`` micro-batches, then unscale and clip.

    Returns (mean loss of the step, grad norm, non-finite flag) as device tensors;
    the caller decides whether to apply the step.
    """
    cfg, device = recipe.train, ctx.device
    micro_batches = [loader.next_batch(device) for _ in range(cfg.grad_accum)]
    # Normalise by the targets of the whole optimiser step on all data-parallel ranks:
    # accumulation and data parallelism then equal one big batch. DDP and FSDP average
    # gradients over the W ranks, so each rank's share is scaled by W to make that the sum.
    n_targets = ctx.dp_all_reduce_(sum(count_targets(targets_of(task, b)) for b in micro_batches))
    world = ctx.dp_size
    step_loss = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # Under DDP and FSDP only the last micro-batch's backward reduces the gradients.
        with grad_sync(forward_model, enabled=last):
            with autocast():
                logits, targets = FORWARD[task](forward_model, batch)
                loss = summed_loss(logits, targets, cfg.label_smoothing)
                if teacher is not None:  # ember distill: blend in the teacher's soft targets
                    loss = taught_loss(loss, logits, teacher, batch, task, recipe.distill, hidden)
                loss = loss / n_targets
            step_loss += loss.detach()
            if penalty is not None and last:  # once per optimiser step, as on one big batch
                loss = loss + penalty() / world
            scaler.scale(loss * world).backward()
    scaler.unscale_(optimizer)
    clip = recipe.optim.grad_clip
    if clip > 0:
        grad_norm = grad_norm_(model.parameters(), clip)
    else:  # still measured: a NaN gradient must be caught even when nothing is clipped
        grad_norm = total_grad_norm(model.parameters())
    bad = ~torch.isfinite(step_loss)
    if not scaler.is_enabled():  # fp16 overflow is the scaler's business: it skips those steps itself
        bad |= ~torch.isfinite(grad_norm)
    return step_loss, grad_norm, bad


def pipeline_optimizer_step(schedule, stage, loader, autocast, recipe: Recipe, ctx: DistContext):
    """``optimizer_step`` for a pipeline stage: the schedule runs forward and backward over the
    step's ``grad_accum`` micro-batches; the gradient norm is taken over all stages."""
    cfg = recipe.train
    micro_batches = [loader.next_batch(ctx.device) for _ in range(cfg.grad_accum)]
    x, y = torch.cat([b["x"] for b in micro_batches]), torch.cat([b["y"] for b in micro_batches])
    with autocast():
        step_loss = pipeline_step(schedule, ctx.pp_rank, ctx.pp_size, x, y, n_targets=count_targets(y))
    grad_norm = clip_grad_norm_across(stage.parameters(), recipe.optim.grad_clip)
    return step_loss, grad_norm, ~torch.isfinite(step_loss) | ~torch.isfinite(grad_norm)


def _build_ema(model: torch.nn.Module, decay: float) -> Optional[torch.optim.swa_utils.AveragedModel]:
    if decay <= 0:
        return None
    ema_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_fn, use_buffers=True)


def _early_stop(progress: Progress, value: float, recipe: Recipe) -> bool:
    mode = metric_mode(recipe.eval.metric, recipe.eval.mode)
    if improved(value, progress.best, mode, recipe.eval.min_delta):
        progress.best, progress.evals_since_best = value, 0
        return False
    progress.evals_since_best += 1
    return recipe.eval.patience > 0 and progress.evals_since_best >= recipe.eval.patience
