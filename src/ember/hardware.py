"""What this machine can do: native bf16 on the CPU, and free memory on a device; and the CPU's
model name, which keys the peak FLOP/s ``ember.training.flops`` measures once per machine.

Both answers change what a run does (bf16 warnings, the recurrent layers' dtype, the
memory check before a model is built), and both depend on the machine a test happens
to land on. So the raw readings are small functions (``cpu_flags``, ``onednn_bf16``,
``meminfo_available``, ``cgroup_available``) that tests monkeypatch, and the decisions
(``cpu_bf16_support``, ``available_memory``) look them up at call time.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

# x86 instructions that make bf16 matmuls fast; without them oneDNN converts to fp32 and back
# in software, and a bf16 matmul runs 10-1000x slower than the fp32 one.
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_BF16_FLAG = "bf16"  # aarch64 /proc/cpuinfo "Features" (BFDOT, BFMMLA)


@dataclass(frozen=True)
class Bf16Support:
    """Whether bf16 runs natively on this CPU; ``reason`` says why not (empty when it does)."""

    native: bool
    reason: str = ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 "flags", aarch64 "Features"); empty when they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset(_darwin_flags())
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_model_name() -> str:
    """The CPU's model name (x86 "model name", else the machine type): part of the key a measured peak is kept under."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model name", "Hardware"):
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _darwin_flags() -> set[str]:
    """macOS has no /proc: Apple silicon reports bf16 (M2 and later) through sysctl."""
    if platform.system() != "Darwin":
        return set()
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return set()
    return {ARM_BF16_FLAG} if out.stdout.strip() == "1" else set()


@functools.cache
def onednn_bf16() -> bool:
    """Whether PyTorch's oneDNN will use bf16 kernels: False when the ISA oneDNN may use is capped
    below them (``ONEDNN_MAX_CPU_ISA=AVX2``) even on a CPU that has the instructions."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: nothing to cap
        return True


def cpu_bf16_support() -> Bf16Support:
    """Native bf16 on this CPU: the instructions are there and oneDNN may use them."""
    flags = cpu_flags()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        if not flags & set(X86_BF16_FLAGS):
            return Bf16Support(False, f"this CPU has neither {' nor '.join(X86_BF16_FLAGS)} instructions")
    elif machine in ("aarch64", "arm64"):
        if ARM_BF16_FLAG not in flags:
            return Bf16Support(False, f"this {machine} CPU does not report the {ARM_BF16_FLAG} feature")
    else:
        return Bf16Support(False, f"ember knows no bf16 instructions on a {machine or 'unknown'} CPU")
    if not onednn_bf16():
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
        cap = f" (ONEDNN_MAX_CPU_ISA={isa})" if isa else ""
        return Bf16Support(False, f"PyTorch's oneDNN may not use this CPU's bf16 instructions{cap}")
    return Bf16Support(True)


def fp32_recurrence(x: torch.Tensor) -> bool:
    """Whether a recurrent layer given ``x`` must leave bf16 autocast and run in fp32: on a CPU
    without native bf16, oneDNN has no LSTM primitive for bf16 (it fails to create one) and an
    emulated one would be slow."""
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not _native_bf16()
    )


def _native_bf16() -> bool:
    return cpu_bf16_support().native


# A compiled model reads /proc once and keeps the answer: torch.compiler.assume_constant_result's
# mark, set without calling it, because the call imports torch._dynamo (with FSDP and DTensor,
# seconds) in every program that imports ember. tests/test_hardware.py checks the mark is torch's.
_native_bf16._dynamo_marked_constant = True  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- free memory


def meminfo_available() -> int | None:
    """Linux's estimate of the bytes new allocations can get without swapping (MemAvailable),
    else free physical pages (``os.sysconf``), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the figure is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def cgroup_available() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, else v1), None without a limit:
    a container is killed at its limit long before the machine runs out."""
    root = Path("/sys/fs/cgroup")
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
            return None
        return max(0, int(limit) - usage)
    return None


def available_memory(device: torch.device) -> int | None:
    """Bytes a new run can still allocate on ``device``; None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    figures = [b for b in (meminfo_available(), cgroup_available()) if b is not None]
    return min(figures, default=None)
