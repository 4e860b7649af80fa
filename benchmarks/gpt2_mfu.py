"""GPT-2 small (124 M parameters) on one GPU: ember's training step vs a plain PyTorch step.

Both train the same model (ember's ``gpt``: 12 layers, 12 heads, 768 wide, 1024-token
context, 50,304-token vocabulary, tied embedding) on random tokens already on the
device, in bf16 autocast, ``torch.compile``d, with fused AdamW and PyTorch's
scaled-dot-product attention (flash on CUDA):

- ember: the training loop's own step (``Layout.forward_backward``) (target-count normalisation,
  accumulation, clipping, the non-finite check), then the optimiser step;
- plain: the nanoGPT-style step — forward, mean cross-entropy, backward, clip, step.

Rounds alternate between the two; each times ``--steps`` optimiser steps after
``--warmup`` (compilation). tokens/s = batch x accumulation x context / seconds per step;
MFU = tokens/s x training FLOPs per token (6 N + 12 L C T, PaLM's count) / the GPU's
bf16 peak (ember.training.flops). Prints one figure: ember's MFU, with the plain step's
beside it. The data path is left out on purpose (see benchmarks/loader.py).

    python benchmarks/gpt2_mfu.py                 # on a GPU
    python benchmarks/gpt2_mfu.py --smoke         # a tiny model on the CPU: checks the script runs
    python benchmarks/gpt2_mfu.py --smoke --no-compile   # ... in seconds (compiling takes a minute on 2 cores)

The last line is the figure, in a fixed form that benchmarks/gpu_suite.py reads:
``ember MFU 52.1% on NAME (plain PyTorch step 53.0%; ember/plain time per step 1.017)``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ember.config import recipe_from_dict
from ember.data.spec import DataSpec
from ember.models.registry import build_model
from ember.training.distributed import DistContext
from ember.training.flops import peak_flops
from ember.training.layouts import Layout, StepParts
from ember.training.optim import build_optimizer
from ember.training.plugin import Plugins
from ember.training.precision import autocast_factory, build_scaler

GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}
SMOKE = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64}


class RandomTokens:
    """A loader's interface as the loop reads it: next_batch(device) -> {"x", "y"}."""

    def __init__(self, batch: int, seq: int, vocab: int, device: torch.device) -> None:
        self.x = torch.randint(0, vocab, (batch, seq + 1), device=device)

    def next_batch(self, device) -> dict[str, torch.Tensor]:
        return {"x": self.x[:, :-1], "y": self.x[:, 1:]}


def build(args, device: torch.device):
    shape = SMOKE if args.smoke else GPT2_SMALL
    recipe = recipe_from_dict(
        {
            "model": {"name": "gpt", **shape, "dropout": 0.0},
            "optim": {"name": "adamw", "lr": 6e-4, "weight_decay": 0.1, "grad_clip": 1.0},
            "train": {
                "batch_size": args.batch,
                "grad_accum": args.accum,
                "precision": args.precision,
                "device": device.type,
            },
        }
    )
    spec = DataSpec(task="lm", vocab_size=args.vocab, seq_len=shape["block_size"])
    torch.manual_seed(0)
    model = build_model(recipe.model, spec).to(device)
    return recipe, model, RandomTokens(args.batch, shape["block_size"], args.vocab, device)


def ember_step(recipe, model, data, device, compile: bool):
    layout = Layout(DistContext(device=device), recipe)
    layout.wrap(model)
    if compile:
        layout.compile()
    optimizer = build_optimizer(model, recipe.optim, fused=device.type == "cuda")
    scaler, autocast = build_scaler(recipe.train.precision, device), autocast_factory(recipe.train.precision, device)
    parts = StepParts(
        optimizer, scaler, autocast, "lm", recipe.train.label_smoothing, recipe.optim.grad_clip, Plugins([])
    )

    def step():
        layout.forward_backward([data.next_batch(device) for _ in range(recipe.train.grad_accum)], parts, model)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def plain_step(recipe, model, data, device, compile: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=device.type == "cuda")
    forward = torch.compile(model) if compile else model
    dtype = torch.bfloat16 if recipe.train.precision == "bf16" else torch.float32

    def step():
        for _ in range(recipe.train.grad_accum):
            batch = data.next_batch(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = forward(batch["x"])
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten()) / recipe.train.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def seconds_per_step(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, to check the script")
    parser.add_argument(
        "--peak-flops", type=float, default=0, help="the device's dense peak FLOP/s (default: ember's table)"
    )
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile both sides (default)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.accum, args.vocab, args.steps, args.warmup, args.rounds = 2, 2, 512, 2, 1, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    recipe, model, data = build(args, device)
    tokens = args.batch * args.accum * model.block_size
    flops_per_token = model.flops_per_item()
    peak = peak_flops(device, args.precision, args.peak_flops)
    if not peak:  # a GPU missing from ember.training.flops.GPU_PEAKS: no MFU can be made up
        raise SystemExit(
            f"{torch.cuda.get_device_name(device)} is not in ember's table of GPU peaks "
            f"(ember.training.flops.GPU_PEAKS): give its dense {args.precision} peak as --peak-flops."
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{model.num_params() / 1e6:.1f} M parameters, {flops_per_token / 1e9:.2f} GFLOP/token, {tokens} tokens/step, "
        f"{name} peak {peak / 1e12:.3g} TFLOP/s ({args.precision}{'' if args.compile else ', eager'})"
    )
    times = {"ember": [], "plain": []}
    steps = {
        "ember": ember_step(recipe, model, data, device, args.compile),
        "plain": plain_step(recipe, model, data, device, args.compile),
    }
    for r in range(args.rounds):
        for kind in ("ember", "plain") if r % 2 == 0 else ("plain", "ember"):
            times[kind].append(seconds_per_step(steps[kind], args.steps, args.warmup, device))
    mfu = {kind: tokens / statistics.median(ts) * flops_per_token / peak for kind, ts in times.items()}
    for kind, ts in times.items():
        s = statistics.median(ts)
        print(f"{kind:5s}: {s * 1e3:8.1f} ms/step  {tokens / s:12,.0f} tokens/s  MFU {percent(mfu[kind])}")
    ratio = statistics.median(times["ember"]) / statistics.median(times["plain"])
    print(
        f"ember MFU {percent(mfu['ember'])} on {name} (plain PyTorch step {percent(mfu['plain'])}; "
        f"ember/plain time per step {ratio:.3f})"
    )


def percent(fraction: float) -> str:
    """Three significant digits: a smoke run's tiny MFU is not printed as 0.0 %."""
    return f"{fraction * 100:.3g}%"


if __name__ == "__main__":
    main()
