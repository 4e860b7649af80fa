"""Near-duplicate search at scale: ember's sorted-band clustering vs datasketch's in-memory LSH.

N documents are stood in for by random MinHash signatures (uint32 x 128, as
``ember.data.dedup.signature`` makes them), 5 % of them planted near-copies of another
(12 of 128 values changed: estimated Jaccard ≈ 0.9). Both sides find the near-duplicates
in document order at threshold 0.8 with the same bands:

- ember: ``find_duplicates`` (band keys sorted with numpy, pairs confirmed by signature
  agreement, clusters by scipy), signatures memory-mapped from disk;
- datasketch: ``MinHashLSH.query`` then ``insert`` of each kept document, with the same
  confirmation, the straightforward way to use the library (and what ember did first).

Figures: documents/s of each, the peak resident memory each adds (measured in a fresh
child process per side), and both sides' removed counts (they must agree).

Run from the repository root::

    PYTHONPATH=src python benchmarks/dedup.py --docs 200000
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def make_signatures(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    sigs = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint32, shape=(n, 128))
    for start in range(0, n, 1 << 18):
        sigs[start : start + (1 << 18)] = rng.integers(0, 2**32, size=(min(1 << 18, n - start), 128), dtype=np.uint32)
    copies = rng.choice(np.arange(1, n), size=n // 20, replace=False)
    for c in np.sort(copies):
        sigs[c] = sigs[rng.integers(0, c)]
        sigs[c, rng.choice(128, size=12, replace=False)] = rng.integers(0, 2**32, size=12, dtype=np.uint32)
    sigs.flush()


def run_ember(path: str, queue) -> None:
    from ember.data.dedup import DedupConfig, find_duplicates

    sigs = np.load(path, mmap_mode="r")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    n = len(sigs)
    exact = np.frombuffer(np.arange(n, dtype=np.uint64).repeat(4).tobytes(), dtype=np.uint8).reshape(n, 32)
    keep, _, _ = find_duplicates(exact, sigs, np.ones(n, dtype=np.int64), DedupConfig(exact=False))
    queue.put(
        (time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, int((~keep).sum()))
    )


def run_datasketch(path: str, queue) -> None:
    from datasketch import LeanMinHash, MinHashLSH

    from ember.data.dedup import LSH_WEIGHTS

    sigs = np.load(path, mmap_mode="r")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=128, weights=LSH_WEIGHTS)
    kept, removed = {}, 0
    for i in range(len(sigs)):
        values = np.array(sigs[i])
        m = LeanMinHash(seed=1, hashvalues=values, scheme="affine32")  # datasketch's uint32 storage, as ember's
        if any(np.mean(kept[c] == values) >= 0.8 for c in lsh.query(m)):
            removed += 1
            continue
        lsh.insert(i, m)
        kept[i] = values
    queue.put((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, removed))


def in_child(fn, path: str):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(path, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"{fn.__name__} failed (exit {proc.exitcode}); its error is printed above")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "sigs.npy")
        make_signatures(Path(path), args.docs)
        results = {name: in_child(fn, path) for name, fn in (("ember", run_ember), ("datasketch", run_datasketch))}
    for name, (seconds, kib, removed) in results.items():
        print(
            f"{name:>10}: {args.docs / seconds:,.0f} docs/s, +{kib / 1024:,.0f} MiB peak "
            f"({kib * 1024 / args.docs:,.0f} B/doc), removed {removed:,} of {args.docs // 20:,} planted"
        )
    e, d = results["ember"], results["datasketch"]
    print(f"ember / datasketch: {d[0] / e[0]:.1f}x the speed, {e[1] / max(d[1], 1):.2f}x the memory")


if __name__ == "__main__":
    main()
