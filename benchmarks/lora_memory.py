"""Memory of a training step: a full fine-tune of a GPT vs LoRA on the same model, predicted and measured.

For a GPT (default: 4 layers, 512 wide, 128-token context, a 2048-token vocabulary,
micro-batch 4, AdamW, fp32) the script prints, for a full fine-tune, LoRA on q and v, and
LoRA on every Linear of the blocks (rank 8), the trainable parameters, ``ember plan``'s
single-device total and two measurements of two real training steps, each in a fresh
subprocess so that nothing else is alive (``benchmarks/plan_memory.py``'s own measurement):

- allocator: the most bytes PyTorch's CPU allocator had handed out at once
  (``torch.profiler`` with ``profile_memory=True`` reports the running total with each
  allocation), from before the model is built until after the second optimiser step: the
  weights, the gradients, AdamW's state and the step's activations. It is the figure the
  plan predicts; Python objects and malloc's own bookkeeping are not in it.
- RSS: the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs) minus
  its resident memory just before the model is built, after a warm-up at micro-batch 1;
  ``MALLOC_MMAP_THRESHOLD_=65536`` returns every freed tensor of 64 kB or more at once.

The step is ember's: the model as the run prepares it (``ember.plugins.prepare_model``:
adapters attached, the base frozen), the optimiser over its trainable parameters
(``build_optimizer``), forward, summed loss over the target count, backward, clipping,
AdamW, ``zero_grad(set_to_none=True)``.

Run from the repository root::

    PYTHONPATH=src python benchmarks/lora_memory.py
    PYTHONPATH=src python benchmarks/lora_memory.py --n-layer 2 --n-embd 256
"""

from __future__ import annotations

import argparse

from plan_memory import measure  # the same two steps, measured the same way in a fresh process

CASES = {
    "full fine-tune": [],
    "lora q,v r=8": ["plugins=[{name: lora, rank: 8, alpha: 16, targets: [q, v]}]"],
    "lora all r=8": ["plugins=[{name: lora, rank: 8, alpha: 16, targets: [q, k, v, proj, fc]}]"],
}


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.n_layer={args.n_layer}",
        f"model.n_embd={args.n_embd}",
        f"model.n_head={args.n_head}",
        f"model.block_size={args.block}",
        f"data.seq_len={args.block}",
        f"data.vocab_size={args.vocab}",
        f"train.batch_size={args.batch}",
        "train.precision=fp32",
        "optim.name=adamw",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()

    from ember.config import load_recipe
    from ember.plan import plan

    print(
        f"GPT {args.n_layer} layers x {args.n_embd}, context {args.block}, vocab {args.vocab}, "
        f"micro-batch {args.batch}, AdamW, fp32"
    )
    print(
        f"{'case':<16} {'trainable':>10} {'grads+optim':>11} {'predicted':>10} {'allocator':>10} {'error':>7} "
        f"{'RSS':>10} {'error':>7}"
    )
    for name, plugin in CASES.items():
        overrides = recipe_overrides(args) + plugin
        p = plan(load_recipe("recipes/gpt-tiny.yaml", overrides))
        m = p.layouts[0].memory
        trainable = m.grads // 4
        alloc, rss = measure(overrides, "allocator"), measure(overrides, "rss")
        print(
            f"{name:<16} {trainable:>10,} {(m.grads + m.optimizer) / 1e6:>9.1f}MB {m.total / 1e6:>8.1f}MB "
            f"{alloc / 1e6:>8.1f}MB {m.total / alloc - 1:>+7.2%} {rss / 1e6:>8.1f}MB {m.total / rss - 1:>+7.2%}"
        )


if __name__ == "__main__":
    main()
