"""The device a run uses and how deterministic its kernels are: ``train.device`` (auto, cpu, cuda)
as a ``torch.device``, and ``train.deterministic`` applied to torch's global switches. Every command
that picks a device imports it from here, not from the training loop."""

from __future__ import annotations

import os

import torch

from ember.errors import EmberError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EmberError(
            "train.device=cuda but PyTorch sees no CUDA device. Use train.device=auto or cpu, or install a CUDA build of torch."
        )
    return torch.device(name)


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """torch's global switches as ``train.deterministic`` asks; ``train`` gives the caller's back when
    it ends (``ember.training.process_state``)."""
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    if deterministic or torch.are_deterministic_algorithms_enabled():  # the call itself imports inductor (~1 s)
        torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    if device.type == "cuda" and not deterministic:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
