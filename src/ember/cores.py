"""How many CPU cores this process may use: the scheduler's affinity mask where the OS has one
(a container or ``taskset`` may grant fewer than the machine has), else the machine's count.

Kept free of torch, so data-preparation workers can ask without importing it.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (at least 1).

    >>> usable_cores() >= 1
    True
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
