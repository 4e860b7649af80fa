"""Forward-pass latency of several models timed side by side, and whether they differ measurably.

One clock reading on a shared machine measures the machine as much as the model: timing
model A now and model B a minute later compares two loads, not two models. So the models
are timed in rounds: in each round every model runs one untimed pass and then ``passes``
timed forward passes, in an order rotated from round to round, and its round figure is
the median of those passes. A model's latency is the median of its round figures, its
spread their lowest and highest.

A speed ratio (the first model's milliseconds over another's) is taken per round — both
figures come from the same few milliseconds, so a burst of other work hits both — and
reported as the median of the per-round ratios with their lowest and highest. The
difference is *measurable* only when every round agrees on which model is faster (the
range of the ratios excludes 1.0). For two equally fast models each round falls on either
side of 1.0 by chance, so R rounds report a difference that is not there with probability
2^(1-R): 0.4 % with the default 9 rounds.

Example::

    rounds = time_interleaved([(float_model, (x,)), (int8_model, (x,))])
    speed_ratio(rounds[0], rounds[1])   # Ratio(median=1.02, low=0.95, high=1.10): no measurable difference
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ember.errors import EmberError

WARMUP = 3  # untimed passes per model first: allocator, kernel selection and lazy init are not its speed
ROUNDS = 9
PASSES = 5


@dataclass(frozen=True)
class Ratio:
    """How many times faster a model ran than the base: median and range of the per-round ratios."""

    median: float
    low: float
    high: float

    @property
    def measurable(self) -> bool:
        """Every round agreed on which model is faster (the range excludes 1.0)."""
        return not self.low <= 1.0 <= self.high

    def describe(self) -> str:
        """``1.52x [1.31–1.70]``, or ``no measurable difference (0.98x [0.91–1.06])`` when the rounds disagree."""
        shown = f"{self.median:.2f}x [{self.low:.2f}–{self.high:.2f}]"
        return shown if self.measurable else f"no measurable difference ({shown})"


def time_interleaved(
    cases: Sequence[tuple[torch.nn.Module, tuple[torch.Tensor, ...]]],
    rounds: int = ROUNDS,
    passes: int = PASSES,
    threads: int = 1,
) -> list[list[float]]:
    """Per model (in the order given), its round figures in ms: the median of ``passes`` timed forward passes
    of its inputs in each of ``rounds`` rounds, the models' order rotated every round; ``threads`` CPU threads."""
    if rounds < 1 or passes < 1:
        raise EmberError(f"timing needs at least 1 round and 1 pass per round, got rounds={rounds}, passes={passes}.")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    figures: list[list[float]] = [[] for _ in cases]
    try:
        with torch.inference_mode():
            for model, inputs in cases:
                for _ in range(WARMUP):
                    model(*inputs)
            for r in range(rounds):
                for k in range(len(cases)):
                    i = (r + k) % len(cases)
                    figures[i].append(_round_ms(*cases[i], passes))
    finally:
        torch.set_num_threads(before)
    return figures


def _round_ms(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], passes: int) -> float:
    sync = torch.cuda.synchronize if inputs[0].device.type == "cuda" else (lambda: None)
    model(*inputs)  # untimed: the caches are the previous model's after its turn
    times = []
    for _ in range(passes):
        sync()
        start = time.perf_counter()
        model(*inputs)
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def speed_ratio(base_ms: Sequence[float], ms: Sequence[float]) -> Ratio:
    """``base_ms`` over ``ms`` round by round (rounds timed together by ``time_interleaved``)."""
    if len(base_ms) != len(ms) or not ms:
        raise ValueError(
            f"per-round figures of different lengths ({len(base_ms)} and {len(ms)}) were not timed together"
        )
    ratios = [b / m for b, m in zip(base_ms, ms)]
    return Ratio(statistics.median(ratios), min(ratios), max(ratios))
