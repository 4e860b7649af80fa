"""DDP over 2 CPU processes vs 1 process on the same global batch: time per optimiser step.

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

Run from the repository root::

    PYTHONPATH=src python benchmarks/ddp_scaling.py --rounds 3 --steps 30
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
    args = parser.parse_args()
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
