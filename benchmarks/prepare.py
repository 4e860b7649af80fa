"""Prepare throughput at corpus scale: ember data prepare (1 and 2 workers) vs a plain tokenizers script.

Three sides read the same JSONL corpus (``benchmarks/corpus.py``; ``--mb N`` takes its first
N MB of documents) and each runs in its own child process, in rotated order each round:

- ember, 1 worker and 2 workers: ``ember.data.prepare.prepare`` with the default settings and
  a 4096-token BPE — NFC, control/whitespace clean-up, e-mail/IP masking, filters, exact +
  MinHash dedup (128 permutations, 5-word shingles), BPE trained on the kept training text,
  tokenising, shards with sha256. The two outputs are compared byte for byte every round;
- plain: what a hand-written pipeline does with ``tokenizers`` alone: read the JSONL, train the
  same byte-level BPE 4096 (same pre-tokenizer, special token, ``min_frequency``) on every
  document, ``encode_batch`` them in batches of 1000, write one uint16 file. No cleaning, no
  dedup, no splits, no checksums.

Every side may use both cores (``tokenizers`` threads by default; ember's workers split them).
Figures: MB/s of document text (UTF-8 bytes, the same number on every side), median over rounds;
ember / plain ratios; CPU-seconds per MB (user + system of the child and its workers, from
``resource.getrusage(RUSAGE_CHILDREN)``); and ember's phase times (its own phase lines).

Run from the repository root::

    .venv/bin/python benchmarks/corpus.py --mb 256
    PYTHONPATH=src .venv/bin/python benchmarks/prepare.py --corpus /tmp/ember-corpus --rounds 1
    PYTHONPATH=src .venv/bin/python benchmarks/prepare.py --mb 50 --rounds 2   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 4096
SIDES = ("plain", "ember-1", "ember-2")
HUGE = "huge"  # the child that times the clean phase of one single-line document


def subset(corpus: Path, mb: float, out: Path) -> int:
    """The first ``mb`` MB of the corpus's documents (all when 0) as one JSONL in ``out``; their text bytes."""
    out.mkdir(parents=True, exist_ok=True)
    total, limit = 0, int(mb * 1e6) if mb else None
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as dst:
        for path in sorted(corpus.glob("corpus-*.jsonl")):
            for line in open(path, encoding="utf-8"):
                if limit is not None and total >= limit:
                    return total
                total += len(json.loads(line)["text"].encode("utf-8"))
                dst.write(line)
    return total


def plain(corpus: Path, out: Path) -> None:
    """The baseline: train a byte-level BPE on every document, encode, write uint16."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    docs = [json.loads(line)["text"] for line in open(corpus / "corpus.jsonl", encoding="utf-8")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    started = time.perf_counter()
    tok.train_from_iterator(docs, trainer)
    print(f"prepare: train 1 done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    started = time.perf_counter()
    eos = np.zeros(1, dtype=np.uint16)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tokens.bin", "wb") as f:
        for start in range(0, len(docs), 1000):
            for enc in tok.encode_batch(docs[start : start + 1000], add_special_tokens=False):
                f.write(np.asarray(enc.ids, dtype=np.uint16).tobytes())
                f.write(eos.tobytes())
    print(f"prepare: encode 1 done in {time.perf_counter() - started:.1f}s", file=sys.stderr)


def ember(corpus: Path, out: Path, workers: int) -> None:
    # Imported here: spawned workers re-import this script, and ember.config loads torch.
    from ember.config import DataConfig
    from ember.data.prepare import prepare

    prepare([str(corpus / "corpus.jsonl")], out, DataConfig(vocab_size=VOCAB), workers=workers, progress=True)


def write_line(path: Path, n_bytes: int, seed: int = 0) -> None:
    """``n_bytes`` of random words on one line (no newline), written 1 MB at a time so that this
    process stays small: a child's peak RSS counts its parent's at the fork."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}x" for i in range(5000)])
    with open(path, "w", encoding="ascii") as f:
        left = n_bytes
        while left > 0:
            chunk = " ".join(rng.choice(vocab, size=200_000).tolist()) + " "
            f.write(chunk[:left] if len(chunk) >= left else chunk)
            left -= min(len(chunk), left)


def clean_one_unit(path: Path) -> None:
    """Child: time the whole clean phase of one unit (read, clean, exact key, MinHash) on ``path``."""
    from ember.config import DataConfig
    from ember.data import sources
    from ember.data.prepare import _clean_unit

    cfg = DataConfig()
    unit = sources.plan_units([str(path)]).units[0]
    start, cpu = time.perf_counter(), time.process_time()
    _clean_unit(unit, "text", cfg.clean, cfg.dedup, str(path.with_suffix(".npz")))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu, "peak_mb": peak}))


def huge_lines(sizes_mb: list[float], root: Path) -> None:
    """The clean phase on single-line documents of each size, each in a fresh process: linear or not."""
    rates = []
    for mb in sizes_mb:
        path = root / f"line-{mb:g}.txt"
        write_line(path, int(mb * 1e6))
        cmd = [sys.executable, __file__, "--child", HUGE, "--out", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.splitlines()[-1])
        rates.append(mb / r["cpu"])
        print(
            f"one line of {mb:g} MB: clean phase {r['wall']:.2f}s wall, {r['cpu']:.2f} CPU-s "
            f"({mb / r['cpu']:.1f} MB/CPU-s), peak RSS {r['peak_mb']:.0f} MB",
            flush=True,
        )
        path.unlink()
    print(f"MB per CPU-s, largest / smallest: {rates[-1] / rates[0]:.2f} (1.00 = linear)")


def run_side(side: str, corpus: Path, out: Path, src: str = "") -> tuple[float, float, dict[str, float]]:
    """(wall seconds, CPU seconds, ember's phase seconds) of one side in a fresh child process."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", side, "--corpus", str(corpus), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": _pythonpath(src)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    phases = {m[1]: float(m[2]) for m in re.finditer(r"prepare: (.+?) \d+ done in ([0-9.]+)s", proc.stderr)}
    return wall, cpu, phases


def _pythonpath(src: str = "") -> str:
    src = src or str(Path(__file__).resolve().parents[1] / "src")
    return os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)


def _same_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.is_file() and p.name != ".lock")
    if names != sorted(p.name for p in b.iterdir() if p.is_file() and p.name != ".lock"):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="/tmp/ember-corpus", help="a directory written by benchmarks/corpus.py")
    parser.add_argument("--mb", type=float, default=0, help="use the first N MB of documents (0 = all)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--src", default="", help="ember's sources to time (e.g. an older checkout's src/)")
    parser.add_argument(
        "--huge-lines", default="", help="e.g. 5,50: time the clean phase on one line of each size (MB)"
    )
    parser.add_argument("--child", choices=(*SIDES, HUGE), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == HUGE:
        clean_one_unit(Path(args.out))
        return
    if args.huge_lines:
        with tempfile.TemporaryDirectory(prefix="ember-huge-line-") as tmp:
            print(f"load {os.getloadavg()[0]:.2f}")
            huge_lines([float(x) for x in args.huge_lines.split(",")], Path(tmp))
        return
    if args.child:
        corpus, out = Path(args.corpus), Path(args.out)
        plain(corpus, out) if args.child == "plain" else ember(corpus, out, int(args.child[-1]))
        return
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory(prefix="ember-prepare-bench-") as tmp:
        root = Path(tmp)
        nbytes = subset(Path(args.corpus), args.mb, root / "corpus")
        mb = nbytes / 1e6
        print(f"corpus: {mb:.1f} MB of text; load {os.getloadavg()[0]:.2f}", flush=True)
        walls: dict[str, list[float]] = {s: [] for s in sides}
        cpus: dict[str, list[float]] = {s: [] for s in sides}
        for r in range(args.rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            for side in order:
                wall, cpu, phases = run_side(side, root / "corpus", root / side, args.src)
                walls[side].append(wall)
                cpus[side].append(cpu)
                shown = " ".join(f"{k} {v:.1f}s" for k, v in phases.items())
                print(f"round {r + 1} {side:>8}: {wall:7.2f}s wall, {cpu:7.2f} CPU-s  {shown}", flush=True)
            if "ember-1" in sides and "ember-2" in sides:
                assert _same_output(root / "ember-1", root / "ember-2"), "1 and 2 workers wrote different bytes"
        print(f"load after: {os.getloadavg()[0]:.2f}")
        for side in sides:
            t, c = statistics.median(walls[side]), statistics.median(cpus[side])
            ratio = f", {statistics.median(walls['plain']) / t:.2f}x plain" if "plain" in sides else ""
            print(f"{side:>8}: {mb / t:6.2f} MB/s, {c / mb:.3f} CPU-s/MB{ratio}")


if __name__ == "__main__":
    main()
