"""Ctrl-C without losing work: the first SIGINT (or a scheduler's SIGTERM) asks the
loop to stop at the next step boundary, where a checkpoint is consistent; a second
one interrupts at once."""

from __future__ import annotations

import signal
import threading

import torch

from ember.training.distributed import all_reduce_


class StopRequest:
    """Context manager; ``requested`` turns True after the first Ctrl-C."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, distributed: bool, sync: bool, device: torch.device) -> bool:
        """Whether the run stops here, the same on every rank: in one process, as soon as asked; with
        several, only at ``sync`` steps (log, validation, checkpoint), where all ranks decide together."""
        if not distributed:
            return self.requested
        if not sync:
            return False
        return bool(all_reduce_(torch.tensor(int(self.requested), device=device), "max").item())
