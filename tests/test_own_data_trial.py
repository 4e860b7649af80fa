"""Data ember's authors had not seen, as users bring it: Excel's separators and encodings, pandas' missing
values, numbers written for people, nested JSON and Parquet columns, long text cells, 16-bit and huge
images, a flat image folder. Each either prepares with its values intact and counted, or is one paragraph
naming the cause and the fix (never a pandas/pyarrow/PIL/json/csv traceback)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ember.config import DataConfig
from ember.data import shards, sources, tables
from ember.data.prepare import prepare, prepare_kind
from ember.errors import EmberError


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"label": "label", "val_fraction": 0.2, "shard_size": 1024, **kw})


def write_rows(path, header: list[str], rows: list[list], delimiter: str = ",", encoding: str = "utf-8") -> str:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def features(out) -> np.ndarray:
    (count, arrays), *_ = shards.open_split(out, shards.load_manifest(out), "train", verify="size")
    return np.asarray(arrays["images"][:count])


@pytest.mark.parametrize("delimiter", [";", "|", "\t"])
def test_a_csv_file_with_another_separator_is_read_by_its_header(tmp_path, delimiter):
    rows = [[f"{i * 0.5}", "red, dark" if i % 2 else "blue", "ab"[i % 3 == 0]] for i in range(60)]
    path = write_rows(tmp_path / "excel.csv", ["size", "colour", "label"], rows, delimiter)
    result = prepare([path], tmp_path / "out", cfg(), progress=False)
    m = result.manifest
    assert [c["name"] for c in m["columns"]] == ["size", "colour"]
    assert m["features"] == ["size", "colour=blue", "colour=red, dark"] and m["classes"] == ["a", "b"]
    assert sources.peek_columns(path) == ["size", "colour", "label"]


def test_a_semicolon_captions_file_and_labelled_text_are_recognised(tmp_path):
    path = write_rows(tmp_path / "t.csv", ["text", "label"], [[f"w{i}; x", "ab"[i % 2]] for i in range(4)], ";")
    assert prepare_kind([path], cfg()) == "labelled-text"
    from ember.data.caption_prepare import read_mapping

    caps = write_rows(tmp_path / "c.csv", ["image", "caption"], [["a.png", "a cat, sitting"]], ";")
    entries, skipped = read_mapping(tmp_path / "c.csv")
    assert [(name, text) for name, text, _ in entries] == [("a.png", "a cat, sitting")] and not skipped, caps


def test_a_text_cell_longer_than_the_csv_modules_limit_is_read_whole(tmp_path):
    long = "word " * 40_000  # 200 kB in one cell: the csv module's default limit is 128 KiB
    rows = [[long if i == 3 else f"short text {i}", "ab"[i % 2]] for i in range(20)]
    path = write_rows(tmp_path / "long.csv", ["text", "label"], rows)
    table = tables.read_table([path])
    assert table.columns["text"][3] == long and len(table.origins) == 20


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_that_is_not_utf8_names_the_byte_and_the_fix(tmp_path, suffix):
    path = tmp_path / f"excel{suffix}"
    if suffix == ".csv":
        write_rows(path, ["café", "label"], [["crème", "a"], ["müsli", "b"]], encoding="cp1252")
    else:
        path.write_bytes('{"text": "café", "label": "a"}\n'.encode("cp1252"))
    with pytest.raises(EmberError, match=r"not UTF-8 text: byte 0xe9 at offset \d+.*iconv -f cp1252") as err:
        tables.read_table([str(path)])
    assert "\n" not in str(err.value)


def test_pandas_missing_spellings_and_a_float_nan_are_missing_counted_and_imputed(tmp_path):
    spellings = ["nan", "NaN", "#N/A", "<NA>", "-nan", "NULL", "n/a", ""]
    rows = [[spellings[i // 4 % 8] if i % 4 == 0 else str(float(i)), "ab"[i % 2]] for i in range(64)]
    path = write_rows(tmp_path / "na.csv", ["x", "label"], rows)
    m = prepare([path], tmp_path / "out", cfg(), progress=False).manifest
    assert m["stats"]["missing"] == {"x": 16}
    spec = m["columns"][0]
    present = [float(r[0]) for r in rows if r[0].strip().lower() not in tables.MISSING]
    assert len(present) == 48 and spec["type"] == "numeric"
    x = features(tmp_path / "out")
    assert np.isfinite(x).all() and abs(float(x.mean())) < 1e-5  # imputed cells are the mean: 0
    assert tables.is_missing(float("nan")) and not tables.is_missing(0.0) and not tables.is_missing("nano")
    x = tables.encode([spec], {"x": [float("nan"), "NaN", str(spec["mean"])]})
    assert np.allclose(x[:, 0], 0.0)  # missing → the training mean → 0 after standardising
    rows[5][0] = "inf"
    with pytest.raises(EmberError, match="holds 'inf' in row 6"):
        prepare([write_rows(tmp_path / "inf.csv", ["x", "label"], rows)], tmp_path / "o2", cfg(), progress=False)


@pytest.mark.parametrize("cell", ["1,234", "12 500", "3,5", "1'000.25"])
def test_numbers_written_with_separators_are_refused_not_made_categories(tmp_path, cell):
    rows = [[cell if i == 0 else f"{i},{i % 10}00" if "," in cell else f"{i} 000", "ab"[i % 2]] for i in range(40)]
    path = write_rows(tmp_path / "n.csv", ["price", "label"], rows)
    with pytest.raises(EmberError, match=rf"'price' holds numbers written with separators, e.g. {cell!r} in row 1"):
        prepare([path], tmp_path / "out", cfg(), progress=False)
    ok = write_rows(tmp_path / "ok.csv", ["code", "label"], [[f"A-{i % 5},x", "ab"[i % 2]] for i in range(40)])
    assert prepare([ok], tmp_path / "o2", cfg(), progress=False).manifest["columns"][0]["type"] == "categorical"


def test_one_number_spelt_two_ways_in_the_label_is_refused(tmp_path):
    rows = [[str(i % 7), ["1", "1.0", "0", "0"][i % 4]] for i in range(40)]
    with pytest.raises(EmberError, match=r"writes one number in several ways: '1' \(row 1 .*\) and '1.0' \(row 2"):
        prepare([write_rows(tmp_path / "l.csv", ["x", "label"], rows)], tmp_path / "out", cfg(), progress=False)
    rows = [[str(i % 7), ["1.0", "0.0"][i % 2]] for i in range(40)]  # one spelling each: kept as written
    m = prepare([write_rows(tmp_path / "f.csv", ["x", "label"], rows)], tmp_path / "o2", cfg(), progress=False)
    assert m.manifest["classes"] == ["0.0", "1.0"]


def test_nested_json_and_parquet_columns_are_refused_by_name(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text(
        "".join(json.dumps({"x": i % 5, "meta": {"src": "web"}, "label": "ab"[i % 2]}) + "\n" for i in range(20))
    )
    with pytest.raises(EmberError, match=r"'meta' holds the dict .* in row 1 of .*json_normalize.*--columns"):
        prepare([str(path)], tmp_path / "o1", cfg(), progress=False)
    m = prepare([str(path)], tmp_path / "o2", cfg(columns=["x"]), progress=False).manifest  # the way round it
    assert m["features"] == ["x"]
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    tags = pa.array([None if i % 3 else ["a", "b"][: i % 2 + 1] for i in range(20)], pa.list_(pa.string()))
    pq.write_table(pa.table({"tags": tags, "label": ["ab"[i % 2] for i in range(20)]}), tmp_path / "t.parquet")
    with pytest.raises(EmberError, match=r"'tags' holds the list \"\['a'\]\" in row 1 of"):
        prepare([str(tmp_path / "t.parquet")], tmp_path / "o3", cfg(), progress=False)


def test_a_text_csv_whose_quoted_newlines_span_pyarrows_blocks_is_read_whole(tmp_path):
    path = tmp_path / "big.csv"
    docs = [f"doc {i} " + "x" * (i % 90) + "\nits second line, with a comma" for i in range(30_000)]
    write_rows(path, ["id", "text"], [[i, d] for i, d in enumerate(docs)])
    assert path.stat().st_size > 2 << 20  # more than pyarrow's 1 MiB parse blocks
    assert sources._table_column(str(path), "csv", "text", (0, -1)) == docs


def _png(path, array, mode=None) -> str:
    from PIL import Image

    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return str(path)


def test_a_16_bit_image_keeps_its_grey_levels(tmp_path):
    deep = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # 0 .. 63,000
    unit = sources.Unit(0, "image-folder", (_png(tmp_path / "deep.png", deep),), label=0)
    x, _, report = sources.read_images(unit, (1, 8, 8))
    assert not report.skipped and np.array_equal(x[0, 0], (deep >> 8).astype(np.uint8))  # PIL alone: 255 nearly all
    small = np.arange(64, dtype=np.int32).reshape(8, 8)
    unit = sources.Unit(0, "image-folder", (_png(tmp_path / "i32.tif", small, "I"),), label=0)
    assert np.array_equal(sources.read_images(unit, (1, 8, 8))[0][0, 0], small)  # 32-bit storage of 8-bit values


def test_a_grey_image_sorted_first_does_not_turn_a_colour_folder_grey(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(5):
            _png(tmp_path / "img" / c / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    _png(tmp_path / "img" / "a" / "0.png", grey)  # the first image of the first class: grey
    plan = sources.plan_units([str(tmp_path / "img")])
    assert sources.image_geometry(plan) == (3, 8, 8)
    x, _, report = sources.read_images(next(u for u in plan.units if "/a/" in u.paths[0]), (3, 8, 8))
    assert not report.skipped and all(np.array_equal(x[0, k], grey) for k in range(3))  # grey, replicated
    for path in (tmp_path / "img").rglob("*.png"):  # an all-grey set stays grey (every header read once)
        _png(path, grey)
    assert sources.image_geometry(sources.plan_units([str(tmp_path / "img")])) == (1, 8, 8)


def test_a_decompression_bomb_image_is_skipped_and_named(tmp_path, monkeypatch):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(6):
            _png(tmp_path / "img" / c / f"{i}.png", np.full((8, 8), 40 * i + (c == "b"), np.uint8))
    _png(tmp_path / "img" / "b" / "huge.png", np.zeros((64, 64), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is beyond twice that: PIL raises, not warns
    m = prepare([str(tmp_path / "img")], tmp_path / "out", cfg(label=""), progress=False).manifest
    assert sum(s["samples"] for s in m["splits"].values()) == 12 and m["image_shape"] == [1, 8, 8]
    assert any("huge.png: DecompressionBombError" in s for s in m["stats"]["read"]["skipped"])


def test_a_flat_folder_of_images_is_explained_not_read_as_text(tmp_path):
    (tmp_path / "photos").mkdir()
    for i in range(3):
        _png(tmp_path / "photos" / f"{i}.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(
        EmberError, match=r"holds images \(0.png, ...\) but no sub-folder of images per class directly.*--captions"
    ):
        prepare([str(tmp_path / "photos")], tmp_path / "out", cfg(label=""), progress=False)
    (tmp_path / "photos" / "notes.txt").write_text("a text file among them: a text source")
    assert sources.plan_units([str(tmp_path / "photos")]).kind == "text"


@pytest.mark.parametrize("kind", ["table", "labelled-text"])
def test_after_a_refusal_of_the_data_the_fixed_data_prepares_with_the_same_command(tmp_path, kind):
    path = tmp_path / "rows.jsonl"
    rows = [{"text": f"text {i % 5}", "x": i % 5, "label": "ab"[i % 2]} for i in range(30)]
    path.write_text("".join(json.dumps({**r, "label": "a"}) + "\n" for r in rows))  # one class: refused
    config = cfg(kind=kind, columns=["x"] if kind == "table" else [])
    with pytest.raises(EmberError, match="holds one class"):
        prepare([str(path)], tmp_path / "out", config, progress=False)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # the fix
    result = prepare([str(path)], tmp_path / "out", config, progress=False)  # was: "an unfinished prepare"
    assert result.manifest["classes"] == ["a", "b"] and result.reused_units == 0


def test_a_full_disk_while_reading_a_table_keeps_the_work_to_resume(tmp_path, monkeypatch):
    from ember.data import prepare_job, table_prepare

    rows = [[f"{i % 7}", "ab"[i % 2]] for i in range(40)]
    paths = [write_rows(tmp_path / f"p{k}.csv", ["x", "label"], rows[k::2]) for k in range(2)]
    real, calls = table_prepare._read_unit, []

    def full_on_the_second(unit, path):
        calls.append(path)
        if len(calls) == 2:
            raise EmberError(f"The disk is full: writing {path} failed. {shards.RESUMES}")
        return real(unit, path)

    monkeypatch.setattr(table_prepare, "_read_unit", full_on_the_second)
    with pytest.raises(EmberError, match="disk is full"):
        prepare(paths, tmp_path / "out", cfg(), progress=False)
    assert (tmp_path / "out" / prepare_job.shards.WORK / "table_000000.json").is_file()
    monkeypatch.setattr(table_prepare, "_read_unit", real)
    assert prepare(paths, tmp_path / "out", cfg(), progress=False).reused_units == 1


def test_after_a_refused_captions_file_the_fixed_one_prepares_with_the_same_command(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        _png(images / f"{i}.png", np.full((4, 4), 20 * i, np.uint8))
    mapping = tmp_path / "captions.jsonl"  # names a folder that is not there: refused
    mapping.write_text("".join(json.dumps({"file": f"img/{i}.png", "caption": f"grey {i}"}) + "\n" for i in range(10)))
    config = cfg(label="", captions=str(mapping), tokenizer="bytes")
    with pytest.raises(EmberError, match="No image under .* is both readable and named"):
        prepare([str(images)], tmp_path / "out", config, progress=False)
    mapping.write_text(mapping.read_text().replace('"img/', '"images/'))  # the fix: the right folder
    assert prepare([str(images)], tmp_path / "out", config, progress=False).manifest["stats"]["captions"]["pairs"] == 10


def test_utf8_files_with_a_bom_read_as_without(tmp_path):
    from ember.data.pairs import read_aligned

    rows = [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(20)]
    path = tmp_path / "bom.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")  # PowerShell's UTF-8
    assert sources.peek_columns(str(path)) == ["text", "label"] and prepare_kind([str(path)], cfg()) == "labelled-text"
    assert tables.read_table([str(path)]).columns["text"] == [r["text"] for r in rows]
    (tmp_path / "src.txt").write_text("one\ntwo\n", encoding="utf-8-sig")
    (tmp_path / "tgt.txt").write_text("un\ndeux\n", encoding="utf-8-sig")
    assert read_aligned(str(tmp_path / "src.txt"), str(tmp_path / "tgt.txt"))[:2] == (["one", "two"], ["un", "deux"])


@pytest.mark.parametrize("cells", [["2021_05", "2022_11"], ["١٢", "٣٤"]])
def test_text_python_alone_reads_as_a_number_stays_text(tmp_path, cells):
    rows = [[cells[i % 2], str(i % 3), "ab"[i % 2 == 0 and i % 3 == 0]] for i in range(40)]
    m = prepare([write_rows(tmp_path / "p.csv", ["period", "x", "label"], rows)], tmp_path / "o", cfg(), progress=False)
    assert m.manifest["columns"][0]["type"] == "categorical" and m.manifest["columns"][0]["categories"] == sorted(cells)


def test_a_numeric_label_of_mostly_single_rows_suggests_target_values(tmp_path):
    rows = [[str(i % 6), str(1000 * (i * 37 % 101))] for i in range(100)]  # 100 rows, 100 distinct prices
    path = write_rows(tmp_path / "house.csv", ["rooms", "price"], rows)
    with pytest.raises(EmberError, match=r"'price' holds 100 distinct numbers in 100 rows .*--target values"):
        prepare([path], tmp_path / "o1", cfg(label="price"), progress=False)
    m = prepare([path], tmp_path / "o2", cfg(label="price", target="values"), progress=False).manifest
    assert m["target"] == "values" and m["target_stats"]["max"] == 100_000.0
    with pytest.raises(EmberError, match=r"leaves 20 of 100 samples for validation; .* at least 100 .*fewer classes"):
        prepare([path], tmp_path / "o3", cfg(label="price", target="classes"), progress=False)  # insisted
    few = write_rows(tmp_path / "few.csv", ["rooms", "grade"], [[str(i % 6), str(i % 4 + 1)] for i in range(100)])
    assert prepare([few], tmp_path / "o4", cfg(label="grade"), progress=False).manifest["classes"] == list("1234")


def test_a_json_file_of_row_objects_is_rows_and_anything_else_is_named(tmp_path):
    rows = [{"text": f"a text about {'ab'[i % 2]} {i}", "x": i % 3, "label": "ab"[i % 2]} for i in range(30)]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(rows, indent=2))  # pandas' to_json(orient="records", indent=2)
    assert (
        sources.peek_columns(str(path)) == ["text", "x", "label"]
        and prepare_kind([str(path)], cfg()) == "labelled-text"
    )
    m = prepare([str(path)], tmp_path / "o1", cfg(), progress=False).manifest
    assert m["kind"] == "labelled-text" and sum(s["samples"] for s in m["splits"].values()) == 30
    assert tables.read_table([str(path)]).columns["x"] == [r["x"] for r in rows]
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    with pytest.raises(EmberError, match=r"holds a JSON dict with the keys \['data'\], not a list of rows"):
        tables.read_table([str(tmp_path / "wrapped.json")])
    (tmp_path / "cut.json").write_text(json.dumps(rows)[:-40])
    with pytest.raises(EmberError, match=r"cut.json is not JSON \("):
        tables.read_table([str(tmp_path / "cut.json")])


def test_a_class_folders_images_in_its_sub_folders_are_read_and_hidden_ones_left_out(tmp_path):
    root = tmp_path / "photos"
    for name, value in [("cat/0.png", 10), ("cat/2024/1.png", 20), ("cat/2024/deep/2.png", 30), ("dog/0.png", 200)]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _png(root / name, np.full((4, 4), value, np.uint8))
    for name in ("dog/1.png", "dog/2.png", "cat/.ipynb_checkpoints/0-checkpoint.png", "dog/._3.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _png(root / name, np.full((4, 4), 201, np.uint8))
    assert [p.relative_to(root).as_posix() for p in sources.class_images(root / "cat")] == [
        "cat/0.png",
        "cat/2024/1.png",
        "cat/2024/deep/2.png",
    ]
    m = prepare([str(root)], tmp_path / "out", cfg(label="", val_fraction=0.34), progress=False).manifest
    assert sum(s["samples"] for s in m["splits"].values()) == 6 and not m["stats"]["read"]["skipped"]
    split = tmp_path / "split"
    (split / "train" / "cat").mkdir(parents=True)
    _png(split / "train" / "cat" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(EmberError, match=r"Its images lie deeper: name the folder .* e.g. .*split/train\."):
        prepare([str(split)], tmp_path / "o2", cfg(label=""), progress=False)


@pytest.mark.parametrize("cell", ["abc", [1, 2], "inf"])
def test_encoding_a_new_row_refuses_a_numeric_cell_that_is_not_a_number(cell):
    spec = {"name": "age", "type": "numeric", "mean": 40.0, "std": 10.0}
    assert tables.encode([spec], {"age": ["50", None, "nan"]})[:, 0].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(EmberError, match=r"numeric column 'age' gets .*, not a finite number \(row 2 "):
        tables.encode([spec], {"age": ["50", cell]})  # was a NaN feature, and NaN probabilities


def test_a_class_of_one_sample_leaves_the_other_classes_stratified():
    from ember.data.prepare_job import VAL, stratified_split

    labels = np.array([0] * 190 + [1] * 10 + [2])  # one sample of class 2: sklearn refuses to stratify
    for seed in range(20):  # unstratified, class 1 had 0 .. 4 of its 10 in val (0 in 35 % of seeds)
        split = stratified_split(labels, 0.1, 0.0, seed)
        in_val = [int(((split == VAL) & (labels == k)).sum()) for k in (0, 1, 2)]
        assert in_val[1] == 1 and in_val[0] + in_val[2] == 20  # the single one counts in class 0's stratum
    pair = np.array([0] * 40 + [1] * 2 + [2])  # a class of two beside a single: never wholly in val
    assert all(((stratified_split(pair, 0.2, 0.0, s) == VAL) & (pair == 1)).sum() < 2 for s in range(50))
    singles = np.array([0] * 30 + [1, 2, 3])  # several single classes share one stratum
    split = stratified_split(singles, 0.2, 0.0, 0)
    assert ((split == VAL) & (singles == 0)).sum() >= 5 and (split == VAL).sum() == 7


def test_unnamed_columns_are_named_as_pandas_does_and_repeated_ones_are_named_by_position(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("age,x,x,label\n1,2,3,a\n")
    with pytest.raises(EmberError, match=r"repeats column names: .* at column\(s\) 3 \('x'\)\. Name each column once"):
        tables.read_table([str(path)])
    rows = "".join(f"{i},{20 + i % 7},{i % 3},{'ab'[i % 2]},\n" for i in range(30))  # to_csv's index; Excel's last ,
    path.write_text(",age,x,label,\n" + rows)
    m = prepare([str(path)], tmp_path / "out", cfg(), progress=False).manifest
    assert [c["name"] for c in m["columns"]] == ["Unnamed: 0", "age", "x", "Unnamed: 4"]
    assert m["stats"]["dropped_columns"] == {"Unnamed: 0": "id-like", "Unnamed: 4": "constant"}
    assert m["features"] == ["age", "x"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_files_whose_byte_order_mark_declares_utf16_or_utf32_are_read(tmp_path, encoding):
    bom = {"utf-16-be": "\ufeff"}.get(encoding, "")  # Python's utf-16 and utf-32 write a BOM themselves
    rows = [{"text": f"crème brûlée {i}", "label": "ab"[i % 2]} for i in range(20)]
    jsonl = tmp_path / "ps.jsonl"  # PowerShell 5: python make.py > ps.jsonl
    jsonl.write_text(bom + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding=encoding)
    assert prepare_kind([str(jsonl)], cfg()) == "labelled-text"
    assert tables.read_table([str(jsonl)]).columns["text"] == [r["text"] for r in rows]
    tsv = tmp_path / "excel.csv"  # Excel's 'Unicode Text': tab-separated UTF-16
    tsv.write_text(bom + "größe\tlabel\n" + "".join(f"{i % 3}\t{'ab'[i % 2]}\n" for i in range(20)), encoding=encoding)
    assert list(tables.read_table([str(tsv)]).columns) == ["größe", "label"]
    doc = tmp_path / "notes.txt"
    doc.write_text(bom + "déjà vu\n", encoding=encoding)
    docs, report = sources.read_documents(sources.Unit(0, "text", (str(doc),)))
    assert docs == ["déjà vu\n"] and not report.skipped


def test_a_column_missing_in_every_training_row_is_dropped_as_constant():
    table = tables.Table({"empty": ["", "NA", None, "nan"]}, [("t.csv", i) for i in range(1, 5)])
    kind = tables.column_kind("empty", table.columns["empty"], table)
    spec = tables.fit_column("empty", table.columns["empty"], kind, np.arange(4))
    assert spec["dropped"] == "constant" and tables.feature_names([spec]) == []  # was one always-1 feature
    one = tables.fit_column("c", ["red", "", "red", ""], "categorical", np.arange(4))
    assert "dropped" not in one and tables.feature_names([one]) == ["c=red", "c=<missing>"]  # red vs missing varies


def test_a_semicolon_file_of_decimal_commas_is_read_as_numbers_and_listed(tmp_path):
    from ember.data.prepare import summary_lines

    rows = [[f"{i},5" if i % 4 else str(i), "NA" if i % 9 == 0 else f"-0,{i % 7}", "ab"[i % 2]] for i in range(40)]
    path = write_rows(tmp_path / "de.csv", ["gewicht", "delta", "label"], rows, ";")
    result = prepare([path], tmp_path / "out", cfg(), progress=False)
    m = result.manifest
    assert [c["type"] for c in m["columns"]] == ["numeric", "numeric"] and m["stats"]["decimal_comma"] == [
        "gewicht",
        "delta",
    ]
    weights = [float(r[0].replace(",", ".")) for r in rows]
    assert min(weights) == 0.0 and max(weights) == 39.5  # 39,5 is 39.5, not 395 nor a category
    assert any("'gewicht': numbers with a decimal comma" in line for line in summary_lines(result))
    texts = write_rows(tmp_path / "t.csv", ["text", "label"], [[f"{i},5", "ab"[i % 2]] for i in range(20)], ";")
    assert tables.read_table([texts]).columns["text"][3] == "3,5"  # texts (labelled text, pairs) are never read so
    rows[7][0] = "1.234,5"  # European thousands: the column is not converted, and refused
    with pytest.raises(EmberError, match=r"The column 'gewicht' mixes numbers and text"):  # not read as 1.2345
        prepare(
            [write_rows(tmp_path / "eu.csv", ["gewicht", "label"], [r[::2] for r in rows], ";")],
            tmp_path / "o2",
            cfg(),
            progress=False,
        )


def test_peeking_at_a_json_file_reads_its_first_object_only(tmp_path):
    path = tmp_path / "big.json"
    rows = [{"source": "x" * 1000, "target": f"y{i}"} for i in range(3000)]  # 3 MB: more than the peek reads
    path.write_text("  [\n " + ",\n".join(json.dumps(r) for r in rows) + "]")
    assert (
        sources.peek_columns(str(path)) == ["source", "target"] and prepare_kind([str(path)], cfg(label="")) == "pairs"
    )
    for text in ('{"a": [1]}', "[1, 2]", "[", ""):  # not a list of objects: no columns, reading it says why
        path.write_text(text)
        assert sources.peek_columns(str(path)) == []


def test_a_column_encoded_as_an_index_is_named_in_the_summary(tmp_path):
    from ember.data.prepare import summary_lines

    rows = [[f"town {i % 50}", str(i % 3), "ab"[i % 2]] for i in range(200)]  # 50 towns > one_hot_max 32
    result = prepare(
        [write_rows(tmp_path / "t.csv", ["town", "x", "label"], rows)], tmp_path / "o", cfg(), progress=False
    )
    assert "column 'town': 50 categories (> data.one_hot_max): one index feature, embedded" in summary_lines(result)
    assert result.manifest["embeddings"] == [[0, 51]]
