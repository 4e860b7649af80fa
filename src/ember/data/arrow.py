"""Arrow IPC files as a source: a directory written by Hugging Face ``Dataset.save_to_disk`` and plain
``.arrow`` files, read with pyarrow alone (``datasets`` need not be installed).

``save_to_disk`` writes ``data-00000-of-0000N.arrow`` files (the Arrow IPC *stream* format) beside
``state.json`` and ``dataset_info.json``; ``dataset_sources`` keeps the data files of such a directory
and drops its metadata, and refuses a ``DatasetDict`` directory (``dataset_dict.json`` and one
sub-directory per split), naming its splits. A plain ``.arrow`` file may be an IPC stream or an IPC
file (``ARROW1`` magic); both are read through a memory map, one record batch at a time, decoding
only the columns asked for, so memory stays bounded by a record batch, not by the file. Nothing is
unpickled: the metadata is JSON, and extension types are read as their storage.

This module runs in prepare's worker processes; it does not import torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ember.errors import EmberError

FILE_MAGIC = b"ARROW1"  # the IPC file format starts with it; the stream format does not
METADATA = ("state.json", "dataset_info.json")  # what save_to_disk writes beside its .arrow files
DATASET_DICT = "dataset_dict.json"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401  (pa.ipc is a submodule)
    except ImportError as err:
        raise ImportError("reading Arrow needs pyarrow: pip install 'ember[parquet]'") from err
    return pa


def is_saved_dataset(directory: Path) -> bool:
    """Whether ``directory`` was written by ``Dataset.save_to_disk`` (its state.json lists data files)."""
    try:
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and isinstance(state.get("_data_files"), list)


def dict_splits(directory: Path) -> list[str] | None:
    """The split names of a ``DatasetDict.save_to_disk`` directory (its dataset_dict.json); None if not one."""
    try:
        splits = json.loads((directory / DATASET_DICT).read_text(encoding="utf-8")).get("splits")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(s) for s in splits] if isinstance(splits, list) else None


def refuse_dataset_dict(directory: Path, splits: list[str]) -> None:
    """An EmberError naming the splits of a ``DatasetDict.save_to_disk`` directory."""
    names = ", ".join(splits) or "none listed"
    first = "train" if "train" in splits or not splits else splits[0]
    raise EmberError(
        f"{directory} is a Hugging Face DatasetDict (splits: {names}), not one dataset: ember prepares one "
        f"split at a time and holds out its own val/test split (--val-fraction). Give one split's directory "
        f"as the SOURCE, e.g. {directory / str(first)}, and prepare the others separately if you need them."
    )


def dataset_sources(files: list[Path]) -> list[Path]:
    """``files`` without the metadata of ``save_to_disk`` directories among them (their ``.arrow``
    files stay); a ``DatasetDict`` directory among them is an EmberError naming its splits."""
    for path in files:
        splits = dict_splits(path.parent) if path.name == DATASET_DICT else None
        if splits is not None:
            refuse_dataset_dict(path.parent, splits)
    datasets = {p.parent for p in files if p.name == "state.json" and is_saved_dataset(p.parent)}
    return [p for p in files if not (p.parent in datasets and p.name in METADATA)]


@contextmanager
def _open(path: str | Path, columns: list[str] | None = None):
    """(reader, schema of the whole file, is_file_format); the reader decodes only ``columns``.
    A column ``columns`` names that the file lacks is a KeyError naming the columns it has."""
    pa = _pyarrow()
    with pa.memory_map(str(path), "r") as source:
        is_file = source.read(len(FILE_MAGIC)) == FILE_MAGIC
        source.seek(0)
        opener = pa.ipc.open_file if is_file else pa.ipc.open_stream
        schema = opener(source).schema
        options = None
        if columns is not None:
            absent = [c for c in columns if c not in schema.names]
            if absent:
                raise KeyError(f"no column {absent[0]!r}; its columns are {schema.names}")
            options = pa.ipc.IpcReadOptions(included_fields=[schema.names.index(c) for c in columns])
        source.seek(0)
        yield opener(source, options=options), schema, is_file


def column_names(path: str | Path) -> list[str]:
    """The column names of an Arrow file, from its schema alone."""
    with _open(path) as (_, schema, _):
        return list(schema.names)


def batches(path: str | Path, columns: list[str] | None, span: tuple[int, int] = (0, -1)) -> Iterator:
    """(index, record batch) for the record batches [a, b) of ``span`` (b < 0: to the end), holding only
    ``columns`` (None: all). One batch is in memory at a time; batches are views of the memory map, valid
    while the iteration runs."""
    start, end = span
    with _open(path, columns) as (reader, _, is_file):
        if is_file:
            stop = reader.num_record_batches if end < 0 else min(end, reader.num_record_batches)
            for i in range(start, stop):
                yield i, reader.get_batch(i)
            return
        for i, batch in enumerate(reader):  # a stream: earlier batches are skipped, not decoded into memory
            if end >= 0 and i >= end:
                return
            if i >= start:
                yield i, batch


def batch_spans(path: str | Path, unit_bytes: int) -> list[tuple[int, int]]:
    """The file cut into runs of record batches [a, b) of about ``unit_bytes`` each (at least one
    span). An unreadable file is one span: reading it reports why."""
    try:
        sizes = [batch.nbytes for _, batch in batches(path, None)]
    except (OSError, ValueError, KeyError, TypeError, ImportError, NotImplementedError):
        return [(0, -1)]
    spans, start, size = [], 0, 0
    for i, nbytes in enumerate(sizes):
        size += nbytes
        if size >= unit_bytes:
            spans.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(sizes) or not spans:
        spans.append((start, len(sizes)))
    return spans


def require_column(path: str | Path, name: str) -> None:
    """An EmberError naming the columns of ``path`` when it has no column ``name``; an unreadable file
    passes (reading it later reports why)."""
    try:
        names = column_names(path)
    except (OSError, ValueError, KeyError, TypeError, ImportError, NotImplementedError):
        return
    if name not in names:
        raise EmberError(
            f"{path} has no column {name!r}; its columns are {names}. Name the text column with --field "
            f"(for example --field {names[0] if names else 'text'})."
        )


def class_label_names(schema) -> dict[str, list[str]]:
    """The names of each ``ClassLabel`` column, from the features ``datasets`` stores in the schema's
    metadata (``{"info": {"features": {column: {"_type": "ClassLabel", "names": [...]}}}}``)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return {
        name: [str(n) for n in f["names"]]
        for name, f in features.items()
        if isinstance(f, dict) and f.get("_type") == "ClassLabel" and isinstance(f.get("names"), list)
    }


def _named(rows: list[dict], names: dict[str, list[str]]) -> list[dict]:
    """ClassLabel ids replaced by their names (-1, a missing label, by None), so classes show by name."""
    for column, labels in names.items():
        for row in rows:
            value = row.get(column)
            if isinstance(value, int) and not isinstance(value, bool):
                row[column] = labels[value] if 0 <= value < len(labels) else None
    return rows


def read_rows(path: str | Path, columns: list[str] | None = None) -> list[dict]:
    """Every row of an Arrow file as {column: value}, only ``columns`` (None: all) decoded; a Hugging Face
    ``ClassLabel`` column holds its class names. A missing column or an unreadable file is an EmberError."""
    rows: list[dict] = []
    try:
        with _open(path) as (_, schema, _):
            names = class_label_names(schema)
        for _, batch in batches(path, columns):
            rows += _named(batch.to_pylist(), names)
    except KeyError as err:  # "no column 'x'; its columns are [...]"
        raise EmberError(f"{path} has {err.args[0]}. Name one of them.") from None
    except (OSError, ValueError, TypeError, NotImplementedError) as err:
        raise EmberError(
            f"{path} is not a readable Arrow file ({type(err).__name__}: {err}). Write it again (for example "
            f"with Dataset.save_to_disk), or remove it from the sources."
        ) from None
    return rows
