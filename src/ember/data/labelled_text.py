"""Labelled text: rows with a text field and a label (``ember data prepare texts.jsonl --label topic``)
→ token-id shards for text classification.

Rows come from JSONL, CSV, TSV or Parquet files (``ember.data.tables.read_table``). Each text is
tokenised (a byte-level BPE trained on the training split, raw bytes, or a given tokenizer.json) and
cut to ``data.seq_len`` tokens; the shards hold ``tokens`` [n, L] — each row the text's ids, then
zeros up to L (id 0, the separator, never occurs inside a text) — and ``labels`` [n] int64. L is the
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

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ember.data import shards, tables
from ember.data.prepare_job import TRAIN, PrepareJob, fit_codec, report_skipped, stratified_split
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.config import DataConfig
    from ember.data.datasets import Datasets


class LabelledTextPrepare(PrepareJob):
    """Read every row in this process, keep those with text, split by class, tokenise, write the shards."""

    def run(self) -> tuple[dict, int, int]:
        with self.phases.phase("read", len(self.units)) as advance:
            table = tables.read_table([p for u in self.units for p in u.paths])
            advance(len(self.units))
        texts, table, skipped = self.texts(table)
        codes, classes = tables.label_codes(table, self.cfg.label)
        split = stratified_split(codes, self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.seed)
        tables.check_labels_in_training(table, self.cfg.label, codes, np.flatnonzero(split == TRAIN), classes)
        train_texts = [t for t, s in zip(texts, split) if s == TRAIN]
        codec, tok_entry = fit_codec(self.cfg, self.out, lambda: iter(train_texts), self.phases)
        with self.phases.phase("tokenize", 1):
            ids = list(codec.encode_batch(texts))
        lengths = np.array([len(i) for i in ids], dtype=np.int64)
        width = int(min(self.cfg.seq_len, lengths.max()))
        dtype = shards.token_dtype(codec.vocab_size)
        info, truncated, per_class = {}, {}, {}
        for name in self.splits:
            rows = np.flatnonzero(split == shards.SPLITS.index(name))
            writer = shards.ShardWriter(self.out, name, self.cfg.shard_size, {"tokens": dtype, "labels": "int64"})
            writer.write(tokens=padded([ids[i] for i in rows], width, dtype), labels=codes[rows])
            info[name] = {"samples": len(rows), "shards": writer.close()}
            truncated[name] = int((lengths[rows] > width).sum())
            per_class[name] = np.bincount(codes[rows], minlength=len(classes)).tolist()
        stats = {
            "read": {
                "samples": len(table.origins) + len(skipped),
                "bytes": table.bytes,
                "skipped_files": 0,
                "skipped_rows": len(skipped),
                "skipped": [f"{where}: {why}" for where, why in skipped[:50]],  # the first 50 named
            },
            "kept": {s: {"samples": info[s]["samples"]} for s in self.splits},
            "truncated": truncated,
            "class_counts": per_class,
            "tokens_per_text": _percentiles(lengths),
        }
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
            "first_ordinary_id": first_ordinary_id(codec),
            "shard_size": self.cfg.shard_size,
            "splits": info,
            "stats": stats,
        }
        return manifest, 0, 0

    def texts(self, table: tables.Table) -> tuple[list[str], tables.Table, list[tuple[str, str]]]:
        """Each row's text, the table of the rows that have one, and the skipped rows (where, why)."""
        field = self.cfg.text_field
        if field not in table.columns:
            raise EmberError(
                f"The rows have no text field {field!r}; their fields are {list(table.columns)}. Name the text "
                f"with --field (data.text_field), or prepare a table of features with --kind table."
            )
        keep, skipped = [], []
        for i, value in enumerate(table.columns[field]):
            if isinstance(value, str) and value.strip():
                keep.append(i)
            else:
                why = "no text" if tables.is_missing(value) or value == "" else f"{type(value).__name__}, not text"
                skipped.append((table.where(i), f"field {field!r}: {why}"))
        report_skipped(skipped, self.strict, self.phases)
        if not keep:
            raise EmberError(f"No row has text in the field {field!r}. Name the text field with --field.")
        kept = tables.Table(
            columns={name: [cells[i] for i in keep] for name, cells in table.columns.items()},
            origins=[table.origins[i] for i in keep],
            bytes=table.bytes,
        )
        return kept.columns[field], kept, skipped


def first_ordinary_id(codec) -> int:
    """The first id after the special tokens at the start of the vocabulary (id 0 and any after it): what a
    text augmentation may insert from."""
    if codec.tokenizer is None:
        return 1
    special = {i for i, t in codec.tokenizer.get_added_tokens_decoder().items() if t.special}
    first = 1
    while first in special:
        first += 1
    return first


def padded(ids: list[list[int]], width: int, dtype: str) -> np.ndarray:
    """Rows of ids cut to ``width`` and padded with zeros after the text: [n, width]."""
    out = np.zeros((len(ids), width), dtype=dtype)
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
    from ember.data.tokenizer import TextCodec

    (count, arrays), *_ = shards.open_split(data_dir, manifest, "train", verify="size")
    if not count:
        return []
    ids = [int(i) for i in arrays["tokens"][0] if i != 0]
    file = manifest["tokenizer"].get("file")
    codec = TextCodec.from_file(data_dir / file) if file else TextCodec(None)
    label = manifest["classes"][int(arrays["labels"][0])]
    return [f"first training text ({label}):", "  " + codec.decode(ids).replace("\n", "\n  ")]


def labelled_text_sets(cfg: DataConfig, path: Path, manifest: dict) -> Datasets:
    """The splits of a prepared labelled-text directory: batches ``{"x": Long[B, L_batch], "y": Long[B]}``,
    each batch cut to its longest text."""
    from ember.data.datasets import Datasets
    from ember.data.mapped import TokenRows
    from ember.data.spec import DataSpec, named_classes

    train, val, test = (
        TokenRows(path, manifest, split, cfg.verify) if shards.has_split(manifest, split) else None
        for split in ("train", "val", "test")
    )
    spec = DataSpec(
        task="classify",
        num_classes=manifest["num_classes"],
        vocab_size=manifest["vocab_size"],
        input_shape=(manifest.get("max_len", manifest["seq_len"]),),
        seq_len=manifest.get("max_len", manifest["seq_len"]),
        class_names=named_classes(manifest.get("classes"), manifest["num_classes"]),
    )
    tokenizer = path / manifest["tokenizer"]["file"] if manifest["tokenizer"].get("file") else None
    codec_json = tokenizer.read_text() if tokenizer else '{"codec": "bytes"}'
    return Datasets(spec, train, val, train_transform=_augmenter(cfg, manifest), codec_json=codec_json, test=test)


def _augmenter(cfg: DataConfig, manifest: dict):
    """data.text_augment's batch transform for the training split, or None when it is off."""
    augment = getattr(cfg, "text_augment", None)
    if augment is None or not augment.enabled():
        return None
    from ember.data.text_augment import build_text_transform

    return build_text_transform(augment, manifest["vocab_size"], manifest["first_ordinary_id"])
