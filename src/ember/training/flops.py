"""Peak FLOP/s of the device, for model FLOPs utilisation (MFU).

MFU = model FLOPs per item × items per second / peak FLOP/s. The peak is the
recipe's ``train.peak_flops`` when given; else a table of dense tensor-core
peaks for known GPUs (vendor figures, no sparsity); else, on the CPU, a short
matmul measurement — so on the CPU "MFU" is relative to what this machine
reached in a large matmul, not a vendor number.

The measurement is bounded in time whatever the CPU: where bf16 is emulated a
1024-wide bf16 matmul alone can take seconds, so it starts small and grows the
matrices only while the next size fits the time left. An MFU above 100 % means
the peak was wrong (a measurement disturbed by other work, a wrong
``train.peak_flops``): ``MfuMeter`` then reports none and says so once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# Dense peaks in FLOP/s (vendor figures, no sparsity), matched against torch.cuda.get_device_name.
# fp32 on these GPUs runs on TF32 tensor cores. Longer names first: "L40S" before "L40" before "L4".
GPU_PEAKS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 181e12},
    "L40": {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12},
}


def gpu_peak_flops(name: str, precision: str) -> float:
    """Vendor dense peak for a CUDA device name (longest matching model name), 0 when unknown."""
    for model in sorted(GPU_PEAKS, key=len, reverse=True):
        if model in name:
            return GPU_PEAKS[model].get(precision, 0.0)
    return 0.0


def measure_cpu_peak_flops(
    precision: str,
    size: int = 1024,
    seconds: float = 0.4,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul,
) -> float:
    """FLOP/s of a square matmul in the training dtype, best of the runs that fit in ``seconds``.

    Starts 64 wide and doubles up to ``size`` while the next size's predicted time (the
    fastest of up to three runs at 64, a call's fixed cost, plus 8x the rest of the fastest
    at this size) fits in the first half of the budget; then repeats the largest size while
    a run is still predicted to end before the deadline. ``matmul`` is for tests.
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    n, best, latency = min(64, size), 0.0, None
    a = torch.randn(n, n, dtype=dtype, generator=generator)
    matmul(a, a)  # outside the clock: the first matmul of a process starts the thread pool
    start = time.perf_counter()
    deadline, grow_until = start + seconds, start + seconds / 2
    while True:
        fastest = _timed(matmul, a)
        for _ in range(2):
            if time.perf_counter() + fastest > grow_until:
                break
            fastest = min(fastest, _timed(matmul, a))
        best = max(best, 2 * n**3 / fastest)
        # What a call costs at the smallest size, whatever its work (thread wake-ups: tens of ms
        # on a busy machine): only the rest grows 8x when the size doubles.
        latency = fastest if latency is None else latency
        if n >= size or time.perf_counter() + latency + 8 * max(fastest - latency, 0.0) > grow_until:
            break
        n = min(size, 2 * n)
        a = torch.randn(n, n, dtype=dtype, generator=generator)
    while time.perf_counter() + fastest < deadline:
        fastest = min(fastest, _timed(matmul, a))
    return max(best, 2 * n**3 / fastest)


def _timed(matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor) -> float:
    t0 = time.perf_counter()
    matmul(a, a)
    return max(time.perf_counter() - t0, 1e-9)


class MfuMeter:
    """MFU from a throughput; None when the peak is unknown, or when a figure above 100 %
    shows the peak is wrong (then ``say`` is told why, once, and no MFU is reported again)."""

    def __init__(self, peak: float, say: Callable[[str], None], measured: bool) -> None:
        self.peak, self.say, self.measured = peak, say, measured

    def __call__(self, flops_per_item: float, items_per_s: float) -> float | None:
        if not self.peak:
            return None
        mfu = flops_per_item * items_per_s / self.peak
        if mfu <= 1.0:
            return mfu
        source = (
            "the start-up matmul measurement of this CPU's peak"
            if self.measured
            else "train.peak_flops (or the GPU table)"
        )
        self.say(
            f"MFU not reported: the model ran at {mfu:.0%} of {self.peak:.3g} FLOP/s, so {source} is too "
            f"low. Give the device's peak as train.peak_flops to get an MFU."
        )
        self.peak = 0.0
        return None


def peak_flops(device: torch.device, precision: str, given: float = 0.0) -> float:
    """The peak MFU is measured against; 0 means unknown (MFU is then not reported)."""
    if given > 0:
        return given
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    return measure_cpu_peak_flops(precision)
