"""The training loop: one function, top to bottom.

``train(recipe)`` builds the run's parts from the recipe (``ember.training.components``),
then runs optimiser steps until ``train.max_steps`` (or early stopping). The loop only
calls components, and each decides when it acts: the run log when to write a line, the
validator when to validate, the checkpointer when to save, the non-finite policy what a
NaN means, the profiler which steps to trace; the layout runs each step's forward and
backward, and the step plugins join in without the loop knowing what they are. Finally the weights are exported.

Example::

    result = train(load_recipe("recipes/cnn-digits.yaml"), run_dir="runs/cnn")
    result.metrics["accuracy"]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ember.config import Recipe, require_recipe, step_capped
from ember.models.modes import eval_mode_modules
from ember.runs import build_run_model, default_run_dir, save_trained_model, with_adapters
from ember.training.checkpoint import list_checkpoints
from ember.training.checkpointer import Checkpointer
from ember.training.components import Run, build_run
from ember.training.device import resolve_device
from ember.training.distributed import barrier, launched_rank, launched_world_size, setup, teardown, with_layout
from ember.training.flops import MfuMeter, peak_flops
from ember.training.heap import run_objects_only
from ember.training.interrupt import StopRequest
from ember.training.layouts import StepOutcome
from ember.training.nonfinite import NonFinitePolicy, check_finite_weights
from ember.training.parallelize import choose_strategy
from ember.training.peak_memory import peak_memory
from ember.training.process_state import caller_state_kept
from ember.training.profiling import Profiler
from ember.training.resume import already_finished, trainer_state
from ember.training.runlog import RunLog
from ember.training.trackers import Trackers
from ember.training.trackers.samples import lm_sampler
from ember.training.validator import Validator

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What ``train`` returns.

    ``run_dir``: the run directory (``recipe.yaml``, ``metrics.jsonl``, ``checkpoints/``,
    ``model.safetensors`` and ``model.json``); ``step``: the optimiser steps done; ``metrics``: the
    last validation's values (``loss``, ``accuracy``, ... as ``eval.metric`` names them), the same
    as ``model.json``'s; ``stopped_early``: early stopping (``eval.patience``) ended the run;
    ``halted``: ``on_eval`` asked it to stop; ``checkpoint``: the newest checkpoint (what
    ``resume="auto"`` continues from), None when the run kept none; ``model_path``: the final
    weights (``ember.evaluate(result.run_dir)`` scores them, ``ember.generate`` samples from them).
    """

    run_dir: Path
    step: int
    metrics: dict = field(default_factory=dict)  # last validation
    stopped_early: bool = False
    halted: bool = False  # on_eval asked to stop (e.g. a search pruned this trial)
    checkpoint: Path | None = None

    @property
    def model_path(self) -> Path:
        """The final weights, ``run_dir/model.safetensors``."""
        return self.run_dir / "model.safetensors"


def train(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    resume: str | None = None,
    on_eval: Callable[[int, dict], bool] | None = None,
    *,
    model: nn.Module | None = None,
    data: Any = None,
) -> TrainResult:
    """Train the recipe's model; returns the run directory, final step and last validation metrics.

    ``on_eval(step, metrics)``, called on every rank after each validation, may return True
    to stop the run there (checkpointed and exported as usual); it must answer the same on
    every rank. ``ember tune`` prunes trials with it.

    ``model``: a module of your own (``model.name: custom`` with its ``task``, see
    ``ember.models.custom``), trained in place; ``data``: a map-style dataset of your own, or a
    ``(train, val)`` pair (``data.name: custom``, see ``ember.data.custom``). Either may come
    alone; both get the same loop, checkpoints, exact resume and run directory. The module is
    moved to the run's device and keeps each submodule's mode (one in eval mode trains so) and its
    frozen parameters (not optimised).

    Called from a program of your own, it gives back what the run sets for itself (seeds, torch's
    deterministic and cuDNN switches, thread count, environment) when it returns or raises: see
    ``ember.training.process_state``.
    """
    require_recipe(recipe, "ember.train")
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(recipe.model.name)
    recipe, capped = step_capped(recipe)
    if capped and launched_rank() == 0:
        logger.warning(capped)  # a user's value changed: said even where logging is not set up
    if resume == "auto" and model is None and data is None and launched_world_size() == 1:
        finished = finished_run(run_dir, recipe)
        if finished is not None:
            return finished
    device = resolve_device(recipe.train.device)
    # The caller's RNGs, torch switches and environment are theirs again when this returns or raises.
    with caller_state_kept(device), run_objects_only():  # and torch's objects not rescanned by every collection
        ctx = setup(recipe.parallel.strategy, device, recipe.parallel.timeout_s)
        try:
            ctx = with_layout(ctx, *choose_strategy(recipe, ctx))
            return _train(build_run(recipe, run_dir, resume, ctx, model, data), on_eval)
        finally:
            teardown()


def finished_run(run_dir: str | Path, recipe: Recipe) -> TrainResult | None:
    """What ``train(recipe, run_dir, resume="auto")`` would return at once for a run that has
    finished (``EMBER_MAX_STEPS`` applied), else None; one process asks before starting several.

    Example::

        finished_run("runs/cnn", load_recipe("runs/cnn/recipe.yaml"))  # TrainResult(...) or None
    """
    # Said at once: resuming a finished run would rebuild data and model only to write the same
    # model.safetensors and metrics again (see ``already_finished``). The cap is idempotent.
    run_dir = Path(run_dir)
    finished = already_finished(run_dir, step_capped(recipe)[0])
    if finished is None:
        return None
    info, stopped_early = finished
    why = (
        "early stopping ended it (eval.patience)"
        if stopped_early
        else "raise train.max_steps with --set to train further"
    )
    how = "stopped early" if stopped_early else "already finished"
    logger.info(f"{run_dir} {how} at step {info['step']} (model.safetensors written); nothing to do — {why}")
    kept = list_checkpoints(run_dir / "checkpoints")
    return TrainResult(run_dir, info["step"], info.get("metrics") or {}, stopped_early, checkpoint=(kept or [None])[-1])


def _train(run: Run, on_eval: Callable[[int, dict], bool] | None) -> TrainResult:
    cfg, ctx, progress = run.recipe.train, run.ctx, run.progress
    eval_model = run.plugins.eval_model(run.model)  # the EMA's average when there is one
    saver = _checkpointer(run)
    policy = NonFinitePolicy(cfg.on_nonfinite, ctx.device)
    profiler = Profiler(cfg.profile, run.run_dir, ctx.device, ctx.rank, progress.step, cfg.max_steps)
    log, mfu = _run_log(run, eval_model)  # last before the try that closes it (its bar and trackers run)
    validator = Validator(run.layout, eval_model, run.data, run.parts.autocast, run.recipe, log, on_eval)
    metrics: dict = {}
    status = "failed"  # what the trackers record unless the run gets to its end
    log.window.restart()
    try:
        with StopRequest() as stop, profiler:
            stopping = False
            while progress.step < cfg.max_steps and not (stopping or validator.halted or progress.stopped_early):
                batches = [run.data.train.next_batch(ctx.device) for _ in range(cfg.grad_accum)]
                outcome = run.layout.forward_backward(batches, run.parts, run.model)
                skip = policy.skip(outcome.bad, progress.step + 1, saver.last)
                lr = _apply_step(run, skip)
                progress.step, progress.skipped_steps = progress.step + 1, progress.skipped_steps + skip
                step = progress.step
                log.window.add(outcome.loss, skip)
                sync = log.should_log(step) or validator.should_validate(step) or saver.should_save(step)
                stopping = stop.agreed(ctx.distributed, sync, ctx.device)  # a Ctrl-C, or a NaN, seen by one rank
                if sync or stopping:
                    policy.check(saver.last, ctx.distributed)
                if log.should_log(step):
                    log.log_step(step, run.items_per_step, ctx.dp_all_reduce_, _line(run, mfu, lr, outcome, log.unit))
                else:
                    log.advance(step)
                with log.window.paused():  # throughput counts training time only
                    if validator.should_validate(step):
                        metrics = validator.run(step, progress, saver.last)
                        stopping = stopping or stop.agreed(ctx.distributed, True, ctx.device)  # during validation
                    elif not ctx.distributed:
                        stopping = stop.requested
                    saver.maybe_save(step, stopping=progress.stopped_early or validator.halted or stopping)
                profiler.step(step)
        if stopping:
            saved = f"checkpoint saved in {saver.last}" if saver.last else "no checkpoint was written"
            status = "killed"
            again = 'Resume with --resume auto (resume="auto" in Python).'
            raise KeyboardInterrupt(f"interrupted at step {progress.step}; {saved}. {again}")
        _say_why_it_ended(log, run, validator)
        metrics = metrics or validator.metrics(progress.step, saver.last)  # a resumed run that had finished
        status = "finished"
    finally:
        log.close(status)
    if eval_model is not run.model or saver.checked_step != progress.step:  # else just checked by the save
        check_finite_weights(eval_model, progress.step, saver.last)
    _export(run, eval_model, metrics)
    barrier()
    return TrainResult(
        run.run_dir, progress.step, metrics, progress.stopped_early, halted=validator.halted, checkpoint=saver.last
    )


def _checkpointer(run: Run) -> Checkpointer:
    """Saves the weights, the optimiser and everything else resume needs (``trainer_state``)."""
    state = lambda: {  # noqa: E731 (read when a checkpoint is written, not now)
        **trainer_state(
            run.scheduler,
            run.parts.scaler,
            run.plugins,
            run.data.train,
            run.progress,
            run.recipe,
            run.ctx.dp_size,
            run.model,
        ),
        "precision": run.precision.precision,  # what auto resolved to here; another machine may differ
    }
    return Checkpointer(
        run.run_dir / "checkpoints",
        run.recipe.train,
        run.model,
        run.optimizer,
        state,
        run.ctx.is_main,
        last=run.resumed_from,
    )


def _apply_step(run: Run, skip: bool) -> float:
    """The optimiser step (unless skipped; the plugins act after it), then the schedule; the rate it used."""
    optimizer, scaler = run.optimizer, run.parts.scaler
    if not skip:
        scaler.step(optimizer)
        run.plugins.after_step(run.model)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    return lr


def _run_log(run: Run, eval_model: nn.Module) -> tuple[RunLog, MfuMeter]:
    cfg, ctx, data = run.recipe.train, run.ctx, run.data
    unit = "samples" if data.items_per_sample == 1 else "tokens"
    trackers = sampler = None
    if ctx.is_main:
        trackers = Trackers(cfg.trackers, run.recipe, run.run_dir, run.progress.step, run.resumed_from is not None)
        if cfg.trackers and not (ctx.distributed or cfg.compile):  # see ember.training.trackers.samples
            sampler = lm_sampler(eval_model, data.spec, data.codec_json, ctx.device, run.recipe.objective.name)
    peak = peak_flops(ctx.device, run.precision.precision, cfg.peak_flops) * ctx.world_size  # may measure
    log = RunLog(
        run.run_dir,
        run.progress.step,
        cfg.max_steps,
        unit,
        cfg.progress,
        cfg.log_every,
        quiet=not ctx.is_main,
        device=ctx.device,
        trackers=trackers,
        sampler=sampler,
    )
    mfu = MfuMeter(
        peak,
        lambda text: log.message(text, logging.WARNING),
        measured=ctx.device.type == "cpu" and not cfg.peak_flops > 0,
    )
    layout = f", {ctx.strategy} x {ctx.world_size}" if ctx.distributed else ""
    log.message(
        f"ember {run.recipe.model.name}: {run.summary['params']:,} parameters, {ctx.device}"
        f"{layout}, {run.precision.describe(cfg.precision)} → {run.run_dir}"
    )
    for level, text in _as_given(run.model):
        log.message(text, level)
    if run.resumed_from is not None:
        log.message(f"resumed from {run.resumed_from} at step {run.progress.step}")
    return log, mfu


def _as_given(model: nn.Module) -> list[tuple[int, str]]:
    """(level, message) for what trains otherwise than a plain module in train mode: frozen parameters
    and modules in eval mode, kept as the user set them and said."""
    params = list({id(p): p for p in model.parameters()}.values())
    frozen, notes = sum(p.numel() for p in params if not p.requires_grad), []
    if frozen:
        total = sum(p.numel() for p in params)
        notes.append((logging.INFO, f"{total - frozen:,} of {total:,} parameters trainable ({frozen:,} frozen)"))
    idle = eval_mode_modules(model)
    if "" in idle:  # the whole module: almost always a model.eval() left from trying it out
        notes.append(
            (
                logging.WARNING,
                "the model was given in eval mode and trains so (dropout off, batch-norm statistics not "
                "updated); call model.train() before ember.train unless that is meant",
            )
        )
    elif idle:  # a frozen backbone's batch norms, say
        shown = ", ".join(idle[:3]) + (", ..." if len(idle) > 3 else "")
        notes.append((logging.INFO, f"in eval mode as given, and trained so: {shown}"))
    return notes


def _line(run: Run, mfu: MfuMeter, lr: float, outcome: StepOutcome, unit: str) -> Callable[[float], dict]:
    """What a log line says besides step and loss, given the window's throughput (in ``unit``s per second)."""
    skipping, ctx = run.recipe.train.on_nonfinite == "skip", run.ctx
    return lambda items_per_s: {
        "lr": lr,
        f"{unit}_per_s": items_per_s,
        "mfu": mfu(flops, items_per_s) if (flops := run.summary["flops_per_item"]) else None,
        "grad_norm": outcome.grad_norm.item(),
        **({"skipped_steps": run.progress.skipped_steps} if skipping else {}),
        **peak_memory(ctx.device, over_ranks=ctx.distributed),
    }


def _say_why_it_ended(log: RunLog, run: Run, validator: Validator) -> None:
    step, ev = run.progress.step, run.recipe.eval
    if run.progress.stopped_early:
        log.message(f"early stopping at step {step}: {ev.metric} did not improve for {ev.patience} evaluations")
    if validator.halted:
        log.message(f"stopped at step {step}: asked to by on_eval (a pruned search trial)")


def _export(run: Run, model, metrics: dict) -> None:
    """Write model.safetensors on rank 0: the model itself, or, when it is sharded, a plain copy
    holding the weights gathered from every rank."""
    info = {**run.summary, "precision": run.precision.precision, "step": run.progress.step, "metrics": metrics}
    info |= run.carried
    if run.layout.sharded:
        state = run.layout.full_state_dict(model)
        if not run.ctx.is_main:
            return
        model = with_adapters(build_run_model(run.recipe, run.data.spec), info)
        model.load_state_dict(state)
    if run.ctx.is_main:
        save_trained_model(run.run_dir, model, run.recipe, run.data.spec, info)
