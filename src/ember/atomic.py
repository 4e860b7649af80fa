"""Atomic file writes: a reader (or a resumed run) sees the old file or the whole
new one, never a part. Every file ember writes that something later trusts —
checkpoints, their records, exported weights, the recipe, caches — goes through here;
``read_json`` reads the JSON ones back, a damaged or foreign file as one message.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as folder:
...     path = Path(folder) / "notes.txt"
...     with atomic_path(path) as tmp:  # e.g. safetensors' save_file(tensors, tmp)
...         _ = tmp.write_text("all or nothing")
...     print(path.read_text())
all or nothing
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ember.errors import EmberError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a directory after a rename in it)."""
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
            fsync_path(tmp)
        os.replace(tmp, final)
        if durable:
            fsync_path(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, durable: bool = True) -> None:
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically (see ``atomic_path``). A result
    dataclass in ``obj`` (e.g. compare's rows inside prune.json) is written as its ``to_dict()``."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_result_as_dict) + "\n")


def _result_as_dict(obj: Any) -> Any:
    if hasattr(obj, "to_dict") and dataclasses.is_dataclass(obj):
        return obj.to_dict()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 4 MiB blocks (checkpoints, shards, tokenizers)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def explain_write_errors(what: str, where: Path, needed: int | None = None, intact: str = "") -> Iterator[None]:
    """Turn a full disk or a directory ember may not write to, met while writing ``what`` into
    ``where``, into one paragraph: the file, the space needed and free, what is still intact
    (``intact``), and the fix. Also finds the OSError inside a DCP ``CheckpointException``."""
    try:
        yield
    except BaseException as raised:
        err = None if isinstance(raised, EmberError) else _os_error_in(raised)  # an inner block's paragraph stands
        if err is None or err.errno not in _NO_SPACE | _NOT_ALLOWED:
            raise
        file = err.filename or where
        kept = f" {intact}" if intact else ""
        if err.errno in _NOT_ALLOWED:
            raise EmberError(
                f"Cannot write {what} to {file}: {err.strerror} (the directory is read-only or not "
                f"yours).{kept} Point the command at a directory you can write to, or fix its "
                f"permissions, and run again."
            ) from None
        size = f"{needed:,} bytes" if needed else "more space"
        free = _free_bytes(Path(where))
        free_text = (
            f"{free:,} bytes are free there" if free is not None else "the free space there could not be measured"
        )
        raise EmberError(
            f"The disk is full: writing {what} failed: {file} needed {size} and {free_text}.{kept} Free "
            f"some space on that disk (or raise the quota, or write to a larger disk), then run the same "
            f"command again."
        ) from None


def _os_error_in(raised: BaseException) -> OSError | None:
    """The OSError behind ``raised``: itself, its cause or context, or a DCP failure's."""
    seen: set[int] = set()
    todo = [raised]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            todo.extend(pair[0] for pair in failures.values() if isinstance(pair, tuple) and pair)
        todo.extend([exc.__cause__, None if exc.__suppress_context__ else exc.__context__])
    return None


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the disk holding ``path`` (or its nearest existing parent); None if unmeasurable."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(candidate).free
    return None


MAX_JSON_BYTES = 256 << 20  # far above any JSON ember writes (a manifest of 100,000 shards is ~30 MB)


def read_json(path: str | Path, fix: str, kind: type = dict, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path`` (a ``kind``, by default an object). A missing, truncated or foreign
    file — another format, a pickle, one larger than ``max_bytes``, nested past Python's stack, or
    with a key twice in one object (plain JSON would silently keep the last) — is an EmberError
    naming the file, the cause and ``fix``; JSON only ever gives back plain values."""
    path = Path(path)
    try:
        if not path.is_file() and path.exists():
            raise EmberError(f"{path} is not a regular file. {fix}")
        size = path.stat().st_size
        if size > max_bytes:
            raise EmberError(
                f"{path} is {size:,} bytes, more than the {max_bytes:,} ember reads from such a file; it was "
                f"not written by ember or has been altered. {fix}"
            )
        value = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except FileNotFoundError:
        raise EmberError(f"{path} does not exist. {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, _DuplicateKey) as err:
        cause = {
            UnicodeDecodeError: "it is not UTF-8 text",
            RecursionError: "it nests deeper than any file ember writes",
        }.get(type(err), f"{err}")
        raise EmberError(
            f"{path} is not valid JSON ({cause}); it may be truncated or not written by ember. {fix}"
        ) from None
    except OSError as err:
        raise EmberError(f"{path} cannot be read ({err.strerror or err}). {fix}") from None
    if not isinstance(value, kind):
        raise EmberError(
            f"{path} holds a JSON {type(value).__name__} where ember wrote a {kind.__name__}; it was "
            f"not written by ember or has been altered. {fix}"
        )
    return value


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"the key {twice!r:.80} appears twice in one object, and only one would be kept")
    return value
