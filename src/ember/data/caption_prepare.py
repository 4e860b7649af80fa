"""``ember data prepare FOLDER --captions FILE`` (kind ``captions``): images paired with captions, for
image–text contrastive training (model ``clip``; the reading side is ``ember.data.captions``).

The sources are image folders: one sub-folder per class (its name is the class name the zero-shot
prompts use, see ``data.prompt``), or a flat folder of images (no classes). The captions file maps
image files to captions: JSONL (one object per line) or CSV/TSV with a header, its file column
``file``, ``image``, ``path``, ``filename``, ... (or ``data.image_field``) and its caption column
``caption``, ``text``, ... (or ``--field``). A file name is looked up relative to the captions file,
then to each source folder (or taken as it is when absolute). An image named on several lines has
several captions: every pair is a training sample; validation and test score each image once, with
its first caption.

Images are read as the image kind reads a folder (grey or RGB, resized to the first image's size);
captions are tokenised (a BPE trained on the training captions, raw bytes, or a given tokenizer.json)
and padded on the right with the tokenizer's padding id (0, ``<|endoftext|>``, for ember's own) to the longest caption, at most ``data.seq_len``
tokens (a longer one is cut; the count is in stats.json). The split is stratified by class, per
image; the per-channel mean and std come from the training images. A listed image that is absent,
an image without a caption, an empty caption and an unreadable image are each skipped and counted
(``--strict``: refused, by name).

``write_sample(out)`` writes such a folder and captions file from the bundled digits, offline.

This module does not import torch (prepare's worker processes import it).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ember.data import shards, sources, tables
from ember.data.prepare_job import TRAIN, PrepareJob, fit_codec, report_skipped, save_npz, stratified_split, write_text
from ember.errors import EmberError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ember.config import DataConfig

FILE_COLUMNS = ("file", "image", "path", "filename", "file_name", "image_path", "image_file", "img")
CAPTION_COLUMNS = ("caption", "text", "captions", "description", "alt", "alt_text", "sentence")
MAPPING_READERS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
MAPPING = "captions-file"  # the reader name of the plan's last unit: the captions file
CHUNK = 512  # images per unit of work
MAX_NAMED = 50


@dataclass
class CaptionPlan(sources.SourcePlan):
    folders: list[str] = field(default_factory=list)  # the source folders, where file names are also looked up


# ---- the plan: image units of the folders, then the captions file ----


def caption_plan(specs: list[str], cfg: DataConfig, exclude: Path | None = None) -> CaptionPlan:
    """The work list of kind captions: units of up to CHUNK images per class folder (label = the
    class's index; 0 in a flat folder), then the captions file as the last unit (so its size and
    modification time are part of the set's fingerprint, like every image's)."""
    mapping = mapping_path(cfg)
    if not specs:
        raise EmberError("No SOURCE given. Name the image folder(s) the captions file maps to captions.")
    units: list[sources.Unit] = []
    classes: list[str] = []
    kinds = set()
    for spec in specs:
        for name, files in _folder_groups(spec, exclude):
            kinds.add(name is None)
            if name is not None and name not in classes:
                classes.append(name)
            label = classes.index(name) if name is not None else 0
            for i in range(0, len(files), CHUNK):
                chunk = tuple(str(f) for f in files[i : i + CHUNK])
                units.append(sources.Unit(len(units), "image-folder", chunk, label=label))
    if len(kinds) > 1:
        raise EmberError(
            f"The sources {specs} mix class folders and flat folders of images. Give every source one "
            f"sub-folder per class, or give only flat folders (then there are no classes)."
        )
    mapping_columns(mapping, cfg.image_field, cfg.text_field)  # a missing column fails before anything is written
    units.append(sources.Unit(len(units), MAPPING, (str(mapping),)))
    return CaptionPlan("captions", units, classes, folders=[str(Path(s)) for s in specs])


def mapping_path(cfg: DataConfig) -> Path:
    """The captions file (``--captions``), checked to exist and to be JSONL or CSV/TSV."""
    if not cfg.captions:
        raise EmberError(
            "Preparing images with captions (--kind captions) needs the file that maps each image to its "
            "caption: --captions FILE (JSONL or CSV with a file and a caption column)."
        )
    path = Path(cfg.captions)
    if not path.is_file():
        raise EmberError(f"The captions file {path} does not exist. Check the --captions path.")
    if path.suffix.lower() not in MAPPING_READERS:
        raise EmberError(
            f"The captions file {path} is neither JSONL (.jsonl) nor CSV (.csv, .tsv). Save it as one of them, "
            f"with a file column and a caption column."
        )
    return path


def _folder_groups(spec: str, exclude: Path | None) -> list[tuple[str | None, list[Path]]]:
    """(class name, its images) per class sub-folder of ``spec``, or [(None, images)] for a flat folder."""
    folder = Path(spec)
    if spec in sources.BUNDLED or not folder.is_dir():
        raise EmberError(
            f"Captions pair image files with text; the source {spec!r} is not a folder. Give the folder that "
            f"holds the images (one sub-folder per class, or the images themselves)."
        )
    skip = exclude.resolve() if exclude is not None else None

    def images(d: Path) -> list[Path]:
        return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in sources.IMAGE_SUFFIXES)

    subdirs = [
        d
        for d in sorted(folder.iterdir())
        if d.is_dir() and not d.name.startswith(".") and (skip is None or not d.resolve().is_relative_to(skip))
    ]
    groups = [(d.name, sources.class_images(d)) for d in subdirs]  # a class's images in its sub-folders too
    groups = [(name, files) for name, files in groups if files]
    loose = images(folder)
    if groups and loose:
        raise EmberError(
            f"{folder} holds both class sub-folders ({', '.join(n for n, _ in groups[:3])}) and images of its own "
            f"({loose[0].name}, ...). Move those images into a class folder, or keep a flat folder of images only."
        )
    if not groups and not loose:
        raise EmberError(
            f"{folder} holds no images ({', '.join(sorted(sources.IMAGE_SUFFIXES))}), directly or in class "
            f"sub-folders. Name the folder the captions file refers to."
        )
    return groups or [(None, loose)]


# ---- the captions file ----


def read_mapping(path: Path, image_field: str = "", caption_field: str = "text") -> tuple[list, list]:
    """The captions file's rows as (file name, caption, where) and the rows skipped as (where, why):
    a row without a file name, or whose caption is empty or not text."""
    rows = _rows(path)
    file_col, text_col = mapping_columns(path, image_field, caption_field, rows)
    entries, skipped = [], []
    for where, row in rows:
        name, text = row.get(file_col), row.get(text_col)
        if not isinstance(name, str) or not name.strip():
            skipped.append((where, f"no image file name in column {file_col!r}: fill it in, or remove the row"))
        elif not isinstance(text, str) or not text.strip():
            skipped.append((where, f"the caption of {name} is empty: write one, or remove the row"))
        else:
            entries.append((name.strip().replace("\\", "/"), text, where))  # a Windows path names the same file
    return entries, skipped


def mapping_columns(path: Path, image_field: str, caption_field: str, rows: list | None = None) -> tuple[str, str]:
    """The captions file's (file column, caption column): the ones named, else recognised by name."""
    rows = _rows(path, limit=1000) if rows is None else rows
    columns = list(dict.fromkeys(k for _, row in rows[:1000] for k in row))
    file_col = _column(path, columns, image_field, FILE_COLUMNS, "image files", "--set image_field=COLUMN")
    explicit = caption_field if caption_field != "text" else ""
    return file_col, _column(path, columns, explicit, CAPTION_COLUMNS, "captions", "--field COLUMN")


def _rows(path: Path, limit: int = 0) -> list[tuple[str, dict]]:
    """(where, row) of every non-empty row (the first ``limit``; 0 = all); a JSONL line that is not an
    object is kept as {} (skipped later)."""
    reader = MAPPING_READERS[path.suffix.lower()]
    try:
        if reader == "jsonl":
            out = []
            with open(path, encoding=tables.encoding_of(path)) as f:
                for number, line in enumerate(f, 1):
                    if limit and len(out) >= limit:
                        break
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except (ValueError, RecursionError):
                            row = None
                        out.append((f"{path}:{number}", row if isinstance(row, dict) else {}))
            return out
        csv.field_size_limit(tables.CSV_FIELD_LIMIT)
        with open(path, newline="", encoding=tables.encoding_of(path)) as f:
            table = csv.DictReader(f, delimiter=tables.csv_delimiter(path, reader))
            rows = itertools.islice(table, limit or None)
            return [(f"{path}:{i + 2}", {k: v for k, v in row.items() if k is not None}) for i, row in enumerate(rows)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise EmberError(
            f"The captions file {path} cannot be read ({type(err).__name__}: {err}). Save it as UTF-8 JSONL or CSV."
        ) from None


def _column(path: Path, columns: list[str], given: str, names: tuple[str, ...], what: str, flag: str) -> str:
    if given:
        if given not in columns:
            raise EmberError(f"The captions file {path} has no column {given!r}; its columns are {columns}.")
        return given
    lower = {c.lower(): c for c in columns}
    found = next((lower[n] for n in names if n in lower), None)
    if found is None:
        raise EmberError(
            f"The captions file {path} has no column naming the {what} (one of {', '.join(names)}); its columns "
            f"are {columns}. Name the column with {flag}."
        )
    return found


def _norm(path: str | Path) -> str:
    return os.path.normpath(os.path.abspath(path))


def match_captions(entries: list, files: list[str], planned: set[str], plan: CaptionPlan) -> tuple[list, list, dict]:
    """Each image's captions (a list per file of ``files``, in the captions file's order), the rows and
    images skipped (where, why), and the count of each reason."""
    mapping = Path(plan.units[-1].paths[0])
    index = {_norm(f): i for i, f in enumerate(files)}
    bases = [mapping.parent, *map(Path, plan.folders)]
    caps: list[list[str]] = [[] for _ in files]
    skipped, counts = [], {"listed_but_absent": 0, "without_caption": 0}
    for name, text, where in entries:
        found = [_norm(name)] if os.path.isabs(name) else [_norm(base / name) for base in bases]
        hit = next((index[p] for p in found if p in index), None)
        if hit is not None:
            caps[hit].append(text)
        elif not any(p in planned for p in found):  # an unreadable image is reported once, as unreadable
            counts["listed_but_absent"] += 1
            skipped.append(
                (
                    where,
                    f"{name} is not an image under {', '.join(plan.folders)} (missing or misspelt): fix the path "
                    f"(relative to {mapping.parent} or to the image folder) or remove the row",
                )
            )
    for f, c in zip(files, caps):
        if not c:
            counts["without_caption"] += 1
            skipped.append((f, f"no caption: {mapping.name} names no caption for it; add a row, or remove the image"))
    return caps, skipped, counts


# ---- the job ----


def _read_unit(unit: sources.Unit, geometry: tuple[int, int, int] | None, path: str) -> None:
    """Worker: decode one unit's images into ``path`` (npz) and the files it kept into its .json."""
    x, y, report = sources.read_images(unit, geometry)
    bad = {p for p, _ in report.skipped}
    kept = [p for p in unit.paths if p not in bad]
    kept = kept if len(kept) == len(x) else []  # the whole unit failed: nothing is kept
    save_npz(Path(path), {"x": x, "y": y})
    record = {"items": report.items, "bytes": report.bytes, "skipped": report.skipped, "files": kept}
    write_text(Path(path).with_suffix(".json"), json.dumps(record))


class CaptionPrepare(PrepareJob):
    """Images read in parallel (resumable per unit), matched to their captions in this process, split
    by image, the tokenizer fitted on the training captions, then the shards."""

    def unit_path(self, i: int) -> Path:
        return self.work / f"images_{i:06d}.npz"

    @property
    def image_units(self) -> list[sources.Unit]:
        return [u for u in self.units if u.reader != MAPPING]

    def run(self) -> tuple[dict, int, int]:
        mapping = Path(self.units[-1].paths[0])
        entries, skipped = read_mapping(mapping, self.cfg.image_field, self.cfg.text_field)
        empty = len(skipped)
        reused = self.read_units()
        files, labels, unreadable = self.kept_files()
        planned = {_norm(p) for u in self.image_units for p in u.paths}
        caps, unmatched, counts = match_captions(entries, files, planned, self.plan)
        skipped = unreadable + skipped + unmatched
        report_skipped(skipped, self.strict, self.phases)
        keep = np.array([bool(c) for c in caps], dtype=bool)
        if not keep.any():
            raise EmberError(
                f"No image under {', '.join(self.plan.folders)} is both readable and named in {mapping}. Check "
                f"that the captions file's paths are relative to it or to the image folder."
                + "".join(f" {p}: {why}." for p, why in skipped[:1])
            )
        codes = np.full(len(files), -1, dtype=np.int8)
        codes[keep] = stratified_split(labels[keep], self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.seed)
        tokens, text_stats, codec_entry, vocab = self.tokenize(caps, codes)
        mean, std, shape = self.mean_std(codes == TRAIN)
        info = self.write_shards(codes, caps, labels, tokens)
        read = {
            "samples": len(files) + len(unreadable),
            "bytes": int(sum(r["bytes"] for r in self.records())),
            "skipped_files": len(skipped),
            "skipped": [f"{p}: {why}" for p, why in skipped[:MAX_NAMED]],
        }
        counts.update(unreadable=len(unreadable), empty_or_unnamed_rows=empty)
        stats = {
            "read": read,
            "kept": {s: {"samples": info[s]["samples"], "images": info[s]["images"]} for s in self.splits},
            "captions": {**text_stats, "skipped": counts},
        }
        manifest = {
            "kind": "captions",
            "image_shape": list(shape),
            "num_classes": len(self.plan.classes),
            "classes": list(self.plan.classes),
            "mean": mean,
            "std": std,
            "caption_len": int(tokens.shape[1]),
            "arrays": {  # each shard's files: one row per image-caption pair
                "images": {"dtype": "uint8", "shape": list(shape)},
                "labels": {"dtype": "int64", "shape": []},
                "captions": {"dtype": str(tokens.dtype), "shape": [int(tokens.shape[1])]},
            },
            "vocab_size": vocab,
            "eot_id": codec_entry["eos_id"],
            "pad_id": codec_entry["pad_id"],  # what fills a caption row after its text
            "tokenizer": codec_entry,
            "shard_size": self.cfg.shard_size,
            "splits": info,
            "stats": stats,
        }
        return manifest, reused, 0

    def read_units(self) -> int:
        geometry = sources.image_geometry(self.plan)
        units = self.image_units
        todo = [u for u in units if not self.unit_path(u.index).with_suffix(".json").is_file()]
        with self.phases.phase("read", len(units), len(units) - len(todo)) as advance:
            for _ in self.pool.map_unordered(_read_unit, [(u, geometry, str(self.unit_path(u.index))) for u in todo]):
                advance()
        return len(units) - len(todo)

    def records(self) -> list[dict]:
        return [json.loads(self.unit_path(u.index).with_suffix(".json").read_text()) for u in self.image_units]

    def kept_files(self) -> tuple[list[str], np.ndarray, list]:
        """The readable images (files and labels, in unit order) and the unreadable ones (path, why)."""
        files, labels, unreadable = [], [], []
        for u, record in zip(self.image_units, self.records()):
            files += record["files"]
            labels += [u.label] * len(record["files"])
            unreadable += [tuple(s) for s in record["skipped"]]
        return files, np.array(labels, dtype=np.int64), unreadable

    def tokenize(self, caps: list[list[str]], codes: np.ndarray) -> tuple[np.ndarray, dict, dict, int]:
        """Every caption's ids, padded with the tokenizer's padding id to the longest (at most data.seq_len),
        in image order."""
        done = self.work / "tokenizer.done"

        def train_texts():
            return (t for c, code in zip(caps, codes) if code == TRAIN for t in c)

        codec, entry = fit_codec(self.cfg, self.out, train_texts, self.phases, reuse=done.is_file())
        write_text(done, "")
        ids = list(codec.encode_batch([t for c in caps for t in c]))
        lengths = np.array([len(i) for i in ids], dtype=np.int64)
        length = int(min(self.cfg.seq_len, max(1, int(lengths.max()))))
        tokens = np.full((len(ids), length), entry["pad_id"], dtype=shards.token_dtype(codec.vocab_size))
        for row, i in enumerate(ids):
            tokens[row, : min(len(i), length)] = i[:length]
        truncated = int((lengths > length).sum())
        if truncated:
            logger.warning(
                "prepare: %d caption(s) longer than data.seq_len=%d tokens were cut to it (the longest has %d); "
                "raise data.seq_len to keep them whole.",
                truncated,
                self.cfg.seq_len,
                int(lengths.max()),
            )
        stats = {"pairs": len(ids), "caption_len": length, "longest": int(lengths.max()), "truncated": truncated}
        return tokens, stats, entry, codec.vocab_size

    def mean_std(self, train: np.ndarray) -> tuple[list[float], list[float], tuple[int, ...]]:
        """Per-channel mean and std of the training images on the [0, 1] scale, and the image shape."""
        total = total_sq = None
        count, start, shape = 0, 0, None
        for u in self.image_units:
            with np.load(self.unit_path(u.index), allow_pickle=False) as f:
                x = f["x"]
            m = train[start : start + len(x)]
            start += len(x)
            if not len(x):
                continue
            shape = shape or tuple(x.shape[1:])
            x = x[m].astype(np.float64) / 255.0
            s, sq = x.sum(axis=(0, 2, 3)), (x * x).sum(axis=(0, 2, 3))
            total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
        return [float(v) for v in mean], [float(max(v, 1e-6)) for v in std], shape

    def write_shards(self, codes: np.ndarray, caps: list, labels: np.ndarray, tokens: np.ndarray) -> dict:
        """Per split: one row per (image, caption) pair in training, per image (its first caption) else."""
        n_caps = np.array([len(c) for c in caps], dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(n_caps)[:-1]])  # each image's first caption row
        dtypes = {"images": "uint8", "labels": "int64", "captions": str(tokens.dtype)}
        info = {}
        for split in self.splits:
            code = shards.SPLITS.index(split)
            writer = shards.ShardWriter(self.out, split, self.cfg.shard_size, dtypes)
            start, images = 0, 0
            for u in self.image_units:
                with np.load(self.unit_path(u.index), allow_pickle=False) as f:
                    x = f["x"]
                local = np.flatnonzero(codes[start : start + len(x)] == code)
                pick, start = start + local, start + len(x)
                images += len(pick)
                reps = n_caps[pick] if code == TRAIN else np.ones(len(pick), dtype=np.int64)
                offsets = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
                rows = np.repeat(first[pick], reps) + offsets
                writer.write(
                    images=np.repeat(x[local], reps, axis=0),
                    labels=np.repeat(labels[pick], reps),
                    captions=tokens[rows],
                )
            shard_list = writer.close()
            info[split] = {"samples": int(sum(r["count"] for r in shard_list)), "images": images, "shards": shard_list}
        return info


def summary(m: dict) -> list[str]:
    """What prepare decided about the captions, for the CLI: never silent about a skip or a cut."""
    c = m["stats"]["captions"]
    classes = ", ".join(m["classes"][:10]) + (", ..." if len(m["classes"]) > 10 else "")
    lines = [
        f"captions: {c['pairs']:,} pairs of {tuple(m['image_shape'])} images, "
        + (f"{m['num_classes']} classes ({classes})" if m["classes"] else "no classes (a flat folder)")
        + f"; {m['tokenizer']['kind']} tokens, vocab {m['vocab_size']:,}, caption length {m['caption_len']}"
    ]
    if c["truncated"]:
        lines.append(f"{c['truncated']} caption(s) cut to {m['caption_len']} tokens (the longest has {c['longest']})")
    named = {
        "listed_but_absent": "captions file row(s) naming no image",
        "without_caption": "image(s) without a caption",
        "unreadable": "unreadable image(s)",
        "empty_or_unnamed_rows": "row(s) with an empty caption or no file name",
    }
    lines += [f"skipped {n} {named[k]}" for k, n in c["skipped"].items() if n]
    return lines


# ---- a sample to try it on ----


def write_sample(out: Path, seed: int = 0) -> Path:
    """Write a captioned image folder from the bundled 8x8 digits into ``out``, offline: PNG files in
    ``out/images/<zero..nine>/`` and ``out/captions.jsonl`` ({"file", "caption"}, paths relative to it),
    one generated caption per image (``ember.data.captions.TEMPLATES``). Returns the captions file;
    prepare with ``ember data prepare OUT/images --captions OUT/captions.jsonl --out DATA``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from ember.data.captions import WORDS, captions, looks

    out = Path(out)
    x, y = load_digits(return_X_y=True)
    images = np.rint(x.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    ink, area = looks(images)
    texts = captions(images, y, (float(np.median(ink)), float(np.median(area))), seed)
    lines = []
    for i, (image, label, text) in enumerate(zip(images, y, texts)):
        rel = Path("images") / WORDS[label] / f"{i:04d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(out / rel)
        lines.append(json.dumps({"file": rel.as_posix(), "caption": text}))
    mapping = out / "captions.jsonl"
    mapping.write_text("\n".join(lines) + "\n")
    return mapping
