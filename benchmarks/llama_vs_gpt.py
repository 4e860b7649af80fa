"""Training tokens/s of the Llama decoder against the GPT at the same parameter count.

``recipes/gpt-tiny.yaml`` (1.07 M parameters) and ``recipes/llama-tiny.yaml`` (1.05 M: RoPE,
RMSNorm, SwiGLU, 4 query heads sharing 2 key/value heads) train on the same batches, one
after the other in one process, in rounds whose order alternates (gpt first, then llama
first) so that neither side always runs first (warm caches, CPU frequency, other jobs). The
figure is llama's tokens/s divided by gpt's: the median of the per-round ratios, with each
model's median tokens/s and the best-run ratio beside it (on a shared machine other jobs only
ever slow a run down).

Each run is the same minimal training step for both models: the recipe's model (``build_model``,
same seed), the same ``BatchLoader.next_batch`` batches of the gpt-tiny data (the two recipes
share their data section), AdamW over ``build_optimizer``'s two parameter groups, a mean
cross-entropy, backward, ``clip_grad_norm_``, step, ``zero_grad(set_to_none=True)``, and one
``.item()`` at the end. What is timed: the wall clock from optimiser step ``--warmup + 1``
(before its batch is fetched) to the end of the last step, the device synchronised at both
readings. Precision (autocast) and ``torch.compile`` follow the flags on both sides.

What differs, at this size: the per-token matmul FLOPs are the same (6 N + attention, N
within 2 %), but llama runs other kernels per block (RoPE's rotate-half on q and k, grouped
key/value heads expanded inside attention, three MLP matmuls and a SiLU product instead of two
and a GELU, RMSNorm in fp32 instead of LayerNorm) and has no position table.

Run from the repository root::

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/llama_vs_gpt.py --steps 40 --rounds 3
    PYTHONPATH=src python benchmarks/llama_vs_gpt.py --device cuda --precision bf16 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ember.config import Recipe, load_recipe
from ember.data.build import build_data
from ember.models.registry import build_model
from ember.training.optim import build_optimizer

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
MODELS = {"gpt": RECIPES / "gpt-tiny.yaml", "llama": RECIPES / "llama-tiny.yaml"}


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once all queued device work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed_run(recipe: Recipe, warmup: int) -> float:
    """Train ``recipe``'s model for its max_steps; seconds of steps ``warmup+1 ..max_steps``."""
    cfg, device = recipe.train, torch.device(recipe.train.device)
    gc.collect()
    if cfg.compile:
        torch.compiler.reset()
    torch.manual_seed(cfg.seed)
    data = build_data(recipe.data, cfg.batch_size, cfg.batch_size, seed=cfg.seed)
    model = build_model(recipe.model, data.spec).to(device).train()
    optimizer = build_optimizer(model, recipe.optim, fused=device.type == "cuda")
    forward = torch.compile(model) if cfg.compile else model
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if cfg.precision == "bf16"
        else contextlib.nullcontext
    )
    start = 0.0
    for step in range(cfg.max_steps):
        if step == warmup:
            start = clock(device)
        batch = data.train.next_batch(device)
        with autocast():
            logits = forward(batch["x"])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["y"].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    return clock(device) - start


def make_recipes(args: argparse.Namespace) -> dict[str, Recipe]:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = [
        f"train.max_steps={args.steps}",
        f"train.device={device}",
        f"train.precision={args.precision}",
        f"train.compile={str(args.compile).lower()}",
        "schedule.warmup_steps=0",  # no schedule runs here; a short run would fail the recipe's check
    ]
    recipes = {name: load_recipe(path, overrides) for name, path in MODELS.items()}
    if recipes["gpt"].data != recipes["llama"].data:
        raise SystemExit("gpt-tiny.yaml and llama-tiny.yaml must share their data section for this comparison")
    return recipes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="llama-tiny's training tokens/s against gpt-tiny's.")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per run (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one gpt and one llama run (default 3)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps or args.rounds < 1:
        parser.error("need 0 <= --warmup < --steps and --rounds >= 1")
    return args


def main() -> None:
    args = parse_args()
    recipes = make_recipes(args)
    cfg, seq_len = recipes["gpt"].train, recipes["gpt"].data.seq_len
    timed_tokens = (cfg.max_steps - args.warmup) * cfg.batch_size * seq_len
    spec = build_data(recipes["gpt"].data, cfg.batch_size, cfg.batch_size, seed=cfg.seed).spec
    for name, recipe in recipes.items():
        model = build_model(recipe.model, spec)
        print(f"{name}: {model.num_params():,} parameters, {model.flops_per_item() / 1e6:.2f} MFLOP per token")
    print(
        f"{cfg.device} {cfg.precision}{' compiled' if cfg.compile else ''}, {torch.get_num_threads()} threads, "
        f"{cfg.max_steps} steps per run, steps {args.warmup + 1}..{cfg.max_steps} timed ({timed_tokens:,} tokens)"
    )
    speed: dict[str, list[float]] = {"gpt": [], "llama": []}
    ratios: list[float] = []
    for r in range(args.rounds):
        order = ["gpt", "llama"] if r % 2 == 0 else ["llama", "gpt"]
        for name in order:
            speed[name].append(timed_tokens / timed_run(recipes[name], args.warmup))
        ratios.append(speed["llama"][-1] / speed["gpt"][-1])
        print(
            f"round {r + 1} ({order[0]} first): gpt {speed['gpt'][-1]:,.0f} tok/s  "
            f"llama {speed['llama'][-1]:,.0f} tok/s  llama/gpt {ratios[-1]:.3f}",
            flush=True,
        )
    gpt, llama = statistics.median(speed["gpt"]), statistics.median(speed["llama"])
    best = max(speed["llama"]) / max(speed["gpt"])
    print(
        f"llama/gpt training tokens/s = {statistics.median(ratios):.3f} (median of {args.rounds} rounds; best run vs "
        f"best run {best:.3f}; gpt {gpt:,.0f} tok/s, llama {llama:,.0f} tok/s; {cfg.device} {cfg.precision}"
        f"{' compiled' if cfg.compile else ''}, {torch.get_num_threads()} threads, {cfg.max_steps} steps)"
    )


if __name__ == "__main__":
    main()
