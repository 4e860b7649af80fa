"""Fixed-size binary shards and the ``manifest.json`` that describes and seals them.

A prepared directory holds, per split (``train``, ``val``, and ``test`` when
``data.test_fraction`` > 0), shards named
``{split}_{i:06d}.{array}.bin``: raw little-endian arrays with no header, so they can be
memory-mapped. Token sets have one array per shard (``tokens``, uint16 or uint32 by
vocabulary size); image sets have two (``images`` [n,C,H,W] and ``labels`` int64 [n]):
images are uint8, or float32 when the manifest says ``"image_dtype": "float32"`` (float
arrays, kept as they are). Every shard but a split's last holds exactly ``shard_size`` items.

``manifest.json`` is written last, atomically: its presence means the set is complete.
It records counts, dtypes, shapes, the sha256 of every file, the tokenizer's hash and the
cleaning and dedup statistics. ``open_split`` refuses a file whose checksum differs.

Example::

    manifest = load_manifest("data/stdlib")
    arrays = open_split("data/stdlib", manifest, "train")   # [(count, {"tokens": memmap})]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ember.atomic import atomic_path, explain_write_errors, read_json, sha256_file, write_text_atomic
from ember.errors import EmberError

MANIFEST = "manifest.json"
WORK = ".ember-work"  # an unfinished prepare's per-unit results, inside the output directory
FORMAT = "ember-shards/1"
SPLITS = ("train", "val", "test")  # in this order; "test" only in sets prepared with test_fraction > 0


def has_split(manifest: dict, split: str) -> bool:
    """Whether the prepared set has ``split`` (sets without a test split have no "test" entry)."""
    return split in manifest["splits"]


def splits_of(manifest: dict) -> list[str]:
    """The splits a prepared set holds, in ``SPLITS`` order."""
    return [s for s in SPLITS if has_split(manifest, s)]


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_file(split: str, index: int, array: str) -> str:
    return f"{split}_{index:06d}.{array}.bin"


def is_shard_file(name: str) -> bool:
    """Whether ``name`` is one ``shard_file`` makes."""
    return _SHARD_FILE.fullmatch(name) is not None


_SHARD_FILE = re.compile(rf"({'|'.join(SPLITS)})_\d{{6}}\.\w+\.bin")


class ShardWriter:
    """Append rows of one or more aligned arrays; cut a shard every ``shard_size`` rows.

    Each shard is written to a temporary file, hashed as it is written, then renamed into
    place; ``on_shard(record)`` is called once it is durable (prepare records it, so a
    resumed prepare skips it). ``done`` lists records of shards an earlier, interrupted run
    already finished: their rows are counted but not written again.
    """

    def __init__(
        self,
        out_dir: Path,
        split: str,
        shard_size: int,
        dtypes: dict[str, str],
        done: list[dict] | None = None,
        on_shard: Callable[[dict], None] = lambda record: None,
    ) -> None:
        self.out_dir, self.split, self.shard_size, self.dtypes = Path(out_dir), split, shard_size, dtypes
        self.records: list[dict] = list(done or [])
        self.on_shard = on_shard
        self._skip = sum(r["count"] for r in self.records)  # rows already in finished shards
        self._pending: dict[str, list[np.ndarray]] = {name: [] for name in dtypes}
        self._pending_rows = 0

    def write(self, **arrays: np.ndarray) -> None:
        rows = len(next(iter(arrays.values())))
        if self._skip:
            drop = min(self._skip, rows)
            arrays = {k: v[drop:] for k, v in arrays.items()}
            self._skip -= drop
            rows -= drop
        if not rows:
            return
        for name, array in arrays.items():
            self._pending[name].append(np.ascontiguousarray(array, dtype=self.dtypes[name]))
        self._pending_rows += rows
        while self._pending_rows >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> list[dict]:
        """Write the last, short shard; return the records of all shards in order."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        return self.records

    def _flush(self, rows: int) -> None:
        index = len(self.records)
        record = {"count": rows, "files": {}}
        for name in self.dtypes:
            joined = np.concatenate(self._pending[name]) if len(self._pending[name]) > 1 else self._pending[name][0]
            head, rest = joined[:rows], joined[rows:]
            self._pending[name] = [rest] if len(rest) else []
            data = head.tobytes()
            path = self.out_dir / shard_file(self.split, index, name)
            with disk_space(path, len(data)), atomic_path(path) as tmp:
                tmp.write_bytes(data)
            record["files"][name] = {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self._pending_rows -= rows
        self.records.append(record)
        self.on_shard(record)


def write_manifest(out_dir: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1) + "\n"
    with disk_space(Path(out_dir) / MANIFEST, len(text.encode())):
        write_text_atomic(Path(out_dir) / MANIFEST, text)


RESUMES = (
    "Nothing written so far is lost: `ember data prepare` resumes where it stopped, keeping every finished "
    "unit and shard."
)


def promises_resume(err: BaseException) -> bool:
    """Whether ``err`` tells the user that the same command resumes (a full disk, a lost Ray worker): the
    unfinished prepare it leaves must then be kept."""
    return RESUMES in str(err)


def disk_space(path: Path, needed: int | None) -> contextlib.AbstractContextManager[None]:
    """Turn a full disk (or a directory not ours to write) while writing ``path`` (``needed`` bytes;
    None around many writes, when the file the error names is reported) into one paragraph that
    says prepare resumes; any other OSError is not the user's to fix here and keeps its traceback."""
    return explain_write_errors(Path(path).name, Path(path), needed, RESUMES)


def load_manifest(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        unfinished = (data_dir / WORK).is_dir()
        hint = (
            "It holds an unfinished prepare: run the same `ember data prepare` command again to finish it."
            if unfinished
            else "Prepare it first: ember data prepare SOURCE... --out " + str(data_dir)
        )
        raise EmberError(f"{data_dir} is not a prepared data set (no {MANIFEST}). {hint}")
    manifest = read_json(path, "Prepare the data again into a new directory.")  # garbage or a pickle: a message
    if manifest.get("format") != FORMAT:
        raise EmberError(
            f"{path} has format {manifest.get('format')!r:.80}; this ember reads {FORMAT!r}. Prepare the data again."
        )
    problem = manifest_problem(manifest)
    if problem:
        raise EmberError(
            f"{path} is malformed: {problem}. It was not written by ember or has been altered; prepare the data "
            f"again into a new directory."
        )
    return manifest


KINDS = ("tokens", "images", "captions", "instruct", "labelled-text", "pairs", "table")
DTYPES = ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64")
DTYPES += ("float16", "float32", "float64")  # what shards hold; never object or text arrays


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 53


def manifest_problem(manifest: dict) -> str | None:
    """What makes ``manifest`` unlike any ember writes (the types and bounds its readers rely on), or None.
    Every shard file must be a plain name inside the directory, every count a non-negative integer."""
    if manifest.get("kind") not in KINDS:
        return f"its kind is {manifest.get('kind')!r:.80}, not one of {', '.join(KINDS)}"
    for key in ("vocab_size", "eot_id", "bos_id", "shard_size", "num_classes"):
        if key in manifest and manifest[key] is not None and not _count(manifest[key]):
            return f"{key} is {manifest[key]!r:.80}, not a non-negative integer"
    for key in ("tokenizer", "stats", "arrays"):
        if key in manifest and not isinstance(manifest[key], dict):
            return f"{key} is a {type(manifest[key]).__name__}, not an object"
    shapes = [manifest["image_shape"]] if "image_shape" in manifest else []
    for name, array in manifest.get("arrays", {}).items():
        if not isinstance(array, dict):
            return f"arrays.{name} is not an object"
        shapes.append(array.get("shape"))
    if any(not isinstance(s, list) or not all(_count(n) for n in s) or len(s) > 8 for s in shapes):
        return "an array shape is not a short list of non-negative integers"
    try:
        dtypes = array_dtypes(manifest)
    except (KeyError, TypeError, AttributeError):
        return "its arrays' dtypes are missing"
    if any(d not in DTYPES for d in dtypes.values()):
        return f"its arrays' dtypes {sorted(map(str, dtypes.values()))} are not all among {', '.join(DTYPES)}"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        return "splits is not an object with a train split"
    for split, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            return f"splits.{split!s:.40}.shards is not a list"
        for i, record in enumerate(shards):
            problem = _record_problem(record)
            if problem:
                return f"splits.{split!s:.40}.shards[{i}] {problem}"
    return None


def _record_problem(record: object) -> str | None:
    if not isinstance(record, dict) or not _count(record.get("count")):
        return "has no count that is a non-negative integer"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return "has no files object"
    for entry in files.values():
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            return f"names the file {name!r:.80}, which is not a plain file name in the directory"
        if not _count(entry.get("bytes")) or not isinstance(entry.get("sha256"), str):
            return f"gives {name} no size in bytes or no sha256"
    return None


def item_shape(manifest: dict, array: str) -> tuple[int, ...]:
    """The shape of one row of ``array``: () for tokens and labels, (C,H,W) for images; a manifest that
    describes its arrays (``"arrays": {name: {"dtype", "shape"}}``) says so itself."""
    if array in manifest.get("arrays", {}):
        return tuple(manifest["arrays"][array]["shape"])
    return tuple(manifest["image_shape"]) if array == "images" else ()


def array_dtypes(manifest: dict) -> dict[str, str]:
    if "arrays" in manifest:
        return {name: a["dtype"] for name, a in manifest["arrays"].items()}
    if manifest["kind"] == "tokens":
        return {"tokens": manifest["dtype"]}
    return {"images": manifest.get("image_dtype", "uint8"), "labels": manifest.get("label_dtype", "int64")}


def check_file(data_dir: Path, entry: dict, full: bool = True) -> str | None:
    """None if the file is whole; else what is wrong with it."""
    path = Path(data_dir) / entry["file"]
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry["bytes"]:
        return f"{path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    if full and sha256_file(path) != entry["sha256"]:
        return "sha256 differs from the manifest (the file was changed or corrupted)"
    return None


def open_split(
    data_dir: str | Path, manifest: dict, split: str, verify: str = "full"
) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Memory-map every shard of ``split``: [(rows, {array: memmap})]. ``verify="full"`` checks
    each file's sha256 first, ``"size"`` only its size; a bad shard is refused by name."""
    data_dir = Path(data_dir)
    if not has_split(manifest, split):
        raise EmberError(
            f"{data_dir} has no {split} split. Prepare the data again with data.test_fraction > 0 "
            f"(e.g. `ember data prepare ... --test-fraction 0.1`) into a new directory."
        )
    dtypes = array_dtypes(manifest)
    shards = []
    for record in manifest["splits"][split]["shards"]:
        arrays = {}
        for name, entry in record["files"].items():
            problem = check_file(data_dir, entry, full=verify == "full")
            if problem:
                raise EmberError(
                    f"The shard {data_dir / entry['file']} is refused: {problem}. Restore it, or prepare the data "
                    f"again into a new directory; `ember data verify {data_dir}` lists every bad shard."
                )
            shape = (record["count"], *item_shape(manifest, name))
            if int(np.prod(shape, dtype=object)) * np.dtype(dtypes[name]).itemsize > entry["bytes"]:
                raise EmberError(
                    f"The shard {data_dir / entry['file']} is refused: {data_dir / MANIFEST} says it holds "
                    f"{record['count']} rows of shape {list(shape[1:])}, more than its {entry['bytes']} bytes. "
                    f"The manifest was altered: prepare the data again into a new directory."
                )
            arrays[name] = np.memmap(data_dir / entry["file"], dtype=dtypes[name], mode="r", shape=shape)
        shards.append((record["count"], arrays))
    return shards


def verify(data_dir: str | Path, on_file: Callable[[str], None] = lambda name: None) -> list[str]:
    """Check every file the manifest lists (and the tokenizer); return the problems found."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    problems = []
    entries = [e for split in manifest["splits"].values() for r in split["shards"] for e in r["files"].values()]
    if manifest.get("tokenizer", {}).get("file"):
        if Path(str(manifest["tokenizer"]["file"])).name != manifest["tokenizer"]["file"]:
            raise EmberError(
                f"{data_dir / MANIFEST} names a tokenizer file outside {data_dir}; prepare the data again."
            )
        entries.append(manifest["tokenizer"])
    for entry in entries:
        problem = check_file(data_dir, entry)
        if problem:
            problems.append(f"{entry['file']}: {problem}")
        on_file(entry["file"])
    return problems


def count_files(manifest: dict) -> int:
    return sum(len(r["files"]) for split in manifest["splits"].values() for r in split["shards"]) + bool(
        manifest.get("tokenizer", {}).get("file")
    )
