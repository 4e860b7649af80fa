"""Mixed precision: which autocast to enter and whether a grad scaler is needed.

bf16 autocast works on the CPU and on CUDA and needs no scaling. fp16 has a
narrow exponent range, so its gradients go through a ``GradScaler`` (CUDA
only). fp32 runs without autocast; the scaler is then a disabled no-op, so the
loop has one code path for all three.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from ember.errors import EmberError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_factory(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """A zero-argument function returning the context to run forward passes in."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise EmberError(
            "train.precision=fp16 needs a CUDA device (fp16 on the CPU is slow and needs loss scaling). "
            "Use train.precision=bf16 on the CPU, or run on a GPU."
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EmberError(
            f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support (autocast would "
            f"silently fall back to fp32). Use train.precision=fp16 on this GPU."
        )
    dtype = AUTOCAST_DTYPES[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def build_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Enabled only for fp16; disabled scalers pass losses and steps straight through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
