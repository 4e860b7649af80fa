"""What the cyclic garbage collector looks at during a run: what the run makes, not what was there before.

A training process holds a few hundred thousand long-lived objects before its first step
(torch's modules, and ``torch._dynamo``, which torch's optimisers import when built). Each
full collection walks them all (~0.1 s each; building the optimiser alone triggers several),
though none of them becomes garbage. ``run_objects_only`` sets them aside (``gc.freeze``)
for the run and gives them back to the collector when it ends; what the run makes is
collected as before. Nothing is freed later than the run's end.

Example::

    with run_objects_only():
        train_the_run()
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def run_objects_only() -> Iterator[None]:
    """Freeze what is alive now until the block ends; a heap already frozen (by the program, or an
    enclosing run) is left as its owner set it."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
