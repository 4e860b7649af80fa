"""Build a text corpus of a given size, offline and deterministically, for the prepare benchmark.

What it holds, in this order: the Python standard library's own source files (``.py``),
then the source and documentation files of the packages installed beside this Python
(``site-packages``: ``.py``, ``.pyi``, ``.c``, ``.h``, ``.rst``, ``.md``, ``.txt``), each
tree walked in sorted path order. Files that are not UTF-8 or hold a NUL byte are left out.
With torch in the virtual environment that is ~450 MB of unique text; only if a larger
corpus is asked for does it start again from the first file, each repeat changed lightly
and deterministically (in pass k, every 7th line of a file gets the suffix `` # pass k``),
so repeats are near-copies, as in a web crawl, rather than exact ones.

Written as JSONL (one ``{"text": ...}`` object per file) in numbered files of about
``--file-mb`` MB, into a directory that is never committed (``/tmp/ember-corpus`` by
default). The same Python and installed packages give the same bytes.

Run from the repository root::

    .venv/bin/python benchmarks/corpus.py --mb 256 --out /tmp/ember-corpus
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

PACKAGE_SUFFIXES = {".py", ".pyi", ".c", ".h", ".rst", ".md", ".txt"}


def source_files() -> list[Path]:
    """The standard library's .py files, then site-packages' sources and docs, each sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    first = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    second = sorted(p for p in site.rglob("*") if p.suffix in PACKAGE_SUFFIXES and p.is_file())
    return first + second


def _texts(files: list[Path]) -> Iterator[str]:
    for path in files:
        raw = path.read_bytes()
        if not raw or b"\x00" in raw:
            continue
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            continue


def _perturbed(text: str, k: int) -> str:
    """Pass ``k`` of a repeat: every 7th line gets a marker, so it is a near-copy, not an exact one."""
    lines = text.split("\n")
    return "\n".join(line + f" # pass {k}" if i % 7 == 0 else line for i, line in enumerate(lines))


def documents(files: list[Path]) -> Iterator[str]:
    """The files' texts, then (endlessly) perturbed repeats of them."""
    k = 0
    while True:
        for text in _texts(files):
            yield text if k == 0 else _perturbed(text, k)
        k += 1


def build(out: Path, mb: float, file_mb: float = 32.0) -> dict:
    """Write about ``mb`` MB of text (UTF-8 bytes of the documents) into ``out``; return a summary."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("corpus-*.jsonl"):
        old.unlink()
    files = source_files()
    target, per_file = int(mb * 1e6), int(file_mb * 1e6)
    total = docs = index = in_file = 0
    handle = open(out / f"corpus-{index:04d}.jsonl", "w", encoding="utf-8")
    for text in documents(files):
        if total >= target:
            break
        if in_file >= per_file:
            handle.close()
            index, in_file = index + 1, 0
            handle = open(out / f"corpus-{index:04d}.jsonl", "w", encoding="utf-8")
        handle.write(json.dumps({"text": text}) + "\n")
        size = len(text.encode("utf-8"))
        total, docs, in_file = total + size, docs + 1, in_file + size
    handle.close()
    summary = {"documents": docs, "text_bytes": total, "files": index + 1, "python": sys.version.split()[0]}
    (out / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256.0, help="size of the corpus, MB of text")
    parser.add_argument("--out", default="/tmp/ember-corpus")
    parser.add_argument("--file-mb", type=float, default=32.0)
    args = parser.parse_args()
    summary = build(Path(args.out), args.mb, args.file_mb)
    print(f"{summary['text_bytes'] / 1e6:.1f} MB, {summary['documents']} documents in {summary['files']} file(s)")


if __name__ == "__main__":
    main()
