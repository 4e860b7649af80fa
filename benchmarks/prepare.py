"""Prepare throughput on the standard-library corpus: clean + dedup + BPE + tokenise + shard.

``ember.data.prepare.prepare(["stdlib"], ...)`` runs with the default data settings
(NFC, control and whitespace clean-up, e-mail and IP masking, filters, exact + MinHash
dedup with 128 permutations, a 4096-token byte-level BPE trained on the kept text) into
a fresh temporary directory, with ``--workers 1`` and ``--workers 2`` in alternating order
each round. A timing is the wall clock of the whole ``prepare`` call, worker start-up
included. Reported: source MB/s and documents/s (the corpus as read), for each worker
count (median over rounds), and the 2-worker / 1-worker speed ratio. The outputs of the
two are compared byte for byte each round.

Run from the repository root::

    PYTHONPATH=src python benchmarks/prepare.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def one_run(workers: int, root: Path) -> tuple[float, dict, dict[str, bytes]]:
    # Imported here, not at the top: spawned workers re-import this script, and
    # ember.config would drag torch into each of them (as a user's script might).
    from ember.config import DataConfig
    from ember.data.prepare import prepare

    out = root / f"w{workers}"
    start = time.perf_counter()
    result = prepare(["stdlib"], out, DataConfig(), workers=workers, progress=False)
    seconds = time.perf_counter() - start
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    return seconds, result.manifest, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[int, list[float]] = {1: [], 2: []}
    manifest = {}
    for r in range(args.rounds):
        order = (1, 2) if r % 2 == 0 else (2, 1)
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            for workers in order:
                seconds, manifest, files[workers] = one_run(workers, Path(tmp))
                times[workers].append(seconds)
            assert files[1] == files[2], "1 and 2 workers wrote different bytes"
        print(f"round {r + 1}: 1 worker {times[1][-1]:.2f}s, 2 workers {times[2][-1]:.2f}s", flush=True)
    read = manifest["stats"]["read"]
    mb, docs = read["bytes"] / 1e6, read["documents"]
    for workers in (1, 2):
        t = statistics.median(times[workers])
        print(f"{workers} worker(s): {mb / t:.2f} MB/s, {docs / t:.0f} docs/s ({t:.2f}s for {mb:.1f} MB, {docs} docs)")
    ratio = statistics.median(times[1]) / statistics.median(times[2])
    print(f"prepare speed-up with 2 workers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
