"""Peak FLOP/s of the device, for model FLOPs utilisation (MFU).

MFU = model FLOPs per item × items per second / peak FLOP/s. The peak is the
recipe's ``train.peak_flops`` when given; else a table of dense tensor-core
peaks for known GPUs (vendor figures, no sparsity); else, on the CPU, a short
matmul measurement — so on the CPU "MFU" is relative to what this machine
reached in a large matmul, not a vendor number.
"""

from __future__ import annotations

import time

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


def measure_cpu_peak_flops(precision: str, size: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul in the training dtype, best of a few runs."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=dtype, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    a @ b  # warm up the kernel choice
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, precision: str, given: float = 0.0) -> float:
    """The peak MFU is measured against; 0 means unknown (MFU is then not reported)."""
    if given > 0:
        return given
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    return measure_cpu_peak_flops(precision)
