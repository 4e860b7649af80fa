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
    top = str(Path(root or sysconfig.get_paths()["stdlib"]))
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        # One relative path per directory, not per file: every run on the bundled set lists these.
        rel = os.path.relpath(dirpath, top)
        prefix = "" if rel == os.curdir else rel.replace(os.sep, "/") + "/"
        here = Path(dirpath)
        found += [(prefix + name, here / name) for name in filenames if name.endswith(".py")]
    return sorted(found)


def cache_dir() -> Path:
    return Path(os.environ.get("EMBER_CACHE") or "~/.cache/ember").expanduser()
