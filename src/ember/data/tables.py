"""Tables for ``ember data prepare --label COLUMN``: rows of CSV, TSV, JSONL, Parquet or Arrow files →
float32 feature rows and integer class labels (or, with ``--target values``, float32 targets to
regress: ``target_values``).

Each feature column is numeric (every present cell parses as a finite number) or categorical
(no cell does); a column mixing both is refused, naming its first cell of the rarer kind.
Missing cells (empty, ``NA``, ``N/A``, ``null``, ``None``, ``?``, JSON null, and the other spellings
pandas' ``read_csv`` reads as missing: ``nan``, ``NaN``, ``#N/A``, ``<NA>``, ...; a float NaN) are counted
per column. A CSV file's separator is read from its header (``,``, ``;``, tab or ``|``: Excel writes ``;``
where the decimal point is a comma). Everything learned comes from the training rows only:

- numeric: standardised with the training mean and std (population); a missing cell is the
  training mean (0 after standardising);
- categorical: one-hot over the sorted training categories, plus a ``<missing>`` slot when
  training has missing cells; a category unseen in training (or a missing cell without that
  slot) is all zeros, counted. A column with more training categories than ``one_hot_max``
  (``data.one_hot_max``) is one feature instead, the category's index (1 .. K in sorted order;
  0 for a missing or unseen cell), which a model embeds (``embedded_columns``; ``model.name: mlp``
  learns an embedding per such column) — a column of 50,000 categories would otherwise be 50,000
  features;
- dropped, and reported: constant columns (one value, or all missing, in training) and id-like
  ones (every training value distinct and present, integers or strings).

``fit_columns`` returns each column's recipe (``"columns"`` in the manifest) and ``encode``
applies them, so the same transform can be repeated on new rows from the manifest alone::

    x = encode(manifest["columns"], {"age": ["41", ""], "colour": ["red", "blue"]})

This module does not import torch (prepare's worker processes import it).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ember.errors import EmberError

# compared stripped and lower-cased: ember's own, and the rest of pandas' read_csv defaults (NaN, Excel's #N/A)
MISSING = {"", "na", "n/a", "null", "none", "?", "nan", "-nan", "#n/a", "#n/a n/a", "#na", "<na>"}
MISSING |= {"1.#ind", "-1.#ind", "1.#qnan", "-1.#qnan"}
DELIMITERS = (",", ";", "\t", "|")  # a .csv file's separator: the one that splits its header into the most names
MISSING_SLOT = "<missing>"
READERS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",  # one list of row objects (rows only: a text source reads a .json file as a document)
    ".parquet": "parquet",
    ".arrow": "arrow",  # Arrow IPC, e.g. the data files of a Hugging Face Dataset.save_to_disk directory
}


@dataclass
class Table:
    """Raw cells by column (str, int, float, bool or None), and where each row came from."""

    columns: dict[str, list] = field(default_factory=dict)
    origins: list[tuple[str, int]] = field(default_factory=list)  # (path, row number: 1 = first data row)
    bytes: int = 0
    decimal_comma: list[str] = field(default_factory=list)  # columns of ';' files read with a decimal comma

    def where(self, i: int) -> str:
        path, row = self.origins[i]
        return f"row {row} of {path}"


# ---- reading ----


def read_table(
    paths: list[str], columns: list[str] | None = None, allow_empty: bool = False, decimal_comma: bool = False
) -> Table:
    """All rows of ``paths`` (one header for all of them); a ragged CSV row is an EmberError. With
    ``columns``, only those are kept (Parquet and Arrow files decode only them), in that order; a file
    without one of them is an EmberError naming the columns it has. No rows at all is an EmberError
    unless ``allow_empty`` (one file of several). With ``decimal_comma`` (a table's features and target, never
    texts), a ';'-separated CSV's columns of decimal-comma numbers are read as numbers (``read_decimal_commas``)."""
    table = Table()
    for path in paths:
        reader = READERS.get(Path(path).suffix.lower())
        if reader is None:
            raise EmberError(
                f"{path} is not a table file: with --label, ember reads .csv, .tsv, .jsonl, .json, .parquet and .arrow "
                f"rows. Convert it, or leave out --label to prepare text."
            )
        rows = _csv_rows(path, reader) if reader in ("csv", "tsv") else _record_rows(path, reader, columns)
        if decimal_comma and reader == "csv" and rows and csv_delimiter(path) == ";":
            table.decimal_comma += [c for c in read_decimal_commas(rows) if c not in table.decimal_comma]
        if columns is not None:
            rows = _only(rows, columns, path)
        names = list(rows[0]) if rows else []
        if table.columns and names and names != list(table.columns):
            raise EmberError(
                f"{path} has the columns {names}, {table.origins[0][0]} has {list(table.columns)}. Give files "
                f"with the same columns in the same order, or prepare them separately."
            )
        for name in names:
            table.columns.setdefault(name, [])
        for number, row in enumerate(rows, start=1):
            for name in table.columns:
                table.columns[name].append(row.get(name))
            table.origins.append((path, number))
        table.bytes += Path(path).stat().st_size
    if not table.origins and not allow_empty:
        raise EmberError(f"The table sources {', '.join(paths)} hold no rows. Give files with a header and rows.")
    return table


def _csv_rows(path: str, reader: str) -> list[dict]:
    csv.field_size_limit(CSV_FIELD_LIMIT)  # the default, 128 KiB, refuses a long text in one cell
    with open(path, newline="", encoding=encoding_of(path)) as f:
        try:
            lines = list(csv.reader(f, delimiter=csv_delimiter(path, reader)))
        except UnicodeDecodeError as err:
            raise not_utf8(path, err) from None
        except csv.Error as err:
            raise EmberError(
                f"{path} is not a readable {reader.upper()} file ({err}). Fix it and prepare again."
            ) from None
    lines = [row for row in lines if row]  # blank lines
    if not lines:
        return []
    # a column without a name is pandas' 'Unnamed: K' (K from 0), as read_csv names it: the index that
    # DataFrame.to_csv writes first unless index=False (then dropped as id-like), or a trailing separator's
    # empty column (dropped as constant); both are listed in the summary
    header = [h.strip() or f"Unnamed: {k}" for k, h in enumerate(lines[0])]
    if len(set(header)) != len(header):
        odd = [f"{k + 1} ({h!r})" for k, h in enumerate(header) if header.index(h) < k]
        raise EmberError(
            f"The header of {path} repeats column names: {header}, at column(s) {', '.join(odd)}. Name each "
            f"column once."
        )
    for number, row in enumerate(lines[1:], start=1):
        if len(row) != len(header):
            raise EmberError(
                f"Row {number} of {path} has {len(row)} field(s), the header has {len(header)}: a ragged row "
                f"(a missing or extra separator, or an unquoted comma inside a value). Fix that row (quote values "
                f"that hold the separator), or remove it."
            )
    return [dict(zip(header, row)) for row in lines[1:]]


CSV_FIELD_LIMIT = 2**31 - 1  # the largest the csv module takes on every platform


def csv_delimiter(path: str | Path, reader: str = "csv") -> str:
    """A ``.tsv`` file's tab; a ``.csv`` file's separator among DELIMITERS: the one that splits the header
    line into the most names (quotes respected), a comma when none splits it."""
    if reader == "tsv":
        return "\t"
    try:
        with open(path, encoding=encoding_of(path), errors="replace", newline="") as f:
            header = f.readline(1 << 20)
    except OSError:
        return ","
    width = {d: len(next(csv.reader([header], delimiter=d), [])) for d in DELIMITERS}
    return max(DELIMITERS, key=lambda d: (width[d], d == ","))


BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


def encoding_of(path: str | Path) -> str:
    """UTF-8 (its BOM, if any, dropped), or the UTF-16/32 a byte-order mark declares: PowerShell 5's ``>``
    and Excel's 'Unicode Text' write UTF-16."""
    try:
        with open(path, "rb") as f:
            start = f.read(4)
    except OSError:
        return "utf-8-sig"
    return next((name for bom, name in BOMS if start.startswith(bom)), "utf-8-sig")


DECIMAL_COMMA = re.compile(r"[+-]?\d+(,\d+)?")


def read_decimal_commas(rows: list[dict]) -> list[str]:
    """In a ';'-separated file (Excel's where ',' is the decimal point), the columns whose every present
    cell is a number with a decimal comma or an integer, one at least with a comma, are read as numbers:
    '3,5' becomes '3.5' in ``rows``. Returns those columns' names (the prepare summary lists them)."""
    converted = []
    for name in rows[0]:
        cells = [row[name] for row in rows if not is_missing(row[name])]
        if any("," in c for c in cells) and all(DECIMAL_COMMA.fullmatch(c.strip()) for c in cells):
            for row in rows:
                if not is_missing(row[name]):
                    row[name] = row[name].replace(",", ".")
            converted.append(name)
    return converted


def not_utf8(path: str | Path, err: UnicodeDecodeError) -> EmberError:
    """The EmberError for a file that is not UTF-8, naming the byte and the usual fix."""
    byte = err.object[err.start : err.start + 1].hex()
    return EmberError(
        f"{path} is not UTF-8 text: byte 0x{byte} at offset {err.start} is not valid UTF-8. ember reads UTF-8 "
        f"(with or without a BOM); a file saved by Excel as plain 'CSV' is usually Windows-1252. Save it as "
        f"'CSV UTF-8', or convert it, e.g. iconv -f cp1252 -t utf-8 FILE > NEW_FILE, and prepare that."
    )


def _only(rows: list[dict], columns: list[str], path: str) -> list[dict]:
    """The ``columns`` of each row, in that order; one that no row has is an EmberError."""
    names = list(rows[0]) if rows else []
    absent = [c for c in columns if c not in names]
    if rows and absent:
        raise EmberError(f"{path} has no column {absent[0]!r}; its columns are {names}. Name one of them.")
    return [{c: row[c] for c in columns} for row in rows]


def _record_rows(path: str, reader: str, columns: list[str] | None = None) -> list[dict]:
    if reader == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError("reading Parquet needs pyarrow: pip install 'ember[parquet]'") from err
        try:
            if columns:  # a missing column is named before anything is read
                _only([dict.fromkeys(pq.read_schema(path).names)], columns, path)
            rows = pq.read_table(path, columns=columns).to_pylist()
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise EmberError(
                f"{path} is not a readable Parquet file ({type(err).__name__}: {str(err)[:200]}). Write it again, "
                f"or remove it from the sources."
            ) from None
    elif reader == "arrow":
        from ember.data.arrow import read_rows

        rows = read_rows(path, columns)  # only those columns decoded; a missing one is an EmberError
    else:
        rows = _json_rows(path) if reader == "json" else _jsonl_rows(path)
    names: dict[str, None] = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise EmberError(f"Row {number} of {path} is not an object of column: value. Give one object per row.")
        names.update(dict.fromkeys(row))
    return [{name: row.get(name) for name in names} for row in rows]  # an absent key is a missing cell


def _jsonl_rows(path: str) -> list:
    """The value of each non-blank line of a JSON Lines file."""
    rows = []
    with open(path, encoding=encoding_of(path)) as f:
        try:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except (ValueError, RecursionError) as err:
                        raise EmberError(f"Line {number} of {path} is not JSON ({err}). Fix or remove it.") from None
        except UnicodeDecodeError as err:
            raise not_utf8(path, err) from None
    return rows


def _json_rows(path: str) -> list:
    """The rows of a ``.json`` file holding one list of row objects (``[{...}, {...}]``, as pandas'
    ``to_json(orient="records")`` writes it, and Hugging Face's json loader reads it)."""
    try:
        with open(path, encoding=encoding_of(path)) as f:
            data = json.load(f)
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from None
    except (ValueError, RecursionError) as err:
        raise EmberError(f"{path} is not JSON ({err}). Fix it, or write one object per line (.jsonl).") from None
    if not isinstance(data, list):
        keys = f" with the keys {list(data)[:5]}" if isinstance(data, dict) else ""
        raise EmberError(
            f"{path} holds a JSON {type(data).__name__}{keys}, not a list of rows. Give a list of objects "
            f'([{{"column": value, ...}}, ...]), or one object per line in a .jsonl file.'
        )
    return data


# ---- columns ----


def is_missing(value) -> bool:
    """None, a float NaN, or a string pandas (or ember: ``?``) reads as missing."""
    if isinstance(value, float):
        return math.isnan(value)
    return value is None or (isinstance(value, str) and value.strip().lower() in MISSING)


def _number(value) -> float | None:
    """The number a cell holds, or None when it is text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and ("_" in value or not value.isascii()):
        return None  # Python's float() reads '2021_05' as 202105 and '٣' as 3; pandas and a person read text
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def column_kind(name: str, cells: list, table: Table) -> str:
    """numeric or categorical; mixed kinds and NaN/inf are EmberErrors naming the first offending row."""
    present = [i for i, v in enumerate(cells) if not is_missing(v)]
    _refuse_nested(name, cells, present, table)
    numbers = {i: _number(cells[i]) for i in present}
    text = [i for i in present if numbers[i] is None]
    if text and len(text) < len(present):
        numeric_rows = [i for i in present if numbers[i] is not None]
        odd = text if len(text) <= len(numeric_rows) else numeric_rows
        kinds = ("text", "numbers") if odd is text else ("a number", "text")
        raise EmberError(
            f"The column {name!r} mixes numbers and text: {table.where(odd[0])} holds {kinds[0]} "
            f"{cells[odd[0]]!r} where {len(present) - len(odd)} other cell(s) hold {kinds[1]} "
            f"({len(odd)} such cell(s) in all). Fix those cells, mark them missing (empty or NA), or leave the "
            f"column out with --columns."
        )
    if text:
        _refuse_formatted_numbers(name, cells, present, table)
        return "categorical"
    for i in present:
        if not math.isfinite(numbers[i]):
            raise EmberError(
                f"The numeric column {name!r} holds {cells[i]!r} in {table.where(i)}: NaN and infinite values "
                f"cannot be standardised. Replace it with a number, or leave the cell empty (missing: imputed with "
                f"the training mean)."
            )
    return "numeric" if present else "categorical"


def _refuse_nested(name: str, cells: list, present: list[int], table: Table) -> None:
    """A list or object cell (nested JSON, a Parquet list or struct) is an EmberError: it has no one encoding."""
    i = next((i for i in present if isinstance(cells[i], list | dict)), None)
    if i is not None:
        raise EmberError(
            f"The column {name!r} holds the {type(cells[i]).__name__} {str(cells[i])[:60]!r} in {table.where(i)}: a "
            f"table feature is one number or one category per cell, and a nested value (a JSON list or object, a "
            f"Parquet list or struct) has no single encoding. Flatten it into columns of their own (e.g. "
            f"pandas.json_normalize), or leave the column out with --columns."
        )


# a number written for people: thousands separated by , ' space or no-break space, or a decimal comma
FORMATTED_NUMBER = re.compile(r"[+-]?(\d{1,3}([,' \u00a0\u202f]\d{3})+([.,]\d+)?|\d{1,3}(\.\d{3})+(,\d+)?|\d+,\d+)")


def _refuse_formatted_numbers(name: str, cells: list, present: list[int], table: Table) -> None:
    """A column whose every cell is a number written with separators ('1,234', '3,5') is an EmberError: read as
    categories it would lose its order and magnitude, and 1,234 may be 1234 or 1.234."""
    if present and all(isinstance(cells[i], str) and FORMATTED_NUMBER.fullmatch(cells[i].strip()) for i in present):
        i = present[0]
        raise EmberError(
            f"The column {name!r} holds numbers written with separators, e.g. {cells[i]!r} in {table.where(i)}: "
            f"ember reads a number with a '.' decimal point and no thousands separator (1234.5), so this column "
            f"would be {len({cells[j] for j in present})} unordered categories, and '1,234' may mean 1234 or 1.234. "
            f"Write the numbers plainly (in Excel: Format Cells > Number, no 1000 separator), or leave the column "
            f"out with --columns."
        )


def _text(value) -> str:
    """A categorical cell (or label) as text: 3 and 3.0 in JSON are both '3'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip() if not isinstance(value, bool) else str(value).lower()


def fit_column(name: str, cells: list, kind: str, train: np.ndarray, one_hot_max: int = 1 << 30) -> dict:
    """One column's recipe from its training cells (``train``: their row indices); a categorical column with
    more than ``one_hot_max`` categories is encoded as an index (``"encoding": "index"``)."""
    present = [cells[i] for i in train if not is_missing(cells[i])]
    spec: dict = {"name": name, "type": kind}
    if kind == "numeric":
        values = np.array([_number(v) for v in present], dtype=np.float64)
        distinct = len(np.unique(values))
        integers = bool(len(values)) and bool(np.all(values == np.round(values)))
        spec["mean"] = float(values.mean()) if len(values) else 0.0
        spec["std"] = float(values.std()) if len(values) else 0.0
    else:
        texts = [_text(v) for v in present]
        distinct, integers = len(set(texts)), True
        spec["categories"] = sorted(set(texts))
        spec["missing_slot"] = len(present) < len(train)
        if len(spec["categories"]) > one_hot_max:
            spec["encoding"] = "index"
    if distinct == 0 or (distinct == 1 and (kind == "numeric" or not spec["missing_slot"])):  # 0: all missing
        spec["dropped"] = "constant"
    elif integers and distinct == len(train) > 1:
        spec["dropped"] = "id-like"
    return spec


def feature_names(specs: list[dict]) -> list[str]:
    names = []
    for spec in specs:
        if spec.get("dropped"):
            continue
        if spec["type"] == "numeric" or spec.get("encoding") == "index":
            names.append(spec["name"])
        else:
            slots = spec["categories"] + ([MISSING_SLOT] if spec["missing_slot"] else [])
            names += [f"{spec['name']}={c}" for c in slots]
    return names


def encode_column(spec: dict, cells: list) -> tuple[np.ndarray, int]:
    """The feature block of one kept column [n, width] float32, and its cells unseen in training."""
    if spec["type"] == "numeric":
        std = spec["std"] if spec["std"] > 0 else 1.0
        x = np.array([spec["mean"] if is_missing(v) else _number(v) for v in cells], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(x))
        if len(bad):  # a new row's text, list or infinity, which would be a NaN feature
            raise EmberError(
                f"The numeric column {spec['name']!r} gets {cells[bad[0]]!r}, not a finite number (row "
                f"{bad[0] + 1} of the rows encoded). Give a number, or leave the cell missing (imputed with the "
                f"training mean)."
            )
        return ((x - spec["mean"]) / std).astype(np.float32)[:, None], 0
    if spec.get("encoding") == "index":  # 1 .. K by the sorted categories; 0: missing or unseen
        codes = {c: j + 1 for j, c in enumerate(spec["categories"])}
        x = np.array([0 if is_missing(v) else codes.get(_text(v), 0) for v in cells], dtype=np.float32)
        return x[:, None], sum(1 for v in cells if not is_missing(v) and _text(v) not in codes)
    slots = {c: j for j, c in enumerate(spec["categories"])}
    if spec["missing_slot"]:
        slots[MISSING_SLOT] = len(slots)
    x = np.zeros((len(cells), len(slots)), dtype=np.float32)
    unseen = 0
    for i, v in enumerate(cells):
        j = slots.get(MISSING_SLOT if is_missing(v) else _text(v))
        if j is None:
            unseen += not is_missing(v)
        else:
            x[i, j] = 1.0
    return x, unseen


def embedded_columns(specs: list[dict]) -> list[list[int]]:
    """[feature position, number of codes: categories + 1] of each kept column encoded as an index."""
    out, position = [], 0
    for spec in specs:
        if spec.get("dropped"):
            continue
        if spec.get("encoding") == "index":
            out.append([position, len(spec["categories"]) + 1])
        one = spec["type"] == "numeric" or spec.get("encoding") == "index"
        position += 1 if one else len(spec["categories"]) + bool(spec["missing_slot"])
    return out


def encode(specs: list[dict], columns: dict[str, list]) -> np.ndarray:
    """Feature rows [n, F] float32 of raw ``columns`` by the recipes ``specs`` (dropped ones skipped)."""
    kept = [s for s in specs if not s.get("dropped")]
    blocks = [encode_column(s, columns[s["name"]])[0] for s in kept]
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((0, 0), dtype=np.float32)


# ---- the label ----


def label_codes(table: Table, label: str) -> tuple[np.ndarray, list[str]]:
    """Each row's class index into the sorted distinct labels (numbers sorted as numbers)."""
    if label not in table.columns:
        raise EmberError(
            f"The label column {label!r} is not in the table; its columns are {list(table.columns)}. "
            f"Name one of them with --label."
        )
    cells = table.columns[label]
    for i, v in enumerate(cells):
        if is_missing(v):
            raise EmberError(
                f"The label column {label!r} is empty in {table.where(i)}. Every row needs a label: fill it in "
                f"or remove that row."
            )
        if isinstance(v, list | dict):
            raise EmberError(
                f"The label column {label!r} holds {type(v).__name__} {str(v)[:60]!r} in {table.where(i)}: ember "
                f"classifies each row into one class, and several labels per row (multi-label) are not supported. "
                f"Give one label per row (for example one row per label, or the labels joined into one class name)."
            )
    names = [_text(v) for v in cells]
    distinct = set(names)
    numeric = all(_number(n) is not None for n in distinct)
    if numeric:
        _refuse_respelt_numbers(label, names, distinct, table)
    classes = sorted(distinct, key=lambda n: (_number(n), n) if numeric else n)
    if len(classes) < 2:
        raise EmberError(
            f"The label column {label!r} holds one class ({classes[0]!r}) in all {len(names)} rows: nothing to "
            f"classify. Check that --label names the target column, or add rows of the other classes."
        )
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), classes


def _refuse_respelt_numbers(label: str, names: list[str], distinct: set[str], table: Table) -> None:
    """Two spellings of one number among numeric labels ('1' and '1.0') would be two classes: an EmberError."""
    by_value: dict[float, list[str]] = {}
    for n in sorted(distinct):
        by_value.setdefault(float(n), []).append(n)
    same = next((spellings for spellings in by_value.values() if len(spellings) > 1), None)
    if same:
        rows = [table.where(names.index(n)) for n in same[:2]]
        raise EmberError(
            f"The label column {label!r} writes one number in several ways: {same[0]!r} ({rows[0]}) and "
            f"{same[1]!r} ({rows[1]}); they would be two classes. Write each class one way (e.g. all integers), "
            f"or prepare a numeric target with --target values."
        )


def refuse_numbers_as_many_classes(label: str, classes: list[str], rows: int) -> None:
    """Numeric labels with more classes than half the rows (most classes a single row) are an EmberError that
    suggests ``--target values``: a price or an age, not a class (``--target classes`` insists on classes)."""
    if len(classes) > max(rows // 2, 2) and all(_number(c) is not None for c in classes):
        raise EmberError(
            f"The label column {label!r} holds {len(classes)} distinct numbers in {rows} rows ({classes[0]} .. "
            f"{classes[-1]}): as classes, most would have a single row, too few to learn or validate. To predict "
            f"the number, add --target values (regression); to classify, bin it into a few classes first, or "
            f"insist with --target classes."
        )


def target_values(table: Table, label: str) -> tuple[np.ndarray, list[str]]:
    """``--target values``: each row's label as a float32 number (regression), and no classes. A missing,
    non-numeric, NaN or infinite cell is an EmberError naming its row; so is a target with one value."""
    if label not in table.columns:
        raise EmberError(
            f"The label column {label!r} is not in the table; its columns are {list(table.columns)}. "
            f"Name one of them with --label."
        )
    values = []
    for i, v in enumerate(table.columns[label]):
        number = None if is_missing(v) else _number(v)
        if number is None or not math.isfinite(number):
            what = "is empty" if is_missing(v) else f"holds {v!r}, not a finite number"
            raise EmberError(
                f"The target column {label!r} {what} in {table.where(i)}: with --target values every row needs a "
                f"numeric target to regress. Fix or remove that row, or prepare classes (--target classes)."
            )
        values.append(number)
    if len(set(values)) < 2:
        raise EmberError(
            f"The target column {label!r} holds one value ({values[0]!r}) in all {len(values)} rows: nothing to "
            f"regress. Check that --label names the target column."
        )
    return np.array(values, dtype=np.float32), []


def check_labels_in_training(table: Table, label: str, codes: np.ndarray, train: np.ndarray, classes: list[str]):
    """A class of val/test rows that no training row has is an EmberError naming it and the row."""
    seen = np.zeros(len(classes), dtype=bool)
    seen[codes[train]] = True
    absent = np.flatnonzero(~seen[codes])
    if len(absent):
        i = int(absent[0])
        raise EmberError(
            f"The label {classes[codes[i]]!r} of {label!r} ({table.where(i)}) is in no training row: a class "
            f"with too few rows ({int(np.sum(codes == codes[i]))}) landed only in val/test, and a classifier "
            f"cannot learn it. Add rows of that class, or remove its rows."
        )
