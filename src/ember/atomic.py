"""Atomic file writes: a reader (or a resumed run) sees the old file or the whole
new one, never a part. Every file ember writes that something later trusts —
checkpoints, their records, exported weights, the recipe, caches — goes through here.

>>> with atomic_path(Path("runs/x/model.safetensors")) as tmp:
...     save_file(tensors, tmp)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path, durable: bool = True) -> Iterator[Path]:
    """Yield a unique temporary path beside ``final``; when the block succeeds, flush it
    and rename it over ``final`` (``durable`` also syncs the directory); when it fails,
    remove it, so a full disk leaves no half file behind."""
    final = Path(final)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=final.name + ".", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are ordinary outputs
        if durable:
            _fsync(tmp)
        os.replace(tmp, final)
        if durable:
            _fsync(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, durable: bool = True) -> None:
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 4 MiB blocks (checkpoints, shards, tokenizers)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
