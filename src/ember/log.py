"""ember's messages: the ``logging`` loggers they go through, and the console they are shown on.

Every module logs to ``logging.getLogger(__name__)``, a child of the ``"ember"`` logger, so a
program embedding ember decides what it sees with the ``logging`` module alone (a level on
``"ember"``, its own handlers). ember installs no handler of its own unless asked:
``configure_logging`` is what the ``ember`` command calls (``-q``/``-v`` set the level), and
what a script or notebook calls to get the command's output. Without it Python's own rules
apply: warnings and errors reach stderr, information is kept quiet.

Progress bars are a display, not messages: they are drawn on ``console()``, the console the
rich handler writes to (so a log line is printed above the bar, not through it), and only
while the ``"ember"`` logger shows information (``progress_wanted``): ``-q``, or a level of
WARNING set on ``"ember"`` by an embedding program, hides them too.

Example::

    import ember
    ember.configure_logging()  # the CLI's look: rich lines on a terminal, plain ones otherwise
    ember.train(ember.load_recipe("recipes/gpt-tiny.yaml"))
"""

from __future__ import annotations

import logging
import sys
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

ROOT = "ember"
_handler: logging.Handler | None = None  # the one configure_logging installed


@cache
def console() -> Console:
    """The stderr console the rich handler and the progress bars share (``sys.stderr`` as it is
    when written to: a test's capture or a redirect made later is followed)."""
    from rich.console import Console  # imported when a console is first needed: plain commands start faster

    return Console(stderr=True)


class _Format(logging.Formatter):
    """The message as written, warnings and errors prefixed with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


class _Stderr(logging.StreamHandler):
    """A plain handler writing to ``sys.stderr`` as it is at each message (as logging's own last resort)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler's __init__ sets it; sys.stderr is read instead
        pass


def configure_logging(verbosity: int = 0, rich: bool | None = None) -> logging.Handler:
    """Show ember's messages on stderr: WARNING and above at ``verbosity`` -1 (``--quiet``, also no
    progress bars), INFO at 0, DEBUG at 1 (``--verbose``). A rich handler when stderr is a terminal
    (or ``rich=True``), plain lines otherwise. Calling it again replaces the handler it installed;
    returns the handler."""
    global _handler
    logger = logging.getLogger(ROOT)
    if _handler is not None:
        logger.removeHandler(_handler)
    if rich is None:
        rich = console().is_terminal  # as the progress bars decide (FORCE_COLOR, TTY_COMPATIBLE honoured)
    if rich:
        from rich.highlighter import NullHighlighter
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=console(), show_time=False, show_level=False, show_path=False, highlighter=NullHighlighter()
        )
    else:
        handler = _Stderr()
    handler.setFormatter(_Format("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)
    _handler = handler
    return handler


def progress_wanted(logger: logging.Logger) -> bool:
    """Whether a progress bar belongs beside ``logger``'s messages: no level above INFO is set on it
    or on an ember logger above it (the root logger's default WARNING does not count)."""
    node: logging.Logger | None = logger
    while node is not None and (node.name == ROOT or node.name.startswith(ROOT + ".")):
        if node.level:
            return node.level <= logging.INFO
        node = node.parent  # type: ignore[assignment]
    return True
