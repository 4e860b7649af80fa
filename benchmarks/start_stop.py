"""Whole-process wall time of a short demo run against a plain PyTorch script doing the same.

ember: ``import ember; ember.train(load_recipe("recipes/gpt-tiny.yaml", ...))`` with
``train.max_steps=N`` (warm-up 0 for one step), ``train.progress=false`` and
``eval.max_batches=1``: N steps, one validation batch, the final checkpoint (model,
optimiser, trainer state, sealed) and the export (``model.safetensors`` + ``model.json``),
everything a run does by default. plain: one file of PyTorch in nanoGPT's style — the same
GPT (4 layers, 128 wide, 4 heads, no biases, tied head: 1,066,112 parameters; GPT-2's
initialisation, without which the first loss is ~67 and its backward crawls through denormal
floats, ~2 s on one core instead of 0.3), AdamW over
decayed / not-decayed groups with warm-up + cosine, gradient clipping, batches of 32 x 128
tokens cut at random from the same prepared shard (a ``numpy.memmap``), ``loss.item()``
every 20 steps, one validation batch, then ``safetensors.torch.save_file`` of the weights.
The demo data is prepared (cached) by an untimed ember run first, which also byte-compiles ember's
modules (the children run without ``PYTHONDONTWRITEBYTECODE``, as an installed package would).

Each figure is the wall clock from the parent's ``Popen`` to the child's exit, in fresh
processes, alternating ember and plain (the order flipping each round); the median of the
rounds. "First step": from ``Popen`` to the moment the first batch is asked for (ember:
``BatchLoader.next_batch``; plain: the top of its loop). ``--breakdown`` adds where ember's
one-step run spends its time (one more fresh process, its phases timed by wrappers).

    PYTHONPATH=src python benchmarks/start_stop.py --steps 1 200 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EMBER = """
import sys, time
import ember.data.loader as loader
real = loader.BatchLoader.next_batch
def first(self, *a, **k):
    if not getattr(loader, "_seen", False):
        loader._seen = True
        print("FIRST", time.time(), flush=True)
    return real(self, *a, **k)
loader.BatchLoader.next_batch = first
import ember
steps = int(sys.argv[2])
recipe = ember.load_recipe(sys.argv[3], [f"train.max_steps={steps}", "train.progress=false", "eval.max_batches=1"]
                           + (["schedule.warmup_steps=0"] if steps <= 30 else []))
ember.train(recipe, run_dir=sys.argv[1])
"""

PLAIN = """
import math, sys, time
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

out, steps, train_bin, val_bin = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.manual_seed(0)
V, T, C, H, L, B = 2048, 128, 128, 4, 4, 32

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(C, bias=False), nn.LayerNorm(C, bias=False)
        self.q, self.k, self.v, self.proj = (nn.Linear(C, C, bias=False) for _ in range(4))
        self.fc, self.fc_proj = nn.Linear(C, 4 * C, bias=False), nn.Linear(4 * C, C, bias=False)
    def forward(self, x):
        b, t, _ = x.shape
        h = self.ln_1(x)
        q, k, v = (m(h).view(b, t, H, C // H).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, C)
        x = x + self.proj(y)
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))

class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, C), nn.Embedding(T, C)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.ln_f, self.head = nn.LayerNorm(C, bias=False), nn.Linear(C, V, bias=False)
        self.head.weight = self.tok.weight
    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

model = GPT()
for m in model.modules():  # GPT-2's initialisation, as nanoGPT's and ember's GPT
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
for block in model.blocks:  # residual projections shrunk by the number of residual branches
    for proj in (block.proj, block.fc_proj):
        nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * L))
decay = [p for p in model.parameters() if p.dim() >= 2]
other = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                        lr=3e-3, betas=(0.9, 0.95))
warmup = 0 if steps <= 30 else 30
def factor(s):
    if s < warmup:
        return (s + 1) / warmup
    done = (s - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))
sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
train_tokens = np.memmap(train_bin, dtype=np.uint16, mode="r")
val_tokens = np.memmap(val_bin, dtype=np.uint16, mode="r")
rng = np.random.default_rng(0)
def batch(tokens):
    starts = rng.integers(0, len(tokens) - T - 1, B)
    x = np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])
print("FIRST", time.time(), flush=True)
print("MARK set-up", time.process_time(), time.time(), flush=True)
for step in range(steps):
    x, y = batch(train_tokens)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    if (step + 1) % 20 == 0 or step + 1 == steps:
        print(step + 1, loss.item(), flush=True)
    if step == 0:
        print("MARK first-step", time.process_time(), time.time(), flush=True)
with torch.no_grad():
    x, y = batch(val_tokens)
    print("val", F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
print("MARK validation", time.process_time(), time.time(), flush=True)
state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}  # tied: stored once
save_file(state, out + "/model.safetensors")
print("MARK save", time.process_time(), time.time(), flush=True)
"""

PHASES = """
import sys, time
T0 = float(sys.argv[2])
marks = []
def wrap(owner, name, label):
    real = getattr(owner, name)
    def timed(*a, **k):
        start, cpu = time.time(), time.process_time()
        try:
            return real(*a, **k)
        finally:
            marks.append((label, start - T0, time.time() - start, time.process_time() - cpu))
    setattr(owner, name, timed)
import ember
import ember.training.loop as loop
import ember.training.components as components
import ember.training.layouts as layouts
import ember.training.flops as flops
import ember.training.validator as validator
import ember.training.checkpointer as checkpointer
import ember.data.build as build
marks.append(("imports (python, torch, ember)", 0.0, time.time() - T0, time.process_time()))
wrap(loop, "setup", "process group / device")
wrap(components, "build_data", "data (prepared set checked, loaders)")
wrap(components, "starting_model", "model built")
wrap(components, "build_optimizer", "optimiser (torch imports dynamo here)")
wrap(loop, "build_run", "build_run in all")
wrap(loop, "peak_flops", "CPU peak FLOP/s (MFU)")
wrap(loop, "RunLog", "run log (tensorboard writer)")
wrap(layouts.Layout, "forward_backward", "forward + backward")
wrap(validator.Validator, "metrics", "final validation (1 batch)")
wrap(checkpointer.Checkpointer, "maybe_save", "final checkpoint")
wrap(loop, "_export", "export (model.safetensors)")
wrap(loop, "teardown", "teardown")
recipe = ember.load_recipe(sys.argv[3], ["train.max_steps=1", "train.progress=false", "eval.max_batches=1",
                                         "schedule.warmup_steps=0"])
start, cpu = time.time(), time.process_time()
ember.train(recipe, run_dir=sys.argv[1])
marks.append(("ember.train in all", start - T0, time.time() - start, time.process_time() - cpu))
for label, at, took, cpu in marks:
    print(f"PHASE {label}|{at:.3f}|{took:.3f}|{cpu:.3f}", flush=True)
print("CPU", time.process_time(), flush=True)
"""


def timed(code: str, args: list[str], env: dict) -> tuple[float, float | None, str, float]:
    """(seconds to exit, seconds to the first step or None, stdout, CPU seconds) of ``code`` in a fresh process."""
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=1800)
    total = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    first = [float(line.split()[1]) - start for line in proc.stdout.splitlines() if line.startswith("FIRST ")]
    used = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    return total, (first[0] if first else None), proc.stdout, used


def shards(recipe: str) -> tuple[str, str]:
    """The prepared demo set's train and val token files (prepared by the warm-up run)."""
    from ember.config import load_recipe
    from ember.data.build import prepared_dir

    path = prepared_dir(load_recipe(recipe).data)
    return str(next(path.glob("train_*.tokens.bin"))), str(next(path.glob("val_*.tokens.bin")))


def breakdown(env: dict, tmp: str, recipe: str) -> None:
    start = time.time()
    _, _, out, used = timed(PHASES, [f"{tmp}/phases", repr(start), recipe], env)
    total = time.time() - start
    print(f"where ember's 1-step run spends its {total:.2f} s, {used:.2f} CPU s (one fresh process; phases nest):")
    ends, cpu_end = 0.0, 0.0
    for line in out.splitlines():
        if line.startswith("PHASE "):
            label, at, took, cpu = line[6:].split("|")
            ends = max(ends, float(at) + float(took))
            print(f"  {label:40s} {float(took):6.2f} s wall {float(cpu):6.2f} s CPU  (from {float(at):6.2f} s)")
        if line.startswith("CPU "):
            cpu_end = float(line.split()[1])
    print(f"  {'interpreter exit after ember.train':40s} {total - ends:6.2f} s wall {used - cpu_end:6.2f} s CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 200])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "gpt-tiny.yaml"))
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--src", default=str(ROOT / "src"), help="another checkout's src/, for a before/after")
    args = parser.parse_args()
    # Both sides read byte-compiled modules, as any installed package does (pip compiles on install, an
    # editable checkout on first import): without this a PYTHONDONTWRITEBYTECODE=1 environment compiles
    # every ember module from source in every process (~0.1 s) while torch and numpy ship compiled.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"PYTHONPATH": args.src}
    with tempfile.TemporaryDirectory() as tmp:
        timed(EMBER, [f"{tmp}/warm", "1", args.recipe], env)  # prepares (caches) the demo set, untimed
        train_bin, val_bin = shards(args.recipe)
        results = {
            n: {k: [] for k in ("ember", "plain", "ember_first", "plain_first", "ember_cpu", "plain_cpu")}
            for n in args.steps
        }
        plain_marks: list[tuple[str, float, float]] = []
        for r in range(args.rounds):
            for n in args.steps:
                sides = [("ember", EMBER), ("plain", PLAIN)][:: 1 if r % 2 == 0 else -1]
                for side, code in sides:
                    out = Path(tmp) / f"{side}-{n}-{r}"
                    out.mkdir()
                    extra = [args.recipe] if side == "ember" else [train_bin, val_bin]
                    started = time.time()
                    total, first, stdout, cpu = timed(code, [str(out), str(n), *extra], env)
                    results[n][side].append(total)
                    results[n][f"{side}_first"].append(first)
                    results[n][f"{side}_cpu"].append(cpu)
                    print(
                        f"round {r} {side} {n} step(s): {total:.2f} s, first step {first:.2f} s, {cpu:.2f} CPU s",
                        flush=True,
                    )
                    if side == "plain" and n == 1:
                        marks = [line.split()[1:] for line in stdout.splitlines() if line.startswith("MARK ")]
                        plain_marks = [(name, float(c), float(t) - started) for name, c, t in marks]
                        plain_marks.append(("exit", cpu, total))
        load = os.getloadavg()
        for n, res in results.items():
            e, p = statistics.median(res["ember"]), statistics.median(res["plain"])
            ef, pf = statistics.median(res["ember_first"]), statistics.median(res["plain_first"])
            rounds = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
            print(f"{n} step(s): ember {e:.2f} s ({rounds(res['ember'])}); plain {p:.2f} s ({rounds(res['plain'])})")
            print(f"  first step: ember {ef:.2f} s, plain {pf:.2f} s: ratio {ef / pf:.2f}")
            ec, pc = statistics.median(res["ember_cpu"]), statistics.median(res["plain_cpu"])
            print(f"  CPU seconds (user + sys): ember {ec:.2f}, plain {pc:.2f}: ratio {ec / pc:.3f}")
            print(f"  ember / plain whole-process wall time, {n} step(s): {e / p:.3f}")
        if plain_marks:
            print("plain 1-step run, last round: each phase's end, wall s from Popen / CPU s of the process:")
            print("  " + "; ".join(f"{name} {t:.2f} / {c:.2f}" for name, c, t in plain_marks))
        print(f"load average after the rounds (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        if args.breakdown:
            breakdown(env, tmp, args.recipe)


if __name__ == "__main__":
    main()
