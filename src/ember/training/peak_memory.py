"""The peak memory a run has used so far, for every log line: ``peak_rss_mb``, the most resident
memory (RSS) the training process has held, and on CUDA ``cuda_peak_mb``, the most memory
PyTorch's allocator has handed out on the device (``torch.cuda.max_memory_allocated``; the
caching allocator's reserve and the CUDA context come on top). Both in MiB and both the
maximum over the ranks of a distributed job (the rank closest to running out is the one that
matters). RSS counts the main process only, not data-loader workers; it is None where the OS
has no ``getrusage`` (Windows).

Example::

    peak_memory(torch.device("cpu"))  # {'peak_rss_mb': 812.4}
"""

from __future__ import annotations

import sys

import torch

from ember.training.distributed import all_reduce_

MIB = 2**20


def peak_rss_mb() -> float | None:
    """This process's peak resident set size in MiB, or None where it cannot be read."""
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux and BSD


def peak_memory(device: torch.device, over_ranks: bool = False) -> dict[str, float | None]:
    """``peak_rss_mb`` (and ``cuda_peak_mb`` on CUDA), the maximum over all ranks with ``over_ranks``
    (a collective: every rank must call it)."""
    rss = peak_rss_mb()
    figures = [rss if rss is not None else -1.0]
    if device.type == "cuda":
        figures.append(torch.cuda.max_memory_allocated(device) / MIB)
    if over_ranks:
        figures = all_reduce_(torch.tensor(figures, dtype=torch.float64, device=device), "max").tolist()
    fields = {"peak_rss_mb": round(figures[0], 1) if figures[0] >= 0 else None}
    if device.type == "cuda":
        fields["cuda_peak_mb"] = round(figures[1], 1)
    return fields
