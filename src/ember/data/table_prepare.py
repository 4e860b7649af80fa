"""``ember data prepare --kind table`` (or ``--label`` on rows without a text field): a table's rows →
standardised, encoded float32 feature shards and class (or value) labels; the column logic is
``ember.data.tables``.

Each file is read in a worker process into a work file of its cells (JSON), so a killed prepare does
not read a finished file again; the split, the columns' statistics and the shards then come from the
whole table in this process (a table fits in memory).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ember.data import shards, sources, tables
from ember.data.prepare_job import TRAIN, PrepareJob, stratified_split, write_text
from ember.errors import EmberError


class TablePrepare(PrepareJob):
    """``--label``: every file read into a work file (parallel, resumable), the whole table gathered, a
    stratified split as for images, each column fitted on the training rows, then the shards."""

    def unit_path(self, i: int) -> Path:
        return self.work / f"table_{i:06d}.json"

    def run(self) -> tuple[dict, int, int]:
        label = self.cfg.label
        reused = self.each_unit(
            "read", lambda u: self.unit_path(u.index), _read_unit, lambda u: (u, str(self.unit_path(u.index)))
        )
        table = self.gather()
        values = self.cfg.target == "values"  # regress: float targets, a plain (unstratified) random split
        codes, classes = tables.target_values(table, label) if values else tables.label_codes(table, label)
        if self.cfg.target == "auto":
            tables.refuse_numbers_as_many_classes(label, classes, len(codes))
        strata = np.zeros(len(codes), dtype=np.int64) if values else codes
        split = stratified_split(strata, self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.seed)
        train = np.flatnonzero(split == TRAIN)
        if not values:
            tables.check_labels_in_training(table, label, codes, train, classes)
        specs = self.fit(table, train)
        names = tables.feature_names(specs)
        if not names:
            why = ", ".join(f"{s['name']} ({s['dropped']})" for s in specs)
            raise EmberError(
                f"No feature column is left: {why}. Give columns that vary and are not row ids (--columns), "
                f"or more rows."
            )
        info, stats = {}, {"missing": {}, "unseen": {}}
        for name in self.splits:
            rows = np.flatnonzero(split == shards.SPLITS.index(name))
            x, unseen = self.encode(specs, table, rows)
            dtypes = {"images": "float32", "labels": "float32" if values else "int64"}
            writer = shards.ShardWriter(self.out, name, self.cfg.shard_size, dtypes)
            writer.write(images=x, labels=codes[rows])
            info[name] = {"samples": len(rows), "shards": writer.close()}
            stats["unseen"][name] = unseen
        for spec in specs:
            stats["missing"][spec["name"]] = sum(tables.is_missing(v) for v in table.columns[spec["name"]])
        manifest = self.manifest(table, specs, names, classes, info, stats)
        if values:  # the raw target (not scaled) and its training statistics
            y = codes[train].astype(np.float64)
            target = {"mean": float(y.mean()), "std": float(y.std()), "min": float(y.min()), "max": float(y.max())}
            manifest.update(target="values", label_dtype="float32", target_stats=target)
        return manifest, reused, 0

    def gather(self) -> tables.Table:
        """The whole table from the units' work files, in file order; files must share their columns."""
        table = tables.Table()
        for u in self.units:
            part = json.loads(self.unit_path(u.index).read_text())
            if not part["origins"]:  # a file with no rows adds nothing
                continue
            names = list(part["columns"])
            if table.origins and names != list(table.columns):
                raise EmberError(
                    f"{u.paths[0]} has the columns {names}, {table.origins[0][0]} has {list(table.columns)}. Give "
                    f"files with the same columns in the same order, or prepare them separately."
                )
            for name in names:
                table.columns.setdefault(name, []).extend(part["columns"][name])
            table.origins += [tuple(o) for o in part["origins"]]
            table.bytes += part["bytes"]
            table.decimal_comma += [c for c in part.get("decimal_comma", []) if c not in table.decimal_comma]
        if not table.origins:
            paths = ", ".join(p for u in self.units for p in u.paths)
            raise EmberError(f"The table sources {paths} hold no rows. Give files with a header and rows.")
        return table

    def fit(self, table: tables.Table, train: np.ndarray) -> list[dict]:
        label, chosen = self.cfg.label, self.cfg.columns
        absent = [c for c in chosen if c not in table.columns or c == label]
        if absent:
            raise EmberError(
                f"--columns names {absent}, which the table does not hold as features (the label is {label!r}); "
                f"its columns are {list(table.columns)}."
            )
        names = chosen or [c for c in table.columns if c != label]
        specs = []
        for name in names:
            kind = tables.column_kind(name, table.columns[name], table)
            specs.append(tables.fit_column(name, table.columns[name], kind, train, self.cfg.one_hot_max))
        return specs

    @staticmethod
    def encode(specs: list[dict], table: tables.Table, rows: np.ndarray) -> tuple[np.ndarray, dict]:
        blocks, unseen = [], {}
        for spec in specs:
            if not spec.get("dropped"):
                block, n = tables.encode_column(spec, [table.columns[spec["name"]][i] for i in rows])
                blocks.append(block)
                if n:
                    unseen[spec["name"]] = n
        return np.concatenate(blocks, axis=1), unseen

    def manifest(self, table, specs, names, classes, info, stats) -> dict:
        dropped = {s["name"]: s["dropped"] for s in specs if s.get("dropped")}
        stats = {
            "read": {"samples": len(table.origins), "bytes": table.bytes, "skipped_files": 0, "skipped": []},
            "kept": {s: {"samples": info[s]["samples"]} for s in self.splits},
            "dropped_columns": dropped,
            **({"decimal_comma": table.decimal_comma} if table.decimal_comma else {}),
            **stats,
        }
        return {
            "kind": "table",
            "label": self.cfg.label,
            "num_classes": len(classes),
            "classes": classes,
            "columns": specs,  # each column's recipe: tables.encode(manifest["columns"], raw) repeats the transform
            "features": names,
            **({"embeddings": embedded} if (embedded := tables.embedded_columns(specs)) else {}),
            "image_shape": [len(names)],  # the shards are an image set's: "images" float32 [n, F] and "labels"
            "image_dtype": "float32",
            "shard_size": self.cfg.shard_size,
            "splits": info,
            "stats": stats,
        }


def _read_unit(unit: sources.Unit, path: str) -> int:
    """Worker: one file's rows as their cells, by column (JSON; a cell JSON cannot hold, such as a Parquet
    timestamp, as its text, which is how a categorical column reads it anyway), and each row's origin."""
    # allow_empty: gather says so when every file is empty
    table = tables.read_table(list(unit.paths), allow_empty=True, decimal_comma=True)
    part = {
        "columns": table.columns,
        "origins": table.origins,
        "bytes": table.bytes,
        "decimal_comma": table.decimal_comma,
    }
    write_text(Path(path), json.dumps(part, default=str))
    return len(table.origins)
