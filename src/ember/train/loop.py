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

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ember.config import Recipe
from ember.atomic import write_text_atomic
from ember.data.build import build_data
from ember.errors import EmberError
from ember.eval.validate import validate
from ember.models.registry import build_model, model_summary
from ember.runs import default_run_dir, prepare_run_dir, save_trained_model
from ember.train.checkpoint import load_checkpoint, save_checkpoint
from ember.train.flops import peak_flops
from ember.train.interrupt import StopRequest
from ember.train.optim import build_optimizer, l1_penalty, split_decay
from ember.train.precision import autocast_factory, build_scaler
from ember.train.resume import (
    Progress, check_compatible, drop_newer_checkpoints, find_resume_checkpoint, restore_training_state, training_state,
)
from ember.train.runlog import RunLog
from ember.train.schedules import build_scheduler
from ember.train.tasks import FORWARD, count_targets, metric_mode, summed_loss, targets_of

MAX_CONSECUTIVE_SKIPS = 20  # on_nonfinite=skip: past this, the run is diverging, not hiccuping


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict = field(default_factory=dict)  # last validation
    stopped_early: bool = False


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
    """One device check over all weights before they are saved: a poisoned model is never written."""
    if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
        raise EmberError(nonfinite_message(step, "model weights", last_checkpoint))


def train(recipe: Recipe, run_dir: str | Path | None = None, resume: Optional[str] = None) -> TrainResult:
    """Train the recipe's model; returns the run directory, final step and last validation metrics."""
    cfg = recipe.train
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(recipe.model.name)
    checkpoint = find_resume_checkpoint(run_dir, resume)
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    if state is not None:
        check_compatible(state["recipe"], recipe, checkpoint)
    prepare_run_dir(run_dir, recipe, resuming=resume is not None)

    # ---- build everything from the recipe ----
    device = resolve_device(cfg.device)
    configure_determinism(cfg.deterministic, device)
    torch.manual_seed(cfg.seed)
    data = build_data(recipe.data, cfg.batch_size, recipe.eval.batch_size or cfg.batch_size, seed=cfg.seed)
    if data.codec_json:  # the tokenizer travels with the run, for generate
        write_text_atomic(run_dir / "tokenizer.json", data.codec_json)
    task = data.spec.task
    model = build_model(recipe.model, data.spec).to(device)
    model.grad_checkpointing = cfg.activation_checkpointing
    summary = model_summary(model)
    optimizer = build_optimizer(model, recipe.optim, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, recipe.schedule, cfg.max_steps)
    autocast = autocast_factory(cfg.precision, device)
    scaler = build_scaler(cfg.precision, device)
    ema = _build_ema(model, cfg.ema_decay)
    eval_model = ema.module if ema is not None else model
    l1_params = split_decay(model)[0] if recipe.optim.l1 > 0 else []
    progress = Progress()
    if state is not None:
        progress = restore_training_state(state, model, optimizer, scheduler, scaler, ema, data.train)
        drop_newer_checkpoints(run_dir / "checkpoints", progress.step)
        state = None  # free the loaded CPU copy of the weights and optimiser state
    forward_model = torch.compile(model) if cfg.compile else model

    # ---- the loop ----
    items_per_step = cfg.batch_size * cfg.grad_accum * data.items_per_sample
    peak = peak_flops(device, cfg.precision, cfg.peak_flops)
    log = RunLog(run_dir, progress.step, cfg.max_steps, "tokens" if task != "classify" else "samples", cfg.progress)
    log.message(f"[bold]ember[/bold] {recipe.model.name}: {summary['params']:,} parameters, {device}, {cfg.precision} → {run_dir}")
    if checkpoint is not None:
        log.message(f"resumed from {checkpoint} at step {progress.step}")
    last_checkpoint = checkpoint
    loss_window = torch.zeros((), device=device)
    nonfinite_at = torch.full((), -1, device=device, dtype=torch.long)
    window_start, window_steps, window_skips, consecutive_skips = time.perf_counter(), 0, 0, 0
    metrics: dict = {}
    try:
        with StopRequest() as stop:
            while progress.step < cfg.max_steps and not stop.requested and not progress.stopped_early:
                step_loss, grad_norm, bad = optimizer_step(
                    forward_model, model, data.train, task, optimizer, scaler, autocast, recipe, device, l1_params
                )
                skip = cfg.on_nonfinite == "skip" and bool(bad.item())  # a sync per step: the price of skipping
                if skip:
                    window_skips, consecutive_skips = window_skips + 1, consecutive_skips + 1
                    if consecutive_skips > MAX_CONSECUTIVE_SKIPS:
                        raise EmberError(nonfinite_message(progress.step + 1, f"loss ({consecutive_skips} steps in a row)", last_checkpoint))
                else:
                    consecutive_skips = 0
                    scaler.step(optimizer)
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
                if (wants_log or wants_eval or wants_checkpoint or stop.requested) and (bad_step := int(nonfinite_at.item())) >= 0:
                    raise EmberError(nonfinite_message(bad_step, "training loss or gradient norm", last_checkpoint))
                if wants_log:
                    now = time.perf_counter()
                    items_per_s = items_per_step * window_steps / (now - window_start)
                    good_steps = window_steps - window_skips
                    log.train_step({
                        "step": step, "loss": loss_window.item() / good_steps if good_steps else float("nan"), "lr": lr,
                        f"{log.unit}_per_s": items_per_s,
                        "mfu": summary["flops_per_item"] * items_per_s / peak if peak else None,
                        "grad_norm": grad_norm.item(),
                        **({"skipped_steps": progress.skipped_steps} if cfg.on_nonfinite == "skip" else {}),
                    })
                    loss_window.zero_()
                    window_start, window_steps, window_skips = now, 0, 0  # the logging itself counts in the next window
                else:
                    log.advance(step)
                pause_start = time.perf_counter()
                if wants_eval:
                    metrics = _validate(eval_model, data, task, device, autocast, recipe, step, last_checkpoint)
                    log.validation(step, metrics)
                    progress.stopped_early = _early_stop(progress, metrics[recipe.eval.metric], recipe) and not is_last
                if wants_checkpoint or progress.stopped_early or stop.requested:  # Ctrl-C may have come during validation
                    check_finite_weights(model, step, last_checkpoint)
                    state = training_state(model, optimizer, scheduler, scaler, ema, data.train, progress, recipe)
                    last_checkpoint = save_checkpoint(state, run_dir / "checkpoints", step, cfg.keep_checkpoints)
                window_start += time.perf_counter() - pause_start  # throughput counts training time only
        if stop.requested:
            saved = f"checkpoint saved in {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise KeyboardInterrupt(f"interrupted at step {progress.step}; {saved}. Resume with --resume auto.")
        if progress.stopped_early:
            log.message(f"early stopping at step {progress.step}: {recipe.eval.metric} did not improve for {recipe.eval.patience} evaluations")
        if not metrics:  # resumed a run that had already finished its steps
            metrics = _validate(eval_model, data, task, device, autocast, recipe, progress.step, last_checkpoint)
    finally:
        log.close()
    check_finite_weights(eval_model, progress.step, last_checkpoint)
    save_trained_model(run_dir, eval_model, recipe, data.spec, {**summary, "step": progress.step, "metrics": metrics})
    return TrainResult(run_dir=run_dir, step=progress.step, metrics=metrics, stopped_early=progress.stopped_early)


def _validate(model, data, task, device, autocast, recipe: Recipe, step: int, last_checkpoint: Optional[Path]) -> dict:
    metrics = validate(model, data.val, task, device, autocast, recipe.eval.max_batches, data.bytes_per_token)
    if not math.isfinite(metrics["loss"]):
        raise EmberError(nonfinite_message(step, "validation loss", last_checkpoint))
    return metrics


def optimizer_step(forward_model, model, loader, task, optimizer, scaler, autocast, recipe: Recipe, device, l1_params):
    """Forward and backward over ``grad_accum`` micro-batches, then unscale and clip.

    Returns (mean loss of the step, grad norm, non-finite flag) as device tensors;
    the caller decides whether to apply the step.
    """
    cfg = recipe.train
    micro_batches = [loader.next_batch(device) for _ in range(cfg.grad_accum)]
    # Normalise by the targets of the whole optimiser step: accumulation then equals one big batch.
    n_targets = sum(count_targets(targets_of(task, b)) for b in micro_batches)
    step_loss = torch.zeros((), device=device)
    for batch in micro_batches:
        with autocast():
            logits, targets = FORWARD[task](forward_model, batch)
            loss = summed_loss(logits, targets, cfg.label_smoothing) / n_targets
        step_loss += loss.detach()
        scaler.scale(loss).backward()
    if l1_params:  # once per optimiser step, as the penalty on one big batch would be
        scaler.scale(recipe.optim.l1 * l1_penalty(l1_params)).backward()
    scaler.unscale_(optimizer)
    clip = recipe.optim.grad_clip
    if clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    else:  # still measured: a NaN gradient must be caught even when nothing is clipped
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    bad = ~torch.isfinite(step_loss)
    if not scaler.is_enabled():  # fp16 overflow is the scaler's business: it skips those steps itself
        bad |= ~torch.isfinite(grad_norm)
    return step_loss, grad_norm, bad


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
