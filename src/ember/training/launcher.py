"""``--nproc N``: run an ember command in N local processes and, when one fails, say which.

The processes are started by torch's elastic agent (what ``torchrun --standalone`` runs),
in this process, so its failure report can be replaced by ember's own. Each rank that
fails writes a small JSON record (``rank_R.json``: the time, the error's type and message,
its traceback) into a directory named by ``EMBER_ERROR_DIR``, and prints nothing; the
launcher then prints one paragraph for the rank that failed *first* — not rank 0's
"Connection reset by peer", which only says that a peer went away.

Example::

    launch(2, ["train", "recipes/gpt-tiny.yaml", "--run-dir", "runs/two"])  # 0
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError

ERROR_DIR_ENV = "EMBER_ERROR_DIR"
# Messages of a rank that failed only because a peer went away (gloo, NCCL, the TCP store).
_PEER_GONE = (
    "connection reset",
    "connection closed",
    "broken pipe",
    "connection refused",
    "peer",
    "timed out",
    "timeout",
    "socket",
    "nccl",
    "gloo",
    "store",
)


@dataclass(frozen=True)
class RankFailure:
    """What one rank reported (or what the agent saw, for a rank that wrote no record)."""

    rank: int
    time: float
    kind: str  # the exception's type name, or "signal"
    message: str
    user_error: bool = False  # an EmberError: cause and fix, no traceback needed
    traceback: str = ""

    @property
    def peer_gone(self) -> bool:
        text = f"{self.kind} {self.message}".lower()
        return not self.user_error and self.kind != "signal" and any(word in text for word in _PEER_GONE)


def record_failure(err: BaseException) -> bool:
    """In a rank started by ``launch``: write ``err`` for the launcher and return True (the
    launcher prints it); elsewhere return False (the caller prints it as usual)."""
    directory = os.environ.get(ERROR_DIR_ENV)
    if not directory:
        return False
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "rank": rank,
        "time": time.time(),
        "kind": type(err).__name__,
        "message": str(err),
        "user_error": isinstance(err, EmberError),
        "traceback": "" if isinstance(err, EmberError) else traceback.format_exc(),
    }
    try:
        Path(directory, f"rank_{rank}.json").write_text(json.dumps(record))
    except OSError:
        return False  # nowhere to write it: let the rank print it itself
    return True


@dataclass(frozen=True)
class Nodes:
    """Where this machine's agent meets the other nodes' (``ember.training.cluster``): ``count``
    nodes, this one ``rank``; node 0 hosts the c10d rendezvous at ``endpoint`` (host:port). Rank
    None: the node whose host name is the endpoint's hosts it."""

    count: int
    rank: int | None
    endpoint: str
    run_id: str


def launch(nproc: int, argv: list[str], nodes: Nodes | None = None) -> int:
    """Run ``ember ARGV`` in ``nproc`` processes on this machine (and as many on each of ``nodes``);
    return the job's exit status (0, 2 when the first failure was a user error, 1 otherwise). A
    crash on any rank stops the others (the agent's doing) and is reported here as one paragraph."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise EmberError(f"--nproc must be at least 1, got {nproc}.")
    nodes = nodes or Nodes(1, 0, "localhost:0", str(uuid.uuid4()))
    config = LaunchConfig(
        min_nodes=nodes.count,
        max_nodes=nodes.count,
        nproc_per_node=nproc,
        run_id=nodes.run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=nodes.endpoint,
        # Node 0 hosts the rendezvous store, told rather than guessed from host names (two agents on one
        # machine would both claim it).
        rdzv_configs={"is_host": nodes.rank == 0} if nodes.count > 1 and nodes.rank is not None else {},
        max_restarts=0,
    )
    with _error_dir() as directory, _quiet_agent():
        try:
            elastic_launch(config, sys.executable)("-m", "ember", *argv)
        except ChildFailedError as err:
            failures = _failures(directory, err)
            print(format_failure(failures, nproc * nodes.count), file=sys.stderr)
            return 2 if first_failure(failures).user_error else 1
        except SignalException as err:  # Ctrl-C or a scheduler's SIGTERM: the agent passed it on to every rank
            raise KeyboardInterrupt(
                f"stopped by {err.sigval.name}: each rank that was training stops at its next step "
                f"and writes a checkpoint (a second signal stops at once); continue with --resume "
                f"auto"
            ) from None
    return 0


@contextlib.contextmanager
def _error_dir() -> Iterator[Path]:
    """A fresh directory for the ranks' records, named to them through the environment."""
    directory = Path(tempfile.mkdtemp(prefix="ember-ranks-"))
    before = os.environ.get(ERROR_DIR_ENV)
    os.environ[ERROR_DIR_ENV] = str(directory)  # the agent starts workers with this process's environment
    try:
        yield directory
    finally:
        if before is None:
            os.environ.pop(ERROR_DIR_ENV, None)
        else:
            os.environ[ERROR_DIR_ENV] = before
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    """The agent logs every stopped worker and its own traceback; ember's paragraph replaces them.
    Its modules set their own loggers' levels, so each is quietened, not just the parent."""
    import torch.distributed.elastic.agent.server.api  # noqa: F401  (creates the loggers to quieten)

    prefix = "torch.distributed.elastic"
    names = [prefix, *(n for n in logging.root.manager.loggerDict if n.startswith(prefix + "."))]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _failures(directory: Path, err) -> list[RankFailure]:
    """Every rank's record; for a failed rank without one (killed by a signal), what the agent saw."""
    found: dict[int, RankFailure] = {}
    for path in directory.glob("rank_*.json"):
        try:
            r = json.loads(path.read_text())
            found[int(r["rank"])] = RankFailure(
                int(r["rank"]),
                float(r["time"]),
                str(r["kind"]),
                str(r["message"]),
                bool(r["user_error"]),
                str(r.get("traceback", "")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a rank killed while writing: the agent's view below stands in
    for rank, failure in getattr(err, "failures", {}).items():
        if rank not in found:
            found[rank] = RankFailure(rank, float(failure.timestamp), *_agent_view(failure.exitcode))
    return sorted(found.values(), key=lambda f: f.rank)


def _agent_view(exitcode: int) -> tuple[str, str]:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return "signal", f"killed by {name}" + (" (out of memory? see `dmesg`)" if name == "SIGKILL" else "")
    return "exit", f"exited with status {exitcode} without an error record"


def first_failure(failures: list[RankFailure]) -> RankFailure:
    """The rank whose own error started it: the earliest failure that is not just a peer going away
    (those follow any failure), else the earliest of all."""
    causes = [f for f in failures if not f.peer_gone] or failures
    # The agent's timestamps (ranks without a record: killed by a signal) are whole seconds, the
    # records' are not: within one second, a rank's own error comes before a signal the agent saw
    # (usually its own SIGTERM, sent because another rank had failed).
    return min(causes, key=lambda f: (f.kind == "exit", math.floor(f.time), f.kind == "signal", f.time))


def format_failure(failures: list[RankFailure], nproc: int) -> str:
    """One paragraph naming the rank that failed first and its own error (a bug keeps its traceback)."""
    first = first_failure(failures)
    others = [f for f in failures if f.rank != first.rank]
    then = ""
    if others:
        shown = "; ".join(f"rank {f.rank}: {f.kind}: {_first_line(f.message)}" for f in others)
        then = f" The other ranks stopped because of it ({shown})."
    message = first.message.rstrip()
    message += "" if message.endswith((".", "!", "?")) else "."
    if first.user_error:
        return f"ember: error: rank {first.rank} of {nproc} failed first: {message}{then}"
    text = f"ember: rank {first.rank} of {nproc} failed first with {first.kind}: {message}{then}"
    return f"{first.traceback.rstrip()}\n{text}" if first.traceback else text


def _first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"
