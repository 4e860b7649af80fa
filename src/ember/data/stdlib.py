"""A byte-level text corpus made of the running Python's standard library source.

Every machine that runs ember has it, so nothing is downloaded. Files are read in
sorted path order and joined with a NUL byte (source files contain none); token ids
are the bytes themselves (vocab_size 256). A file goes to validation by a stable hash
of its relative path and the data seed, so the split does not depend on ``max_bytes``.

The built arrays are cached as ``.npy`` under ``$EMBER_CACHE`` (default
``~/.cache/ember``), keyed by Python version and parameters; the second build is a load.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from torch import Tensor

from ember.atomic import atomic_path

if TYPE_CHECKING:
    from ember.config import DataConfig

SEPARATOR = b"\x00"
VOCAB_SIZE = 256
MIN_VAL_BYTES = 1 << 20  # with max_bytes set, val keeps at least 1 MiB so its loss is not noise
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
_FORMAT = 1  # bump when the corpus layout changes, to invalidate old caches


def encode(text: str) -> list[int]:
    """Text → token ids (its UTF-8 bytes)."""
    return list(text.encode("utf-8"))


def decode(ids: Iterable[int]) -> str:
    """Token ids → text; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return bytes(ids).decode("utf-8", errors="replace")


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


def _file_hash(rel: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per file; the smallest ones go to val."""
    digest = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _join(docs: Iterable[bytes], cap: int) -> np.ndarray:
    """Join documents with the separator, stopping once ``cap`` bytes are reached (0 = no cap)."""
    parts, total = [], 0
    for doc in docs:
        if parts:
            parts.append(SEPARATOR)
            total += 1
        parts.append(doc)
        total += len(doc)
        if cap and total >= cap:
            break
    data = b"".join(parts)
    return np.frombuffer(data[:cap] if cap else data, dtype=np.uint8).copy()


def build_corpus(seed: int, val_fraction: float, max_bytes: int, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read and split the stdlib: (train bytes, val bytes) as uint8 arrays."""
    docs = {}
    for rel, path in stdlib_files(root):
        try:
            text = path.read_bytes()
        except OSError:
            continue  # unreadable: skip, it would not change the corpus much
        if SEPARATOR not in text and text.strip():  # empty __init__.py files add nothing
            docs[rel] = text
    by_hash = sorted(docs, key=lambda rel: _file_hash(rel, seed))
    val_names = set(by_hash[: max(1, round(val_fraction * len(docs)))])
    train = _join((docs[r] for r in sorted(docs) if r not in val_names), max_bytes)
    val_cap = max(MIN_VAL_BYTES, int(max_bytes * val_fraction)) if max_bytes else 0
    val = _join((docs[r] for r in sorted(val_names)), val_cap)
    return train, val


def cache_dir() -> Path:
    return Path(os.environ.get("EMBER_CACHE") or "~/.cache/ember").expanduser()


def _save_atomic(path: Path, array: np.ndarray) -> None:
    # Readers (and other ranks building at the same time) see no file or a whole one.
    with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def load_corpus(cfg: "DataConfig") -> tuple[Tensor, Tensor]:
    """(train, val) uint8 token tensors for ``cfg``, built once and then read from the cache."""
    version = ".".join(map(str, sys.version_info[:3]))
    key = f"stdlib-v{_FORMAT}-py{version}-seed{cfg.seed}-val{cfg.val_fraction}-max{cfg.max_bytes}"
    paths = {split: cache_dir() / f"{key}.{split}.npy" for split in ("train", "val")}
    if not all(p.is_file() for p in paths.values()):
        print(f"ember: building the stdlib corpus cache in {cache_dir()} (first run only)", file=sys.stderr)
        arrays = dict(zip(("train", "val"), build_corpus(cfg.seed, cfg.val_fraction, cfg.max_bytes)))
        cache_dir().mkdir(parents=True, exist_ok=True)
        for split, path in paths.items():
            _save_atomic(path, arrays[split])
    return torch.from_numpy(np.load(paths["train"])), torch.from_numpy(np.load(paths["val"]))
