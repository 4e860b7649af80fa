"""How much faster the batched augmentation is than applying it one image at a time.

One ``ImageTransform`` (``ember.data.augment``) in training mode, random affine with
rotation 10, scale (0.9, 1.1) and translate 0.1, runs on one uint8 batch (``--batch``
images of ``--size`` x ``--size``, 1 channel, default 256 of 8x8 like the digits) two ways:

- batched: ``t(x)``, the whole batch in one call, as ember's loader does;
- per sample: ``torch.cat([t(x[i:i+1]) for i in range(B)])``, the same module and the
  same work (convert, affine, normalise) one image at a time, the way a per-sample
  dataset transform would run it.

Each round times both, in alternating order so that neither always runs first, after one
untimed warm-up call of each. A timing is the wall clock over ``--reps`` calls (CUDA is
synchronised before each clock reading). The figure is the median over rounds of the
per-round ratio batched images/s / per-sample images/s; both medians are printed beside it.

Run from the repository root::

    PYTHONPATH=src python benchmarks/augment.py
    PYTHONPATH=src python benchmarks/augment.py --device cuda --batch 1024 --size 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ember.data.augment import AugmentConfig, build_image_transform


def timed(fn: Callable[[], torch.Tensor], reps: int, device: torch.device) -> float:
    """Seconds for ``reps`` calls of ``fn``, device work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5, help="calls per timing")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = AugmentConfig(rotation=10, scale=(0.9, 1.1), translate=0.1)
    t = build_image_transform([0.3], [0.3], cfg).to(device).train()
    x = torch.randint(0, 256, (args.batch, 1, args.size, args.size), dtype=torch.uint8, device=device)

    def batched() -> torch.Tensor:
        return t(x)

    def per_sample() -> torch.Tensor:
        return torch.cat([t(x[i : i + 1]) for i in range(len(x))])

    sides = {"batched": batched, "per-sample": per_sample}
    for fn in sides.values():  # warm-up: kornia builds its modules and samplers, kernels load
        fn()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
            rates[name].append(args.batch * args.reps / timed(sides[name], args.reps, device))

    ratio = statistics.median(b / s for b, s in zip(rates["batched"], rates["per-sample"]))
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(
        f"augment ({device}, {args.batch} x 1x{args.size}x{args.size}, rotation 10, scale 0.9-1.1, translate 0.1): "
        f"batched {med['batched']:,.0f} images/s, per-sample {med['per-sample']:,.0f} images/s, "
        f"speed-up {ratio:.1f}x (median of {args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
