"""A run's profiles: a ``torch.profiler`` trace of the optimiser steps ``train.profile`` names,
and, on CUDA, snapshots of the memory allocator.

The trace covers steps ``start`` to ``start + steps - 1`` (optimiser steps, as the schedules
count them: all ``grad_accum`` micro-batches of a step are in it), each marked
``ProfilerStep#<step>``; a step's mark spans its batches, forward, backward, optimiser step and
whatever else the loop does at that step (a log line, a validation, a checkpoint). It is written
to ``RUN/profile/rank<R>.<start>.pt.trace.json`` by every rank (one file each, so a slow rank
shows), in the Chrome trace format that Perfetto (ui.perfetto.dev), ``chrome://tracing`` and
TensorBoard's profiler plugin read. Outside the window the profiler is not running: a step
costs two integer comparisons. A run resumed inside the window traces the steps that remain;
one resumed past it traces nothing; a window past ``train.max_steps`` ends there, and a run that
stops early inside it keeps what was traced. The first traced step carries the profiler's start-up,
so a window is best started after step 1 (which also holds the run's lazy set-up).

On CUDA an out-of-memory error writes the allocator's state to
``RUN/profile/oom_memory_rank<R>.pickle`` and ends the run with one paragraph naming the
remedies. With ``train.profile.memory`` the allocator also records each allocation's history
from the run's start (with its Python stack), and a snapshot is written when the trace ends
(``memory_rank<R>.pickle``). Those files are pickles in PyTorch's own format, for
https://pytorch.org/memory_viz: ember writes and links them and never reads one.

Example::

    with Profiler(recipe.train.profile, run_dir, device, rank=0, start_step=0, max_steps=100) as profiler:
        for step in range(1, max_steps + 1):
            ...  # one optimiser step
            profiler.step(step)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ember.config import ProfileConfig
from ember.errors import EmberError

logger = logging.getLogger(__name__)

# PyTorch's Kineto prints "USDT: ... profiler_start/stop" on stderr at every trace, even in a quiet run;
# level 6 (above its highest) silences it. It reads the variable once, at the first trace, so it is set
# just before a trace starts (not on import: a program importing ember keeps its environment; the run
# gives it back when it ends, see ember.training.process_state); a user's own value stands.
KINETO_QUIET = ("KINETO_LOG_LEVEL", "6")

MEMORY_HISTORY_ENTRIES = 100_000  # allocations kept in the history (the newest; a few tens of MB)


def trace_path(run_dir: Path, rank: int, first_step: int) -> Path:
    """Where ``rank``'s trace starting at ``first_step`` goes: ``<worker>.<span>.pt.trace.json``, the
    name TensorBoard's profiler plugin reads (worker ``rank<R>``)."""
    return Path(run_dir) / "profile" / f"rank{rank}.{first_step}.pt.trace.json"


class Profiler:
    """Starts ``torch.profiler`` before the window's first step and stops it after its last; a context
    manager around the training steps (it also turns a CUDA out-of-memory error into ember's error)."""

    def __init__(
        self, cfg: ProfileConfig, run_dir: Path, device: torch.device, rank: int, start_step: int, max_steps: int
    ) -> None:
        self.first, self.last = cfg.start, min(cfg.start + cfg.steps - 1, max_steps) if cfg.start else 0
        self.dir, self.device, self.rank = Path(run_dir) / "profile", device, rank
        self.cuda = device.type == "cuda"
        self.memory = cfg.memory and self.cuda
        if cfg.memory and not self.cuda and rank == 0:  # the user's value has no effect here: said, not dropped
            logger.warning(
                "train.profile.memory records the CUDA allocator's history; this run is on %s, so no memory "
                "snapshot is written (a trace, train.profile.start, still shows the CPU allocations)",
                device.type,
            )
        self.done = start_step  # the last finished optimiser step
        self.prof: torch.profiler.profile | None = None
        self.marker: torch.profiler.record_function | None = None

    def __enter__(self) -> Profiler:
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self._maybe_start()
        return self

    def step(self, step: int) -> None:
        """Optimiser step ``step`` has finished: start, mark or stop the trace."""
        self.done = step
        if self.prof is None:
            self._maybe_start()
            return
        self._end_marker()
        if step >= self.last:
            self._finish()
        else:
            self._begin_marker(step + 1)

    def __exit__(self, kind, error, traceback) -> None:
        if self.prof is not None:  # the run ended inside the window: what was traced is kept
            self._end_marker()
            self._finish()
        oom = isinstance(error, torch.OutOfMemoryError) and self.cuda
        if oom:
            snapshot = self._snapshot(f"oom_memory_rank{self.rank}.pickle")
        if self.memory:
            torch.cuda.memory._record_memory_history(enabled=None)
        if oom:
            raise EmberError(out_of_memory_message(self.done + 1, error, snapshot, self.memory)) from None

    def _maybe_start(self) -> None:
        if not (self.first and self.first <= self.done + 1 <= self.last):
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # Shapes and allocations (the plugin's operator and memory views); no Python stacks (slow, large).
        self.prof = profile(activities=activities, record_shapes=True, profile_memory=True)
        self.traced_from = self.done + 1
        os.environ.setdefault(*KINETO_QUIET)
        self.prof.start()
        self._begin_marker(self.done + 1)

    def _begin_marker(self, step: int) -> None:
        self.marker = torch.profiler.record_function(f"ProfilerStep#{step}")
        self.marker.__enter__()

    def _end_marker(self) -> None:
        if self.marker is not None:
            self.marker.__exit__(None, None, None)
            self.marker = None

    def _finish(self) -> None:
        prof, self.prof, self.first = self.prof, None, 0  # one window per run
        assert prof is not None
        prof.stop()
        path = trace_path(self.dir.parent, self.rank, self.traced_from)
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        if self.memory:
            self._snapshot(f"memory_rank{self.rank}.pickle")
        if self.rank == 0:
            logger.info("profile: steps %d-%d traced → %s", self.traced_from, self.done, path)

    def _snapshot(self, name: str) -> Path | None:
        """The CUDA allocator's state (and history, when recorded) in ``name``; None if it could not be written."""
        path = self.dir / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
        except (OSError, RuntimeError) as err:  # a full disk must not hide the error being reported
            logger.warning("could not write the memory snapshot %s: %s", path, err)
            return None
        return path


def out_of_memory_message(step: int, error: BaseException, snapshot: Path | None, recorded: bool) -> str:
    """The one paragraph a CUDA out-of-memory error at ``step`` ends the run with."""
    cause = str(error).split("\n")[0].split(". ")[0]
    where = (
        f"the allocator's state is in {snapshot} (open it at https://pytorch.org/memory_viz"
        + ("" if recorded else "; train.profile.memory=true also records which code made each allocation")
        + ")"
        if snapshot is not None
        else "no memory snapshot could be written"
    )
    return (
        f"CUDA ran out of memory at step {step} ({cause}). Lower train.batch_size (raise train.grad_accum to keep "
        f"the batch), set train.activation_checkpointing=true or train.precision=bf16, or spread the model over "
        f"more devices (`ember plan RECIPE` shows what fits); {where}."
    )
