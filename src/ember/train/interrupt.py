"""Ctrl-C without losing work: the first SIGINT asks the loop to stop at the next
step boundary (where a checkpoint is consistent); a second one interrupts at once."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager; ``requested`` turns True after the first Ctrl-C."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
