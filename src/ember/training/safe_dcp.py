"""Reading a ``torch.distributed.checkpoint`` directory without running code from it.

DCP's own ``FileSystemReader`` unpickles the index (``.metadata``) with plain
``pickle.load``, and its ``DefaultLoadPlanner`` reads every non-tensor entry (the
optimiser's ``param_groups``: learning rates, betas, parameter names) with
``torch.load(weights_only=False)``. Either runs whatever a crafted file asks for, and
the checkpoint's sha256 record does not help: whoever crafts the files writes the
record too. So ember reads checkpoints through

- ``read_index``: a ``pickle.Unpickler`` whose ``find_class`` hands out only the DCP
  metadata classes, ``torch.Size``, torch dtypes and layouts and a path class — the
  objects a real index holds — and refuses every other global; the result must be a
  ``Metadata`` whose storage entries name plain files inside the checkpoint;
- ``SafeLoadPlanner``: non-tensor entries through ``torch.load(weights_only=True)``
  (tensors already load that way in DCP's reader).

Example::

    dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(path))
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from ember.errors import EmberError

INDEX = ".metadata"
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# Every global a DCP index refers to (found by unpickling real single-process and sharded
# indexes written by torch 2.13); none of them does more than build a value when called
# with the arguments a pickle can give it.
_ALLOWED = {
    (_DCP_METADATA, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup of torch.strided & co. by name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib", "Path"),  # StorageMeta.checkpoint_id
}


class _IndexUnpickler(pickle.Unpickler):
    """Hands out only the classes a DCP index is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a checkpoint index never holds")


class _BadIndex(Exception):
    """Why a file is not a checkpoint index (internal: callers get an EmberError or the reason)."""


def _problem(path: Path, why: str) -> EmberError:
    return EmberError(
        f"{path} is not a valid checkpoint index ({why}); ember does not load it, since a crafted index could "
        f"run code. The checkpoint was not written by ember or has been altered: resume from another checkpoint "
        f"(--resume PATH), or start a new run directory."
    )


def read_index(checkpoint: Path) -> Metadata:
    """The checkpoint's DCP index, unpickled with only the metadata classes allowed."""
    path = Path(checkpoint) / INDEX
    try:
        return _load_index(path)
    except _BadIndex as err:
        raise _problem(path, str(err)) from None


def index_problem(checkpoint: Path) -> str | None:
    """None when the checkpoint's index reads as DCP metadata, else why it does not."""
    try:
        _load_index(Path(checkpoint) / INDEX)
    except _BadIndex as err:
        return f"its DCP index ({INDEX}) is not a valid checkpoint index: {err}"
    return None


def _load_index(path: Path) -> Metadata:
    try:
        with open(path, "rb") as f:
            metadata = _IndexUnpickler(f).load()
    except FileNotFoundError:
        raise _BadIndex("it is missing") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        RuntimeError,
        MemoryError,
        UnicodeDecodeError,
        OverflowError,
        OSError,
    ) as err:
        raise _BadIndex(str(err) or type(err).__name__) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise _BadIndex(f"it holds a {type(metadata).__name__}, not DCP metadata")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise _BadIndex("it has no storage table")
    for info in storage.values():
        ok = (
            isinstance(info, _StorageInfo)
            and isinstance(info.relative_path, str)
            and Path(info.relative_path).name == info.relative_path
            and info.relative_path not in ("", ".", "..")
            and isinstance(info.offset, int)
            and isinstance(info.length, int)
            and info.offset >= 0
            and info.length >= 0
        )
        if not ok:  # a shard outside the checkpoint (../../x) is never read
            raise _BadIndex(f"a storage entry is malformed or points outside the checkpoint: {info!r:.200}")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader with the index read by ``read_index``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank indexes: ember never writes them
            raise _problem(Path(self.path) / f"__{kwargs['rank']}{INDEX}", "ember writes one index per checkpoint")
        metadata = read_index(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader does
        return metadata


def refused_global(err: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, without the rest of torch's text (which
    suggests retrying with ``weights_only=False``: exactly what must not be done here)."""
    lines = [line.strip().rstrip(".") for line in str(err).splitlines()]
    return next((line for line in lines if "unsupported" in line.lower()), "not plain tensors and values")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner with non-tensor entries loaded as ``weights_only`` data."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__()
        self.checkpoint = Path(checkpoint)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            found = refused_global(err)
            raise EmberError(
                f"Checkpoint {self.checkpoint}: the entry {read_item.dest_index.fqn} holds objects a checkpoint never "
                f"holds ({found}); ember does not load it, since it could run code. The checkpoint was not written "
                f"by ember or has been altered: resume from another checkpoint (--resume PATH), or start a new run "
                f"directory."
            ) from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes does
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
