"""What a run tells the world: ``metrics.jsonl``, the experiment trackers, the progress bar and its
log messages (logger ``ember.training.runlog``: the run's header, a line per logged step when no
bar is drawn, each validation).

``metrics.jsonl`` holds one JSON object per logged step (``step``, ``loss``,
``lr``, throughput, ``mfu`` when known, peak memory) and one per validation
(``split: "val"`` plus the metric values). On resume, lines past the resumed
step are dropped first so the file reads as one uninterrupted run. Every line
and validation also goes to the recipe's trackers (``ember.training.trackers``:
TensorBoard, MLflow, W&B), with a language model's text sample at each validation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ember.atomic import write_text_atomic
from ember.log import console, progress_wanted
from ember.training.trackers import Trackers

logger = logging.getLogger(__name__)


def _step_of(line: str) -> int | None:
    try:
        step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # a line cut short when the process died
    return step if isinstance(step, int) else None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop entries logged after ``last_step`` (they belong to the interrupted future) and broken lines."""
    if not path.is_file():
        return
    text = path.read_bytes().decode("utf-8", errors="replace")  # a damaged line is dropped, not a traceback
    kept = [line for line in text.splitlines() if (step := _step_of(line)) is not None and step <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _json_safe(value):
    """NaN and inf are not JSON: write them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class StepWindow:
    """The steps since the last log line: their summed loss (kept on the device: no sync per step),
    how many ran and were skipped, and the training time they took (pauses excluded)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.steps = self.skips = 0
        self.restart()

    def restart(self) -> None:
        """Start timing now (the loop calls it just before its first step: set-up is not training)."""
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, skipped: bool) -> None:
        if not skipped:
            self.loss += loss
        self.steps += 1
        self.skips += skipped

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Validation and checkpoints inside do not count as training time."""
        pause_start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - pause_start

    def close(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
        """(mean loss of the good steps over all ranks, seconds), and a fresh window."""
        now = time.perf_counter()
        good = self.steps - self.skips
        reduce(self.loss)  # each data-parallel rank holds its share of the global mean
        mean = self.loss.item() / good if good else float("nan")
        seconds = now - self.start
        self.loss.zero_()
        self.steps = self.skips = 0
        self.start = now  # the logging itself counts in the next window
        return mean, seconds


class _NoBar:
    """The progress bar's interface, drawing nothing (no terminal, ``train.progress=false``, ``-q``)."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def _bar():
    """The training bar, on the console the log handler writes to (its lines print above the bar)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console(),
    )


class RunLog:
    """When a training line is logged and what it says, on every rank (its loss is reduced over
    the ranks); rank 0 appends it to the run directory and drives the console (``quiet`` elsewhere)."""

    def __init__(
        self,
        run_dir: Path,
        start_step: int,
        max_steps: int,
        unit: str,
        show_progress: bool,
        log_every: int = 1,
        quiet: bool = False,
        device: torch.device | None = None,
        trackers: Trackers | None = None,
        sampler: Callable[[], str] | None = None,
    ):
        self.unit, self.every, self.max_steps, self.quiet = unit, log_every, max_steps, quiet
        self.window = StepWindow(device if device is not None else torch.device("cpu"))
        if quiet:
            return
        self.path = run_dir / "metrics.jsonl"
        truncate_metrics(self.path, start_step)
        self.file = open(self.path, "a", buffering=1)
        self.trackers = trackers if trackers is not None else Trackers([], None, run_dir, start_step, False)
        self.sampler = sampler if self.trackers.active else None  # only worth its time when something shows it
        # The console (rich) is asked only when a bar could be drawn: train.progress=false imports no rich.
        self.live = show_progress and console().is_terminal and progress_wanted(logger)
        self.progress = _bar() if self.live else _NoBar()
        self.task = self.progress.add_task("train", total=max_steps, completed=start_step, stats="")
        self.progress.start()

    def should_log(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def log_step(
        self,
        step: int,
        items_per_step: float,
        reduce: Callable[[torch.Tensor], torch.Tensor],
        extra: Callable[[float], dict],
    ) -> None:
        """Close the window into a line: step, loss, and ``extra(items_per_s)`` (lr, throughput, mfu, ...)."""
        steps = self.window.steps
        loss, seconds = self.window.close(reduce)
        items_per_s = items_per_step * steps / seconds
        self.train_step({"step": step, "loss": loss, **extra(items_per_s)})

    def train_step(self, record: dict) -> None:
        """A logged training step: file, trackers, and the bar (or a line when there is no terminal)."""
        if self.quiet:
            return
        self._write(record)
        self.trackers.log_metrics(record["step"], record, "train")
        stats = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record[f'{self.unit}_per_s']:,.0f} {self.unit}/s"
        if record.get("mfu") is not None:
            stats += f"  mfu {100 * record['mfu']:.1f}%"
        stats += memory_text(record)
        self.progress.update(self.task, completed=record["step"], stats=stats)
        # The bar shows it already; --verbose (DEBUG) still gets the line.
        logger.log(logging.DEBUG if self.live else logging.INFO, "step %6d  %s", record["step"], stats)

    def advance(self, step: int) -> None:
        if not self.quiet:
            self.progress.update(self.task, completed=step)

    def validation(self, step: int, metrics: dict) -> None:
        if self.quiet:
            return
        self._write({"step": step, "split": "val", **metrics})
        self.trackers.log_metrics(step, metrics, "val")
        if self.sampler is not None:
            self.trackers.log_text(step, "sample", self.sampler())
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        logger.info("step %6d  val  %s", step, shown)

    def message(self, text: str, level: int = logging.INFO) -> None:
        """A message of the run's (rank 0's only)."""
        if not self.quiet:
            logger.log(level, text)

    def _write(self, record: dict) -> None:
        safe = {k: _json_safe(v) for k, v in record.items()}
        self.file.write(json.dumps({**safe, "time": round(time.time(), 3)}) + "\n")

    def close(self, status: str = "finished") -> None:
        """``status`` ("finished", "failed", "killed") is what the trackers record as the run's end."""
        if self.quiet:
            return
        self.progress.stop()
        self.trackers.finish(status)
        self.file.close()


def memory_text(record: dict) -> str:
    """The console's peak-memory figures: '  rss 812 MiB  cuda 5,120 MiB' (what the line has of them)."""
    shown = [(label, record.get(key)) for label, key in (("rss", "peak_rss_mb"), ("cuda", "cuda_peak_mb"))]
    return "".join(f"  {label} {value:,.0f} MiB" for label, value in shown if value is not None)
