"""Interleaved latency timing (ember.compress.timing) and how the trade-off table reports it:
real models timed on this machine, so the assertions are about differences big or absent
enough to survive a shared CPU."""

from __future__ import annotations

import pytest
import torch

from ember.compress.measure import TradeoffRow, format_table
from ember.compress.timing import Ratio, speed_ratio, time_interleaved


class Matmuls(torch.nn.Module):
    """``repeat`` matmuls of the input by one 384-wide weight: work proportional to ``repeat``."""

    def __init__(self, repeat: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(384, 384) / 20, requires_grad=False)
        self.repeat = repeat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.repeat):
            x = x @ self.weight
        return x


def row(name: str, round_ms: list[float], timed_with: str = "t1") -> TradeoffRow:
    return TradeoffRow(
        name=name,
        run=f"runs/{name}",
        method="float",
        params=10,
        nonzero=10,
        bytes=1000,
        ms_per_batch=sorted(round_ms)[len(round_ms) // 2],
        batch_size=8,
        threads=1,
        device="cpu",
        metric="accuracy",
        quality=0.9,
        split="val",
        samples=100,
        max_batches=0,
        round_ms=tuple(round_ms),
        timed_with=timed_with,
    )


def test_the_same_model_twice_is_no_measurable_difference():
    model, x = Matmuls(1), torch.randn(256, 384)
    figures = time_interleaved([(model, (x,)), (model, (x,))], rounds=15, passes=3)
    assert [len(f) for f in figures] == [15, 15]
    ratio = speed_ratio(*figures)
    # 15 rounds of one model against itself: all on one side of 1.0 by chance with probability 2^-14
    assert not ratio.measurable and ratio.low <= 1.0 <= ratio.high
    table = format_table([row("a", figures[0], "s"), row("b", figures[1], "s")])
    assert "no measurable difference" in table.splitlines()[2]


def test_four_times_the_work_is_slower_and_every_round_says_so():
    x = torch.randn(256, 384)
    figures = time_interleaved([(Matmuls(1), (x,)), (Matmuls(4), (x,))], rounds=9, passes=3)
    ratio = speed_ratio(*figures)
    assert ratio.measurable and ratio.high < 1.0
    assert 0.1 < ratio.median < 0.5  # about a quarter: 4x the matmuls, the same fixed cost per call
    line = format_table([row("one", figures[0], "s"), row("four", figures[1], "s")]).splitlines()[2]
    assert "no measurable difference" not in line and f"{ratio.median:.2f}x [" in line


def test_the_ratio_is_taken_round_by_round():
    # A load burst in round 2 slows both models alike: per round, B is always twice as fast.
    ratio = speed_ratio([10.0, 40.0, 10.0], [5.0, 20.0, 5.0])
    assert ratio == Ratio(2.0, 2.0, 2.0) and ratio.measurable
    assert not Ratio(1.3, 0.98, 1.6).measurable and Ratio(0.7, 0.6, 0.99).measurable
    with pytest.raises(ValueError, match="not timed together"):
        speed_ratio([1.0, 2.0], [1.0])


def test_rows_timed_apart_are_not_compared_round_by_round():
    a, b = row("a", [10.0, 10.0, 10.0], "s1"), row("b", [5.0, 5.0, 5.0], "s2")
    line = format_table([a, b]).splitlines()[2]
    assert "2.00x (timed apart: not compared)" in line
    old = TradeoffRow.from_dict({k: v for k, v in b.to_dict().items() if k not in ("round_ms", "timed_with")})
    assert old is not None and old.round_ms == () and old.timed_with == ""
    assert "timed apart" in format_table([a, old]).splitlines()[2]
    assert "10.00 [10.00–10.00]" in format_table([a, old]).splitlines()[1]


def test_timing_restores_the_thread_count_and_refuses_no_rounds():
    from ember.errors import EmberError

    before = torch.get_num_threads()
    time_interleaved([(Matmuls(1), (torch.randn(4, 384),))], rounds=1, passes=1, threads=1)
    assert torch.get_num_threads() == before
    with pytest.raises(EmberError, match="at least 1 round"):
        time_interleaved([(Matmuls(1), (torch.randn(4, 384),))], rounds=0)
