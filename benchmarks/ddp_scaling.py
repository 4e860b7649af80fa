"""DDP over 2 CPU processes vs 1 process on the same global batch: time per optimiser step (and with
``--sweep``: the share of a step spent in the gradient all-reduce, and DDP's bucket settings).

The demo's GPT (``recipes/gpt-tiny.yaml``: 4 layers, 128 wide, 128-token context) is
trained twice per round through the command line, each time in fresh processes:

- 1 process: ``ember train recipes/gpt-tiny.yaml --set train.batch_size=2B`` with
  ``OMP_NUM_THREADS=2``, so that one process has both cores (in general: the cores this
  benchmark may use, shared out among the processes);
- 2 processes: ``ember train recipes/gpt-tiny.yaml --nproc 2 --set train.batch_size=B``
  (torch.distributed.run, DDP over gloo; ``--strategy fsdp`` for FSDP2) with
  ``OMP_NUM_THREADS=1``, one core each (what torchrun itself sets when several processes
  share a machine; set here explicitly).

Both therefore step on the same global batch of 2B sequences — the loader gives W ranks
with batch B exactly the samples one rank with batch 2B gets, so the logged losses agree
to a rounding and are compared as a check that both do the same work. The order
alternates every round (1 then 2, 2 then 1, ...) because the machine is shared.

Time per step comes from the run's ``metrics.jsonl``, not from the wall clock: the run
logs every step (``train.log_every=1``), and each record's ``tokens_per_s`` covers the
time since the previous record (global tokens, so s/step = 2B x seq_len / tokens_per_s).
The first ``--warmup`` steps are left out and the median of the others is the run's time
per step; a median of single steps shrugs off the bursts of other jobs on a shared
machine. Logging every step costs a ``.item()`` and, under DDP, three scalar
all-reduces per step: well under 1 ms against steps of hundreds of ms. Validation and
checkpoints are out of the timed steps (``train.eval_every=0``,
``train.checkpoint_every=0``: only the final ones, after the last step;
``eval.max_batches=1``), as is the CPU peak-FLOP measurement (``train.peak_flops=1``).
Start-up is reported separately: from launching the command to the log record of step 1
(process and torchrun start, imports, process group, data, model, the first step); the
tail is the last record to the command's exit (final validation, checkpoint, export).

Each run also reports how much CPU other processes used meanwhile (``/proc/stat`` busy
time less this benchmark's children, in cores), because the two sides do not suffer
alike from other jobs: one process with 2 OpenMP threads slows down far more than its
share when another job takes a core (every parallel region waits for its descheduled
thread: 7 to 25 times slower here), two single-threaded processes only by their share.
A round whose runs saw other jobs use under ``--quiet`` cores (0.25) is quiet; rounds
are run until ``--rounds`` of them are quiet, at most 3 x ``--rounds`` rounds, and no
round starts that would end past ``--max-minutes`` (6). The figure: the median over the
quiet rounds of the 2-process time per step divided by the median of the 1-process one
(< 1 means DDP is faster), with the per-round ratios beside it; with no quiet round at
all, the median over all rounds, flagged as such.

Runs are written into a temporary directory, deleted after. The stdlib corpus is
prepared into the data cache (``$EMBER_CACHE``) first, outside any timed run. Before
each run the benchmark waits up to ``--settle`` seconds for the machine to go quiet
(other processes under 0.2 cores for a second), and goes ahead regardless after that.

``--sweep`` measures instead what the all-reduce costs and whether DDP's bucket settings
change it, in-process, on the same model and global batch (random tokens; an AdamW step:
forward, loss, backward, optimiser step, zero_grad). Each round runs two jobs, their order
alternating: 1 process with the cores' threads timing plain steps on the global batch 2B,
and 2 ranks (torch.distributed.run, gloo, one thread each) on B each. The 2-rank job holds
one copy of the model per setting, each with its own ``DistributedDataParallel`` wrapper
and optimiser — ``bucket_cap_mb`` 1, 25 (torch's default) and 100, each with
``gradient_as_bucket_view`` off and on, and the default with DDP's ``no_sync`` (the same
step without the gradient all-reduce) — and the settings take turns step by step, the
order rotated every cycle, the ranks lined up by a barrier before each step (outside the
clock). So every setting is timed in the same seconds as every other, and:

- the all-reduce share of a setting is 1 - (no_sync step / its step), cycle by cycle: the
  part of the step the gradient all-reduce adds (what overlap with backward leaves visible);
- a setting against the default is its step over the default's, cycle by cycle;
- 2 processes against 1 is the ratio of the jobs' medians, round by round.

Each figure is the median with its quartiles over the cycles (or its range over the rounds).
The job's other-jobs load is recorded as above, and ``uptime`` at the start.

Run from the repository root::

    PYTHONPATH=src python benchmarks/ddp_scaling.py --rounds 3 --steps 30
    PYTHONPATH=src python benchmarks/ddp_scaling.py --sweep --rounds 3 --sweep-steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gpt-tiny.yaml"


@dataclass
class Run:
    procs: int
    s_per_step: float  # median over the timed steps
    startup_s: float
    tail_s: float
    wall_s: float
    losses: dict  # step -> logged loss
    others_cores: float  # CPU used by other processes on the machine during the run, in cores
    waited_s: float = 0.0  # waited before the launch for other jobs to quieten
    exit_note: str = ""  # a non-zero exit after the last step, if any


def prepare_data() -> int:
    """Prepare (or find) the recipe's corpus in the cache; returns its sequence length."""
    from ember.config import load_recipe
    from ember.data.build import build_data

    recipe = load_recipe(RECIPE)
    build_data(recipe.data, 1, 1, seed=0)
    return recipe.data.seq_len


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children and their children (torchrun's workers included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_idle(max_s: float, threshold: float = 0.2) -> float:
    """Wait (at most ``max_s``) until other processes use under ``threshold`` cores for a second; seconds waited."""
    start = time.perf_counter()
    while (waited := time.perf_counter() - start) < max_s:
        busy = busy_cpu_s()
        time.sleep(1.0)
        if busy_cpu_s() - busy < threshold:
            break
    return waited


def threads_for(procs: int) -> int:
    """Intra-op threads per process: the machine's cores shared out (2 cores: 2 for 1 process, 1 each for 2)."""
    return max(1, len(os.sched_getaffinity(0)) // procs)


def run(
    procs: int,
    batch: int,
    steps: int,
    warmup: int,
    seq_len: int,
    tmp: Path,
    tag: str,
    settle: float,
    strategy: str = "ddp",
) -> Run:
    run_dir = tmp / tag
    waited = wait_for_idle(settle)
    cmd = [sys.executable, "-m", "ember", "train", str(RECIPE), "--run-dir", str(run_dir)]
    if procs > 1:
        cmd += ["--nproc", str(procs), "--set", f"parallel.strategy={strategy}"]
    for s in (
        f"train.batch_size={batch}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.progress=false",
        "train.peak_flops=1",
        "eval.max_batches=1",
        f"schedule.warmup_steps={min(5, steps - 1)}",
        "schedule.warmup_fraction=0",  # the recipe gives its warmup as a share; this one is in steps
    ):
        cmd += ["--set", s]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads_for(procs)),
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p),
    )
    busy, ours, launched = busy_cpu_s(), children_cpu_s(), time.time()
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
    ended = time.time()
    others = max(0.0, (busy_cpu_s() - busy) - (children_cpu_s() - ours)) / (ended - launched)
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    train_rows = [r for r in rows if "tokens_per_s" in r]
    if [r["step"] for r in train_rows] != list(range(1, steps + 1)):
        raise SystemExit(
            f"{' '.join(cmd)}\nexited with {proc.returncode} without logging every step:\n"
            f"{(proc.stdout + proc.stderr)[-4000:]}"
        )
    note = ""
    if proc.returncode != 0:  # every step was trained and logged: a failure at the end, reported but not fatal
        lines = [line for line in proc.stderr.splitlines() if "terminate" in line or "exitcode" in line]
        shown = " | ".join(lines[:3]) or (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        note = f"exit status {proc.returncode} after step {steps}: {shown}"
    tokens_per_step = batch * procs * seq_len  # global
    s_per_step = statistics.median(tokens_per_step / r["tokens_per_s"] for r in train_rows[warmup:])
    return Run(
        procs,
        s_per_step,
        train_rows[0]["time"] - launched,
        ended - train_rows[-1]["time"],
        ended - launched,
        {r["step"]: r["loss"] for r in train_rows},
        others,
        waited,
        note,
    )


def describe(r: Run) -> str:
    return (
        f"{r.procs} proc{'s' if r.procs > 1 else ' '}: {1000 * r.s_per_step:6.1f} ms/step, start-up {r.startup_s:4.1f} s,"
        f" tail {r.tail_s:4.1f} s, wall {r.wall_s:5.1f} s; other jobs {r.others_cores:.2f} cores"
        + (f" (after waiting {r.waited_s:.0f} s)" if r.waited_s >= 1.5 else "")
    )


# --------------------------------------------------------------------------- the sweep: all-reduce share, buckets

# (label, bucket_cap_mb, gradient_as_bucket_view, sync): torch's defaults first; "no_sync" is the same
# step with DDP's gradient all-reduce left out (DistributedDataParallel.no_sync), so the time it saves
# is what the all-reduce adds to a step.
SETTINGS = [
    ("bucket 25 MB (default)", 25.0, False, True),
    ("bucket 1 MB", 1.0, False, True),
    ("bucket 100 MB", 100.0, False, True),
    ("bucket 25 MB + grad view", 25.0, True, True),
    ("bucket 1 MB + grad view", 1.0, True, True),
    ("bucket 100 MB + grad view", 100.0, True, True),
    ("no all-reduce (no_sync)", 25.0, False, False),
]


def sweep_worker(args: argparse.Namespace) -> None:
    """One job of the sweep (started by ``sweep``): 1 process timing plain steps on the global batch, or
    each of 2 ranks timing DDP steps on half of it under every setting — one copy of the model, its DDP
    wrapper and its optimiser per setting, the settings taking turns step by step in an order rotated
    every cycle, the ranks lined up by a barrier before each step (outside the clock). Rank 0 prints one
    JSON line: setting label -> seconds of each timed step."""
    import copy

    import torch
    import torch.distributed as dist

    from ember.config import load_recipe
    from ember.data.spec import DataSpec
    from ember.models.registry import build_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    recipe = load_recipe(RECIPE)
    torch.manual_seed(0)
    spec = DataSpec("lm", vocab_size=recipe.data.vocab_size, seq_len=recipe.data.seq_len)
    model = build_model(recipe.model, spec)
    batch = 2 * args.batch // world
    x = torch.randint(spec.vocab_size, (batch, spec.seq_len))
    y = torch.randint(spec.vocab_size, (batch, spec.seq_len))
    if world == 1:
        steppers = {"1 process": Stepper(model, model, True)}
    else:
        steppers = {}
        for label, cap, view, sync in SETTINGS:
            copied = copy.deepcopy(model)
            ddp = torch.nn.parallel.DistributedDataParallel(copied, bucket_cap_mb=cap, gradient_as_bucket_view=view)
            steppers[label] = Stepper(ddp, copied, sync)
    labels = list(steppers)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for cycle in range(args.warmup_steps + args.sweep_steps):
        for k in range(len(labels)):
            label = labels[(cycle + k) % len(labels)]
            if world > 1:
                dist.barrier()
            seconds = steppers[label].step(x, y)
            if cycle >= args.warmup_steps:
                times[label].append(seconds)
    if int(os.environ.get("RANK", "0")) == 0:
        print("SWEEP " + json.dumps(times), flush=True)
    if world > 1:
        dist.destroy_process_group()


class Stepper:
    """An AdamW training step (forward, backward, step, zero_grad) of one model through ``forward``
    (its DDP wrapper), with the gradient all-reduce (``sync``) or without (DDP's ``no_sync``)."""

    def __init__(self, forward, model, sync: bool) -> None:
        import torch

        self.forward, self.sync = forward, sync
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(self, x, y) -> float:
        import contextlib

        import torch.nn.functional as F

        start = time.perf_counter()
        with contextlib.nullcontext() if self.sync else self.forward.no_sync():
            logits = self.forward(x)
            F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def sweep_job(procs: int, args: argparse.Namespace, r: int) -> tuple[dict, float]:
    """Run one sweep job (1 process with the cores' threads, or 2 ranks under torch.distributed.run);
    its figures and the cores other processes used meanwhile."""
    script = [str(Path(__file__).resolve()), "--worker", "--round", str(r), "--batch", str(args.batch)]
    script += ["--sweep-steps", str(args.sweep_steps), "--warmup-steps", str(args.warmup_steps)]
    cmd = [sys.executable, *script]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), *script]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads_for(procs)),
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p),
    )
    busy, ours, launched = busy_cpu_s(), children_cpu_s(), time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    others = max(0.0, (busy_cpu_s() - busy) - (children_cpu_s() - ours)) / (time.time() - launched)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SWEEP ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(lines[-1][len("SWEEP ") :]), others


def sweep(args: argparse.Namespace) -> None:
    """Rounds of one 1-process job and one 2-process job (order alternating); per setting, the median
    over rounds of its time per step, tokens/s, the ratio to 1 process and the all-reduce share."""
    seq_len = prepare_data()
    tokens = 2 * args.batch * seq_len
    print(
        f"sweep: gpt-tiny, global batch {2 * args.batch} x {seq_len}, {args.sweep_steps} timed steps per setting"
        f" after {args.warmup_steps}; load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}",
        flush=True,
    )
    per_round: list[dict] = []
    for r in range(args.rounds):
        figures = {}
        for procs in (1, 2) if r % 2 == 0 else (2, 1):
            wait_for_idle(args.settle)
            result, others = sweep_job(procs, args, r)
            figures.update(result)
            figures[f"others {procs}"] = others
        per_round.append(figures)
        shown = ", ".join(
            f"{k} {1000 * statistics.median(v):.0f} ms" for k, v in figures.items() if not k.startswith("others")
        )
        print(
            f"round {r + 1}: {shown}; other jobs {figures['others 1']:.2f} / {figures['others 2']:.2f} cores",
            flush=True,
        )
    report_sweep(per_round, tokens)


def report_sweep(per_round: list[dict], tokens: int) -> None:
    """Per setting: median ms/step and tokens/s over every timed step of every round; against the default
    and against no_sync, step by step within a cycle; against 1 process, round by round."""
    med = statistics.median
    one = [med(f["1 process"]) for f in per_round]
    default, no_sync = SETTINGS[0][0], "no all-reduce (no_sync)"
    print(f"1 process ({threads_for(1)} threads): {1000 * med(one):.0f} ms/step, {tokens / med(one):,.0f} tokens/s")
    for label, *_ in SETTINGS:
        mine = [t for f in per_round for t in f[label]]
        vs_one = [med(f[label]) / o for f, o in zip(per_round, one)]
        vs_default = [t / d for f in per_round for t, d in zip(f[label], f[default])]
        share = [1 - n / t for f in per_round for t, n in zip(f[label], f[no_sync])]
        print(
            f"2 processes, {label:<26} {1000 * med(mine):5.0f} ms/step, {tokens / med(mine):7,.0f} tokens/s,"
            f" time vs 1 process {med(vs_one):.2f}x [{min(vs_one):.2f}-{max(vs_one):.2f}],"
            f" vs default {med(vs_default):.2f}x {_quartiles(vs_default)}"
            + ("" if label == no_sync else f", all-reduce share {med(share):.0%} {_quartiles(share, '.0%')}"),
            flush=True,
        )


def _quartiles(values: list[float], spec: str = ".2f") -> str:
    """``[q1-q3]``: the middle half of the step-by-step figures."""
    if len(values) < 2:
        return ""
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"[{q1:{spec}}-{q3:{spec}}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="quiet rounds wanted")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="the 2-process layout")
    parser.add_argument("--max-minutes", type=float, default=6, help="start no round that would end past this")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="a round is quiet when other jobs used under this many cores during both its runs",
    )
    parser.add_argument("--batch", type=int, default=32, help="per-process batch B of the 2-process run (global 2B)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument(
        "--settle",
        type=float,
        default=20,
        help="before each run, wait up to this many seconds for other jobs to use under 0.2 cores",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead: the all-reduce share and DDP's bucket settings, timed in-process (see the docstring)",
    )
    parser.add_argument("--sweep-steps", type=int, default=8, help="sweep: timed steps per setting and job")
    parser.add_argument("--warmup-steps", type=int, default=2, help="sweep: untimed steps first, per setting")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return sweep_worker(args)
    if args.sweep:
        return sweep(args)
    if args.steps <= args.warmup:
        raise SystemExit("--steps must be more than --warmup")
    began = time.perf_counter()
    seq_len = prepare_data()
    print(
        f"gpt-tiny, global batch {2 * args.batch} x {seq_len} tokens, {args.steps} steps (first {args.warmup} untimed);"
        f" {len(os.sched_getaffinity(0))} CPUs;"
        f" OMP_NUM_THREADS {threads_for(1)} for 1 proc, {threads_for(2)} for each of 2",
        flush=True,
    )
    rounds: list[tuple[Run, Run]] = []
    quiet: list[tuple[Run, Run]] = []
    longest = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        while len(quiet) < args.rounds and len(rounds) < 3 * args.rounds:
            if rounds and time.perf_counter() - began + longest > 60 * args.max_minutes:
                break
            round_start, r = time.perf_counter(), len(rounds)
            order = (1, 2) if r % 2 == 0 else (2, 1)
            results = {
                p: run(
                    p,
                    args.batch * 2 // p,
                    args.steps,
                    args.warmup,
                    seq_len,
                    Path(tmp),
                    f"r{r}-p{p}",
                    args.settle,
                    args.strategy,
                )
                for p in order
            }
            longest = max(longest, time.perf_counter() - round_start)
            one, two = results[1], results[2]
            rounds.append((one, two))
            is_quiet = max(one.others_cores, two.others_cores) < args.quiet
            if is_quiet:
                quiet.append((one, two))
            diff = max(abs(one.losses[s] - two.losses[s]) for s in one.losses)
            print(
                f"round {r + 1} ({order[0]} first, {'quiet' if is_quiet else 'NOT quiet: other jobs ran'}):"
                f" 2/1 = {two.s_per_step / one.s_per_step:.3f}, max loss difference {diff:.1e}",
                flush=True,
            )
            for res in (one, two):
                print(f"  {describe(res)}", flush=True)
                if res.exit_note:
                    print(f"  warning: {res.procs} proc(s) {res.exit_note}", flush=True)
    used = quiet or rounds
    if not quiet:
        print(
            f"warning: no quiet round (other jobs under {args.quiet} cores during both runs): the figure below is"
            f" from busy rounds and measures the other jobs as much as DDP"
        )
    med1 = statistics.median(one.s_per_step for one, _ in used)
    med2 = statistics.median(two.s_per_step for _, two in used)
    print(
        f"median of {len(used)} {'quiet' if quiet else 'busy'} round(s) of {len(rounds)}:"
        f" 1 proc {1000 * med1:.1f} ms/step, start-up {statistics.median(one.startup_s for one, _ in used):.1f} s;"
        f" 2 procs {1000 * med2:.1f} ms/step, start-up {statistics.median(two.startup_s for _, two in used):.1f} s;"
        f" per-round 2/1 {', '.join(f'{two.s_per_step / one.s_per_step:.3f}' for one, two in used)}"
    )
    print(f"{args.strategy} 2 procs / 1 proc time per step: {med2 / med1:.2f}x (speed-up {med1 / med2:.2f}x)")


if __name__ == "__main__":
    main()
