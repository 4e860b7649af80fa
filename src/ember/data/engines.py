"""Where ``ember data prepare`` runs its work: an engine, chosen with ``--engine``.

``local`` (the default) runs the per-unit stages in worker processes on this machine; ``ray`` runs them
as tasks on a Ray cluster (``ember.data.ray_engine``, the ``ember[ray]`` extra). Prepare's stages call
an engine through two methods only, and every decision depends on the data and the settings alone, so
each engine writes the same bytes:

- ``map_unordered(fn, jobs)``: ``fn(*job)`` for every job, results in the order they finish;
- ``near_edges(sigs, ids, cfg)``: the confirmed near-duplicate pairs among ``ids``
  (``dedup.near_edges``; the Ray engine shuffles band keys across the cluster instead);

and ``check_shared(path)``, before any work: every worker sees ``path`` (the work directory).

This module does not import torch or ray.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np

from ember.data import dedup
from ember.errors import EmberError

ENGINES = ("local", "ray")


class Engine(Protocol):
    def map_unordered(self, fn: Callable, jobs: list[tuple]) -> Iterator: ...

    def near_edges(self, sigs: np.ndarray, ids: np.ndarray, cfg: dedup.DedupConfig) -> np.ndarray: ...

    def check_shared(self, path: Path) -> None: ...

    def close(self) -> None: ...


class LocalEngine:
    """``map_unordered`` in ``workers`` spawned processes (inline with one); near-duplicates in this process."""

    def __init__(self, workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> None:
        self.workers = workers
        # spawn: the children import only what they need (no torch) and share no
        # tokenizer or lock state with the parent.
        self.executor = (
            None
            if workers == 1
            else ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=initializer,
                initargs=initargs,
            )
        )

    def map_unordered(self, fn: Callable, jobs: list[tuple]) -> Iterator:
        if self.executor is None:
            yield from (fn(*job) for job in jobs)
            return
        futures = [self.executor.submit(fn, *job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()

    def near_edges(self, sigs: np.ndarray, ids: np.ndarray, cfg: dedup.DedupConfig) -> np.ndarray:
        return dedup.near_edges(sigs, ids, cfg)

    def check_shared(self, path: Path) -> None:
        """Every worker sees this machine's files."""

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)


def check_engine(name: str, workers: int) -> None:
    """A user's engine choice, checked before anything runs."""
    if name not in ENGINES:
        raise EmberError(f"--engine must be one of {', '.join(ENGINES)}, got {name!r}.")
    if name == "ray" and workers != 1:
        raise EmberError(
            f"--workers {workers} is the local engine's process count; with --engine ray every CPU of the Ray "
            f"cluster works (set them per node with `ray start --num-cpus N`). Drop --workers, or drop --engine ray."
        )
    if name == "ray":  # a missing extra is said before anything is written
        from ember.data.ray_engine import import_ray

        import_ray()


@contextmanager
def open_engine(
    name: str, workers: int = 1, initializer: Callable | None = None, initargs: tuple = ()
) -> Iterator[Engine]:
    """The engine ``name``, closed on exit. ``initializer(*initargs)`` starts each local worker process."""
    check_engine(name, workers)
    if name == "ray":
        from ember.data.ray_engine import RayEngine

        engine: Engine = RayEngine()
    else:
        engine = LocalEngine(workers, initializer, initargs)
    try:
        yield engine
    finally:
        engine.close()
