"""Example sources of every kind ``ember data prepare`` reads, written offline from data every machine has
(``ember data sample KIND --out PATH``): a file to try a kind on, and the shape to give one's own data.

- ``table``: scikit-learn's bundled breast cancer table as a CSV (30 numeric columns, label ``diagnosis``:
  malignant/benign);
- ``labelled-text``: a JSONL of Python functions from this Python's standard library, each labelled with
  the package it comes from (``text``, ``package``): nine packages, 200–1,000 functions each;
- ``pairs``: a JSONL of numbers as digits (``source``) and in words (``target``), for seq2seq;
- ``captions``: a folder of 8x8 digit PNGs (one sub-folder per class) and ``captions.jsonl``, for clip;
- ``instruct``: a JSONL of instructions built from the same functions (``prompt``: "What is this
  function called?" and its source without the name's line; ``response``: its name), for fine-tuning a
  language model on answers only;
- ``hf-llama``: a small Llama-family checkpoint directory in Hugging Face's format (random weights, a
  Llama-style tokenizer trained on the same functions), for ``init.from_hf`` without the hub.

``write_sample`` returns the arguments that prepare it (``ember data prepare ARGS --out DIR``).

Example::

    args = write_sample("labelled-text", Path("stdlib-functions.jsonl"))  # [path, "--label", "package"]
"""

from __future__ import annotations

import ast
import csv
import json
import sysconfig
from collections.abc import Callable
from pathlib import Path

from ember.atomic import atomic_path
from ember.errors import EmberError

# Packages of the standard library with a few hundred functions each in every Python since 3.10.
PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "urllib", "xml")
MAX_CHARS = 1500  # a function's source is cut here: the long tail would only slow the example down


def _table(out: Path, seed: int) -> list[str]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [str(n) for n in data.target_names]
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*data.feature_names, "diagnosis"])
        for row, label in zip(data.data, data.target):
            writer.writerow([*(f"{v:.6g}" for v in row), names[label]])
    return [str(out), "--label", "diagnosis"]


def stdlib_functions(root: str | None = None) -> list[dict]:
    """Every function (and method) of the ``PACKAGES``, outside their tests: its source, cut to
    ``MAX_CHARS``, and its package; in sorted file order."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    rows = []
    for package in PACKAGES:
        for path in sorted((base / package).rglob("*.py")):
            if {"test", "tests"} & set(path.relative_to(base).parts):
                continue
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue
            lines = source.splitlines(keepends=True)  # ast.get_source_segment splits the file on every call
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    text = "".join(lines[node.lineno - 1 : node.end_lineno]).strip()
                    if text:
                        rows.append({"text": text[:MAX_CHARS], "package": package})
    return rows


def _write_jsonl(out: Path, rows: list[dict]) -> None:
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _labelled_text(out: Path, seed: int) -> list[str]:
    _write_jsonl(out, stdlib_functions())
    return [str(out), "--label", "package"]


def function_name_rows(limit: int = 4000, chars: int = 300) -> list[dict]:
    """Instructions from the standard library's functions: the body of a function (its ``def`` line left
    out, cut to ``chars``) and its parameters as the prompt, the function's name as the response."""
    rows = []
    for row in stdlib_functions():
        head, _, body = row["text"].partition("\n")
        name = head.split("def ", 1)[-1].split("(", 1)[0].strip()
        params = head.partition("(")[2].rpartition(")")[0]
        if name.isidentifier() and body.strip():
            prompt = f"Name the function that takes ({params}) and runs:\n{body[:chars]}"
            rows.append({"prompt": prompt, "response": name})
        if len(rows) == limit:
            break
    return rows


def _instruct(out: Path, seed: int) -> list[str]:
    _write_jsonl(out, function_name_rows())
    return [str(out), "--kind", "instruct"]


def _hf_llama(out: Path, seed: int) -> list[str]:
    from ember.interop.hf_sample import write_llama_sample

    return write_llama_sample(out, [row["text"] for row in stdlib_functions()], seed)


def _pairs(out: Path, seed: int) -> list[str]:
    from ember.data.pairs import write_sample as write_pairs

    return [str(write_pairs(out, seed))]


def _captions(out: Path, seed: int) -> list[str]:
    from ember.data.caption_prepare import write_sample as write_captions

    mapping = write_captions(out, seed)
    return [str(out / "images"), "--captions", str(mapping)]


# kind -> (default file or folder name, writer(out, seed) -> the prepare arguments)
SAMPLES: dict[str, tuple[str, Callable[[Path, int], list[str]]]] = {
    "table": ("breast_cancer.csv", _table),
    "labelled-text": ("stdlib-functions.jsonl", _labelled_text),
    "pairs": ("numbers.jsonl", _pairs),
    "captions": ("digits-captions", _captions),
    "instruct": ("function-names.jsonl", _instruct),
    "hf-llama": ("tiny-llama", _hf_llama),
}


def write_sample(kind: str, out: Path, seed: int = 0) -> list[str]:
    """Write the example source of ``kind`` to ``out`` (a file, or a folder for captions); returns the
    arguments that prepare it: ``ember data prepare *args --out DIR``."""
    if kind not in SAMPLES:
        raise EmberError(f"There is no sample of kind {kind!r}; the kinds are {', '.join(SAMPLES)}.")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return SAMPLES[kind][1](out, seed)


def next_steps(kind: str, out: Path, args: list[str]) -> list[str]:
    """What ``ember data sample`` prints after writing ``out``: how to use it."""
    if kind == "hf-llama":
        return [
            f"wrote {out}: a small random Llama checkpoint in Hugging Face's format; start a run from it with",
            f"  init: {{from_hf: {out}}}   and data prepared with   --tokenizer {out}/tokenizer.json",
        ]
    return [
        f"wrote {out}: an example {kind} source; prepare it with",
        f"  ember data prepare {' '.join(args)} --out data/{out.stem}",
    ]
