"""Checkpoints: atomic writes, an integrity record, newest-valid discovery.

A checkpoint is ``checkpoints/step_00000100.pt`` (``torch.save`` of plain
tensors and containers) plus ``step_00000100.json`` holding its size and
sha256. The ``.pt`` is written to a temporary name, flushed to disk and
renamed (``ember.atomic``); the ``.json`` is written the same way afterwards.
So a crash at any moment leaves either a complete, verifiable pair or a
``.pt`` with no record, which is never loaded. Loading uses ``weights_only=True``: a checkpoint cannot
run code.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember.atomic import atomic_path, sha256_file, write_text_atomic
from ember.errors import EmberError

CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def save_checkpoint(state: dict, directory: Path, step: int, keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``; keep the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    final.with_suffix(".json").unlink(missing_ok=True)  # rewriting a step: its old record must not vouch for the new file
    with atomic_path(final) as tmp:
        torch.save(state, tmp)
    write_json_atomic(final.with_suffix(".json"), {"step": step, "bytes": final.stat().st_size, "sha256": sha256_file(final)})
    for old in list_checkpoints(directory)[:-keep]:
        if old == final:
            continue
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, oldest first (by step, not by file time)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is complete and intact, else the reason it is not."""
    record_path = path.with_suffix(".json")
    if not path.is_file():
        return "the file does not exist"
    if not record_path.is_file():
        return "it has no integrity record (the write was interrupted)"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return "its integrity record is unreadable"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"it is {size} bytes but was written as {record.get('bytes')} (truncated?)"
    if sha256_file(path) != record.get("sha256"):
        return "its sha256 does not match the one recorded at write time (corrupted)"
    return None


def latest_valid_checkpoint(directory: Path) -> Path | None:
    """Newest checkpoint that verifies; each invalid newer one is named in a warning."""
    for path in reversed(list_checkpoints(directory)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"Skipping checkpoint {path}: {problem}.", stacklevel=2)
    return None


def load_checkpoint(path: Path) -> dict:
    """Verify and load one checkpoint on the CPU; a bad one is an EmberError, never loaded."""
    problem = verify_checkpoint(path)
    if problem is not None:
        raise EmberError(
            f"Checkpoint {path} cannot be used: {problem}. Resume from an older checkpoint in the same "
            f"folder (--resume PATH) or let --resume auto pick the newest valid one."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Every RNG a training step may draw from, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
