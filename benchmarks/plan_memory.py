"""How close ``ember plan``'s predicted peak memory is to what one real training step uses on the CPU.

For a GPT (default: 4 layers, 256 wide, 256-token context, a 2048-token vocabulary,
micro-batch 8, AdamW) in fp32, bf16 and fp32 with activation checkpointing, the script
prints the plan's single-device total and two measurements of a real training step, each
in a fresh subprocess so that nothing else is alive:

- allocator: the most bytes PyTorch's CPU allocator had handed out at once
  (``torch.profiler`` with ``profile_memory=True`` reports the running total with each
  allocation), from before the model is built until after the second optimiser step; the
  second step is the peak, with the optimiser state already there.
- RSS: the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs)
  minus its resident memory just before the model is built, after a warm-up step at
  micro-batch 1 has loaded code, started threads and set up kernel scratch space. It
  includes what the allocator does not see (malloc's own bookkeeping, small allocations
  on glibc's heap); ``MALLOC_MMAP_THRESHOLD_=65536`` sends every tensor of 64 kB or more
  through mmap, so a freed tensor leaves resident memory at once.

The step is the one ember's loop runs: forward under autocast, summed loss divided by
the target count, backward, gradient clipping, AdamW (ember's parameter groups),
``zero_grad(set_to_none=True)``.

Run from the repository root::

    PYTHONPATH=src python benchmarks/plan_memory.py
    PYTHONPATH=src python benchmarks/plan_memory.py --n-layer 2 --n-embd 128 --block 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = [("fp32", False), ("bf16", False), ("fp32", True)]


def recipe_overrides(args: argparse.Namespace, precision: str, checkpointing: bool) -> list[str]:
    return [
        f"model.n_layer={args.n_layer}",
        f"model.n_embd={args.n_embd}",
        f"model.n_head={args.n_head}",
        f"model.block_size={args.block}",
        f"data.seq_len={args.block}",
        f"data.vocab_size={args.vocab}",
        f"train.batch_size={args.batch}",
        f"train.precision={precision}",
        f"train.activation_checkpointing={str(checkpointing).lower()}",
    ]


def measure(overrides: list[str], how: str) -> int:
    """Peak bytes of two real training steps, measured in a fresh process."""
    code = f"import sys; sys.argv = ['x', {how!r}] + {overrides!r}; from benchmarks.plan_memory import child; child()"
    # Every allocation of 64 kB or more through mmap: freed memory leaves the process at once,
    # so resident memory follows live memory instead of glibc's retained heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def child() -> None:
    import torch

    from ember.config import load_recipe
    from ember.models.registry import build_model
    from ember.plan import allocator_peak, data_spec, reference_step
    from ember.plugins import prepare_model
    from ember.training.optim import build_optimizer

    how, overrides = sys.argv[1], sys.argv[2:]
    recipe = load_recipe("recipes/gpt-tiny.yaml", overrides)
    spec = data_spec(recipe)
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, spec.vocab_size, (recipe.train.batch_size, spec.seq_len + 1), generator=g) for _ in range(2)
    ]

    def run(batches: list[torch.Tensor]) -> None:
        model = build_model(recipe.model, spec)
        model.grad_checkpointing = recipe.train.activation_checkpointing
        prepare_model(recipe.plugins, model)  # as build_run does: LoRA's adapters, a frozen base
        optimizer = build_optimizer(model, recipe.optim)
        for tokens in batches:
            reference_step(model, optimizer, tokens, recipe.train.precision, recipe.optim.grad_clip)

    if how == "rss":
        # A first step at micro-batch 1 loads code, starts threads and sets up kernels'
        # scratch space; then the peak is reset (clear_refs 5) and measured from there.
        run([b[:1] for b in batches])
        before = _vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        run(batches)
        peak = _vm("VmHWM") - before
    else:
        peak = allocator_peak(lambda: run(batches))
    print(json.dumps({"peak": peak}))


def _vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    from ember.config import load_recipe
    from ember.plan import plan

    print(
        f"GPT {args.n_layer} layers x {args.n_embd}, context {args.block}, vocab {args.vocab}, micro-batch {args.batch}, AdamW"
    )
    print(f"{'case':<14} {'predicted':>10} {'allocator':>10} {'error':>7} {'RSS':>10} {'error':>7}")
    for precision, checkpointing in CASES:
        overrides = recipe_overrides(args, precision, checkpointing)
        predicted = plan(load_recipe("recipes/gpt-tiny.yaml", overrides)).layouts[0].memory.total
        alloc, rss = measure(overrides, "allocator"), measure(overrides, "rss")
        name = precision + (" + ckpt" if checkpointing else "")
        print(
            f"{name:<14} {predicted / 1e6:>8.1f}MB {alloc / 1e6:>8.1f}MB {predicted / alloc - 1:>+7.2%} "
            f"{rss / 1e6:>8.1f}MB {predicted / rss - 1:>+7.2%}"
        )


if __name__ == "__main__":
    main()
