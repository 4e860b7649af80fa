"""Mixed precision: which autocast to enter and whether a grad scaler is needed.

bf16 autocast works on the CPU and on CUDA and needs no scaling. fp16 has a
narrow exponent range, so its gradients go through a ``GradScaler`` (CUDA
only). fp32 runs without autocast; the scaler is then a disabled no-op, so the
loop has one code path for all three.

bf16 on a CPU without native bf16 instructions (see ``ember.hardware``) still works, but
oneDNN emulates it 10-1000x slower than fp32: ``autocast_factory`` warns once per process,
and the recurrent models run their LSTM/GRU in fp32 there (``ember.hardware.fp32_recurrence``).

``train.precision: auto`` picks by hardware (``resolve_precision``): bf16 where the device does
it natively (a GPU of compute capability 8.0 or later, a CPU with avx512_bf16 or amx_bf16), fp16
with a scaler on Volta and Turing GPUs, fp32 otherwise. The run resolves it once, says which and
why in its header, and records the answer in model.json and its checkpoints; the saved recipe
keeps ``auto``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ember import hardware
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.config import Recipe

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_WARNED: set[str] = set()  # reasons already warned about in this process


@dataclass(frozen=True)
class ResolvedPrecision:
    """The precision a run computes in; ``reason`` says why ``auto`` chose it (empty when the recipe named it)."""

    precision: str
    reason: str = ""

    def describe(self, requested: str) -> str:
        """The header's words: ``bf16``, or ``bf16 (precision auto: this CPU has amx_bf16)``."""
        if requested != "auto":
            return self.precision
        return f"{self.precision} (precision auto: {self.reason})"


def with_precision(recipe: Recipe, precision: str) -> Recipe:
    """``recipe`` with ``train.precision`` set, for what sizes and lays out a run (memory, fsdp dtypes);
    the recipe saved with the run keeps the user's value."""
    if recipe.train.precision == precision:
        return recipe
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": precision})})


def resolve_precision(requested: str, device: torch.device) -> ResolvedPrecision:
    """``requested`` as it stands, or for ``auto`` what ``device`` runs fastest without losing range:
    bf16 where it is native, fp16 (with a loss scaler) on GPUs with fp16 tensor cores but no bf16, else fp32."""
    if requested != "auto":
        return ResolvedPrecision(requested)
    if device.type == "cuda":
        return _cuda_precision(device)
    if device.type == "cpu":
        support = hardware.cpu_bf16_support()
        if not support.native:
            return ResolvedPrecision("fp32", f"{support.reason}: bf16 would be emulated, many times slower")
        have = sorted(hardware.cpu_flags() & {*hardware.X86_BF16_FLAGS, hardware.ARM_BF16_FLAG})
        return ResolvedPrecision("bf16", f"this CPU has {' and '.join(have) or 'native bf16'}")
    return ResolvedPrecision("fp32", f"ember runs bf16 and fp16 on CPUs and CUDA GPUs, not on {device.type}")


def _cuda_precision(device: torch.device) -> ResolvedPrecision:
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return ResolvedPrecision("bf16", f"{name}, compute capability {major}.{minor}, does bf16 natively")
    if major >= 7:  # Volta and Turing: fp16 tensor cores, no bf16
        return ResolvedPrecision(
            "fp16", f"{name}, compute capability {major}.{minor}, has fp16 tensor cores but no bf16"
        )
    return ResolvedPrecision("fp32", f"{name}, compute capability {major}.{minor}, has no tensor cores")


class SlowPrecisionWarning(UserWarning):
    """The recipe's precision is emulated on this device: correct, but much slower than fp32."""


def warn_if_emulated_bf16(precision: str, device: torch.device) -> bool:
    """Warn (once per process) when bf16 on this CPU is emulated; True when it is."""
    if precision != "bf16" or device.type != "cpu":
        return False
    support = hardware.cpu_bf16_support()
    if support.native:
        return False
    if support.reason not in _WARNED:
        _WARNED.add(support.reason)
        warnings.warn(
            f"train.precision=bf16 on a CPU without native bf16: {support.reason}, so PyTorch emulates bf16 "
            f"and its matmuls run many times slower than fp32 (recurrent layers run in fp32 here). "
            f"Set train.precision=fp32 on this machine, or train on a CPU with avx512_bf16/amx_bf16 or a GPU.",
            SlowPrecisionWarning,
            stacklevel=3,
        )
    return True


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument function returning the context to run forward passes in (``auto`` resolved for ``device``)."""
    precision = resolve_precision(precision, device).precision
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise EmberError(
            "train.precision=fp16 needs a CUDA device (fp16 on the CPU is slow and needs loss scaling). "
            "Use train.precision=bf16 on the CPU, or run on a GPU."
        )
    # including_emulation=False: by default torch answers True on pre-Ampere GPUs (V100, T4), which only emulate bf16.
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise EmberError(
            f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no native bf16 (it needs compute "
            f"capability 8.0, Ampere, or later; PyTorch would emulate bf16 many times slower than fp32). "
            f"Use train.precision=fp16 on this GPU."
        )
    warn_if_emulated_bf16(precision, device)
    dtype = AUTOCAST_DTYPES[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def build_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Enabled only for fp16 (``auto`` resolved for ``device``); disabled scalers pass losses and steps straight through."""
    return torch.amp.GradScaler(device.type, enabled=resolve_precision(precision, device).precision == "fp16")
