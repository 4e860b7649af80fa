"""The bundled text corpus: the running Python's standard library source.

Every machine that runs ember has it, so nothing is downloaded. ``stdlib_files`` lists
the ``*.py`` files (tests and site-packages left out) in sorted path order; ``ember data
prepare stdlib`` reads them like any other directory of text files, and recipes with
``data.name: stdlib`` prepare it once into ``cache_dir()`` (``$EMBER_CACHE``, default
``~/.cache/ember``), keyed by the Python version and the prepare settings.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_files(root: str | None = None) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every stdlib ``*.py`` outside tests and site-packages, sorted."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(base).as_posix(), path))
    return sorted(found)


def cache_dir() -> Path:
    return Path(os.environ.get("EMBER_CACHE") or "~/.cache/ember").expanduser()
