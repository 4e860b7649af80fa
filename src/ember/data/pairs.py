"""``ember data prepare --kind pairs``: source → target text pairs for a seq2seq model.

Sources are rows (JSONL, CSV/TSV or Parquet) with the fields ``data.source_field`` and
``data.target_field`` (default ``source`` and ``target``), or two aligned plain-text files
(``ember data prepare --kind pairs src.txt tgt.txt``: line i of the first is the source of line
i of the second). Texts are kept as they are (no cleaning, no dedup).

One tokenizer reads both sides: a byte-level BPE trained on the training split's sources and
targets (``data.tokenizer=bpe``, ``data.vocab_size``), raw bytes, or a given ``tokenizer.json``.
Its V ids are followed by three of ember's: pad = V, bos = V + 1, eos = V + 2 (vocab V + 3), so
no text can spell them. Each split's shards hold two arrays:

- ``src`` [n, S]: the source's ids, then pad;
- ``tgt`` [n, T + 1]: bos, the target's ids, eos, then pad. A batch reads
  ``tgt_in = tgt[:, :-1]`` and ``tgt_out = tgt[:, 1:]`` with pad as IGNORE_INDEX.

S = min(data.src_len or data.seq_len, longest source) and T = min(data.seq_len, longest target
+ 1): longer sequences are cut, and counted in stats.json and the prepare summary. The split is
random (``data.seed``, ``val_fraction``, ``test_fraction``). Each file (or the two aligned files) is a
unit of work read and tokenised in a worker process (``--workers``; the same bytes for any number),
and a killed prepare resumes from the units it finished.

The prepare side (``PairsPrepare``) does not import torch; ``pair_sets`` (the reader) does, inside.
``write_sample`` writes the shipped recipe's data: numbers in digits → the same numbers in words.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ember.atomic import atomic_path
from ember.data import shards, sources
from ember.data.prepare_job import (
    TEST,
    TRAIN,
    VAL,
    PrepareJob,
    fit_codec,
    load_npz,
    pack_ids,
    pack_texts,
    save_npz,
    unpack_ids,
    unpack_texts,
    write_text,
)
from ember.data.spec import DataSpec
from ember.data.tokenizer import TextCodec, data_codec, data_codec_json
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.config import DataConfig
    from ember.data.datasets import Datasets

ALIGNED = "aligned-lines"  # the reader of two aligned plain-text files
SPECIALS = 3  # pad, bos, eos after the tokenizer's own ids


def pairs_plan(specs: list[str], exclude: Path | None = None) -> sources.SourcePlan:
    """Two plain-text files: one aligned unit; else every table file of ``specs`` is one unit of rows."""
    from ember.data.tables import READERS

    files = [p for spec in specs for p in sources._expand(spec, exclude)] if specs else []
    if not files:
        raise EmberError("ember data prepare --kind pairs needs sources: a JSONL/CSV/Parquet file, or two text files.")
    plain = [p for p in files if p.suffix.lower() not in READERS]
    if len(files) == 2 and len(plain) == 2:
        return sources.SourcePlan("pairs", [sources.Unit(0, ALIGNED, tuple(str(p) for p in files))])
    if plain:
        raise EmberError(
            f"{plain[0]} is not a table of pairs (ember reads .csv, .tsv, .jsonl and .parquet rows with the source "
            f"and target fields). Give rows, or exactly two aligned plain-text files (sources, then targets)."
        )
    return sources.SourcePlan("pairs", [sources.Unit(i, "rows", (str(p),)) for i, p in enumerate(files)])


# ---- reading ----


def _lines(path: str) -> list[str]:
    try:
        from ember.data.tables import encoding_of

        text = Path(path).read_text(encoding=encoding_of(path))
    except (OSError, UnicodeDecodeError) as err:
        raise EmberError(f"{path} cannot be read as UTF-8 text ({err}). Give two aligned UTF-8 text files.") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it starts none
    return [line.removesuffix("\r") for line in lines]


def read_aligned(src_path: str, tgt_path: str) -> tuple[list, list, list[str]]:
    """(sources, targets, where) of two aligned text files; different line counts are an EmberError."""
    src, tgt = _lines(src_path), _lines(tgt_path)
    if len(src) != len(tgt):
        raise EmberError(
            f"The aligned files differ in length: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)}. Line i "
            f"of the first is the source of line i of the second: give files with one line per pair in each."
        )
    where = [f"line {i} of {src_path} / {tgt_path}" for i in range(1, len(src) + 1)]
    return src, tgt, where


def read_rows(paths: list[str], source_field: str, target_field: str) -> tuple[list, list, list[str]]:
    """(sources, targets, where) of the rows of ``paths``; a field no row has is an EmberError."""
    from ember.data.tables import read_table

    table = read_table(paths, allow_empty=True)  # a file of no rows adds none (all empty: an error)
    if not table.origins:
        return [], [], []
    absent = [f for f in (source_field, target_field) if f not in table.columns]
    if absent:
        raise EmberError(
            f"The pairs in {', '.join(paths)} have no {' or '.join(map(repr, absent))} field; their fields are "
            f"{list(table.columns)}. Name the fields with --source-field and --target-field (data.source_field, "
            f"data.target_field)."
        )
    where = [table.where(i) for i in range(len(table.origins))]
    return table.columns[source_field], table.columns[target_field], where


def check_pairs(src: list, tgt: list, where: list[str], fields: tuple[str, str] | None) -> None:
    """Every source and target must be non-empty text; the first bad row is an EmberError naming it.
    ``fields``: the rows' source and target fields; None for two aligned text files."""
    if not src:
        raise EmberError("The pairs sources hold no pairs (empty files). Give files with one pair per row or line.")
    for k, (side, values) in enumerate((("source", src), ("target", tgt))):
        for i, value in enumerate(values):
            why = _bad_value(value)
            if why:
                bad = sum(_bad_value(v) is not None for v in values)
                fix = (
                    f"fix or remove those rows (write numbers as strings), or name the right field with --{side}-field"
                    if fields
                    else "write a text on that line, or remove the line from both files (they stay aligned)"
                )
                raise EmberError(
                    f"The {side} of {where[i]} {why}" + (f" (field {fields[k]!r})" if fields else "") + f"; {bad} "
                    f"{side}(s) in all are missing, empty or not text. Every pair needs a non-empty text {side}: {fix}."
                )


def _bad_value(value: Any) -> str | None:
    if value is None:
        return "is missing"
    if not isinstance(value, str):
        return f"is not text but {type(value).__name__} {str(value)[:40]!r}"
    if not value.strip():
        return "is empty"
    return None


# ---- splitting, tokenising, padding ----


def random_split(n: int, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Each pair's split code: a random permutation by ``seed``; val first, then test, the rest train."""
    n_val = max(1, round(n * val_fraction))
    n_test = math.ceil(n * test_fraction) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise EmberError(
            f"{n} pair(s) leave none for training after {n_val} for validation and {n_test} for test. Give more "
            f"pairs, or lower data.val_fraction / data.test_fraction."
        )
    order = np.random.default_rng(seed).permutation(n)
    split = np.full(n, TRAIN, dtype=np.int8)
    split[order[:n_val]] = VAL
    split[order[n_val : n_val + n_test]] = TEST
    return split


def pad_rows(ids: list[list[int]], width: int, pad: int, bos: int | None = None, eos: int | None = None) -> np.ndarray:
    """Rows of ``ids`` cut to fit ``width`` with the optional bos/eos around them, then padded."""
    room = width - (bos is not None) - (eos is not None)
    out = np.full((len(ids), width), pad, dtype=np.int64)
    for r, row in enumerate(ids):
        row = ([bos] if bos is not None else []) + list(row[:room]) + ([eos] if eos is not None else [])
        out[r, : len(row)] = row
    return out


class PairsPrepare(PrepareJob):
    """In phases, each unit's work file written atomically under ``OUT/.ember-work/`` so that a killed prepare
    resumes where it stopped: read (parallel, per file: the checked sources and targets), split (random, over
    every pair in file order), tokenizer, tokenise (parallel, per file), shards (in file order). The output
    does not depend on the number of workers."""

    def pairs_path(self, i: int) -> Path:
        return self.work / f"pairs_{i:06d}.npz"

    def ids_path(self, i: int) -> Path:
        return self.work / f"pair_ids_{i:06d}.npz"

    def run(self) -> tuple[dict, int, int]:
        reused = self.read()
        counts = [json.loads(self.pairs_path(u.index).with_suffix(".json").read_text())["pairs"] for u in self.units]
        if not sum(counts):
            raise EmberError("The pairs sources hold no pairs (empty files). Give files with one pair per row or line.")
        split = random_split(sum(counts), self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.seed)
        done = self.work / "tokenizer.done"
        codec, entry = self.tokenizer(split, done.is_file())
        write_text(done, "")
        v = codec.vocab_size
        dtype = shards.token_dtype(v + SPECIALS)
        self.tokenize(codec, dtype)
        src_len, tgt_len = self.lengths()
        s, t = (
            min(self.cfg.src_len or self.cfg.seq_len, int(src_len.max())),
            min(self.cfg.seq_len, int(tgt_len.max()) + 1),
        )
        info = self.write_shards(split, s, t, v, dtype)
        stats = {
            "read": {"samples": sum(counts), "bytes": self.bytes_read(), "skipped_files": 0, "skipped": []},
            "kept": {n: {"samples": info[n]["samples"]} for n in self.splits},
            "truncated": {"sources": int((src_len > s).sum()), "targets": int((tgt_len > t - 1).sum())},
            "longest": {"source": int(src_len.max()), "target": int(tgt_len.max())},
        }
        manifest = {
            "kind": "pairs",
            "dtype": dtype,
            "vocab_size": v + SPECIALS,
            "pad_id": v,
            "bos_id": v + 1,
            "eos_id": v + 2,
            "src_len": s,
            "tgt_len": t,
            "arrays": pair_arrays({"dtype": dtype, "src_len": s, "tgt_len": t}),
            "tokenizer": entry,
            "shard_size": self.cfg.shard_size,
            "splits": info,
            "stats": stats,
        }
        return manifest, reused, 0

    def read(self) -> int:
        """Each unit's checked pairs into its work file (parallel; a finished unit is not read again)."""
        fields = (self.cfg.source_field, self.cfg.target_field)
        done = lambda u: self.pairs_path(u.index).with_suffix(".json")  # noqa: E731
        return self.each_unit("read", done, _read_unit, lambda u: (u, *fields, str(self.pairs_path(u.index))))

    def train_texts(self, split: np.ndarray) -> Iterator[str]:
        """Each training pair's source, then its target, in file order."""
        start = 0
        for u in self.units:
            arrays = load_npz(self.pairs_path(u.index))
            pairs = zip(unpack_texts(arrays, "src"), unpack_texts(arrays, "tgt"))
            for k, (src, tgt) in enumerate(pairs, start=start):
                if split[k] == TRAIN:
                    yield from (src, tgt)
            start += len(arrays["src_offsets"]) - 1

    def tokenize(self, codec: TextCodec, dtype: str) -> None:
        codec_json = codec.to_json()  # one copy of the tokenizer's text for every job
        job = lambda u: (str(self.pairs_path(u.index)), codec_json, dtype, str(self.ids_path(u.index)))  # noqa: E731
        self.each_unit("tokenise", lambda u: self.ids_path(u.index), _tokenize_unit, job)

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Every pair's source and target length in tokens."""
        offsets = [load_npz(self.ids_path(u.index), ("src_offsets", "tgt_offsets")) for u in self.units]
        return tuple(np.concatenate([np.diff(o[f"{side}_offsets"]) for o in offsets]) for side in ("src", "tgt"))

    def write_shards(self, split: np.ndarray, s: int, t: int, v: int, dtype: str) -> dict:
        writers = {
            n: shards.ShardWriter(self.out, n, self.cfg.shard_size, {"src": dtype, "tgt": dtype}) for n in self.splits
        }
        start = 0
        for u in self.units:
            arrays = load_npz(self.ids_path(u.index))
            src, tgt = unpack_ids(arrays, "src"), unpack_ids(arrays, "tgt")
            x, y = pad_rows(src, s, v), pad_rows(tgt, t + 1, v, v + 1, v + 2)
            for name, writer in writers.items():
                mine = np.flatnonzero(split[start : start + len(src)] == shards.SPLITS.index(name))
                writer.write(src=x[mine], tgt=y[mine])
            start += len(src)
        return {
            n: {"samples": int((split == shards.SPLITS.index(n)).sum()), "shards": w.close()}
            for n, w in writers.items()
        }

    def bytes_read(self) -> int:
        return sum(os.path.getsize(p) for u in self.units for p in u.paths)

    def tokenizer(self, split: np.ndarray, reuse: bool) -> tuple[TextCodec, dict]:
        """The codec for both sides and its manifest entry (a BPE's file is OUT/tokenizer.json), leaving room
        for ember's pad, bos and eos after a trained BPE's ids."""
        if self.cfg.tokenizer == "bpe" and self.cfg.vocab_size - SPECIALS < 257 + len(self.cfg.special_tokens):
            raise EmberError(
                f"data.vocab_size={self.cfg.vocab_size} leaves no room for a byte-level BPE of pairs (256 bytes, "
                f"<|endoftext|> and any special tokens, plus ember's pad, bos and eos). Raise --vocab-size to at "
                f"least {260 + len(self.cfg.special_tokens)}, e.g. 1024, or use --tokenizer bytes."
            )
        docs = lambda: self.train_texts(split)  # noqa: E731
        return fit_codec(self.cfg, self.out, docs, self.phases, reuse, vocab_size=self.cfg.vocab_size - SPECIALS)


def _read_unit(unit: sources.Unit, source_field: str, target_field: str, path: str) -> int:
    """Worker: one unit's sources and targets, checked (a bad pair is an EmberError naming it), into
    ``path`` (npz) and a json record of the count. Torch-free, like every prepare worker."""
    if unit.reader == ALIGNED:
        src, tgt, where = read_aligned(*unit.paths)
        fields = None
    else:
        src, tgt, where = read_rows(list(unit.paths), source_field, target_field)
        fields = (source_field, target_field)
    if src:
        check_pairs(src, tgt, where, fields)
    save_npz(Path(path), {**pack_texts(src, "src"), **pack_texts(tgt, "tgt")})
    write_text(Path(path).with_suffix(".json"), json.dumps({"pairs": len(src)}))  # last: marks the unit done
    return len(src)


def _tokenize_unit(pairs_path: str, codec_json: str, dtype: str, path: str) -> None:
    """Worker: the ids of one unit's sources and targets."""
    from ember.data.tokenizer import codec_from_json

    codec, arrays = codec_from_json(codec_json), load_npz(Path(pairs_path))
    src, tgt = (list(codec.encode_batch(unpack_texts(arrays, side))) for side in ("src", "tgt"))
    save_npz(Path(path), {**pack_ids(src, dtype, "src"), **pack_ids(tgt, dtype, "tgt")})


def summary(manifest: dict) -> list[str]:
    """What prepare decided about the pairs' lengths, for the CLI: never silent about a cut sequence."""
    cut, longest = manifest["stats"]["truncated"], manifest["stats"]["longest"]
    return [
        f"pairs: vocab {manifest['vocab_size']:,} (pad {manifest['pad_id']}, bos {manifest['bos_id']}, eos "
        f"{manifest['eos_id']}); sources padded to {manifest['src_len']} tokens (longest {longest['source']}), "
        f"targets to {manifest['tgt_len']} (longest {longest['target']} + eos)",
        f"truncated: {cut['sources']} source(s), {cut['targets']} target(s)"
        + (" (raise data.src_len / data.seq_len to keep them whole)" if cut["sources"] or cut["targets"] else ""),
    ]


def first_pair(data_dir: Path, manifest: dict) -> list[str]:
    """The first training pair as its texts (what the ids decode to), for ``ember data inspect``."""
    codec = data_codec(data_dir, manifest)
    record = manifest["splits"]["train"]["shards"][0]
    texts = []
    for name, width in (("src", manifest["src_len"]), ("tgt", manifest["tgt_len"] + 1)):
        ids = np.fromfile(Path(data_dir) / record["files"][name]["file"], dtype=manifest["dtype"], count=width)
        texts.append(codec.decode([int(i) for i in ids if i < manifest["pad_id"]]))
    return [f"first training pair: {texts[0]!r} -> {texts[1]!r}"]


# ---- reading prepared pairs (torch) ----


def pair_arrays(manifest: dict) -> dict:
    """The shards' arrays: ``src`` [n, S] and ``tgt`` [n, T + 1] ids (``shards.open_split`` reads them)."""
    dtype = manifest["dtype"]
    return {
        "src": {"dtype": dtype, "shape": [manifest["src_len"]]},
        "tgt": {"dtype": dtype, "shape": [manifest["tgt_len"] + 1]},
    }


def pair_spec(manifest: dict) -> DataSpec:
    """The seq2seq DataSpec of a prepared pairs directory, from its manifest alone."""
    return DataSpec(
        task="seq2seq",
        vocab_size=manifest["vocab_size"],
        seq_len=manifest["tgt_len"],
        src_len=manifest["src_len"],
        pad_id=manifest["pad_id"],
        bos_id=manifest["bos_id"],
        eos_id=manifest["eos_id"],
    )


def pair_sets(cfg: DataConfig, path: Path, manifest: dict) -> Datasets:
    """A prepared pairs directory as seq2seq datasets; the codec travels with the run (tokenizer.json)."""
    from ember.data.datasets import Datasets

    if cfg.augment.enabled():
        raise EmberError(f"data.augment transforms images; {path} holds text pairs. Remove data.augment for it.")
    from ember.data.mapped import PairRows

    manifest = {**manifest, "arrays": pair_arrays(manifest)}  # sets prepared before manifests named them
    train, val, test = (
        PairRows(path, manifest, split, cfg.verify) if shards.has_split(manifest, split) else None
        for split in ("train", "val", "test")
    )
    spec = pair_spec(manifest)
    codec_json = data_codec_json(path, manifest)
    return Datasets(spec, train, val, codec_json=codec_json, test=test)


# ---- the shipped sample: numbers in digits → words ----

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
_ONES += "seventeen eighteen nineteen"
ONES = _ONES.split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """``n`` (0 ≤ n < 10**6) in English words: 4027 → "four thousand twenty seven"."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))


def write_sample(out: Path, seed: int = 0, count: int = 8000, high: int = 100_000) -> Path:
    """Write the shipped recipe's pairs to ``out`` (JSONL): ``count`` distinct numbers below ``high``, drawn
    with ``seed`` so that every number of digits is as likely (small numbers are not rare); source: the
    digits, space-separated ("4 0 2 7"); target: the words ("four thousand twenty seven")."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    widths = len(str(high - 1))
    count = min(count, high)
    numbers: dict[int, None] = {}  # distinct, in the order drawn
    while len(numbers) < count:
        digits = rng.integers(1, widths + 1, size=count)
        low = np.where(digits == 1, 0, 10 ** (digits - 1))
        for n in rng.integers(low, np.minimum(10**digits, high)).tolist():
            if len(numbers) < count:
                numbers.setdefault(n)
    rows = [{"source": " ".join(str(n)), "target": number_words(n)} for n in numbers]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out
