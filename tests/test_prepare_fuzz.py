"""Fuzzing `ember data prepare` (issue #15, DESIGN §6): broken sources either prepare or raise
EmberError, never another exception and never a hang.

Each strategy writes a source (random bytes, broken JSONL, broken CSV, broken PNGs in an image
folder, empty files, junk directories) into a fresh directory and calls ``prepare`` on it with
a tiny vocabulary and small shards. The fast version runs a few examples of each; the slow one
(``-m slow``) many more. A reproducer of each bug found stays as an ``@example``.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ember.config import DataConfig
from ember.data.prepare import prepare
from ember.errors import EmberError

FAST = settings(max_examples=6, deadline=20_000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SLOW = settings(max_examples=150, deadline=20_000, suppress_health_check=[HealthCheck.too_slow])


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"vocab_size": 260, "shard_size": 1024, "val_fraction": 0.2, **kw})


def prepares_or_explains(write, config: DataConfig | None = None, source: str = "src") -> None:
    """Write a source with ``write(root)``, prepare it: success or EmberError, nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        write(root / "src")
        try:
            prepare([str(root / source)], root / "out", config or cfg(), progress=False)
        except EmberError:
            pass


# --- strategies -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)
jsonl_lines = st.one_of(
    st.text(max_size=200).map(lambda t: json.dumps({"text": t}).encode()),
    json_values.map(lambda v: json.dumps({"text": v}).encode()),  # wrong field types
    json_values.map(lambda v: json.dumps(v).encode()),  # non-object lines
    st.text(max_size=60).map(lambda t: json.dumps({"text": t}).encode()[:-3]),  # truncated
    st.sampled_from(
        [
            b'{"text": 1e999999}',
            b'{"text": ' + b"9" * 5000 + b"}",
            b"[" * 5000,
            b'{"text": "\xff\xfe"}',
            b'{"text": "\\ud800"}',
            b"\x00\x00",
            b"",
            b"   ",
        ]
    ),
    st.binary(max_size=80),
)
csv_cells = st.one_of(
    st.text(max_size=30),
    st.sampled_from(['"', '""', '"a,b"', "\x00", "\r\n", "a\nb", ","]),
    st.binary(max_size=10).map(lambda b: b.decode("latin-1")),
)


def png_bytes(seed: int, size: int = 6) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# --- the fuzz tests ---------------------------------------------------------------------------


def _random_files(files: list[bytes]):
    def write(src: Path) -> None:
        for i, data in enumerate(files):
            (src / f"f{i}.txt").write_bytes(data)

    return write


@FAST
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=4))
@example([b""])  # an empty file only
def test_random_bytes_files(files):
    prepares_or_explains(_random_files(files))


def _jsonl(lines: list[bytes], newline: bytes):
    def write(src: Path) -> None:
        (src / "a.jsonl").write_bytes(newline.join(lines))

    return write


@FAST
@given(st.lists(jsonl_lines, min_size=1, max_size=30), st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
@example([b"[" * 5000], b"\n")  # found: json.loads raised RecursionError, which the reader did not catch
def test_broken_jsonl(lines, newline):
    prepares_or_explains(_jsonl(lines, newline), source="src/a.jsonl")


def _csv(header: list[str], rows: list[list[str]]):
    def write(src: Path) -> None:
        text = "\n".join(",".join(r) for r in [header, *rows])
        (src / "a.csv").write_bytes(text.encode("utf-8", "surrogatepass"))

    return write


@FAST
@given(
    st.lists(st.sampled_from(["text", "id", "", '"text"', "text,"]), min_size=1, max_size=3),
    st.lists(st.lists(csv_cells, min_size=0, max_size=4), max_size=20),
)
def test_broken_csv(header, rows):
    prepares_or_explains(_csv(header, rows), source="src/a.csv")


def _image_folder(kinds: list[tuple[str, int, int]]):
    def write(src: Path) -> None:
        for i, (kind, label, cut) in enumerate(kinds):
            folder = src / f"class{label}"
            folder.mkdir(exist_ok=True)
            data = png_bytes(i, size=4 + label)
            if kind == "truncated":
                data = data[: cut % max(1, len(data))]
            elif kind == "junk":
                data = bytes(range(cut % 256)) * 3
            elif kind == "empty":
                data = b""
            (folder / f"{i}.png").write_bytes(data)
        (src / "junk.txt").write_text("not an image")
        (src / "emptydir").mkdir(exist_ok=True)

    return write


@FAST
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["good", "good", "truncated", "junk", "empty"]), st.integers(0, 2), st.integers(0, 400)
        ),
        min_size=1,
        max_size=12,
    )
)
def test_broken_image_folders(kinds):
    prepares_or_explains(_image_folder(kinds), cfg(val_fraction=0.3))


def _junk_tree(names: list[str], data: list[bytes]):
    def write(src: Path) -> None:
        for i, name in enumerate(names):
            path = src / name
            if name.endswith("/"):
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.is_dir():
                    path.write_bytes(data[i % len(data)] if data else b"")

    return write


@FAST
@given(
    st.lists(
        st.sampled_from(
            [
                "a.txt",
                "b.jsonl",
                "c.csv",
                "d.npz",
                "e.parquet",
                "x/",
                "x/y.txt",
                "x/z.png",
                ".hidden",
                "sub/",
                "sub/f.ndjson",
                "empty.txt",
            ]
        ),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.binary(max_size=200), max_size=3),
)
def test_directories_with_junk(names, data):
    prepares_or_explains(_junk_tree(names, data))


def _npz(payload: bytes):
    def write(src: Path) -> None:
        (src / "a.npz").write_bytes(payload)

    return write


@FAST
@given(st.binary(max_size=400))
@example(b"")  # found: np.load raised EOFError, which the reader did not catch
@example(b"PK\x03\x04")  # found: a zip header and nothing else (zipfile.BadZipFile)
def test_broken_npz(payload):
    prepares_or_explains(_npz(payload), source="src/a.npz")


# --- the larger version --------------------------------------------------------------------


@pytest.mark.slow
@SLOW
@given(st.lists(jsonl_lines, min_size=1, max_size=60), st.sampled_from([b"\n", b"\r\n"]))
def test_broken_jsonl_many(lines, newline):
    prepares_or_explains(_jsonl(lines, newline), source="src/a.jsonl")


@pytest.mark.slow
@SLOW
@given(
    st.lists(
        st.tuples(st.sampled_from(["good", "truncated", "junk", "empty"]), st.integers(0, 3), st.integers(0, 400)),
        min_size=1,
        max_size=20,
    )
)
def test_broken_image_folders_many(kinds):
    prepares_or_explains(_image_folder(kinds), cfg(val_fraction=0.3))


@pytest.mark.slow
@SLOW
@given(st.lists(st.binary(max_size=5000), min_size=1, max_size=6))
def test_random_bytes_files_many(files):
    prepares_or_explains(_random_files(files))
