"""The Ray engine of ``ember data prepare --engine ray``: the same per-unit stages as Ray tasks on a
cluster, and the near-duplicate search as a shuffle of band keys across it.

Connects to a running cluster: ``RAY_ADDRESS``, else one started with ``ray start`` on this machine
(ember never starts one itself: Ray's servers listen on every address of the machine). Every task
reads and writes the paths the driver gives it, so the sources and ``--out`` must be on storage every
node mounts at the same path (docs/SCALING.md). A task whose worker dies is run again by Ray
(``MAX_RETRIES``); a unit's work file is written atomically and marked done last, so a rerun writes
the same bytes.

Near-duplicates (``dedup.band_partition_map`` / ``band_partition_reduce``): map tasks read blocks of
the signature memory map in the work directory and scatter (band, key, document) rows by key hash
range into one object per partition; Ray's object store spills them to disk when they outgrow
memory. Each reduce task gets one hash range from every block, finds and confirms its candidate
pairs, and returns them; the driver clusters the union as the local engine does.

Ray is imported only here, and only when this engine is chosen (the ``ember[ray]`` extra).
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ember.data import dedup, shards
from ember.errors import EmberError

MAX_RETRIES = 3  # runs of a task after its worker (or node) died; an exception it raises is not retried
BLOCK = 1 << 18  # documents per map task of the near-duplicate shuffle (128 MB of 128 uint32 signatures)
WAIT_S = 0.5  # map_unordered collects finished tasks this often
IN_FLIGHT_PER_CPU = 4  # tasks submitted ahead per cluster CPU
SHARE_BYTES = 1 << 16  # a job argument this large is put in the object store once, not sent with each task
PARTITION_BYTES = 1 << 28  # (band, key, document) rows per reduce task: 18 bytes each, ~256 MB


def import_ray() -> Any:
    """The ``ray`` module, or an EmberError naming the extra that installs it."""
    try:
        import ray
    except ImportError as err:
        raise EmberError(
            f"--engine ray needs Ray, which is not installed here ({err}). Install the extra with "
            f"`pip install 'ember[ray]'` (on every node of the cluster, with the same Python and ember versions), "
            f"or prepare on this machine without --engine ray (--workers N for N processes)."
        ) from None
    return ray


def _run(cwd: str, fn: Callable, *job: Any) -> Any:
    """A task: ``fn(*job)`` in the driver's working directory (relative source and --out paths)."""
    # One thread per task: Ray gives each task one CPU (it sets OMP_NUM_THREADS=1 itself).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        os.chdir(cwd)
    except OSError as err:
        raise EmberError(
            f"the directory prepare was started in, {cwd}, is not on this node ({err.strerror}). Start it from a "
            f"directory on shared storage that every node mounts at the same path (docs/SCALING.md)."
        ) from None
    return fn(*job)


def _sees(path: str, cwd: str) -> bool:
    return os.path.exists(path) and os.path.isdir(cwd)


def _silent(address: str) -> str | None:
    """The host:port ``ray.init(address)`` would dial, when nothing listens there (Ray itself retries for
    minutes); None when something does, or when the address is not a plain host:port."""
    try:
        from ray._private.services import canonicalize_bootstrap_address  # Ray's own lookup; private, so guarded

        target = canonicalize_bootstrap_address(address)
    except Exception:  # another Ray version, no address found, or a ray:// address: ray.init says
        return None
    if not target or "://" in target:
        return None
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError):
        return target
    return None


def _open(source: str | np.ndarray) -> np.ndarray:
    """The signatures: the work directory's memory map by path (never pickled), or an array."""
    return np.load(source, mmap_mode="r", allow_pickle=False) if isinstance(source, str) else source


def _map_block(source: str | np.ndarray, ids: np.ndarray, cfg: dedup.DedupConfig, partitions: int) -> tuple:
    return tuple(dedup.band_partition_map(_open(source), ids, cfg, partitions))


def _reduce_partition(source: str | np.ndarray, threshold: float, *pieces: tuple) -> np.ndarray:
    return dedup.band_partition_reduce(list(pieces), _open(source), threshold)


@functools.cache
def _tasks(ray: Any) -> tuple:
    # retry_exceptions=False: a worker's death is retried, an error the task raises is the user's to see.
    remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)
    return remote(_run), remote(_map_block), remote(_reduce_partition), remote(_sees)


class RayEngine:
    """``map_unordered`` and ``near_edges`` as Ray tasks; connects on creation, disconnects on ``close``
    (a Ray session that was already connected, e.g. by a notebook or a test, is left connected)."""

    def __init__(self, block: int = BLOCK) -> None:
        self.ray = import_ray()
        self.block = block
        self.owned = not self.ray.is_initialized()
        if self.owned:
            self.connect(os.environ.get("RAY_ADDRESS") or "auto")
        self.run, self.map_block, self.reduce_partition, self.sees = _tasks(self.ray)

    def connect(self, address: str) -> None:
        """Join a running cluster; never start one here (its servers would listen on every address)."""
        silent = _silent(address)
        if silent:
            source = "RAY_ADDRESS" if address != "auto" else "left by `ray start` on this machine"
            raise EmberError(
                f"--engine ray found the Ray cluster address {silent} ({source}), "
                f"and nothing answers there: the cluster has stopped (one stopped without `ray stop` leaves its address "
                f"behind). Start it again with `ray start --head`, run `ray stop` to clear the stale address, or set "
                f"RAY_ADDRESS to a running cluster's address."
            )
        try:
            self.ray.init(address=address, logging_level="warning")
        except ConnectionError as err:
            where = "no Ray cluster runs on this machine" if address == "auto" else f"RAY_ADDRESS={address}: {err}"
            raise EmberError(
                f"--engine ray runs on a Ray cluster, and {where}. Start one (`ray start --head` here, then "
                f"`ray start --address HEAD:6379` on the other nodes) or set RAY_ADDRESS to a running one's "
                f"address (docs/SCALING.md); on one machine the local engine does the same work (--workers N)."
            ) from None

    def check_shared(self, path: Path) -> None:
        """Every node with CPUs sees ``path`` and the driver's directory where the driver does; else an
        EmberError before any work (a node without the mount would count the sources as unreadable)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        path_, cwd = str(Path(path).absolute()), os.getcwd()
        nodes = [n for n in self.ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
        probes = [
            self.sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                path_, cwd
            )
            for n in nodes
        ]
        blind = sorted({n["NodeManagerAddress"] for n, ok in zip(nodes, self.ray.get(probes)) if not ok})
        if blind:
            raise EmberError(
                f"Ray node(s) {', '.join(blind)} do not see {path_} (or {cwd}): every node reads the sources and "
                f"writes --out at the paths the driver gives. Put the sources and --out on shared storage mounted at "
                f"the same path on every node, start prepare from a directory there, and run it again."
            )

    def map_unordered(self, fn: Callable, jobs: list[tuple]) -> Iterator:
        """``fn(*job)`` as tasks, at most ``IN_FLIGHT_PER_CPU`` per cluster CPU submitted at a time (a
        million units are not a million task specs held at once); results as they finish."""
        cwd, todo, pending = os.getcwd(), iter(jobs), []
        window = IN_FLIGHT_PER_CPU * self.cpus()
        shared: dict[int, Any] = {}  # a large argument every job passes (the tokenizer's JSON): stored once
        try:
            while True:
                for job in itertools.islice(todo, window - len(pending)):
                    pending.append(self.run.remote(cwd, fn, *(self.shared(a, shared) for a in job)))
                if not pending:
                    return
                # Whatever finished within WAIT_S: one wait per batch, not one per task (O(n) each).
                done, pending = self.ray.wait(pending, num_returns=len(pending), timeout=WAIT_S)
                yield from (self.get(ref) for ref in done)
        finally:
            for ref in pending:  # an error, or the caller stopped: the rest is not wanted
                self.ray.cancel(ref)

    def shared(self, arg: Any, store: dict[int, Any]) -> Any:
        """``arg``, or for a large str or bytes a reference to one copy of it in the object store."""
        if isinstance(arg, (str, bytes)) and len(arg) >= SHARE_BYTES:
            if id(arg) not in store:
                store[id(arg)] = (arg, self.ray.put(arg))  # the arg too: its id stays its own while held
            return store[id(arg)][1]
        return arg

    def cpus(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def near_edges(self, sigs: np.ndarray, ids: np.ndarray, cfg: dedup.DedupConfig) -> np.ndarray:
        if isinstance(sigs, np.memmap) and sigs.filename:
            sigs.flush()  # the driver wrote it; the tasks map the file
            source: Any = str(sigs.filename)
        else:
            source = self.ray.put(np.asarray(sigs))
        bands, _ = dedup.lsh_bands(cfg)
        partitions = self.partitions(len(ids) * bands)
        maps = [
            self.map_block.options(num_returns=partitions).remote(source, ids[s : s + self.block], cfg, partitions)
            for s in range(0, len(ids), self.block)
        ]
        reduces = [
            self.reduce_partition.remote(source, cfg.threshold, *(m[p] for m in maps)) for p in range(partitions)
        ]
        return dedup.unique_edges([self.get(r) for r in reduces])

    def partitions(self, rows: int) -> int:
        """Reduce tasks: at least one per CPU of the cluster (and 2), more when the rows would not fit one."""
        return max(2, self.cpus(), -(-rows * 18 // PARTITION_BYTES))

    def get(self, ref: Any) -> Any:
        """A task's result; its failure as an EmberError where it is the user's to fix."""
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, EmberError):
                raise EmberError(f"On a Ray worker: {cause}") from None
            if isinstance(cause, OSError):
                raise EmberError(
                    f"A Ray task could not read or write {cause.filename or 'a file'} ({cause.strerror or cause}). "
                    f"Every node must see the sources and --out at the same paths: put them on shared storage "
                    f"(NFS, a cluster file system) mounted alike on each node, and run from a directory there."
                ) from None
            raise
        except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.OutOfMemoryError) as err:
            raise EmberError(
                f"A Ray task's worker died {MAX_RETRIES + 1} times ({type(err).__name__}); the job stopped. Check "
                f"the nodes' memory (a reduce task of the near-duplicate search holds up to ~1 GB; see "
                f"docs/SCALING.md), then run the same command again. {shards.RESUMES}"
            ) from None

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()
