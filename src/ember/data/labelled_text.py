"""Labelled text: rows with a text field and a label (``ember data prepare texts.jsonl --label topic``)
→ token-id shards for text classification.

Rows come from JSONL, CSV, TSV, Parquet or Arrow files (``ember.data.tables.read_table``), one file
per unit of work: files are read and tokenised in parallel (``--workers``), and a killed prepare
resumes from the units it finished. Each text is
tokenised (a byte-level BPE trained on the training split, raw bytes, or a given tokenizer.json) and
cut to ``data.seq_len`` tokens; the shards hold ``tokens`` [n, L] — each row the text's ids, then
the manifest's ``pad_id`` up to L (a special id, which never occurs inside a text: 0 for ember's own
tokenizers) — and ``labels`` [n] int64. L is the
longest text after the cut, so short texts do not pay for ``seq_len``. The split is stratified by
class as for images and tables; a class absent from training is refused.

A row whose text is missing, empty or not text is skipped and counted (named in the summary), or
refused with ``--strict``; a missing label is always refused (tables.label_codes says which row).
Truncated texts are counted per split.

This module does not import torch at its top (prepare runs it without torch); ``labelled_text_sets``
builds the training-side datasets.

Example::

    from ember.config import DataConfig
    prepare(["texts.jsonl"], "data/texts", DataConfig(label="topic", seq_len=128))
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ember.data import shards, tables
from ember.data.prepare_job import (
    TRAIN,
    PrepareJob,
    fit_codec,
    load_npz,
    pack_ids,
    pack_texts,
    report_skipped,
    save_npz,
    stratified_split,
    unpack_ids,
    unpack_texts,
    write_text,
)
from ember.data.tokenizer import TextCodec, data_codec, data_codec_json
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.config import DataConfig
    from ember.data.datasets import Datasets
    from ember.data.spec import DataSpec


class LabelledTextPrepare(PrepareJob):
    """In phases, each unit's work file written atomically under ``OUT/.ember-work/`` so that a killed prepare
    resumes where it stopped: read (parallel, per file: each row's text and label), split (in order: the
    classes and a stratified split of every row), tokenizer (trained on the training texts), tokenise
    (parallel, per file), shards (in file order). The output does not depend on the number of workers."""

    def rows_path(self, i: int) -> Path:
        return self.work / f"rows_{i:06d}.npz"

    def ids_path(self, i: int) -> Path:
        return self.work / f"ids_{i:06d}.npz"

    def run(self) -> tuple[dict, int, int]:
        reused = self.read()
        table, skipped = self.labels()
        report_skipped(skipped, self.strict, self.phases)
        if not table.origins:
            raise EmberError(f"No row has text in the field {self.cfg.text_field!r}. Name the text field with --field.")
        codes, classes = tables.label_codes(table, self.cfg.label)
        split = stratified_split(codes, self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.seed)
        tables.check_labels_in_training(table, self.cfg.label, codes, np.flatnonzero(split == TRAIN), classes)
        done = self.work / "tokenizer.done"
        codec, tok_entry = fit_codec(self.cfg, self.out, lambda: self.train_texts(split), self.phases, done.is_file())
        write_text(done, "")
        dtype = shards.token_dtype(codec.vocab_size)
        self.tokenize(codec, dtype)
        pad_id = tok_entry["pad_id"]
        lengths = np.concatenate(
            [np.diff(load_npz(self.ids_path(u.index), ("ids_offsets",))["ids_offsets"]) for u in self.units]
        )
        width = int(min(self.cfg.seq_len, lengths.max()))
        info = self.write_shards(codes, split, width, dtype, pad_id)
        stats = self.stats(table, skipped, info, codes, split, lengths, width, len(classes))
        manifest = {
            "kind": "labelled-text",
            "label": self.cfg.label,
            "text_field": self.cfg.text_field,
            "num_classes": len(classes),
            "classes": classes,
            "vocab_size": codec.vocab_size,
            "dtype": dtype,
            "seq_len": width,  # the shards' width: the longest text kept
            "max_len": self.cfg.seq_len,  # the setting: the model's input length, the same for any data prepared so
            "arrays": {"tokens": {"dtype": dtype, "shape": [width]}, "labels": {"dtype": "int64", "shape": []}},
            "tokenizer": tok_entry,
            "ordinary_ids": list(ordinary_ids(codec)),
            "pad_id": tok_entry["pad_id"],  # what fills each row after its text
            "shard_size": self.cfg.shard_size,
            "splits": info,
            "stats": stats,
        }
        return manifest, reused, 0

    def read(self) -> int:
        """Each unit's texts and labels into its work file (parallel; a finished unit is not read again)."""
        fields = (self.cfg.text_field, self.cfg.label)
        done = lambda u: self.rows_path(u.index).with_suffix(".json")  # noqa: E731
        return self.each_unit("read", done, _read_unit, lambda u: (u, *fields, str(self.rows_path(u.index))))

    def labels(self) -> tuple[tables.Table, list[tuple[str, str]]]:
        """A table of the label of every row with text (in unit order, each row's origin kept for messages),
        and the skipped rows (where, why)."""
        table, skipped = tables.Table(columns={self.cfg.label: []}), []
        for u in self.units:
            record = json.loads(self.rows_path(u.index).with_suffix(".json").read_text())
            table.columns[self.cfg.label] += record["labels"]
            table.origins += [(record["path"], row) for row in record["rows"]]
            table.bytes += record["bytes"]
            skipped += [tuple(s) for s in record["skipped"]]
        return table, skipped

    def train_texts(self, split: np.ndarray) -> Iterator[str]:
        start = 0
        for u in self.units:
            texts = unpack_texts(load_npz(self.rows_path(u.index)))
            yield from (t for t, s in zip(texts, split[start : start + len(texts)]) if s == TRAIN)
            start += len(texts)

    def tokenize(self, codec: TextCodec, dtype: str) -> None:
        codec_json = codec.to_json()  # one copy of the tokenizer's text for every job
        job = lambda u: (str(self.rows_path(u.index)), codec_json, dtype, str(self.ids_path(u.index)))  # noqa: E731
        self.each_unit("tokenize", lambda u: self.ids_path(u.index), _tokenize_unit, job)

    def write_shards(self, codes: np.ndarray, split: np.ndarray, width: int, dtype: str, pad_id: int) -> dict:
        dtypes = {"tokens": dtype, "labels": "int64"}
        writers = {name: shards.ShardWriter(self.out, name, self.cfg.shard_size, dtypes) for name in self.splits}
        start = 0
        with self.phases.phase("shards", len(self.units)) as advance:
            for u in self.units:
                rows = unpack_ids(load_npz(self.ids_path(u.index)))
                for name, writer in writers.items():
                    mine = np.flatnonzero(split[start : start + len(rows)] == shards.SPLITS.index(name))
                    writer.write(
                        tokens=padded([rows[i] for i in mine], width, dtype, pad_id), labels=codes[start + mine]
                    )
                start += len(rows)
                advance()
        return {
            name: {"samples": int((split == shards.SPLITS.index(name)).sum()), "shards": w.close()}
            for name, w in writers.items()
        }

    def stats(self, table, skipped, info, codes, split, lengths, width, n_classes) -> dict:
        in_split = {name: split == shards.SPLITS.index(name) for name in self.splits}
        return {
            "read": {
                "samples": len(table.origins) + len(skipped),
                "bytes": table.bytes,
                "skipped_files": 0,
                "skipped_rows": len(skipped),
                "skipped": [f"{where}: {why}" for where, why in skipped[:50]],  # the first 50 named
            },
            "kept": {s: {"samples": info[s]["samples"]} for s in self.splits},
            "truncated": {s: int((lengths[m] > width).sum()) for s, m in in_split.items()},
            "class_counts": {s: np.bincount(codes[m], minlength=n_classes).tolist() for s, m in in_split.items()},
            "tokens_per_text": _percentiles(lengths),
        }


def _read_unit(unit, text_field: str, label: str, path: str) -> int:
    """Worker: the texts (UTF-8 bytes and offsets, npz) and, in a json record, the labels and row numbers of
    the rows with text and the skipped rows of one file. Torch-free, like every prepare worker."""
    source = unit.paths[0]
    table = tables.read_table([source], allow_empty=True)  # a file of no rows adds none (all empty: an error)
    if table.origins and text_field not in table.columns:
        raise EmberError(
            f"The rows of {source} have no text field {text_field!r}; their fields are {list(table.columns)}. Name "
            f"the text with --field (data.text_field), or prepare a table of features with --kind table."
        )
    keep, skipped = [], []
    for i, value in enumerate(table.columns[text_field]):
        if isinstance(value, str) and value.strip():
            keep.append(i)
        else:
            why = "no text" if tables.is_missing(value) or value == "" else f"{type(value).__name__}, not text"
            skipped.append((table.where(i), f"field {text_field!r}: {why}"))
    save_npz(Path(path), pack_texts([table.columns[text_field][i] for i in keep]))
    if table.origins and label not in table.columns:
        raise EmberError(
            f"The label column {label!r} is not in the rows of {source}; their fields are {list(table.columns)}. "
            f"Name one of them with --label."
        )
    labels = table.columns.get(label, [])
    record = {
        "path": source,
        "rows": [table.origins[i][1] for i in keep],
        "labels": [labels[i] for i in keep],
        "bytes": table.bytes,
        "skipped": skipped,
    }
    write_text(Path(path).with_suffix(".json"), json.dumps(record))  # last: marks the unit done
    return len(keep)


def _tokenize_unit(rows_path: str, codec_json: str, dtype: str, path: str) -> None:
    """Worker: the ids of one unit's texts, back to back, and each text's offset."""
    from ember.data.tokenizer import codec_from_json

    ids = list(codec_from_json(codec_json).encode_batch(unpack_texts(load_npz(Path(rows_path)))))
    save_npz(Path(path), pack_ids(ids, dtype))


def ordinary_ids(codec) -> tuple[int, int]:
    """[lo, hi): the ids between the special tokens at the start of the vocabulary and those at its end
    (ember's BPE: after <|endoftext|>; GPT-2's: before it; Llama's: after <unk>, <s>, </s>): what a text
    augmentation may insert from, never a special or padding id."""
    if codec.tokenizer is None:
        return 1, 256
    special = {i for i, t in codec.tokenizer.get_added_tokens_decoder().items() if t.special}
    lo, hi = 0, codec.vocab_size
    while lo in special:
        lo += 1
    while hi - 1 in special and hi - 1 > lo:
        hi -= 1
    return lo, hi


def padded(ids: list[list[int]], width: int, dtype: str, pad_id: int = 0) -> np.ndarray:
    """Rows of ids cut to ``width`` and filled with ``pad_id`` after the text: [n, width]."""
    out = np.full((len(ids), width), pad_id, dtype=dtype)
    for row, seq in enumerate(ids):
        seq = seq[:width]
        out[row, : len(seq)] = seq
    return out


def _percentiles(lengths: np.ndarray) -> dict:
    q = np.percentile(lengths, [50, 90, 99]) if len(lengths) else [0, 0, 0]
    return {"p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]), "max": int(lengths.max(initial=0))}


def summary(m: dict) -> list[str]:
    """What prepare decided, for the CLI: classes, length cut, skipped rows."""
    st = m["stats"]
    t = st["tokens_per_text"]
    lines = [
        f"labelled text: {m['num_classes']} classes of {m['label']!r}: {', '.join(m['classes'])}",
        f"tokens per text: median {t['p50']}, p90 {t['p90']}, max {t['max']}; rows cut to {m['seq_len']}",
    ]
    cut = {s: n for s, n in st["truncated"].items() if n}
    if cut:
        lines.append(
            "truncated to data.seq_len: "
            + ", ".join(f"{n} {s}" for s, n in cut.items())
            + " text(s) (raise --set seq_len=N to keep more)"
        )
    if st["read"]["skipped_rows"]:
        lines.append(f"skipped {st['read']['skipped_rows']} row(s) without text (named in stats.json)")
    return lines


def first_text(data_dir: Path, manifest: dict) -> list[str]:
    """The first training text as its tokens decode, and its label, for ``ember data inspect``."""
    (count, arrays), *_ = shards.open_split(data_dir, manifest, "train", verify="size")
    if not count:
        return []
    ids = [int(i) for i in arrays["tokens"][0] if i != manifest.get("pad_id", 0)]
    codec = data_codec(data_dir, manifest)
    label = manifest["classes"][int(arrays["labels"][0])]
    return [f"first training text ({label}):", "  " + codec.decode(ids).replace("\n", "\n  ")]


def labelled_text_sets(cfg: DataConfig, path: Path, manifest: dict) -> Datasets:
    """The splits of a prepared labelled-text directory: batches ``{"x": Long[B, L_batch], "y": Long[B]}``,
    each batch cut to its longest text."""
    from ember.data.datasets import Datasets
    from ember.data.mapped import TokenRows

    train, val, test = (
        TokenRows(path, manifest, split, cfg.verify) if shards.has_split(manifest, split) else None
        for split in ("train", "val", "test")
    )
    spec = text_spec(manifest)
    codec_json = data_codec_json(path, manifest)
    return Datasets(spec, train, val, train_transform=_augmenter(cfg, manifest), codec_json=codec_json, test=test)


def text_spec(manifest: dict) -> DataSpec:
    """A prepared labelled-text directory's DataSpec: token ids of the prepared length, classes by name."""
    from ember.data.spec import DataSpec, named_classes

    length = manifest.get("max_len", manifest["seq_len"])
    return DataSpec(
        task="classify",
        num_classes=manifest["num_classes"],
        vocab_size=manifest["vocab_size"],
        input_shape=(length,),
        seq_len=length,
        pad_id=manifest.get("pad_id", 0),
        class_names=named_classes(manifest.get("classes"), manifest["num_classes"]),
    )


def _augmenter(cfg: DataConfig, manifest: dict):
    """data.text_augment's batch transform for the training split, or None when it is off."""
    if not cfg.text_augment.enabled():
        return None
    from ember.data.text_augment import build_text_transform

    # sets prepared before ordinary_ids was recorded have only its start, first_ordinary_id
    lo, hi = manifest.get("ordinary_ids") or (manifest["first_ordinary_id"], manifest["vocab_size"])
    return build_text_transform(cfg.text_augment, hi, lo, manifest.get("pad_id", 0))
