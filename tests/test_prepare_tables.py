"""``ember data prepare --label COLUMN``: a CSV/TSV/JSONL table → standardised, one-hot float32 rows in
the image shards' layout, statistics from the training rows only, and one paragraph per bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from conftest import QUIET
from ember.cli import main
from ember.config import DataConfig, recipe_from_dict
from ember.data import shards, tables
from ember.data.inspect import describe
from ember.data.prepare import prepare
from ember.data.prepare_job import stratified_split as _stratified_split
from ember.errors import EmberError

SITES = ["north", "south", "east"]


def cancer_rows() -> tuple[list[str], list[list]]:
    """Breast cancer rows with a row id, a categorical column, a constant one and missing cells."""
    data = load_breast_cancer(as_frame=False)
    header = ["id", *map(str, data.feature_names[:6]), "site", "batch", "diagnosis"]
    rows = []
    for i, (x, y) in enumerate(zip(data.data, data.target)):
        row = [1000 + i, *(f"{v:.6g}" for v in x[:6]), SITES[i % 3], "b1", data.target_names[y]]
        if i % 11 == 0:
            row[2] = ""  # a missing numeric cell
        if i % 13 == 0:
            row[7] = "NA"  # a missing category
        rows.append(row)
    return header, rows


def write_csv(path, header: list[str], rows: list[list], delimiter: str = ",") -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"label": "diagnosis", "val_fraction": 0.2, "test_fraction": 0.1, "shard_size": 1024, **kw})


@pytest.fixture(scope="module")
def cancer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cancer")
    header, rows = cancer_rows()
    path = write_csv(tmp / "cancer.csv", header, rows)
    result = prepare([path], tmp / "out", cfg(), progress=False)
    return header, rows, result


def split_arrays(result, split: str) -> tuple[np.ndarray, np.ndarray]:
    ((_, arrays),) = shards.open_split(result.out_dir, result.manifest, split)
    return np.asarray(arrays["images"]), np.asarray(arrays["labels"])


def test_statistics_come_from_the_training_rows_only(cancer):
    header, rows, result = cancer
    m = result.manifest
    assert m["kind"] == "table" and m["classes"] == ["benign", "malignant"] and m["image_dtype"] == "float32"
    codes = np.array([m["classes"].index(r[-1]) for r in rows])
    split = _stratified_split(codes, 0.2, 0.1, 0)
    train = np.flatnonzero(split == 0)
    cols = {c["name"]: c for c in m["columns"]}
    for j, name in enumerate(header[1:7], start=1):
        present = np.array([float(rows[i][j]) for i in train if rows[i][j] != ""])
        assert cols[name]["mean"] == pytest.approx(present.mean(), rel=1e-12)
        assert cols[name]["std"] == pytest.approx(present.std(), rel=1e-12)
    everything = np.array([float(r[1]) for r in rows if r[1] != ""])
    assert cols[header[1]]["mean"] != pytest.approx(everything.mean(), rel=1e-9)  # not the whole table's
    assert cols["site"]["categories"] == sorted(SITES) and cols["site"]["missing_slot"]
    assert m["stats"]["dropped_columns"] == {"id": "id-like", "batch": "constant"}
    assert m["stats"]["missing"][header[2]] == len(range(0, len(rows), 11))
    assert m["stats"]["missing"]["site"] == len(range(0, len(rows), 13))
    assert m["features"] == [*header[1:7], "site=east", "site=north", "site=south", "site=<missing>"]
    assert m["image_shape"] == [10] and m["num_classes"] == 2
    x, y = split_arrays(result, "train")
    assert x.shape == (len(train), 10) and x.dtype == np.float32
    np.testing.assert_array_equal(y, codes[train])
    complete = [0, 2, 3, 4, 5]  # mean 0, std 1 on the training rows; the imputed column's std is below 1
    assert np.abs(x[:, complete].mean(axis=0)).max() < 1e-5
    np.testing.assert_allclose(x[:, complete].std(axis=0), 1, rtol=1e-4)
    assert abs(x[:, 1].mean()) < 1e-5 and x[:, 1].std() < 1
    assert set(np.unique(x[:, 6:])) == {0.0, 1.0} and (x[:, 6:].sum(axis=1) == 1).all()


def test_the_manifest_repeats_the_transform_on_raw_rows(cancer):
    header, rows, result = cancer
    m = result.manifest
    codes = np.array([m["classes"].index(r[-1]) for r in rows])
    val = np.flatnonzero(_stratified_split(codes, 0.2, 0.1, 0) == 1)
    raw = {name: [rows[i][j] for i in val] for j, name in enumerate(header)}
    x, y = split_arrays(result, "val")
    np.testing.assert_array_equal(tables.encode(m["columns"], raw), x)
    np.testing.assert_array_equal(y, codes[val])
    stats = json.loads((result.out_dir / "stats.json").read_text())
    assert stats["missing"]["site"] > 0 and stats["dropped_columns"]["id"] == "id-like"
    text = describe(result.out_dir)
    assert "id: dropped (id-like)" in text and "batch: dropped (constant)" in text and "rows" in text


def test_unseen_category_is_all_zeros_and_counted():
    spec = tables.fit_column("c", ["a", "b", "a", "NA", "x"], "categorical", np.arange(4))
    assert spec["categories"] == ["a", "b"] and spec["missing_slot"] and "dropped" not in spec
    block, unseen = tables.encode_column(spec, ["b", "x", "", "a"])
    np.testing.assert_array_equal(block, [[0, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]])
    assert unseen == 1


def test_cli_with_columns_tsv_and_jsonl(tmp_path, capsys):
    header, rows = cancer_rows()
    tsv = write_csv(tmp_path / "cancer.tsv", header, rows, delimiter="\t")
    code = main(
        ["data", "prepare", tsv, "--out", str(tmp_path / "t"), "--label", "diagnosis"]
        + ["--columns", f"{header[2]},site", "--test-fraction", "0.1", "--val-fraction", "0.2"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "train:" in out and "rows" in out and "missing cell(s) imputed" in out
    m = shards.load_manifest(tmp_path / "t")
    assert m["features"] == [header[2], "site=east", "site=north", "site=south", "site=<missing>"]
    assert shards.has_split(m, "test") and m["settings"]["columns"] == [header[2], "site"]
    with open(tmp_path / "rows.jsonl", "w") as f:
        for r in rows:
            cells = {"f": None if r[2] == "" else float(r[2]), "site": None if r[7] == "NA" else r[7], "y": r[-1]}
            f.write(json.dumps(cells) + "\n")
    j = prepare([str(tmp_path / "rows.jsonl")], tmp_path / "j", cfg(label="y"), progress=False).manifest
    assert j["features"] == ["f", "site=east", "site=north", "site=south", "site=<missing>"]
    assert j["columns"][0]["mean"] == m["columns"][0]["mean"]  # the same rows, the same split, the same numbers


def test_text_prepare_is_unchanged_without_a_label(tmp_path):
    assert "label" not in prepare_settings_of(tmp_path) and "columns" not in prepare_settings_of(tmp_path)


def prepare_settings_of(tmp_path) -> dict:
    from ember.data.prepare import prepare_settings

    (tmp_path / "a.txt").write_text("hello")
    return prepare_settings([str(tmp_path / "a.txt")], DataConfig())


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h, r: r[5].pop(), "Row 6 of .* has 9 field"),
        (lambda h, r: h.__setitem__(-1, "target"), "label column 'diagnosis' is not in the table"),
        (lambda h, r: [row.__setitem__(-1, "benign") for row in r], "holds one class .'benign'. in all"),
        (lambda h, r: r[7].__setitem__(3, "inf"), "holds 'inf' in row 8 of .*NaN and infinite"),
        (lambda h, r: r[9].__setitem__(4, "-inf"), "holds '-inf' in row 10"),
        (lambda h, r: r[12].__setitem__(2, "twelve"), "mixes numbers and text: row 13 of .* holds text 'twelve'"),
        (lambda h, r: r[20].__setitem__(-1, ""), "label column 'diagnosis' is empty in row 21"),
    ],
)
def test_bad_tables_are_one_paragraph(tmp_path, edit, match):
    header, rows = cancer_rows()
    edit(header, rows)
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(EmberError, match=match) as err:
        prepare([path], tmp_path / "out", cfg(), progress=False)
    assert "\n" not in str(err.value)


def test_a_label_only_in_val_or_test_is_named(tmp_path):
    header, rows = cancer_rows()
    rows[40][-1] = "rare"
    codes = np.array([sorted({"benign", "malignant", "rare"}).index(r[-1]) for r in rows])
    seed = next(s for s in range(200) if _stratified_split(codes, 0.2, 0.1, s)[40] != 0)
    path = write_csv(tmp_path / "rare.csv", header, rows)
    with pytest.raises(EmberError, match="label 'rare' of 'diagnosis' .row 41 of .* is in no training row"):
        prepare([path], tmp_path / "out", cfg(seed=seed), progress=False)


def test_unknown_columns_and_non_table_files_are_refused(tmp_path):
    header, rows = cancer_rows()
    path = write_csv(tmp_path / "c.csv", header, rows)
    with pytest.raises(EmberError, match=r"--columns names \['nope'\]"):
        prepare([path], tmp_path / "o1", cfg(columns=["nope"]), progress=False)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(EmberError, match="not a table file"):
        prepare([str(tmp_path / "notes.txt")], tmp_path / "o2", cfg(), progress=False)


def test_an_mlp_trains_on_the_prepared_table(cancer, tmp_path):
    from ember.models import registry

    if "mlp" not in registry.MODELS:
        pytest.skip("the mlp model (src/ember/models/mlp.py) is not registered in this tree")
    from ember.training.loop import train

    _, _, result = cancer
    raw = {
        "data": {"name": "prepared", "path": str(result.out_dir)},
        "model": {"name": "mlp", "depth": 2, "width": 32},
        "train": {**QUIET["train"], "max_steps": 60, "batch_size": 32},
        "optim": {"lr": 0.01},
    }
    metrics = train(recipe_from_dict(raw), tmp_path / "run").metrics
    assert metrics["accuracy"] > 0.85  # benign is 63 % of the rows
    raw["data"]["augment"] = {"hflip": 0.5}
    with pytest.raises(EmberError, match="data.augment transforms images"):
        train(recipe_from_dict(raw), tmp_path / "run2")


def test_parquet_rows_with_nulls(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    a = [1.5, 2.0, None, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0] * 3
    c = ["x", "y", None, "x", "y", "x", "y", "x", "y", "x"] * 3
    pq.write_table(pa.table({"a": a, "c": c, "y": [0, 1] * 15}), tmp_path / "t.parquet")
    m = prepare([str(tmp_path / "t.parquet")], tmp_path / "out", cfg(label="y"), progress=False).manifest
    assert m["features"] == ["a", "c=x", "c=y", "c=<missing>"] and m["classes"] == ["0", "1"]
    assert m["stats"]["missing"] == {"a": 3, "c": 3}


def test_a_column_of_many_categories_is_an_index_the_mlp_embeds(tmp_path):
    from ember.data.build import build_sets
    from ember.models.registry import build_model
    from ember.plan import plan
    from ember.training.loop import train

    rng = np.random.default_rng(0)
    rows = [
        [f"{rng.normal():.3f}", f"city{i % 60}", ["red", "green", "blue"][i % 3], "yes" if i % 60 % 2 else "no"]
        for i in range(720)
    ]  # the label is the city's parity: learnable only through the city
    path = write_csv(tmp_path / "t.csv", ["noise", "city", "colour", "label"], rows)
    m = prepare([path], tmp_path / "out", DataConfig(label="label", val_fraction=0.2), progress=False).manifest
    assert m["features"] == ["noise", "city", "colour=blue", "colour=green", "colour=red"]
    assert m["embeddings"] == [[1, 61]] and m["columns"][1]["encoding"] == "index"
    code = m["columns"][1]["categories"].index("city7") + 1  # 1 .. K in sorted order
    assert tables.encode(m["columns"], {"noise": ["0"], "city": ["city7"], "colour": ["red"]})[0, 1] == code
    x, unseen = tables.encode_column(m["columns"][1], ["city0", "atlantis", ""])
    assert x[:, 0].tolist() == [1.0, 0.0, 0.0] and unseen == 1  # unseen and missing: code 0
    data = {"name": "prepared", "path": str(tmp_path / "out")}
    assert build_sets(DataConfig(**data)).spec.embeddings == ((1, 61),)
    recipe = recipe_from_dict(
        {
            "data": data,
            "model": {"name": "mlp", "depth": 2, "width": 32},
            "optim": {"lr": 0.01},
            "train": {**QUIET["train"], "max_steps": 150, "batch_size": 32},
        }
    )
    real = build_model(recipe.model, build_sets(DataConfig(**data)).spec)
    assert plan(recipe).params == sum(p.numel() for p in real.parameters())
    assert train(recipe, tmp_path / "run").metrics["accuracy"] > 0.9  # chance: 0.5
    one_hot = prepare([path], tmp_path / "wide", DataConfig(label="label", one_hot_max=100), progress=False)
    assert len(one_hot.manifest["features"]) == 1 + 60 + 3 and "embeddings" not in one_hot.manifest


def test_an_empty_file_among_tables_adds_no_rows_and_a_killed_prepare_resumes(tmp_path, monkeypatch):
    from conftest import prepare_killed_in, shard_hashes
    from ember.data import table_prepare

    rows = [[f"{i}", f"{i % 5}", "a" if i % 2 else "b"] for i in range(60)]
    paths = [write_csv(tmp_path / f"p{k}.csv", ["x", "y", "label"], rows[k::3]) for k in range(3)]
    empty = write_csv(tmp_path / "empty.csv", ["x", "y", "label"], [])
    cfg = DataConfig(label="label", val_fraction=0.2)
    whole = prepare([*paths, empty], tmp_path / "whole", cfg, workers=2, progress=False).manifest
    assert whole["stats"]["read"]["samples"] == 60
    cut = lambda: prepare(paths, tmp_path / "cut", cfg, progress=False)  # noqa: E731
    prepare_killed_in(table_prepare, "_read_unit", monkeypatch, cut)  # killed while reading the second file
    resumed = prepare(paths, tmp_path / "cut", cfg, progress=False)
    assert resumed.reused_units == 1 and shard_hashes(resumed.manifest) == shard_hashes(whole)


def test_an_unreadable_parquet_table_is_named(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(EmberError, match="bad.parquet is not a readable Parquet file"):
        prepare([str(bad)], tmp_path / "out", DataConfig(label="y"), progress=False)
