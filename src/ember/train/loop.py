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
from ember.data.build import build_data
from ember.errors import EmberError
from ember.eval.validate import validate
from ember.models.registry import build_model, model_summary
from ember.runs import default_run_dir, prepare_run_dir, save_trained_model
from ember.train.checkpoint import latest_valid_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ember.train.flops import peak_flops
from ember.train.interrupt import StopRequest
from ember.train.optim import build_optimizer, l1_penalty, split_decay
from ember.train.precision import autocast_factory, build_scaler
from ember.train.runlog import RunLog
from ember.train.schedules import build_scheduler
from ember.train.tasks import FORWARD, METRICS, count_targets, summed_loss, targets_of


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict = field(default_factory=dict)  # last validation
    stopped_early: bool = False


@dataclass
class Progress:
    """Loop state that is not inside a module: what early stopping and resume need."""

    step: int = 0
    best: Optional[float] = None
    evals_since_best: int = 0
    skipped_steps: int = 0


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
    kept = f"The last good checkpoint, {last_checkpoint}, is untouched." if last_checkpoint else "No checkpoint was written after it."
    return (
        f"The {what} became non-finite (NaN or inf) at optimiser step {step}, so training stopped before "
        f"writing any poisoned weights. {kept} Usual fixes: lower optim.lr, add warmup "
        f"(schedule.warmup_steps), keep optim.grad_clip on, prefer bf16 over fp16 — or set "
        f"train.on_nonfinite=skip to skip such steps."
    )


def train(recipe: Recipe, run_dir: str | Path | None = None, resume: Optional[str] = None) -> TrainResult:
    """Train the recipe's model; returns the run directory, final step and last validation metrics."""
    cfg = recipe.train
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(recipe.model.name)
    checkpoint = _find_resume_checkpoint(run_dir, resume)
    prepare_run_dir(run_dir, recipe, resuming=resume is not None)

    # ---- build everything from the recipe ----
    device = resolve_device(cfg.device)
    configure_determinism(cfg.deterministic, device)
    torch.manual_seed(cfg.seed)
    data = build_data(recipe.data, cfg.batch_size, recipe.eval.batch_size or cfg.batch_size, seed=cfg.seed)
    task = data.spec.task
    if recipe.eval.metric not in METRICS[task]:
        raise EmberError(f"eval.metric={recipe.eval.metric!r} is not reported for {task} data; choose one of {list(METRICS[task])}.")
    model = build_model(recipe.model, data.spec).to(device)
    model.grad_checkpointing = cfg.activation_checkpointing
    summary = model_summary(model)
    optimizer = build_optimizer(model, recipe.optim, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, recipe.schedule, cfg.max_steps)
    autocast = autocast_factory(cfg.precision, device)
    scaler = build_scaler(cfg.precision, device)
    ema = _build_ema(model, cfg.ema_decay)
    l1_params = split_decay(model)[0] if recipe.optim.l1 > 0 else []
    progress = Progress()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        _check_compatible(state, recipe, checkpoint)
        progress = _restore(state, model, optimizer, scheduler, scaler, ema, data.train)
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
    window_start, window_steps = time.perf_counter(), 0
    metrics: dict = {}
    stopped_early = False
    model.train()
    try:
        with StopRequest() as stop:
            while progress.step < cfg.max_steps and not stop.requested and not stopped_early:
                step_loss, grad_norm, bad = optimizer_step(
                    forward_model, model, data.train, task, optimizer, scaler, autocast, recipe, device, l1_params
                )
                if cfg.on_nonfinite == "skip" and bad.item():
                    progress.skipped_steps += 1
                else:
                    scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                scheduler.step()
                progress.step += 1
                if ema is not None:
                    ema.update_parameters(model)
                if cfg.on_nonfinite == "stop":  # recorded on the device; read only at the checks below
                    nonfinite_at = torch.where(bad & (nonfinite_at < 0), progress.step, nonfinite_at)
                loss_window += torch.where(bad, 0.0, step_loss)
                window_steps += 1
                step = progress.step
                is_last = step == cfg.max_steps
                wants_log = step % cfg.log_every == 0 or is_last
                wants_eval = (cfg.eval_every and step % cfg.eval_every == 0) or is_last
                wants_checkpoint = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or is_last or stop.requested
                if (wants_log or wants_eval or wants_checkpoint) and (bad_step := int(nonfinite_at.item())) >= 0:
                    raise EmberError(nonfinite_message(bad_step, "training loss or gradient norm", last_checkpoint))
                if wants_log:
                    now = time.perf_counter()
                    items_per_s = items_per_step * window_steps / (now - window_start)
                    log.train_step({
                        "step": step, "loss": loss_window.item() / window_steps, "lr": lr,
                        f"{log.unit}_per_s": items_per_s,
                        "mfu": summary["flops_per_item"] * items_per_s / peak if peak else None,
                        "grad_norm": grad_norm.item() if grad_norm is not None else None,
                        **({"skipped_steps": progress.skipped_steps} if cfg.on_nonfinite == "skip" else {}),
                    })
                    loss_window.zero_()
                    window_start, window_steps = now, 0  # the logging itself counts in the next window
                else:
                    log.advance(step)
                pause_start = time.perf_counter()
                if wants_eval:
                    metrics = validate(ema.module if ema is not None else model, data.val, task, device, autocast, recipe.eval.max_batches)
                    log.validation(step, metrics)
                    stopped_early = _early_stop(progress, metrics[recipe.eval.metric], recipe)
                if wants_checkpoint or stopped_early:
                    state = _state(model, optimizer, scheduler, scaler, ema, data.train, progress, recipe)
                    last_checkpoint = save_checkpoint(state, run_dir / "checkpoints", step, cfg.keep_checkpoints)
                window_start += time.perf_counter() - pause_start  # throughput counts training time only
        if stop.requested:
            raise KeyboardInterrupt(f"interrupted at step {progress.step}; checkpoint saved in {last_checkpoint}. Resume with --resume auto.")
        if stopped_early:
            log.message(f"early stopping at step {progress.step}: {recipe.eval.metric} did not improve for {recipe.eval.patience} evaluations")
        if not metrics:  # resumed a run that had already finished its steps
            metrics = validate(ema.module if ema is not None else model, data.val, task, device, autocast, recipe.eval.max_batches)
    finally:
        log.close()
    export = ema.module if ema is not None else model
    save_trained_model(run_dir, export, recipe, data.spec, {**summary, "step": progress.step, "metrics": metrics})
    return TrainResult(run_dir=run_dir, step=progress.step, metrics=metrics, stopped_early=stopped_early)


def optimizer_step(forward_model, model, loader, task, optimizer, scaler, autocast, recipe: Recipe, device, l1_params):
    """Forward and backward over ``grad_accum`` micro-batches, then unscale and clip.

    Returns (mean loss of the step, grad norm or None, non-finite flag) as device tensors;
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
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip > 0 else None
    bad = ~torch.isfinite(step_loss)
    if grad_norm is not None and not scaler.is_enabled():  # fp16 overflow is the scaler's business
        bad |= ~torch.isfinite(grad_norm)
    return step_loss, grad_norm, bad


def _find_resume_checkpoint(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    if resume is None:
        return None
    if resume == "auto":
        return latest_valid_checkpoint(run_dir / "checkpoints")
    path = Path(resume)
    if not path.is_file():
        raise EmberError(f"--resume {resume}: no such checkpoint file. Use --resume auto to take the newest valid one in {run_dir / 'checkpoints'}.")
    return path


def _build_ema(model: torch.nn.Module, decay: float) -> Optional[torch.optim.swa_utils.AveragedModel]:
    if decay <= 0:
        return None
    ema_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_fn, use_buffers=True)


def _early_stop(progress: Progress, value: float, recipe: Recipe) -> bool:
    if improved(value, progress.best, recipe.eval.mode, recipe.eval.min_delta):
        progress.best, progress.evals_since_best = value, 0
        return False
    progress.evals_since_best += 1
    return recipe.eval.patience > 0 and progress.evals_since_best >= recipe.eval.patience


def _state(model, optimizer, scheduler, scaler, ema, loader, progress: Progress, recipe: Recipe) -> dict:
    """Everything needed to continue exactly: weights, optimiser, schedule, scaler, EMA, RNGs, data position."""
    return {
        "step": progress.step,
        "progress": {"best": progress.best, "evals_since_best": progress.evals_since_best, "skipped_steps": progress.skipped_steps},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng": rng_state(),
        "data": loader.state_dict(),
        "recipe": recipe.model_dump(mode="json"),
    }


def _check_compatible(state: dict, recipe: Recipe, path: Path) -> None:
    for section in ("model", "data"):
        saved, current = state["recipe"][section], getattr(recipe, section).model_dump(mode="json")
        if saved != current:
            diff = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)}
            shown = ", ".join(f"{section}.{k}: checkpoint {a!r} vs recipe {b!r}" for k, (a, b) in diff.items())
            raise EmberError(
                f"Checkpoint {path} was written by a run with a different {section} section ({shown}). "
                f"Resume with the recipe that wrote it, or start a new run directory."
            )


def _restore(state, model, optimizer, scheduler, scaler, ema, loader) -> Progress:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    loader.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    return Progress(step=state["step"], **state["progress"])
