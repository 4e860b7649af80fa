"""The CPU peak behind MFU: measured robustly once per machine, kept as JSON in the user cache,
the same figure on every later run, and never below what a training-shaped matmul reaches."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ember.training import flops
from ember.training.flops import cpu_peak_flops, peak_cache_path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    return tmp_path / "cpu-peak.json"


def fake_measure(per_thread: float, calls: list):
    """A measurement of ``per_thread`` FLOP/s per thread at 90 % scaling, recording each call."""

    def measure(precision: str) -> float:
        threads = torch.get_num_threads()
        calls.append((precision, threads))
        return per_thread * (1 if threads == 1 else 0.9 * threads)

    return measure


def test_the_peak_is_measured_once_and_read_back_as_json(cache):
    calls = []
    assert peak_cache_path() == cache
    first = cpu_peak_flops("fp32", threads=1, measure=fake_measure(5e10, calls))
    again = cpu_peak_flops("fp32", threads=1, measure=fake_measure(9e10, calls))
    assert first == again == 5e10 and calls == [("fp32", 1)]  # the second run divides by the same figure
    stored = json.loads(cache.read_text())
    (key, entry), *_ = stored["entries"].items()
    assert f"torch {torch.__version__}" in key and "fp32" in key and entry["flops"] == 5e10 and "bursts" in entry["how"]
    stored["entries"][key]["how"] = "one 0.4 s matmul measurement"  # an older ember's: measured again
    cache.write_text(json.dumps(stored))
    assert cpu_peak_flops("fp32", threads=1, measure=fake_measure(6e10, calls)) == 6e10 and len(calls) == 2
    cpu_peak_flops("bf16", threads=1, measure=fake_measure(2e11, calls))
    assert calls[-1] == ("bf16", 1) and len(json.loads(cache.read_text())["entries"]) == 2


def test_several_threads_take_the_larger_of_t_threads_and_t_times_one(cache, monkeypatch):
    monkeypatch.setattr(flops, "usable_cores", lambda: 4)
    calls = []
    before = torch.get_num_threads()
    peak = cpu_peak_flops("fp32", threads=4, measure=fake_measure(5e10, calls))
    assert peak == pytest.approx(4 * 5e10) and sorted(calls) == [("fp32", 1), ("fp32", 4)]
    assert torch.get_num_threads() == before
    # More threads than cores: counted as the cores there are (a 4-core machine's peak is 4 cores').
    assert cpu_peak_flops("fp32", threads=16, measure=fake_measure(1.0, calls)) == pytest.approx(4 * 5e10)


def test_a_damaged_cache_is_measured_again(cache):
    cache.write_text("\x80\x04 not json")  # a pickle's first bytes: never unpickled, just replaced
    calls = []
    assert cpu_peak_flops("fp32", threads=1, measure=fake_measure(3e10, calls)) == 3e10 and calls
    cache.write_text(json.dumps({"format": 1, "entries": {"x": {"flops": "a lot"}}}))
    assert cpu_peak_flops("fp32", threads=1, measure=fake_measure(4e10, calls)) == 4e10
    assert json.loads(cache.read_text())["entries"].keys() == {flops._machine_key("fp32", 1)}


def _best_matmul_flops(m: int, k: int, n: int, tries: int = 5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def test_the_measured_peak_is_at_least_a_training_shaped_matmul(cache):
    peak = cpu_peak_flops("fp32")
    assert peak == cpu_peak_flops("fp32")  # stable: read back, not measured again
    # The demo GPT's MLP (64 x 128 tokens, 128 -> 512) and issue 19's 12 M-parameter shape (8 x 256, 384 -> 1536).
    for m, k, n in ((8192, 128, 512), (2048, 384, 1536)):
        assert peak >= _best_matmul_flops(m, k, n)


def test_the_measured_peak_is_at_least_a_training_shaped_convolution(cache):
    """oneDNN's convolutions can outrun the BLAS matmul on the same CPU (on an AMD EPYC 2.5x): the peak
    includes them, so a CNN's MFU stays under 100 %."""
    peak = cpu_peak_flops("fp32")
    x, w = torch.randn(64, 32, 8, 8), torch.randn(32, 32, 3, 3)  # the digits CNN's layers, a batch of 64
    conv = lambda: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
    conv()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        conv()
        best = min(best, time.perf_counter() - start)
    assert peak >= 2 * 64 * 32 * 32 * 9 * 64 / best


@pytest.mark.parametrize("seconds_per_gflop", [10.0, 0.5, 0.0])
def test_the_convolution_measurement_is_bounded_in_time_however_slow(seconds_per_gflop):
    def slow_conv(x, w, padding):
        time.sleep(seconds_per_gflop * 2 * x.shape[0] * w.shape[0] ** 2 * 9 * x.shape[2] ** 2 / 1e9)
        return x

    start = time.perf_counter()
    assert flops.measure_cpu_conv_flops("bf16", seconds=0.15, conv=slow_conv) > 0
    assert time.perf_counter() - start < 0.15 + 0.2 + 0.05  # the budget, plus one smallest conv at 10 s/GFLOP
