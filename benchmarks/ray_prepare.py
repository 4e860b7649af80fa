"""`ember data prepare --engine ray` against the local engine, and the per-core rates docs/SCALING.md scales up.

On the standard-library corpus, default data settings (4096-token BPE, exact + MinHash dedup, 128
permutations), each round in alternating order:

- ``--workers 2`` (the local engine's process pool) and ``--engine ray`` on a local Ray cluster of
  2 CPUs started once beforehand (its ~10 s start-up is printed apart, not in the timings); the two
  outputs are compared byte for byte;
- once, ``--workers 1`` (every stage inline in this process): each stage's CPU seconds
  (``time.process_time``, robust to other work on a shared machine), as per-core rates: clean + exact
  key + MinHash (MB of source read per CPU-second), tokenise (MB of kept text), BPE training on the
  driver (MB of training text), and the in-process near-duplicate search (CPU-us per document).

Then the memory dedup holds per document, measured with tracemalloc (numpy reports its buffers) on
synthetic keys and signatures: the driver's peak with the in-process search (local engine) and with
the edges coming back from the cluster (Ray: the driver never holds band keys), and a reduce task's
peak per (band, key, document) row.

Run from the repository root::

    PYTHONPATH=src python benchmarks/ray_prepare.py --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path


def timed_prepare(out: Path, **kw) -> tuple[float, dict, str]:
    from ember.config import DataConfig
    from ember.data import prepare as prep

    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(log):
        result = prep.prepare(["stdlib"], out, DataConfig(), **kw)
    return time.perf_counter() - start, result.manifest, log.getvalue()


def tree(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def per_core_rates() -> None:
    """CPU seconds of each stage in a ``--workers 1`` prepare (inline: every stage runs in this process),
    as MB per CPU-second: robust to other work on the machine, unlike wall time."""
    import ember.data.prepare as prep
    import ember.data.prepare_job as job

    cpu: dict[str, float] = {}
    from ember.data import dedup

    dedup.signature("warm up: imports and permutations", dedup.DedupConfig())  # not charged to the first unit

    def timed(name, fn):
        def run(*args, **kw):
            start = time.process_time()  # this process, all its threads (BPE training may use several)
            try:
                return fn(*args, **kw)
            finally:
                cpu[name] = cpu.get(name, 0.0) + time.process_time() - start

        return run

    real = prep._clean_unit, prep._tokenize_unit, job.train_bpe, prep.find_duplicates
    prep._clean_unit, prep._tokenize_unit = timed("clean", real[0]), timed("tokenise", real[1])
    job.train_bpe, prep.find_duplicates = timed("bpe", real[2]), timed("dedup search", real[3])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            seconds, manifest, _ = timed_prepare(Path(tmp) / "w1", progress=False, workers=1)
    finally:
        prep._clean_unit, prep._tokenize_unit, job.train_bpe, prep.find_duplicates = real
    stats = manifest["stats"]
    read_mb, docs = stats["read"]["bytes"] / 1e6, stats["read"]["documents"]
    kept_mb = sum(s["bytes"] for s in stats["kept"].values()) / 1e6
    train_mb = stats["kept"]["train"]["bytes"] / 1e6
    print(
        f"1 worker: {seconds:.1f}s wall; {read_mb:.1f} MB read, {docs} documents ({read_mb * 1e6 / docs:.0f} B average)"
    )
    print(f"  clean+key+MinHash: {read_mb / cpu['clean']:.2f} MB per CPU-second ({cpu['clean']:.1f} CPU-s)")
    print(
        f"  tokenise: {kept_mb / cpu['tokenise']:.2f} MB per CPU-second ({cpu['tokenise']:.1f} CPU-s, {kept_mb:.1f} MB)"
    )
    print(
        f"  BPE training (driver): {train_mb / cpu['bpe']:.2f} MB per CPU-second ({cpu['bpe']:.1f} CPU-s, {train_mb:.1f} MB)"
    )
    print(f"  dedup search (driver, local engine): {cpu['dedup search'] * 1e6 / docs:.1f} CPU-us per document")


def dedup_memory(n: int = 200_000) -> None:
    """Peak bytes per document of the dedup phase's arrays, and per shuffled row of a reduce task."""
    import numpy as np

    from ember.data import dedup
    from ember.data.prepare import _assign_splits, _split_hash

    cfg, rng = dedup.DedupConfig(), np.random.default_rng(0)
    # Imports (datasketch, scipy) and first-call caches are allocated outside the measured window.
    few = rng.integers(0, 2**32, size=(50, cfg.num_perm), dtype=np.uint32)
    dedup.find_duplicates(np.zeros((50, 32), np.uint8), few, np.ones(50, np.int64), cfg)
    with tempfile.TemporaryDirectory() as tmp:
        sigs = np.lib.format.open_memmap(f"{tmp}/s.npy", mode="w+", dtype=np.uint32, shape=(n, cfg.num_perm))
        sigs[:] = rng.integers(0, 2**32, size=sigs.shape, dtype=np.uint32)
        for name, edges in (("local engine (search in the driver)", None), ("ray engine driver", _no_edges)):
            tracemalloc.start()
            exact = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
            nbytes = np.full(n, 3000, dtype=np.int64)
            keep, _, _ = dedup.find_duplicates(exact, sigs, nbytes, cfg, edges)
            hashes = np.fromiter((_split_hash(k.tobytes(), 1) for k in exact), np.float64, n)
            _assign_splits(hashes, np.flatnonzero(keep), 0.01, 0.0)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(f"dedup memory, {name}: {peak / n:.0f} B per document (peak {peak / 1e6:.0f} MB, {n} docs)")
        start = time.process_time()
        pieces = dedup.band_partition_map(sigs, np.arange(n), cfg, 1)
        mapped = time.process_time() - start
        rows = len(pieces[0][0])
        tracemalloc.start()
        dedup.band_partition_reduce(pieces, sigs, cfg.threshold)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"reduce task: {peak / rows:.0f} B per (band, key, document) row on top of its input of 18 B a row")
        start = time.process_time()
        dedup.band_partition_reduce(pieces, sigs, cfg.threshold)
        reduced = time.process_time() - start
        print(f"near search on the cluster: map {mapped / n * 1e6:.1f}, reduce {reduced / n * 1e6:.1f} CPU-us/doc")
        start = time.process_time()
        keep, _, _ = dedup.find_duplicates(exact, sigs, nbytes, cfg, _no_edges)
        hashes = np.fromiter((_split_hash(k.tobytes(), 1) for k in exact), np.float64, n)
        _assign_splits(hashes, np.flatnonzero(keep), 0.01, 0.0)
        print(f"dedup on the ray driver (exact, splits): {(time.process_time() - start) / n * 1e6:.1f} CPU-us/doc")


def _no_edges(sigs, ids, cfg):
    import numpy as np

    return np.zeros((0, 2), dtype=np.int64)  # the cluster's answer: confirmed pairs only (16 B each)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rates-only", action="store_true", help="only the per-core rates and dedup memory")
    args = parser.parse_args()
    if args.rates_only:
        per_core_rates()
        dedup_memory()
        return
    import ray

    print(f"load before: {os.getloadavg()}")
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    print(f"ray start-up (2 CPUs, this machine): {time.perf_counter() - start:.1f}s")
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            outs = {}
            for engine in ("local", "ray") if r % 2 == 0 else ("ray", "local"):
                outs[engine] = Path(tmp) / engine
                kw = {"workers": 2} if engine == "local" else {"engine": "ray"}
                seconds, manifest, _ = timed_prepare(outs[engine], progress=False, **kw)
                times[engine].append(seconds)
            assert tree(outs["local"]) == tree(outs["ray"]), "local and ray wrote different bytes"
        print(f"round {r + 1}: local --workers 2 {times['local'][-1]:.1f}s, ray (2 CPUs) {times['ray'][-1]:.1f}s")
    ray.shutdown()
    mb = manifest["stats"]["read"]["bytes"] / 1e6
    local, on_ray = statistics.median(times["local"]), statistics.median(times["ray"])
    print(f"local 2 workers {mb / local:.2f} MB/s, ray 2 CPUs {mb / on_ray:.2f} MB/s: ray/local {local / on_ray:.2f}x")
    per_core_rates()
    dedup_memory()
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
