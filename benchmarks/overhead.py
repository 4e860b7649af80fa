"""How much throughput ember's training loop costs against a minimal hand-written loop.

The demo's GPT (``recipes/gpt-tiny.yaml``) is trained for the same number of optimiser
steps twice per round, in one process: once by a plain PyTorch loop in the style of
nanoGPT's ``train.py`` (``plain_loop`` below) and once by ``ember.training.loop.train``.
The order alternates every round so that neither side always runs first (warm caches,
CPU frequency, other jobs). The figure is ember's tokens/s divided by the plain loop's;
the goal is >= 0.97. The headline is the median of the per-round ratios; the ratio of
the best plain run to the best ember run is printed beside it, because on a shared
machine other jobs only ever slow a run down. Differences of a few per cent between
rounds are noise: use more rounds (and steps) on a quiet machine for a firm figure.

Both sides do the same work: the same model (``build_model`` from the recipe, same seed,
so the same initial weights), the same batches (``BatchLoader.next_batch`` of the same
``build_data`` loader), AdamW over the same two parameter groups (``build_optimizer``,
fused on CUDA), the same warmup-plus-cosine learning rate each step, a mean
cross-entropy, backward, ``clip_grad_norm_``, step, ``zero_grad(set_to_none=True)``, and
one ``.item()`` plus one log line every ``--log-every`` steps. Precision (autocast) and
``torch.compile`` follow the flags on both sides, as do TF32 matmuls on CUDA.

What is timed, on both sides: the wall clock from the start of optimiser step
``--warmup + 1`` (before its batch is fetched) to the end of the last optimiser step,
its log line included. The first ``--warmup`` steps (allocator and kernel warm-up,
compilation) are not timed, and neither are process start-up, data, model and
optimiser construction, or, for ember, the run directory set-up before the loop and the
final validation, checkpoint and export after it. On CUDA the device is synchronised
before each of the two clock readings and nowhere else. ember is timed from outside,
without changing it: the layout's ``forward_backward`` (``ember.training.layouts.Layout``)
and ``validate`` in ``ember.training.layouts`` are wrapped (``unittest.mock.patch.object``)
so that the (warmup + 1)-th call of the first (after that step's batches are fetched)
reads the start clock and the first call of the second, which follows the last step's
log when ``train.eval_every=0``, reads the end clock. ember's own console output goes to
a buffer, as do the plain loop's log lines. ember runs with ``train.progress=false``,
``train.eval_every=0``, ``train.checkpoint_every=0`` and ``train.peak_flops=1`` (no CPU
peak measurement); it writes its run directory into a temporary directory, deleted after.

Run from the repository root::

    PYTHONPATH=src python benchmarks/overhead.py --steps 60 --rounds 3
    PYTHONPATH=src python benchmarks/overhead.py --device cuda --precision bf16 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

import ember.training.layouts as ember_layouts
import ember.training.loop as ember_loop
from ember.config import Recipe, load_recipe
from ember.data.build import build_data
from ember.models.registry import build_model
from ember.training.optim import build_optimizer
from ember.training.schedules import lr_factor

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "gpt-tiny.yaml"


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once all queued device work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def fresh_start(recipe: Recipe) -> None:
    """Free the previous run's memory and compiled graphs before the next run starts."""
    gc.collect()
    if recipe.train.compile:
        torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plain_loop(recipe: Recipe, warmup: int) -> float:
    """Train the recipe with a minimal hand-written loop; seconds of steps ``warmup+1 ..max_steps``."""
    cfg, device = recipe.train, torch.device(recipe.train.device)
    torch.manual_seed(cfg.seed)
    data = build_data(recipe.data, cfg.batch_size, recipe.eval.batch_size or cfg.batch_size, seed=cfg.seed)
    model = build_model(recipe.model, data.spec).to(device)
    optimizer = build_optimizer(model, recipe.optim, fused=device.type == "cuda")
    forward = torch.compile(model) if cfg.compile else model
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if cfg.precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    log = io.StringIO()
    model.train()
    start = 0.0
    for step in range(cfg.max_steps):
        if step == warmup:
            start = clock(device)
        lr = recipe.optim.lr * lr_factor(step, recipe.schedule, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data.train.next_batch(device)
        with autocast():
            logits = forward(batch["x"])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["y"].reshape(-1))
        loss.backward()
        if recipe.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            print(f"step {step + 1} loss {loss.item():.4f} lr {lr:.2e}", file=log)
    return clock(device) - start


def ember_run(recipe: Recipe, warmup: int) -> float:
    """Train the recipe with ``ember.training.loop.train``; seconds of steps ``warmup+1 ..max_steps``."""
    device = torch.device(recipe.train.device)
    real_step, real_validate = ember_layouts.Layout.forward_backward, ember_layouts.validate
    clocks: dict[str, float] = {}
    calls = 0

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if calls == warmup:
            clocks["start"] = clock(device)
        calls += 1
        return real_step(*args, **kwargs)

    def timed_validate(*args: Any, **kwargs: Any) -> Any:
        clocks.setdefault("end", clock(device))  # the final validation: the last step is done
        return real_validate(*args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(ember_layouts.Layout, "forward_backward", timed_step))
        stack.enter_context(mock.patch.object(ember_layouts, "validate", timed_validate))
        run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ember-overhead-"))) / "run"
        stack.enter_context(contextlib.redirect_stderr(io.StringIO()))  # ember's console lines
        result = ember_loop.train(recipe, run_dir=run_dir)
    if result.step != recipe.train.max_steps or calls != result.step or clocks.keys() != {"start", "end"}:
        raise RuntimeError(
            f"ember ran {result.step} steps ({calls} timed calls, clocks {sorted(clocks)}); cannot time it"
        )
    return clocks["end"] - clocks["start"]


def make_recipe(args: argparse.Namespace) -> Recipe:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = [
        f"train.max_steps={args.steps}",
        f"train.device={device}",
        f"train.precision={args.precision}",
        f"train.compile={str(args.compile).lower()}",
        "train.progress=false",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.peak_flops=1",
    ]
    if args.log_every:
        overrides.append(f"train.log_every={args.log_every}")
    return load_recipe(RECIPE, overrides)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ember's tokens/s against a minimal PyTorch loop on the demo GPT.")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per run (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one plain and one ember run (default 3)")
    parser.add_argument(
        "--log-every", type=int, default=0, help="steps per log line and .item() (default: the recipe's)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model on both sides")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps or args.rounds < 1:
        parser.error("need 0 <= --warmup < --steps and --rounds >= 1")
    return args


def main() -> None:
    args = parse_args()
    recipe = make_recipe(args)
    cfg = recipe.train
    if cfg.device == "cuda":  # what ember's configure_determinism sets; nanoGPT sets the same
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    timed_tokens = (cfg.max_steps - args.warmup) * cfg.batch_size * recipe.data.seq_len
    runs: dict[str, Callable[[Recipe, int], float]] = {"plain": plain_loop, "ember": ember_run}
    print(
        f"{cfg.device} {cfg.precision}{' compiled' if cfg.compile else ''}, {cfg.max_steps} steps per run, "
        f"steps {args.warmup + 1}..{cfg.max_steps} timed ({timed_tokens:,} tokens), log every {cfg.log_every}"
    )
    speed: dict[str, list[float]] = {"plain": [], "ember": []}
    ratios: list[float] = []
    for r in range(args.rounds):
        order = ["plain", "ember"] if r % 2 == 0 else ["ember", "plain"]
        for name in order:
            fresh_start(recipe)
            speed[name].append(timed_tokens / runs[name](recipe, args.warmup))
        ratios.append(speed["ember"][-1] / speed["plain"][-1])
        print(
            f"round {r + 1} ({order[0]} first): plain {speed['plain'][-1]:,.0f} tok/s  "
            f"ember {speed['ember'][-1]:,.0f} tok/s  ember/plain {ratios[-1]:.3f}",
            flush=True,
        )
    plain, ember = statistics.median(speed["plain"]), statistics.median(speed["ember"])
    best = max(speed["ember"]) / max(speed["plain"])  # other jobs only ever slow a run down
    print(
        f"overhead: ember/plain tokens/s = {statistics.median(ratios):.3f} (median of {args.rounds} rounds; "
        f"best run vs best run {best:.3f}; plain {plain:,.0f} tok/s, ember {ember:,.0f} tok/s; "
        f"{cfg.device} {cfg.precision}{' compiled' if cfg.compile else ''}, {cfg.max_steps} steps)"
    )


if __name__ == "__main__":
    main()
