"""``ember compare RUN...``: several runs side by side in the compression trade-off table.

Each run's size and quality come from RUN/compress.json when that file is newer than the
run's weights and was measured on the same split and batches; otherwise they are measured
again (``quality_row``). The latencies are always timed anew, all runs together in
interleaved rounds (``time_rows``): a speed read back from another call would compare the
machine's load then with its load now.

Example::

    rows = compare(["runs/gpt-tiny", "runs/gpt-tiny-int8-dynamic"])
    print(format_table(rows))
"""

from __future__ import annotations

from pathlib import Path

from ember.compress.measure import TradeoffRow, check_run_dir, quality_row, read_row, time_rows
from ember.compress.timing import PASSES, ROUNDS
from ember.errors import EmberError


def compare(
    runs: list[str | Path], split: str = "val", max_batches: int = 0, rounds: int = ROUNDS, passes: int = PASSES
) -> list[TradeoffRow]:
    """One trade-off row per run, in the order given (ratios in ``format_table`` are vs the first);
    quality over ``max_batches`` batches of ``split`` (0 = all of it); latency timed in ``rounds``
    interleaved rounds of ``passes`` forward passes per run."""
    if not runs:
        raise EmberError(
            "ember compare needs at least one run directory, e.g. `ember compare runs/gpt runs/gpt-int8-dynamic`."
        )
    paths = [Path(run) for run in runs]
    for path in paths:  # every mistake before any slow measurement
        check_run_dir(path, "ember compare")
    rows = []
    for path in paths:
        row = read_row(path)
        fresh = row is not None and (row.split, row.max_batches) == (split, max_batches)
        rows.append(row if fresh else quality_row(path, split=split, max_batches=max_batches))
    return time_rows(rows, rounds, passes)
