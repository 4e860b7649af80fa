"""Hugging Face ``datasets`` as a source of ``ember data prepare`` (issue 17): a directory written by
``Dataset.save_to_disk`` and plain ``.arrow`` files (IPC stream and IPC file format), read with pyarrow
alone, one record batch at a time.

The fixtures are written by the real ``datasets`` (``Dataset.from_dict(...).save_to_disk(dir)`` and
``DatasetDict``): it is in the ``test`` extra, since ``pip install datasets`` took about 7 s here and
adds only dill, multiprocess, pandas and xxhash to what the extras already hold. ember itself never
imports it.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from ember.config import DataConfig
from ember.data import arrow, sources, tables
from ember.data.prepare import prepare
from ember.errors import EmberError

datasets.disable_progress_bars()
WORDS = [f"w{i}x" for i in range(300)] + ["def", "return", "class", "import", "self"]


def make_docs(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "\n" for _ in range(n)]


def small_cfg(**kw) -> DataConfig:
    return DataConfig(**{"vocab_size": 300, "shard_size": 1024, "val_fraction": 0.2, **kw})


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every output file but the manifest (it names the sources) and the lock."""
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.is_file() and p.name not in (".lock", "manifest.json")
    }


def assert_same_output(a: Path, b: Path) -> None:
    """Byte-identical outputs but for the bytes read (a JSONL or CSV file counts its syntax too)."""
    files_a, files_b = tree_bytes(a), tree_bytes(b)
    stats_a, stats_b = (json.loads(files.pop("stats.json")) for files in (files_a, files_b))
    assert files_a == files_b  # tokenizer (or column recipe) and shards
    stats_a["read"].pop("bytes"), stats_b["read"].pop("bytes")
    assert stats_a == stats_b


def write_arrow(path: Path, docs: list[str], rows_per_batch: int, file_format: bool = False) -> Path:
    """``docs`` (and a second column) as an IPC stream or file of batches of ``rows_per_batch`` rows."""
    table = pa.table({"n": list(range(len(docs))), "text": docs})
    new = pa.ipc.new_file if file_format else pa.ipc.new_stream
    path.parent.mkdir(parents=True, exist_ok=True)
    with new(str(path), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=rows_per_batch):
            writer.write_batch(batch)
    return path


def test_a_saved_dataset_prepares_the_same_tokens_as_its_jsonl(tmp_path):
    docs = make_docs(60)
    datasets.Dataset.from_dict({"n": list(range(60)), "text": docs}).save_to_disk(tmp_path / "ds", num_shards=2)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert sources.peek_columns(str(tmp_path / "ds")) == ["n", "text"]
    plan = sources.plan_units([str(tmp_path / "ds")])
    assert [Path(u.paths[0]).name for u in plan.units] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    hf = prepare([str(tmp_path / "ds")], tmp_path / "hf", small_cfg(), progress=False)
    js = prepare([str(tmp_path / "docs.jsonl")], tmp_path / "js", small_cfg(), progress=False)
    assert hf.manifest["stats"]["read"]["documents"] == 60 and hf.manifest["stats"]["read"]["skipped_files"] == 0
    assert hf.manifest["splits"] == js.manifest["splits"]  # token counts, shard sizes and hashes
    assert_same_output(hf.out_dir, js.out_dir)


def test_record_batches_are_units_and_one_or_two_workers_write_the_same_bytes(tmp_path, monkeypatch):
    docs = make_docs(240, seed=5)
    stream = write_arrow(tmp_path / "s" / "big.arrow", docs, 20)
    monkeypatch.setattr(sources, "UNIT_BYTES", 1500)
    for path in (stream, write_arrow(tmp_path / "f.arrow", docs, 20, file_format=True)):
        plan = sources.plan_units([str(path)])
        assert len(plan.units) > 5 and all(u.reader == "arrow" for u in plan.units)
        assert [d for u in plan.units for d in sources.read_documents(u)[0]] == docs  # each once, in order
    _, batch = next(arrow.batches(stream, ["text"], (3, 4)))
    assert batch.schema.names == ["text"] and batch.num_rows == 20  # only the text column is decoded
    cfg = small_cfg(tokenizer="bytes")  # the units' order and contents are under test here, not BPE
    one = prepare([str(stream)], tmp_path / "one", cfg, progress=False)
    two = prepare([str(stream)], tmp_path / "two", cfg, workers=2, progress=False)
    assert one.manifest["stats"]["read"]["documents"] == 240
    assert tree_bytes(one.out_dir) == tree_bytes(two.out_dir) and one.manifest == two.manifest


def test_a_table_from_a_saved_dataset_equals_the_same_rows_from_csv(tmp_path):
    rng = random.Random(2)
    cols = {
        "size": [round(rng.uniform(0, 10), 3) for _ in range(80)],
        "colour": [rng.choice(["red", "green", "blue"]) for _ in range(80)],
        "kind": [rng.choice(["cat", "dog"]) for _ in range(80)],
    }
    datasets.Dataset.from_dict(cols).save_to_disk(tmp_path / "ds")
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(cols))
        writer.writerows(zip(*cols.values()))
    cfg = small_cfg(label="kind")
    hf = prepare([str(tmp_path / "ds")], tmp_path / "hf", cfg, progress=False).manifest
    table = prepare([str(tmp_path / "rows.csv")], tmp_path / "csv", cfg, progress=False).manifest
    assert hf["kind"] == table["kind"] and hf["classes"] == ["cat", "dog"]
    for key in ("splits", "columns", "classes", "features"):
        assert hf[key] == table[key], key
    assert_same_output(tmp_path / "hf", tmp_path / "csv")
    picked = tables.read_table([str(next((tmp_path / "ds").glob("*.arrow")))], columns=["kind", "size"])
    assert list(picked.columns) == ["kind", "size"] and picked.columns["size"] == cols["size"]


def test_a_dataset_dict_is_refused_naming_its_splits(tmp_path):
    ds = datasets.Dataset.from_dict({"text": make_docs(8), "kind": ["a", "b"] * 4})
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(tmp_path / "dd")
    match = r"DatasetDict \(splits: train, test\).*e\.g\. .*dd/train"
    with pytest.raises(EmberError, match=match):
        prepare([str(tmp_path / "dd")], tmp_path / "o", small_cfg(), progress=False)
    with pytest.raises(EmberError, match=match):
        prepare([str(tmp_path / "dd")], tmp_path / "o", small_cfg(label="kind"), progress=False)
    with pytest.raises(EmberError, match=match):  # also when it is inside a directory given as the source
        prepare([str(tmp_path)], tmp_path / "o", small_cfg(), progress=False)
    assert not (tmp_path / "o").exists()
    train = prepare([str(tmp_path / "dd" / "train")], tmp_path / "t", small_cfg(tokenizer="bytes"), progress=False)
    assert train.manifest["stats"]["read"]["documents"] == 8


def test_a_missing_column_is_named_with_the_columns_present(tmp_path):
    datasets.Dataset.from_dict({"body": make_docs(10), "kind": ["a", "b"] * 5}).save_to_disk(tmp_path / "ds")
    present = r"its columns are \['body', 'kind'\]"
    with pytest.raises(EmberError, match=rf"no column 'text'; {present}\. Name the text column with --field"):
        prepare([str(tmp_path / "ds")], tmp_path / "o", small_cfg(), progress=False)
    assert not (tmp_path / "o").exists()  # refused before anything is written
    with pytest.raises(EmberError, match=present):
        prepare([str(tmp_path / "ds")], tmp_path / "o", small_cfg(label="nope", kind="table"), progress=False)
    with pytest.raises(EmberError, match=rf"no column 'nope'; {present}"):
        tables.read_table([str(next((tmp_path / "ds").glob("*.arrow")))], columns=["body", "nope"])
    ok = prepare(
        [str(tmp_path / "ds")], tmp_path / "b", small_cfg(text_field="body", tokenizer="bytes"), progress=False
    )
    assert ok.manifest["stats"]["read"]["documents"] == 10


def test_a_corrupt_arrow_file_is_skipped_in_text_and_refused_in_rows(tmp_path):
    docs = make_docs(60, seed=8)
    good = write_arrow(tmp_path / "src" / "a.arrow", docs, 10)
    data = good.read_bytes()
    (tmp_path / "src" / "b.arrow").write_bytes(data[: len(data) // 2])  # truncated in the middle of a batch
    (tmp_path / "src" / "c.arrow").write_bytes(b"not arrow at all" * 10)
    cfg = small_cfg(tokenizer="bytes")
    m = prepare([str(tmp_path / "src")], tmp_path / "o", cfg, progress=False).manifest
    read = m["stats"]["read"]
    assert read["skipped_files"] == 2 and 60 <= read["documents"] < 120  # b.arrow's whole batches are kept
    assert {s.split(".arrow")[0][-1] for s in read["skipped"]} == {"b", "c"}
    with pytest.raises(EmberError, match=r"c\.arrow"):
        prepare([str(tmp_path / "src")], tmp_path / "s", cfg, strict=True, progress=False)
    for name in ("b.arrow", "c.arrow"):
        with pytest.raises(EmberError, match=rf"{name} is not a readable Arrow file"):
            tables.read_table([str(tmp_path / "src" / name)])


def test_metadata_of_a_saved_dataset_is_not_text_and_reading_needs_no_datasets(tmp_path):
    """The JSON beside the .arrow files is left out; reading works where ``datasets`` cannot be imported."""
    datasets.Dataset.from_dict({"text": make_docs(5)}).save_to_disk(tmp_path / "ds")
    shutil.copy(tmp_path / "ds" / "state.json", tmp_path / "notes.json")  # a JSON file elsewhere stays a document
    names = sorted(p.name for p in sources._expand(str(tmp_path)))
    assert names == ["data-00000-of-00001.arrow", "notes.json"]
    code = (
        "import sys; sys.modules['datasets'] = None; from ember.data import sources, tables; "
        f"plan = sources.plan_units([{str(tmp_path / 'ds')!r}]); "
        "assert len(sources.read_documents(plan.units[0])[0]) == 5; "
        f"assert len(tables.read_table([plan.units[0].paths[0]]).origins) == 5"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_class_label_column_gives_the_classes_their_names(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    texts = [f"{w} {w} {i}" for i in range(20) for w in ("good", "bad")]
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(40)]}, features=features).save_to_disk(
        str(tmp_path / "ds")
    )
    cfg = DataConfig(label="label", tokenizer="bytes", val_fraction=0.25)
    m = prepare([str(tmp_path / "ds")], tmp_path / "out", cfg, progress=False).manifest
    assert m["kind"] == "labelled-text" and m["classes"] == ["neg", "pos"]
