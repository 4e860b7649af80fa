"""Seconds from a fresh Python process to the first training step: ``import ember; ember.train``
vs a plain PyTorch script, side by side.

ember: ``import ember`` and ``ember.train`` on the digits CNN recipe (1 step, no validation
before it); the clock stops when the loop asks for its first batch (``BatchLoader.next_batch``),
so it counts imports, the run directory, the data (already cached), the memory check, the
model and the optimiser. plain: ``import torch``, a CNN of the same size built from
``torch.nn``, a random batch, the clock stopping at the first forward. Both are timed from
the parent's ``Popen`` (wall clock), in fresh processes, in alternating rounds; each figure is
the median. Prints one figure: ember's seconds to the first step over plain PyTorch's.

``--src DIR`` runs another checkout's ember (e.g. an older commit) for a before/after.

    python benchmarks/startup.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EMBER = """
import time, sys
import ember.data.loader as loader
real = loader.BatchLoader.next_batch
def first(self, *a, **k):
    print("FIRST", time.time(), flush=True)
    sys.exit(0)
loader.BatchLoader.next_batch = first
import ember
recipe = ember.load_recipe("recipes/cnn-digits.yaml", ["train.max_steps=1", "schedule.warmup_steps=0",
                           "train.progress=false", "train.eval_every=0"])
ember.train(recipe, run_dir=sys.argv[1])
"""

PLAIN = """
import time, torch
from torch import nn
model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
print("FIRST", time.time(), flush=True)
"""


def seconds_to_first_step(code: str, env: dict, arg: str) -> float:
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("FIRST ")]
    if not lines:
        raise RuntimeError(f"no first step:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(lines[0].split()[1]) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"))
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": args.src}
    ember_s, plain_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        seconds_to_first_step(EMBER, env, f"{tmp}/warm")  # prepares the digits cache once, untimed
        for r in range(args.rounds):
            ember_s.append(seconds_to_first_step(EMBER, env, f"{tmp}/run{r}"))
            plain_s.append(seconds_to_first_step(PLAIN, env, ""))
    e, p = statistics.median(ember_s), statistics.median(plain_s)
    print(
        f"ember {e:.2f} s to the first step (rounds {', '.join(f'{s:.2f}' for s in ember_s)}); "
        f"plain PyTorch {p:.2f} s ({', '.join(f'{s:.2f}' for s in plain_s)})"
    )
    print(f"ember / plain seconds to the first step: {e / p:.2f}")


if __name__ == "__main__":
    main()
