"""The GPU suite: every check only a CUDA device can answer, on one GPU in under 8 minutes.

It writes one JSON file of figures. The checks, in the order they run (the timed ones first,
while nothing else runs):

- ``gpt2_mfu``: ``benchmarks/gpt2_mfu.py`` (GPT-2 small, bf16, compiled, fused AdamW, ember's
  step and a plain one interleaved); figure: ember's MFU against the GPU's dense bf16 peak;
  goal >= 0.50 (nanoGPT and torchtitan report 0.30-0.40).
- ``overhead``: ``benchmarks/overhead.py --device cuda --precision bf16`` (the demo GPT, ember's
  loop against a hand-written one, interleaved rounds); figure: ember/plain tokens/s; goal >= 0.97.
- ``plan_memory/<case>``: ``ember plan``'s predicted peak on one device against
  ``torch.cuda.max_memory_allocated`` over two steps of ember's own training step (GPT-2
  small's shape, micro-batch 8; fp32, bf16, fp32 with activation checkpointing);
  figure: predicted / measured - 1; goal: within +-0.15.
- ``recipe/<name>/<mode>``: every shipped recipe for 20 steps in fp32, bf16, fp16 (with
  the GradScaler), bf16 compiled, and fp32 with ``train.deterministic`` (torch's deterministic
  kernels, cuBLAS's fixed workspace); figure: the last logged training loss; goal: every
  step ran and every logged loss is finite (deterministic: and a second run logs the very
  same losses and validation metrics). Recipes on prepared data get it from the very
  ``ember data`` commands their header gives, run once into a temporary directory.

Each check runs in a child process under a time budget (a CUDA error ends that child, not
the suite); a failing, crashing or timed-out check is recorded with its error and the suite
goes on; checks not reached before the suite's budget are recorded as not run. The JSON
(``--out``): the device (``torch.cuda.get_device_name``), torch and CUDA versions, load
average, and one entry per check: name, figure, unit, goal, passed (true, false, or null
when skipped, with the reason), seconds, error, details. Each child's output is kept in
``<out>-logs/``. Exit status 0 when no check failed.

``--smoke`` runs the same code on the CPU in about a minute on a busy 2-core machine (tests/test_gpu_suite.py):
three recipes for 2 steps in fp32, and bf16 where this CPU has native bf16
(``ember.hardware``); gpt2_mfu's tiny model, eager; the plan against the CPU allocator
(``benchmarks/plan_memory.py``'s measurement, in process). fp16 (needs CUDA), compile (about a minute
per model on 2 cores), deterministic and the overhead check (it prepares the full corpus: about 2 minutes
on 2 cores) are recorded as skipped. Performance goals are not applied in a smoke run.

Run from the repository root::

    benchmarks/gpu_suite.sh                      # on a GPU machine: gpu_suite.json
    benchmarks/gpu_suite.sh --smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
MODES = {  # recipe overrides per mode; compile runs in bf16, as one would on a GPU
    "fp32": ["train.precision=fp32"],
    "bf16": ["train.precision=bf16"],
    "fp16": ["train.precision=fp16"],
    "compile": ["train.precision=bf16", "train.compile=true"],
    # cuBLAS's fixed workspace and torch's deterministic kernels: an op without one raises only on CUDA
    "deterministic": ["train.precision=fp32", "train.deterministic=true"],
}
MODE_BUDGET_S = {"fp32": 45, "bf16": 45, "fp16": 45, "compile": 150, "deterministic": 45}
PREPARE_BUDGET_S = 60  # a recipe's data (its first check's budget carries it)
SMOKE_RECIPES = ["cnn-digits", "gpt-tiny", "mlp-table"]  # images, a language model, prepared data
SMOKE_SKIPS = {
    "fp16": "fp16 needs CUDA",
    "compile": "compiling takes about a minute per model on 2 cores",
    "deterministic": "the deterministic-kernel checks that can fail are CUDA's (tests cover the CPU's)",
}
PLAN_CASES = [("fp32", False), ("bf16", False), ("fp32", True)]
PLAN_SHAPE = {"n_layer": 12, "n_embd": 768, "n_head": 12, "block": 1024, "vocab": 50304, "batch": 8}
PLAN_SMOKE_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 2, "block": 64, "vocab": 512, "batch": 4}


@dataclass
class Result:
    """One check's entry in the JSON."""

    name: str
    goal: str
    figure: float | None = None
    unit: str = ""
    passed: bool | None = None  # None: skipped (``skipped`` says why)
    seconds: float = 0.0
    error: str | None = None
    skipped: str | None = None
    details: dict = field(default_factory=dict)


class CheckTimeout(BaseException):
    """A check ran past its budget (a BaseException: no ``except Exception`` in ember swallows it)."""


# --------------------------------------------------------------------------- the parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_suite.json", help="the JSON of figures (default gpu_suite.json)")
    ap.add_argument("--smoke", action="store_true", help="a quick end-to-end run on the CPU")
    ap.add_argument("--budget", type=float, default=0, help="seconds for the whole suite (default 480; smoke 120)")
    ap.add_argument("--steps", type=int, default=0, help="steps per recipe check (default 20; smoke 2)")
    ap.add_argument("--recipes", default="", help="comma-separated recipe names (default: all; smoke: a few)")
    ap.add_argument("--modes", default="", help=f"comma-separated, of {','.join(MODES)} (default all)")
    ap.add_argument("--only", default="", help="comma-separated: gpt2_mfu,overhead,plan_memory,recipes")
    ap.add_argument(
        "--peak-flops", type=float, default=0, help="gpt2_mfu: the GPU's dense bf16 peak if ember's table lacks it"
    )
    ap.add_argument(
        "--workers", type=int, default=0, help="recipe children at once (default: half the cores, at most 8; smoke 1)"
    )
    ap.add_argument("--child", choices=["recipes", "plan"], help=argparse.SUPPRESS)
    ap.add_argument("--child-args", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.budget = args.budget or (120.0 if args.smoke else 480.0)
    args.steps = args.steps or (2 if args.smoke else 20)
    args.workers = args.workers or (1 if args.smoke else max(1, min(8, (os.cpu_count() or 2) // 2)))
    names = [p.stem for p in sorted(RECIPES.glob("*.yaml"))]
    args.recipes = args.recipes.split(",") if args.recipes else (SMOKE_RECIPES if args.smoke else names)
    args.modes = args.modes.split(",") if args.modes else list(MODES)
    args.only = args.only.split(",") if args.only else ["gpt2_mfu", "overhead", "plan_memory", "recipes"]
    unknown = [r for r in args.recipes if r not in names] + [m for m in args.modes if m not in MODES]
    unknown += [c for c in args.only if c not in ("gpt2_mfu", "overhead", "plan_memory", "recipes")]
    if unknown:
        ap.error(f"unknown recipe, mode or check: {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: PyTorch sees no CUDA device here. Run it on a GPU machine, or --smoke on the CPU.")
        return 2
    out = Path(args.out).resolve()
    logs = out.with_name(out.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget
    header = environment(args)
    results: list[Result] = []

    def save() -> None:
        write_report(out, {**header, "seconds": round(time.monotonic() - start, 1)}, results)

    if "gpt2_mfu" in args.only:
        results.append(mfu_check(args, deadline, logs))
        save()
    if "overhead" in args.only:
        results.append(overhead_check(args, deadline, logs))
        save()
    if "plan_memory" in args.only:
        names = [plan_case_name(p, c) for p, c in PLAN_CASES]
        results += run_child("plan", {}, names, 120 if not args.smoke else 60, args, deadline, logs / "plan.log")
        save()
    if "recipes" in args.only:
        with tempfile.TemporaryDirectory(prefix="ember-gpu-suite-") as tmp:
            for checks in recipe_checks(args, Path(tmp), deadline, logs):
                results += checks
                save()
    save()
    failed = [r.name for r in results if r.passed is False]
    print(f"{len(results)} checks, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; wrote {out}")
    return 1 if failed else 0


def environment(args: argparse.Namespace) -> dict:
    """What the figures were measured on."""
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    return {
        "suite": "ember GPU suite (benchmarks/gpu_suite.py)",
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke run: no GPU used)",
        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "budget_s": args.budget,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_report(path: Path, header: dict, results: list[Result]) -> None:
    """The JSON, rewritten whole after every phase (an interrupted suite leaves what it had)."""
    report = {**header, "checks": [finite(asdict(r)) for r in results]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def finite(value):
    """JSON has no NaN or infinity: such a number is written as its string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def run_logged(
    command: list[str], timeout: float, log: Path, cwd: Path = ROOT, env: dict | None = None
) -> tuple[int | None, str]:
    """Run ``command`` with its output in ``log``; (exit status or None on timeout, the output)."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    with open(log, "w") as f:
        f.write("$ " + shlex.join(command) + "\n")
        f.flush()
        proc = subprocess.Popen(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own children (compile workers) too
            proc.wait()
            code = None
    return code, log.read_text(errors="replace")


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def left(deadline: float) -> float:
    return deadline - time.monotonic()


# --------------------------------------------------------------------------- gpt2_mfu and overhead

MFU_LINE = re.compile(r"ember MFU ([0-9.eE+-]+)% on (.+?) \(plain PyTorch step ([0-9.eE+-]+)%; .*per step ([0-9.]+)\)")
OVERHEAD_LINE = re.compile(r"overhead(?: \((?P<shape>[^)]*)\))?: ember/plain tokens/s = (?P<ratio>[0-9.]+)")
OVERHEAD_HF = re.compile(r"ember/hf (?P<ratio>[0-9.]+)")


def parse_mfu(output: str) -> dict | None:
    """gpt2_mfu.py's last line as numbers; None when it is missing."""
    found = MFU_LINE.findall(output)
    if not found:
        return None
    ember, device, plain, ratio = found[-1]
    return {
        "ember_mfu": float(ember) / 100,
        "plain_mfu": float(plain) / 100,
        "device": device,
        "time_ratio": float(ratio),
    }


def parse_overhead(output: str) -> dict[str, dict]:
    """overhead.py's summary line(s), by shape ("default" when it names none): ember/plain, and ember/hf
    where the script also ran transformers' Trainer. Reads both the one-shape and the several-shape form."""
    shapes = {}
    for line in output.splitlines():
        m = OVERHEAD_LINE.search(line)
        if m:
            hf = OVERHEAD_HF.search(line[m.end() :])
            shapes[m["shape"] or "default"] = {
                "ember/plain": float(m["ratio"]),
                "ember/hf": float(hf["ratio"]) if hf else None,
            }
    return shapes


def timed(result: Result, started: float) -> Result:
    result.seconds = round(time.monotonic() - started, 1)
    return result


def mfu_check(args: argparse.Namespace, deadline: float, logs: Path) -> Result:
    started = time.monotonic()
    goal = ">= 0.50 (bf16, GPT-2 small, H100/H200)" + (" (not applied in a smoke run)" if args.smoke else "")
    result = Result("gpt2_mfu", goal, unit="fraction of the GPU's dense bf16 peak")
    command = [sys.executable, str(ROOT / "benchmarks" / "gpt2_mfu.py")]
    if args.smoke:  # compiling the two steps takes about 90 s on 2 cores
        from ember import hardware

        native = hardware.cpu_bf16_support().native
        command += ["--smoke", "--no-compile", "--precision", "bf16" if native else "fp32"]
    else:
        command += ["--rounds", "2"] + (["--peak-flops", str(args.peak_flops)] if args.peak_flops else [])
    code, output = run_logged(command, min(240, left(deadline)), logs / "gpt2_mfu.log")
    figures = parse_mfu(output)
    if code != 0 or figures is None:
        result.error = ("timed out" if code is None else f"exit status {code}") + ":\n" + tail(output)
        result.passed = False
        return timed(result, started)
    result.figure, result.details = figures["ember_mfu"], figures
    result.passed = figures["ember_mfu"] > 0 if args.smoke else figures["ember_mfu"] >= 0.50
    return timed(result, started)


def overhead_check(args: argparse.Namespace, deadline: float, logs: Path) -> Result:
    started = time.monotonic()
    result = Result("overhead", ">= 0.97 (CUDA, bf16)", unit="ember/plain tokens/s")
    if args.smoke:
        result.skipped = "smoke run: overhead.py prepares the full 11 MB corpus (about 2 minutes on 2 cores)"
        return timed(result, started)
    script = str(ROOT / "benchmarks" / "overhead.py")
    command = [sys.executable, script, "--device", "cuda", "--precision", "bf16", "--steps", "60", "--rounds", "3"]
    _, usage = run_logged([sys.executable, script, "--help"], 60, logs / "overhead-help.log")
    if "--sides" in usage:  # the version that can also run transformers' Trainer: the goal is against plain
        command += ["--sides", "plain,ember"]
    code, output = run_logged(command, min(180, left(deadline)), logs / "overhead.log")
    shapes = parse_overhead(output)
    if code != 0 or not shapes:
        result.error = ("timed out" if code is None else f"exit status {code}") + ":\n" + tail(output)
        result.passed = False
        return timed(result, started)
    first = next(iter(shapes.values()))
    result.figure, result.details = first["ember/plain"], {"shapes": shapes}
    result.passed = result.figure >= 0.97
    return timed(result, started)


# --------------------------------------------------------------------------- children and recipes


def run_child(
    kind: str, params: dict, names: list[str], budget: float, args: argparse.Namespace, deadline: float, log: Path
) -> list[Result]:
    """Run checks ``names`` in a child process (``--child kind``); a check the child did not
    finish (crash, CUDA error, timeout) is recorded as failed with the log's tail."""
    part = log.with_suffix(".json")
    part.unlink(missing_ok=True)
    if left(deadline) < 5:
        return [Result(n, goal_of(n), passed=False, error="not run: the suite's time budget was spent") for n in names]
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--out", str(part)]
    command += ["--steps", str(args.steps), "--child-args", json.dumps(params)] + (["--smoke"] if args.smoke else [])
    started = time.monotonic()
    # Children compiling at once share the cores: each gets its share of inductor's compile workers.
    threads = {"TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 1) // args.workers))}
    # Before cuBLAS starts: set later (by the deterministic mode, after other modes ran) it would not take.
    threads["CUBLAS_WORKSPACE_CONFIG"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    code, output = run_logged(command, min(budget, left(deadline)), log, env=threads)
    done = {r["name"]: Result(**r) for r in json.loads(part.read_text())} if part.exists() else {}
    why = "timed out" if code is None else f"the child process ended with exit status {code}"
    missing = Result(
        "", "", passed=False, seconds=round(time.monotonic() - started, 1), error=f"{why}:\n{tail(output)}"
    )
    return [done.get(n) or Result(**{**asdict(missing), "name": n, "goal": goal_of(n)}) for n in names]


def goal_of(name: str) -> str:
    return PLAN_GOAL if name.startswith("plan_memory/") else RECIPE_GOAL


def recipe_checks(args: argparse.Namespace, tmp: Path, deadline: float, logs: Path) -> Iterator[list[Result]]:
    """Each recipe's checks (its data prepared first) in a child process, ``--workers`` children at a
    time: one child per recipe on a GPU, one for all in a smoke run (starting a process costs
    seconds there). Yields each child's results as they come."""
    groups = [args.recipes] if args.smoke else [[r] for r in args.recipes]
    stdlib = [r for r in args.recipes if recipe_data(r)[0].get("name") == "stdlib"]
    if len(groups) > 1 and stdlib:  # parallel children must not all prepare the shared corpus at once
        yield [prepare_stdlib(stdlib, deadline, logs)]

    def one(group: list[str]) -> list[Result]:
        names = [f"recipe/{r}/{m}" for r in group for m in args.modes]
        budget = len(group) * (PREPARE_BUDGET_S + sum(MODE_BUDGET_S[m] for m in args.modes)) + 30
        params = {"recipes": group, "modes": args.modes, "data_dir": str(tmp)}
        return run_child("recipes", params, names, budget, args, deadline, logs / f"recipes-{'-'.join(group)}.log")

    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        yield from pool.map(one, groups)


def recipe_data(recipe: str) -> tuple[dict, dict, str]:
    """A shipped recipe's data and init sections, and its text."""
    import yaml

    text = (RECIPES / f"{recipe}.yaml").read_text()
    raw = yaml.safe_load(text) or {}
    return raw.get("data") or {}, raw.get("init") or {}, text


def prepare_stdlib(recipes: list[str], deadline: float, logs: Path) -> Result:
    """Build the standard-library corpus these recipes share into ember's cache, once, before the
    recipe checks run in parallel."""
    started = time.monotonic()
    code = (
        "import sys; from ember.config import load_recipe; from ember.data.build import build_data\n"
        "for r in sys.argv[2:]:\n"
        "    build_data(load_recipe(sys.argv[1] + '/' + r + '.yaml').data, 8, 8, seed=0)"
    )
    command = [sys.executable, "-c", code, str(RECIPES), *recipes]
    status, output = run_logged(command, min(PREPARE_BUDGET_S * 2, left(deadline)), logs / "prepare-stdlib.log")
    result = Result("prepare/stdlib-corpus", "prepared", passed=status == 0)
    if status != 0:
        result.error = ("timed out" if status is None else f"exit status {status}") + f":\n{tail(output)}"
    return timed(result, started)


# --------------------------------------------------------------------------- in a child process


def child_main(args: argparse.Namespace) -> int:
    """Run the checks of one child, writing the results so far after each (a crash keeps them)."""
    params = json.loads(args.child_args)
    checks: list[tuple[str, str, float, Callable[[], Result]]] = []
    if args.child == "plan":
        for precision, ckpt in PLAN_CASES:
            name = plan_case_name(precision, ckpt)
            checks.append((name, PLAN_GOAL, 90, lambda _, p=precision, c=ckpt, n=name: plan_check(n, p, c, args.smoke)))
    else:
        for recipe in params["recipes"]:
            checks += recipe_child_checks(recipe, params["modes"], Path(params["data_dir"]) / recipe, args)
    results: list[Result] = []
    prepared: dict[str, list[str] | Exception] = {}
    for name, goal, budget, run in checks:
        results.append(guarded(name, goal, budget, lambda run=run: run(prepared)))
        Path(args.out).write_text(json.dumps([finite(asdict(r)) for r in results]))
        print(f"[gpu_suite] {name}: passed={results[-1].passed} {results[-1].error or ''}", flush=True)
    return 0


def recipe_child_checks(recipe: str, modes: list[str], where: Path, args: argparse.Namespace) -> list[tuple]:
    """One check per mode; the first to run prepares the recipe's data (within its own budget)."""

    def run(mode: str, prepared: dict) -> Result:
        if recipe not in prepared:
            try:
                prepared[recipe] = prepare_data(recipe, where)
            except Exception as err:  # every mode of this recipe fails with it
                prepared[recipe] = err
        if isinstance(prepared[recipe], Exception):
            raise prepared[recipe]
        return recipe_check(f"recipe/{recipe}/{mode}", recipe, mode, prepared[recipe], args)

    return [
        (f"recipe/{recipe}/{m}", RECIPE_GOAL, PREPARE_BUDGET_S + MODE_BUDGET_S[m], lambda p, m=m: run(m, p))
        for m in modes
    ]


def prepare_data(recipe: str, where: Path) -> list[str]:
    """Run the ``ember data ...`` commands of a recipe's header in ``where`` (as tests/conftest.py's
    ``sample_data_overrides`` does for the test suite); the overrides pointing the recipe at the
    data, [] for recipes on built-in data."""
    from ember.cli import main as ember
    from ember.recipe_header import header_commands

    data, init, text = recipe_data(recipe)
    if data.get("name") != "prepared":
        return []
    commands = header_commands(text)
    if not commands:
        raise RuntimeError(f"{recipe} reads prepared data but its header gives no `ember data` commands")
    where.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(where)  # the header's paths are relative
    try:
        for argv in commands:
            if ember(argv) != 0:
                raise RuntimeError(f"preparing {recipe}'s data: `ember {shlex.join(argv)}` failed")
    finally:
        os.chdir(here)
    overrides = [f"data.path={where / data['path']}"]
    return overrides + ([f"init.from_hf={where / init['from_hf']}"] if init.get("from_hf") else [])


def guarded(name: str, goal: str, budget: float, run: Callable[[], Result]) -> Result:
    """``run()`` under a time budget (SIGALRM); an exception becomes the result's error."""
    import traceback

    def alarm(signum, frame):
        raise CheckTimeout(f"over its budget of {budget:.0f} s")

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        result = run()
    except CheckTimeout as err:
        result = Result(name, goal, passed=False, error=f"timed out: {err}")
    except Exception as err:  # noqa: BLE001 (any failure is this check's, recorded, and the suite goes on)
        result = Result(
            name, goal, passed=False, error=f"{type(err).__name__}: {err}\n{tail(traceback.format_exc(), 12)}"
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return timed(result, started)


RECIPE_GOAL = "every step runs; every logged loss finite"
PLAN_GOAL = "within +-0.15"


def recipe_check(name: str, recipe: str, mode: str, data_overrides: list[str], args: argparse.Namespace) -> Result:
    """A few steps of a shipped recipe in ``mode``, on CUDA (or the CPU in a smoke run); in the
    deterministic mode twice, and the two runs must log the very same losses."""
    from ember import hardware

    result = Result(name, RECIPE_GOAL, unit="last training loss")
    if args.smoke and mode in SMOKE_SKIPS:
        result.skipped = f"smoke run: {SMOKE_SKIPS[mode]}"
        return result
    if args.smoke and mode == "bf16" and not hardware.cpu_bf16_support().native:
        result.skipped = f"smoke run: {hardware.cpu_bf16_support().reason}"
        return result
    overrides = recipe_overrides(recipe, mode, data_overrides, args)
    steps, losses, validation = train_losses(recipe, overrides, compile=mode == "compile")
    result.figure = losses[-1] if losses else None
    result.details = {"steps": steps, "losses": losses, "validation": validation, "overrides": overrides}
    result.passed = steps == args.steps and bool(losses) and all(math.isfinite(x) for x in losses)
    if not result.passed:
        result.error = f"ran {steps} of {args.steps} steps; logged losses {losses}"
    elif mode == "deterministic":
        again = train_losses(recipe, overrides, compile=False)
        result.details["repeat_losses"] = again[1]
        result.passed = again[1:] == (losses, validation)
        if not result.passed:
            result.error = f"two deterministic runs differ: losses {losses} then {again[1]}"
    return result


def recipe_overrides(recipe: str, mode: str, data_overrides: list[str], args: argparse.Namespace) -> list[str]:
    overrides = [
        f"train.max_steps={args.steps}",
        f"train.log_every={max(1, args.steps // 4)}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.progress=false",
        "eval.max_batches=2",
        f"schedule.warmup_steps={min(2, args.steps - 1)}",
        "schedule.warmup_fraction=0",  # the recipe gives its warmup as a share; this one is in steps
        f"train.device={'cpu' if args.smoke else 'cuda'}",
        *(["train.peak_flops=1"] if args.smoke else []),  # no CPU peak measurement per run
        *MODES[mode],
        *data_overrides,
    ]
    if args.smoke and recipe_data(recipe)[0].get("name") == "stdlib":  # a smaller corpus and batch
        overrides += ["data.max_bytes=200000", "data.tokenizer=bytes", "train.batch_size=8"]
    return overrides


def train_losses(recipe: str, overrides: list[str], compile: bool) -> tuple[int, list[float], dict]:
    """Train the recipe in a temporary run directory: (steps run, logged training losses, last validation)."""
    import torch

    from ember.config import load_recipe
    from ember.training.loop import train

    fresh_device_state(torch, compile)
    with tempfile.TemporaryDirectory(prefix="ember-gpu-suite-run-") as tmp:
        run = train(load_recipe(RECIPES / f"{recipe}.yaml", overrides), Path(tmp) / "run")
        rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    return run.step, [r["loss"] for r in rows if "split" not in r and "loss" in r], run.metrics


def fresh_device_state(torch, compile: bool) -> None:
    """Free the previous check's memory and graphs, so one check's leftovers do not fail the next."""
    import gc

    gc.collect()
    if compile:
        torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- plan vs measured memory


def plan_case_name(precision: str, checkpointing: bool) -> str:
    return f"plan_memory/{precision}{'+ckpt' if checkpointing else ''}"


def plan_check(name: str, precision: str, checkpointing: bool, smoke: bool) -> Result:
    """``ember plan``'s single-device total against the measured peak of two training steps."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import plan_memory

    from ember.config import load_recipe
    from ember.plan import plan

    shape = argparse.Namespace(**(PLAN_SMOKE_SHAPE if smoke else PLAN_SHAPE))
    overrides = plan_memory.recipe_overrides(shape, precision, checkpointing)
    how = "the CPU allocator (torch.profiler)" if smoke else "torch.cuda.max_memory_allocated"
    result = Result(name, PLAN_GOAL, unit="predicted / measured - 1")
    predicted = plan(load_recipe(RECIPES / "gpt-tiny.yaml", overrides)).layouts[0].memory.total
    measured = cpu_peak(overrides) if smoke else cuda_peak(overrides)
    result.figure = predicted / measured - 1
    result.passed = abs(result.figure) <= 0.15
    result.details = {
        "predicted_bytes": predicted,
        "measured_bytes": measured,
        "measured_by": how,
        "shape": vars(shape),
    }
    return result


def cpu_peak(overrides: list[str]) -> int:
    """Peak bytes the CPU allocator handed out over two steps of ``reference_step`` (as
    benchmarks/plan_memory.py measures, there in a fresh process), here above what was allocated
    when they started: a first, unmeasured pass warms up code and caches. Equal to the
    fresh-process figure to the byte on the smoke shape, and 10 s faster on 2 busy cores."""
    import torch
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    from ember.config import load_recipe
    from ember.models.registry import build_model
    from ember.plan import data_spec, reference_step
    from ember.training.optim import build_optimizer

    recipe = load_recipe(RECIPES / "gpt-tiny.yaml", overrides)
    spec, g = data_spec(recipe), torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, spec.vocab_size, (recipe.train.batch_size, spec.seq_len + 1), generator=g) for _ in range(2)
    ]

    def two_steps() -> None:
        model = build_model(recipe.model, spec)
        model.grad_checkpointing = recipe.train.activation_checkpointing
        optimizer = build_optimizer(model, recipe.optim)
        for tokens in batches:
            reference_step(model, optimizer, tokens, recipe.train.precision, recipe.optim.grad_clip)

    two_steps()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        two_steps()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
    events.sort()
    before = events[0][1] - events[0][2]  # the running total just before the first event (a free's size is negative)
    return max(total for _, total, _ in events) - before


def cuda_peak(overrides: list[str]) -> int:
    """Peak bytes the CUDA caching allocator handed out over two steps of ember's own training step
    (``Layout.forward_backward``, fused AdamW, as the loop takes it), beyond what was allocated before
    the model was built. cuBLAS's workspace is created first, outside the figure: the plan does not
    count it (it is fixed per process, tens of MB, not per model)."""
    import torch

    from ember.config import load_recipe
    from ember.models.registry import build_model
    from ember.plan import data_spec
    from ember.plugins import prepare_model
    from ember.training.distributed import DistContext
    from ember.training.layouts import Layout, StepParts
    from ember.training.optim import build_optimizer
    from ember.training.plugin import Plugins
    from ember.training.precision import autocast_factory, build_scaler

    recipe = load_recipe(RECIPES / "gpt-tiny.yaml", [*overrides, "train.device=cuda"])
    spec, device = data_spec(recipe), torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True  # as ember's configure_determinism sets
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, spec.vocab_size, (recipe.train.batch_size, spec.seq_len + 1), generator=g).to(device)
        for _ in range(2)
    ]
    warm = torch.ones(64, 64, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        (warm.to(dtype) @ warm.to(dtype)).sum().item()  # cuBLAS's handle and workspace, before the baseline
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build_model(recipe.model, spec)
    model.grad_checkpointing = recipe.train.activation_checkpointing
    prepare_model(recipe.plugins, model)
    model = model.to(device)
    layout = Layout(DistContext(device=device), recipe)
    layout.wrap(model)
    optimizer = build_optimizer(model, recipe.optim, fused=True)
    scaler, autocast = build_scaler(recipe.train.precision, device), autocast_factory(recipe.train.precision, device)
    parts = StepParts(optimizer, scaler, autocast, "lm", 0.0, recipe.optim.grad_clip, Plugins([]))
    for tokens in batches:
        layout.forward_backward([{"x": tokens[:, :-1], "y": tokens[:, 1:]}], parts, model)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


if __name__ == "__main__":
    sys.exit(main())
