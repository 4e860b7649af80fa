"""What a run changes in its process for its own sake, given back when it ends.

A run seeds torch's random number generators (resuming, numpy's and Python's ``random`` too: a
checkpoint holds all three), switches deterministic algorithms, cuDNN's benchmark mode and TF32
as ``train.deterministic`` says, and sets environment variables libraries read
(``CUBLAS_WORKSPACE_CONFIG``, ``KINETO_LOG_LEVEL``). A program that calls ``ember.train`` — a
notebook seeding its own code, a loop of runs — finds all of it as it was before the call once
``train`` returns or raises: ``caller_state_kept`` saves it first and puts it back after. Also
kept: torch's thread count, default dtype and grad mode.

Not kept (the run's very point, or out of reach): the weights of a module given to ``train``,
and its device; a process group the caller started; the random state of GPUs other than the
current one, and CUDA's when CUDA was not started before a run on the CPU or a run of several
processes (reading it would start CUDA there).

Example::

    with caller_state_kept(torch.device("cpu")):
        torch.manual_seed(0)  # the run's seed; the caller's generator state is back after the block
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ember.training.distributed import launched_world_size


@dataclass
class _Switches:
    """torch's global switches a run sets, as plain values."""

    deterministic: bool
    warn_only: bool
    cudnn_benchmark: bool
    cudnn_deterministic: bool
    cudnn_tf32: bool
    matmul_tf32: bool
    matmul_precision: str
    threads: int
    dtype: torch.dtype
    grad: bool

    @classmethod
    def now(cls) -> _Switches:
        return cls(
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision(),
            torch.get_num_threads(),
            torch.get_default_dtype(),
            torch.is_grad_enabled(),
        )

    def restore(self) -> None:
        if _Switches.now() == self:
            return
        if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != (
            self.deterministic,
            self.warn_only,
        ):  # only when changed: the call imports inductor (~1 s)
            torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.backends.cudnn.allow_tf32 = self.cudnn_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.matmul_tf32
        torch.set_float32_matmul_precision(self.matmul_precision)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.set_default_dtype(self.dtype)
        torch.set_grad_enabled(self.grad)


def _cuda_rng_saved(device: torch.device) -> tuple[int, torch.Tensor] | None:
    """(GPU, its generator state) of the current GPU when CUDA is in use already, or when this one
    process's run is about to start it there; None otherwise: reading a GPU's state starts CUDA on it
    (a context on every GPU from every rank, were each GPU read)."""
    if not torch.cuda.is_available():
        return None
    if torch.cuda.is_initialized() or (device.type == "cuda" and launched_world_size() == 1):
        index = torch.cuda.current_device()
        return index, torch.cuda.get_rng_state(index)
    return None


def _restore_environ(saved: dict[str, str]) -> None:
    for name in [name for name in os.environ if name not in saved]:
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


@contextmanager
def caller_state_kept(device: torch.device) -> Iterator[None]:
    """Inside: whatever the run sets. After (returned or raised): the caller's random generators
    (torch's, the current GPU's when CUDA is in use, numpy's, Python's), torch's switches and thread
    count, and the environment, as they were before."""
    torch_rng, cuda_rng = torch.get_rng_state(), _cuda_rng_saved(device)
    numpy_rng, python_rng = np.random.get_state(), random.getstate()
    switches, environ = _Switches.now(), dict(os.environ)
    try:
        yield
    finally:
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng[1], cuda_rng[0])
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)
        switches.restore()
        _restore_environ(environ)
