"""Raw data in: turn ``ember data prepare`` SOURCE arguments into ordered units of work.

A SOURCE is a bundled set by name (``stdlib``, ``digits``), a file, a directory
(every file under it, recursively) or a glob (``data/**/*.jsonl``). Files are read by
suffix:

- text: ``.jsonl`` / ``.ndjson`` (one JSON object per line, ``text_field``), ``.parquet``,
  ``.arrow`` and ``.csv`` (column ``text_field``), anything else is one plain-text document;
- Hugging Face ``datasets``: a directory written by ``Dataset.save_to_disk`` is its ``.arrow``
  files (its JSON metadata is not text); a ``DatasetDict`` directory is refused, naming its
  splits (see ``ember.data.arrow``; pyarrow reads them, ``datasets`` is not needed);
- images: ``.npz`` (arrays ``x`` or ``images`` [N,H,W] / [N,C,H,W] / [N,H,W,C], and ``y``
  or ``labels``; values kept as they are: uint8, or float32 for floats), an image folder (one sub-folder per class of .png/.jpg/... files).

``plan_units`` fixes the whole work list up front, in sorted order, so the output never
depends on the number of workers, and a resumed prepare can tell which units are done.
A unit is a group of small files (up to ``UNIT_BYTES``), or a part of about ``UNIT_BYTES``
of one structured file (JSONL by byte range, Parquet by row groups, Arrow by record batches;
a CSV file is one unit, since quoted fields may span lines), so one huge file still spreads
over workers. Arrow units are streamed one record batch at a time, decoding only the text column.
Reading a unit never raises for a bad file: it is skipped and reported in ``ReadReport``
(``--strict`` turns that into an error in ``ember.data.prepare``).

This module runs in worker processes; it does not import torch.
"""

from __future__ import annotations

import csv
import glob
import json
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ember.errors import EmberError

UNIT_BYTES = 1 << 20  # small text files are grouped into units of about this many bytes
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
STRUCTURED = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
BUNDLED = {"stdlib": "text", "digits": "images"}
Kind = Literal["text", "images", "table", "labelled-text", "pairs", "captions"]


@dataclass(frozen=True)
class Unit:
    """One piece of work: ``reader`` names how ``paths`` are read (see READERS)."""

    index: int
    reader: str
    paths: tuple[str, ...]
    label: int = -1  # image folders: the class of every file in the unit
    span: tuple[int, int] = (0, -1)  # a part of one big file: JSONL bytes, Parquet row groups, Arrow batches [a, b)


@dataclass
class ReadReport:
    """What a unit read: documents/samples and bytes, and the files it had to skip."""

    items: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def add(self, other: ReadReport) -> None:
        self.items += other.items
        self.bytes += other.bytes
        self.skipped.extend(other.skipped)


@dataclass
class SourcePlan:
    kind: Kind
    units: list[Unit]
    classes: list[str] = field(default_factory=list)  # image folders: class names in label order


def _expand(spec: str, exclude: Path | None = None) -> list[Path]:
    """Every regular file a path, directory or glob names, sorted; hidden files and
    folders (``.git``), anything under ``exclude`` (the output directory) and the metadata of
    ``save_to_disk`` directories left out (a ``DatasetDict`` directory is refused)."""
    from ember.data.arrow import dataset_sources

    if any(ch in spec for ch in "*?["):
        found = [Path(p) for p in glob.glob(spec, recursive=True)]
        root = Path(".")
    else:
        path = Path(spec)
        if not path.exists():
            raise EmberError(
                f"The source {spec!r} does not exist. A SOURCE is a file, a directory, a glob such as "
                f"'texts/**/*.txt', or a bundled set: {', '.join(BUNDLED)}."
            )
        found = [path] if path.is_file() else [p for p in path.rglob("*")]
        root = path if path.is_dir() else path.parent
    excluded = exclude.resolve() if exclude is not None else None

    def wanted(p: Path) -> bool:
        rel = p.relative_to(root).parts if p.is_relative_to(root) else p.parts[-1:]
        if any(part.startswith(".") and part not in (".", "..") for part in rel):
            return False
        return excluded is None or not p.resolve().is_relative_to(excluded)

    files = dataset_sources(sorted(p for p in found if p.is_file() and wanted(p)))
    if not files:
        raise EmberError(f"The source {spec!r} names no files. Check the path or the glob pattern.")
    return files


def _is_image_folder(spec: str) -> bool:
    path = Path(spec)
    if not path.is_dir():
        return False
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return any(any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir()) for d in subdirs)


def source_kind(spec: str) -> Kind:
    if spec in BUNDLED:
        return BUNDLED[spec]  # type: ignore[return-value]
    if spec.lower().endswith(".npz") or _is_image_folder(spec):
        return "images"
    return "text"


def _group_small(files: list[Path], reader: str, start: int) -> list[Unit]:
    """Consecutive files into units of about UNIT_BYTES each (one file may be bigger)."""
    units, group, size = [], [], 0
    for path in files:
        group.append(str(path))
        size += path.stat().st_size
        if size >= UNIT_BYTES:
            units.append(Unit(start + len(units), reader, tuple(group)))
            group, size = [], 0
    if group:
        units.append(Unit(start + len(units), reader, tuple(group)))
    return units


def _cap(files: list[Path], max_bytes: int) -> list[Path]:
    """The first files whose sizes add up to at least ``max_bytes`` (0 = all)."""
    if not max_bytes:
        return files
    kept, total = [], 0
    for path in files:
        if total >= max_bytes:
            break
        kept.append(path)
        total += path.stat().st_size
    return kept


def peek_columns(spec: str) -> list[str]:
    """The column (field) names of the first file ``spec`` names, from its header, first JSON object or
    schema; [] for a file that is not a table (or cannot be read: reading it later says why)."""
    from ember.data.tables import READERS, csv_delimiter, encoding_of

    try:
        path = _expand(spec)[0]
    except EmberError:
        return []
    reader = READERS.get(path.suffix.lower())
    try:
        if reader in ("csv", "tsv"):
            with open(path, newline="", encoding=encoding_of(path)) as f:
                return [h.strip() for h in next(csv.reader(f, delimiter=csv_delimiter(path, reader)), [])]
        if reader in ("jsonl", "json"):
            with open(path, encoding=encoding_of(path)) as f:
                if reader == "jsonl":
                    row = json.loads(next((line for line in f if line.strip()), "{}"))
                else:  # the first object of a list, decoded from the file's first MiB (the file may be huge)
                    head = f.read(1 << 20).lstrip()
                    start = len(head) - len(head[1:].lstrip()) if head.startswith("[") else -1
                    row = json.JSONDecoder().raw_decode(head, start)[0] if start > 0 else None
            return list(row) if isinstance(row, dict) else []
        if reader == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if reader == "arrow":
            from ember.data.arrow import column_names

            return column_names(path)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, ImportError, RecursionError):
        return []
    return []


def table_plan(specs: list[str], exclude: Path | None = None, kind: Kind = "table") -> SourcePlan:
    """Rows (a table, labelled text, pairs): every file of ``specs`` is one unit (read whole, in this process)."""
    from ember.data.tables import READERS

    units = []
    for spec in specs:
        if spec in BUNDLED:
            raise EmberError(f"{spec!r} is a bundled {BUNDLED[spec]} set, not a table: leave out --label for it.")
        for path in _expand(spec, exclude):
            reader = READERS.get(path.suffix.lower())
            if reader is None:
                raise EmberError(
                    f"{path} is not a table file: with --label, ember reads .csv, .tsv, .jsonl, .json, .parquet and .arrow "
                    f"rows. Convert it, remove it from the sources, or leave out --label to prepare text."
                )
            units.append(Unit(len(units), reader, (str(path),)))
    return SourcePlan(kind, units)


def _text_units(
    specs: list[str], max_bytes: int, exclude: Path | None = None, text_field: str | None = None
) -> list[Unit]:
    from ember.data.stdlib import stdlib_files

    files: list[Path] = []
    for spec in specs:
        found = [p for _, p in stdlib_files()] if spec == "stdlib" else _expand(spec, exclude)
        if Path(spec).is_dir() and all(p.suffix.lower() in IMAGE_SUFFIXES for p in found):
            deeper = sorted({p.relative_to(spec).parts[0] for p in found if len(p.relative_to(spec).parts) > 2})
            hint = (
                f" Its images lie deeper: name the folder whose sub-folders are the classes, e.g. {spec}/{deeper[0]}."
                if deeper
                else ""
            )
            raise EmberError(
                f"The folder {spec} holds images ({found[0].name}, ...) but no sub-folder of images per class "
                f"directly under it, so ember would read them as text.{hint} An image source has one sub-folder of "
                f"images per class ({spec}/cat/*.jpg, {spec}/dog/*.jpg); images paired with captions are prepared "
                f"with --captions FILE."
            )
        files += found
    files = _cap(files, max_bytes)
    plain = [p for p in files if p.suffix.lower() not in STRUCTURED]
    units = _group_small(plain, "text", 0)
    for path in files:
        reader = STRUCTURED.get(path.suffix.lower())
        if reader == "arrow" and text_field is not None:
            from ember.data.arrow import require_column

            require_column(path, text_field)  # a dataset without the column: say so now, not once per file
        if reader:
            units += [
                Unit(len(units) + i, reader, (str(path),), span=span) for i, span in enumerate(_spans(path, reader))
            ]
    return units


def _spans(path: Path, reader: str) -> list[tuple[int, int]]:
    """How one structured file is cut into units of about UNIT_BYTES."""
    if reader == "jsonl":
        size = path.stat().st_size
        return [(a, min(a + UNIT_BYTES, size)) for a in range(0, size, UNIT_BYTES)] or [(0, 0)]
    if reader == "parquet":
        try:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
        except Exception:  # unreadable or pyarrow missing: one unit, whose reader reports why
            return [(0, -1)]
        spans, start, size = [], 0, 0
        for g in range(meta.num_row_groups):
            size += meta.row_group(g).total_byte_size
            if size >= UNIT_BYTES:
                spans.append((start, g + 1))
                start, size = g + 1, 0
        if start < meta.num_row_groups or not spans:
            spans.append((start, meta.num_row_groups))
        return spans
    if reader == "arrow":
        from ember.data.arrow import batch_spans

        return batch_spans(path, UNIT_BYTES)
    return [(0, -1)]


def _image_units(specs: list[str]) -> tuple[list[Unit], list[str]]:
    units: list[Unit] = []
    classes: list[str] = []
    for spec in specs:
        if spec == "digits":
            units.append(Unit(len(units), "digits", ()))
        elif spec.lower().endswith(".npz"):
            units += [Unit(len(units) + i, "npz", (str(p),)) for i, p in enumerate(_expand(spec))]
        else:
            for class_dir in sorted(d for d in Path(spec).iterdir() if d.is_dir() and not d.name.startswith(".")):
                files = class_images(class_dir)
                if not files:
                    raise EmberError(
                        f"The class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}). "
                        f"An image source has one folder of images per class: fill it or remove it."
                    )
                if class_dir.name not in classes:
                    classes.append(class_dir.name)
                for i in range(0, len(files), 512):
                    chunk = tuple(str(f) for f in files[i : i + 512])
                    units.append(Unit(len(units), "image-folder", chunk, label=classes.index(class_dir.name)))
    return units, classes


def class_images(class_dir: Path) -> list[Path]:
    """The images of one class folder, in its sub-folders too (as torchvision's ImageFolder reads one),
    sorted; hidden files and folders (``.ipynb_checkpoints``, macOS ``._*``) left out."""
    return sorted(
        f
        for f in class_dir.rglob("*")
        if f.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(class_dir).parts)
        and f.is_file()
    )


def plan_units(
    specs: list[str], max_bytes: int = 0, exclude: Path | None = None, text_field: str | None = None
) -> SourcePlan:
    """The ordered units of work for ``specs``; all sources must be text, or all images.
    Files under ``exclude`` (the output directory) are never read. With ``text_field``, an Arrow
    file without that column is an EmberError naming its columns."""
    if not specs:
        raise EmberError("No SOURCE given. Name files, directories, globs, or a bundled set: stdlib, digits.")
    kinds = {spec: source_kind(spec) for spec in specs}
    if len(set(kinds.values())) > 1:
        raise EmberError(
            f"The sources mix text and images ({kinds}). Prepare text and images into separate --out directories."
        )
    kind = next(iter(kinds.values()))
    if kind == "text":
        return SourcePlan("text", _text_units(specs, max_bytes, exclude, text_field))
    units, classes = _image_units(specs)
    return SourcePlan("images", units, classes)


# ---- reading text units: each reader yields documents (str) and fills the report ----


def _read_text_files(unit: Unit, field_name: str, report: ReadReport) -> Iterator[str]:
    from ember.data.tables import BOMS

    for path in unit.paths:
        try:
            raw = Path(path).read_bytes()
            declared = next((name for bom, name in BOMS if raw.startswith(bom)), None)  # UTF-16/32 says so
            if declared:
                text = raw.decode(declared)
            elif b"\x00" in raw:
                raise ValueError("binary file (contains NUL bytes)")
            else:
                text = raw.decode("utf-8")
        except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
            report.skipped.append((path, _why(err)))
            continue
        report.bytes += len(raw)
        yield text


def _read_jsonl(unit: Unit, field_name: str, report: ReadReport) -> Iterator[str]:
    """The lines that start in the unit's byte range [a, b): a line belongs to the range its
    first byte is in, so consecutive ranges split the file without loss or overlap."""
    path, (start, end) = unit.paths[0], unit.span
    try:
        with open(path, "rb") as f:
            if not _first_line_in(f, start, end):
                return
            while f.tell() < end or end < 0:
                offset, line = f.tell(), f.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)[field_name]
                    if not isinstance(value, str):
                        raise TypeError(f"it is a {type(value).__name__}")
                except (
                    ValueError,
                    KeyError,
                    TypeError,
                    RecursionError,
                ) as err:  # RecursionError: "[[[[..." nested deeper than json can
                    report.skipped.append((f"{path}@{offset}", f"no string field {field_name!r} ({_why(err)})"))
                    continue
                report.bytes += len(line)
                yield value
    except OSError as err:
        report.skipped.append((path, _why(err)))


def _first_line_in(f, start: int, end: int, block: int = 1 << 16) -> bool:
    """Seek ``f`` to the first line that starts in [start, end); False when none does.

    The rest of a line begun before ``start`` is skipped by searching for its newline in
    blocks, and never past ``end``: with ``readline`` every unit inside one 50 MB line would
    read the whole remainder of it, quadratic in the line's length."""
    if start <= 0:
        f.seek(0)
        return True
    f.seek(start - 1)
    pos = start - 1
    while end < 0 or pos < end:
        chunk = f.read(block if end < 0 else min(block, end - pos))
        if not chunk:
            return False
        newline = chunk.find(b"\n")
        if newline >= 0:
            f.seek(pos + newline + 1)
            return end < 0 or pos + newline + 1 < end
        pos += len(chunk)
    return False


def _read_table(unit: Unit, field_name: str, report: ReadReport) -> Iterator[str]:
    path = unit.paths[0]
    try:
        column = _table_column(path, unit.reader, field_name, unit.span)
    except (OSError, ValueError, KeyError, ImportError) as err:
        report.skipped.append((path, _why(err)))
        return
    first_row = unit.span[0] if unit.reader == "parquet" and unit.span[1] >= 0 else 0
    where = f"{path} row group {first_row}+, row" if first_row else f"{path} row"
    yield from _strings(column, where, field_name, report)


def _strings(values: list, where: str, field_name: str, report: ReadReport) -> Iterator[str]:
    """The text values of a column; any other value is skipped, reported as ``where`` + its row number."""
    for row, value in enumerate(values):
        if not isinstance(value, str):
            report.skipped.append((f"{where} {row}", f"column {field_name!r} is {type(value).__name__}, not text"))
            continue
        report.bytes += len(value.encode("utf-8", "surrogatepass"))
        yield value


def _read_arrow(unit: Unit, field_name: str, report: ReadReport) -> Iterator[str]:
    """The text column of the unit's record batches, one batch in memory at a time."""
    from ember.data.arrow import batches

    path, where = unit.paths[0], unit.paths[0]
    try:
        for number, batch in batches(path, [field_name], unit.span):
            where = f"{path} record batch {number}"
            yield from _strings(batch.column(0).to_pylist(), f"{where}, row", field_name, report)
    except (OSError, ValueError, KeyError, TypeError, ImportError, NotImplementedError) as err:
        report.skipped.append((where, _why(err)))


def _table_column(path: str, reader: str, field_name: str, span: tuple[int, int]) -> list:
    if reader == "csv":
        try:
            import pyarrow.csv as pacsv
        except ImportError as err:
            raise ImportError("reading CSV needs pyarrow: pip install 'ember[parquet]'") from err
        from ember.data.tables import csv_delimiter

        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=csv_delimiter(path), newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={field_name: "string"}),
        )
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError("reading Parquet needs pyarrow: pip install 'ember[parquet]'") from err
        names = pq.read_schema(path).names
        if field_name not in names:
            raise KeyError(f"no column {field_name!r}; columns are {names}")
        if span[1] >= 0:
            table = pq.ParquetFile(path).read_row_groups(range(*span), columns=[field_name])
        else:
            table = pq.read_table(path, columns=[field_name])
    if field_name not in table.column_names:
        raise KeyError(f"no column {field_name!r}; columns are {table.column_names}")
    return table.column(field_name).to_pylist()


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:200]


TEXT_READERS = {
    "text": _read_text_files,
    "jsonl": _read_jsonl,
    "parquet": _read_table,
    "csv": _read_table,
    "arrow": _read_arrow,
}


def read_documents(unit: Unit, field_name: str = "text") -> tuple[list[str], ReadReport]:
    """Every document of a text unit, in order, and what was read or skipped."""
    report = ReadReport()
    docs = list(TEXT_READERS[unit.reader](unit, field_name, report))
    report.items = len(docs)
    return docs, report


# ---- reading image units: uint8 (or float32, see _to_nchw) [N, C, H, W] and int64 labels ----

FLOAT_EXACT = 1 << 24  # every integer of magnitude up to 2**24 is exact in float32


def _to_nchw(x: np.ndarray, source: str) -> np.ndarray:
    """[N, C, H, W] images with their values kept: uint8 as they are; other integers in 0..255 as
    uint8 (the same numbers); floats, and integers beyond 0..255, as float32. Never rescaled or
    clipped: a feature near 650 stays 650 (normalisation by the training mean/std comes later)."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC → NCHW
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"{source}: images must be [N,H,W], [N,C,H,W] or [N,H,W,C] with 1 or 3 channels, got {x.shape}"
        )
    return np.ascontiguousarray(_pixel_values(x, source))


def _pixel_values(x: np.ndarray, source: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.uint8)  # False/True -> 0/1, the same values
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if 0 <= lo and hi <= 255:
            return x.astype(np.uint8)
        if -FLOAT_EXACT <= lo and hi <= FLOAT_EXACT:
            return x.astype(np.float32)  # exact: these integers all have a float32
        raise ValueError(
            f"{source}: integer pixel values from {lo} to {hi} cannot be kept exactly (float32 holds "
            f"integers up to ±{FLOAT_EXACT:,}); scale them into that range, or save them as floats"
        )
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not np.isfinite(x).all():
            raise ValueError(
                f"{source}: {int((~np.isfinite(x)).sum())} pixel value(s) are NaN or infinite; "
                f"replace them with finite numbers"
            )
        return x.astype(np.float32)  # float64 rounds to float32, the precision the models train in
    raise ValueError(f"{source}: images of dtype {x.dtype} are not supported; save integers or floats")


def _read_digits(unit: Unit, report: ReadReport) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = np.rint(x.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)  # 17 grey levels → 0..255
    return x[:, None], y.astype(np.int64)


def _read_npz(unit: Unit, report: ReadReport) -> tuple[np.ndarray, np.ndarray]:
    path = unit.paths[0]
    with np.load(path, allow_pickle=False) as f:
        xk = next((k for k in ("x", "images") if k in f), None)
        yk = next((k for k in ("y", "labels") if k in f), None)
        if xk is None or yk is None:
            raise ValueError(f"{path} needs arrays 'x' (or 'images') and 'y' (or 'labels'); it has {list(f.keys())}")
        for key in (xk, yk):
            _check_npz_member(f, key, path)
        labels = f[yk].reshape(-1)
        if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
            raise ValueError(
                f"{path}: labels must be integers >= 0 (class ids), got {labels.dtype} "
                f"with values {np.unique(labels)[:5].tolist()}"
            )
        x, y = _to_nchw(f[xk], path), labels.astype(np.int64)
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def _check_npz_member(npz: Any, key: str, path: Path) -> None:
    """Refuse, from its header alone, a member holding objects or claiming more bytes than the member
    holds (a header that asks for a terabyte, or a member cut short), before numpy allocates it."""
    info = npz.zip.getinfo(f"{key}.npy")
    with npz.zip.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member, max_header_size=10_000)
        except ValueError as err:
            raise ValueError(f"{path}: array {key!r} is not a readable .npy member ({err})") from None
        header = member.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: array {key!r} holds Python objects, which ember never unpickles; save numbers")
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if claimed != info.file_size - header:
        raise ValueError(
            f"{path}: array {key!r} claims {claimed:,} bytes of data but holds {info.file_size - header:,}; "
            f"the file is damaged or crafted. Save it again with numpy.savez"
        )


def _read_image_folder(
    unit: Unit, report: ReadReport, size: tuple[int, int], channels: int
) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images = []
    for path in unit.paths:
        try:
            with Image.open(path) as im:
                im = _eight_bit(im).convert("L" if channels == 1 else "RGB")
                if im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                images.append(np.asarray(im, dtype=np.uint8))
        except (OSError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError: an OSError
            report.skipped.append((path, _why(err)))
    x = np.stack(images) if images else np.zeros((0, size[0], size[1]), np.uint8)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), np.full(len(x), unit.label, dtype=np.int64)


SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes of 16-bit grey images (PNG, TIFF)


def _eight_bit(im):
    """A 16-bit grey image as 8 bits (value >> 8, as OpenCV reads one), not clipped at 255 by PIL's convert,
    which turns nearly every 16-bit pixel white. Mode I (32-bit) holding only 0..255 is kept as it is; values
    beyond 16 bits are a ValueError (the image is skipped, named)."""
    from PIL import Image

    if im.mode not in SIXTEEN_BIT:
        return im
    x = np.asarray(im)
    lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
    if lo < 0 or hi > 0xFFFF:
        raise ValueError(f"{im.mode} pixel values from {lo} to {hi} are not 16-bit grey levels")
    if im.mode == "I" and hi <= 0xFF:  # 32-bit storage of 8-bit values: kept as they are
        return Image.fromarray(x.astype(np.uint8), "L")
    return Image.fromarray((x.astype(np.uint32) >> 8).astype(np.uint8), "L")


def image_geometry(plan: SourcePlan) -> tuple[int, int, int] | None:
    """(C, H, W) of an image-folder plan: the first readable image's size; 3 channels (RGB) when any image
    is in colour, else 1 (grey). A grey image sorted first no longer turns a colour set grey: while only
    grey images have been seen, the headers of the rest are read (lazily: no pixels) until one in colour
    turns up; an all-grey set reads every header once. None when the plan has no readable image."""
    first = None
    for path in _folder_images(plan):
        mode_size = _mode_and_size(path)
        if mode_size is None:  # read_images skips and names it
            continue
        mode, (width, height) = mode_size
        colour = mode not in GREY_MODES
        if first is None:
            first = (height, width)
        if colour:
            return 3, *first
    return None if first is None else (1, *first)


GREY_MODES = ("1", "L", "LA", "F", *SIXTEEN_BIT)  # PIL modes without colour; any other is read as RGB


def _folder_images(plan: SourcePlan) -> Iterator[str]:
    for unit in plan.units:
        if unit.reader == "image-folder":
            yield from unit.paths


def _mode_and_size(path: str) -> tuple[str, tuple[int, int]] | None:
    """An image's mode and (width, height) from its header, without decoding its pixels; None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except (OSError, Image.DecompressionBombError):
        return None


def read_images(unit: Unit, geometry: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray, ReadReport]:
    """(images [N,C,H,W], int64 [N], report) of an image unit; folders are resized to ``geometry``.
    Images are uint8, or float32 for .npz arrays of floats or of integers beyond 0..255."""
    report = ReadReport()
    try:
        if unit.reader == "digits":
            x, y = _read_digits(unit, report)
        elif unit.reader == "npz":
            x, y = _read_npz(unit, report)
        else:
            if geometry is None:
                raise ValueError("no image of the folder source could be opened")
            x, y = _read_image_folder(unit, report, geometry[1:], geometry[0])
    except (
        OSError,
        ValueError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
    ) as err:  # what a truncated or foreign .npz raises
        report.skipped.append((",".join(unit.paths) or unit.reader, _why(err)))
        x, y = np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64)
    report.items, report.bytes = len(x), int(x.nbytes)
    return x, y, report
