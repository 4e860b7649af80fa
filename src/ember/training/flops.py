"""Peak FLOP/s of the device, for model FLOPs utilisation (MFU).

MFU = model FLOPs per item × items per second / peak FLOP/s. The peak is the
recipe's ``train.peak_flops`` when given; else a table of dense tensor-core
peaks for known GPUs (vendor figures, no sparsity); else, on the CPU, measured
— so on the CPU "MFU" is relative to what this machine reached in dense matmuls
and convolutions in the training dtype, not a vendor number.

The CPU peak (``cpu_peak_flops``) is measured once per machine, torch version,
dtype and thread count and kept in ``cpu-peak.json`` in the user cache directory
(``$EMBER_CACHE``, else ``$XDG_CACHE_HOME/ember``, else ``~/.cache/ember``; JSON,
never a pickle), so every later run divides by the same figure. A measurement taken
while other work runs reads low, and a low peak shows as an MFU that is too high
(81.9 % on a shared 2-core CPU), so it is made robust three ways: several short
bursts, separated by pauses, each keeping its fastest matmul (a burst that lands in
a quiet moment sets the figure); both on one thread and on the run's T threads,
the peak being the larger of the T-thread figure and T × the one-thread figure (a
matmul scales almost linearly over cores, and one thread is far less disturbed by
a busy neighbour than T threads that wait for each other at every barrier; where T
threads share cores, as with SMT, this overestimates the peak and MFU errs low); and
the fastest of two kernels at several sizes — square matmuls 64 to 1024 wide and
matmuls of a transformer's training shapes (the BLAS library's; on an AMX Xeon the
latter ran faster on two threads than the square one) and 3x3 convolutions of a small CNN's shapes (oneDNN's) — because one
library may use the CPU's widest vector units where the other does not: on an AMD EPYC
with AVX-512, MKL's fp32 matmul reached 87 GFLOP/s on one thread and oneDNN's
convolution 230, so a peak from matmuls alone let a CNN run at "more than 100 %".
Flag tables (AVX-512 / AMX width × cores × clock) are not used: in virtual machines
the clock and the cores a process really gets are unreliable. An MFU above 100 % still means the peak
was wrong: ``MfuMeter`` then reports none and says how to measure again.

Each burst is bounded in time whatever the CPU: where bf16 is emulated a
1024-wide bf16 matmul alone can take seconds, so it starts small and grows the
matrices (and the convolutions) only while the next size fits the time left.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ember.atomic import read_json, write_json_atomic
from ember.cores import usable_cores
from ember.errors import EmberError
from ember.hardware import cpu_model_name

BURSTS = 3  # per thread count: one that lands in a quiet moment is enough
BURST_SECONDS = 0.3  # the matmul's share of a burst; the convolution's is measure_cpu_conv_flops's 0.15 s
PAUSE_SECONDS = 0.05  # between bursts: the next one lands in another scheduling window

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


# (m, k, n) of training-shaped matmuls, about as much work as the 1024-wide square one: a transformer's
# MLP in and out (2048 tokens, 384 -> 1536 and back) and a small model's (8192 tokens, 128 -> 512). On
# some CPUs these outrun the square matmul by a third on two threads (MKL splits them better).
GEMM_SHAPES = ((2048, 384, 1536), (2048, 1536, 384), (8192, 128, 512))


def measure_cpu_peak_flops(
    precision: str,
    size: int = 1024,
    seconds: float = 0.4,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul,
) -> float:
    """FLOP/s of a matmul in the training dtype, best of the runs that fit in ``seconds``.

    Starts with a 64-wide square matmul and doubles up to ``size`` while the next size's
    predicted time (the fastest of up to three runs at 64, a call's fixed cost, plus 8x the
    rest of the fastest at this size) fits in the first half of the budget; then, while a
    run is still predicted to end before the deadline, takes turns between the largest
    square and the ``GEMM_SHAPES`` (each predicted from the best FLOP/s so far).
    ``matmul`` is for tests.
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
    operands = [(a, a)] + [
        (torch.randn(m, k, dtype=dtype, generator=generator), torch.randn(k, n_, dtype=dtype, generator=generator))
        for m, k, n_ in GEMM_SHAPES
        if m * k * n_ <= n**3 * 4  # the training shapes only once the square ladder reached their size
    ]
    return _round_robin(matmul, operands, best, deadline)


def _round_robin(
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    operands: list[tuple[torch.Tensor, torch.Tensor]],
    best: float,
    deadline: float,
) -> float:
    """The best FLOP/s of ``matmul`` over ``operands``, taking turns while a run fits before ``deadline``."""
    while True:
        ran = False
        for a, b in operands:
            work = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            if time.perf_counter() + work / best > deadline:
                continue
            best, ran = max(best, work / _timed(matmul, a, b)), True
        if not ran:
            return best


# (batch, channels, side) of 3x3 convolutions, smallest first: the sizes of a small CNN's layers.
CONV_SHAPES = ((16, 32, 8), (64, 32, 8), (64, 64, 8), (32, 128, 8), (32, 128, 16))


def measure_cpu_conv_flops(
    precision: str, seconds: float = 0.15, conv: Callable[..., torch.Tensor] = torch.nn.functional.conv2d
) -> float:
    """FLOP/s of a 3x3 convolution in the training dtype (oneDNN's, where PyTorch has it), best of the runs
    that fit in ``seconds``: up the ``CONV_SHAPES`` while the next shape's predicted time (the last one's
    per FLOP) fits, each shape called once untimed (primitive creation) and up to three times timed.
    ``conv`` is for tests."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    deadline, best, per_flop = time.perf_counter() + seconds, 0.0, None
    for batch, channels, side in CONV_SHAPES:
        flops = 2 * batch * channels * channels * 9 * side * side
        if per_flop is not None and time.perf_counter() + 4 * per_flop * flops > deadline:
            break
        x = torch.randn(batch, channels, side, side, dtype=dtype, generator=generator)
        w = torch.randn(channels, channels, 3, 3, dtype=dtype, generator=generator)
        fastest = _timed(lambda a, b: conv(a, b, padding=1), x, w)  # untimed in effect: the fastest run counts
        for _ in range(3):
            if time.perf_counter() + fastest > deadline:
                break
            fastest = min(fastest, _timed(lambda a, b: conv(a, b, padding=1), x, w))
        best, per_flop = max(best, flops / fastest), fastest / flops
    return best


def _timed(
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor | None = None
) -> float:
    t0 = time.perf_counter()
    matmul(a, a if b is None else b)
    return max(time.perf_counter() - t0, 1e-9)


def cpu_peak_flops(precision: str, threads: int | None = None, measure: Callable[[str], float] | None = None) -> float:
    """The CPU peak for ``precision`` on ``threads`` threads (default: torch's; at most the cores this process
    may use): the larger of the T-thread
    figure and T × the one-thread figure, each read from ``cpu-peak.json`` or measured once and kept there.
    ``measure`` (a precision's best FLOP/s on the current thread count) is for tests."""
    threads = min(threads or torch.get_num_threads(), usable_cores())
    one = _cached_or_measured(precision, 1, measure or _best_of_bursts)
    return max(
        threads * one, _cached_or_measured(precision, threads, measure or _best_of_bursts) if threads > 1 else 0.0
    )


def peak_cache_path() -> Path:
    """Where measured CPU peaks are kept: ``$EMBER_CACHE``, else ``$XDG_CACHE_HOME/ember``, else ``~/.cache/ember``."""
    root = os.environ.get("EMBER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ember"
    return Path(root).expanduser() / "cpu-peak.json"


def _machine_key(precision: str, threads: int) -> str:
    """One entry per machine (host and CPU model), torch version, dtype and thread count."""
    return f"{platform.node()} | {cpu_model_name()} | torch {torch.__version__} | {precision} | {threads} thread(s)"


def _cached_or_measured(precision: str, threads: int, measure: Callable[[str], float]) -> float:
    path, key = peak_cache_path(), _machine_key(precision, threads)
    entries = _read_entries(path)
    if key in entries and entries[key].get("how") == _HOW:  # measured another way by an older ember: again
        return entries[key]["flops"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flops = measure(precision)
    finally:
        torch.set_num_threads(before)
    entries = _read_entries(path)  # another process (a second rank) may have written meanwhile
    entries[key] = {"flops": flops, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "how": _HOW}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"format": 1, "entries": entries})
    except (OSError, EmberError):  # a read-only home: measured again next time, nothing lost but time
        pass
    return flops


_HOW = (
    f"best of {BURSTS} bursts, each square matmuls 64 to 1024 wide, training-shaped matmuls and 3x3 "
    "convolutions (the fastest run)"
)


def _read_entries(path: Path) -> dict[str, dict]:
    """The cache's entries; an unreadable or foreign file counts as empty (it is rewritten)."""
    if not path.is_file():
        return {}
    try:
        entries = read_json(path, "").get("entries", {})
    except EmberError:
        return {}
    ok = isinstance(entries, dict) and all(
        isinstance(e, dict) and isinstance(e.get("flops"), (int, float)) and e["flops"] > 0 for e in entries.values()
    )
    return dict(entries) if ok else {}


def _best_of_bursts(precision: str) -> float:
    best = 0.0
    for i in range(BURSTS):
        if i:
            time.sleep(PAUSE_SECONDS)
        best = max(best, measure_cpu_peak_flops(precision, seconds=BURST_SECONDS), measure_cpu_conv_flops(precision))
    return best


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
            f"this CPU's measured peak (kept in {peak_cache_path()}: delete it to measure again on a quiet machine)"
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
    return cpu_peak_flops(precision)
