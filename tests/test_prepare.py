"""`ember data prepare`: sources, cleaning counts, dedup, BPE, shards, checksums, workers, resume."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ember.config import DataConfig
from ember.data import prepare as prepare_mod
from ember.data import shards, sources
from ember.data.inspect import describe, verify_dir
from ember.data.mapped import PackedTokens
from ember.data.prepare import prepare
from ember.data.tokenizer import TextCodec
from ember.errors import EmberError

WORDS = [f"w{i}x" for i in range(400)] + ["def", "return", "class", "import", "self", "value", "print"]


def make_doc(rng: random.Random, n_words: int = 120) -> str:
    lines = []
    while n_words > 0:
        k = min(n_words, rng.randint(4, 12))
        lines.append("    " * rng.randint(0, 2) + " ".join(rng.choice(WORDS) for _ in range(k)))
        n_words -= k
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """60 text files with 3 exact copies (up to case and spaces), 2 near copies, a mail
    address, a binary file and one that is not UTF-8."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(7)
    docs = [make_doc(rng) for _ in range(55)]
    docs[3] += "contact: someone@example.org\n"
    docs.append(docs[0].upper().lower().replace(" ", "  "))  # exact copy after normalisation
    docs.append(docs[1])
    docs.append(docs[2] + "\n\n")
    words = docs[4].split(" ")
    words[10] = "changed"
    docs.append(" ".join(words))  # a near copy
    docs.append(docs[5] + "one more line\n")
    for i, doc in enumerate(docs):
        (root / f"doc_{i:03d}.txt").write_text(doc)
    (root / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return root


def small_cfg(**kw) -> DataConfig:
    base = dict(vocab_size=300, shard_size=1024, val_fraction=0.2)
    return DataConfig(**{**base, **kw})


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return prepare([str(corpus)], out, small_cfg(), progress=False)


def die_writing_train_shard(monkeypatch, n: int) -> None:
    """Make the shard writer raise KeyboardInterrupt (a kill) as it writes train shard ``n`` (1-based)."""
    real_flush = shards.ShardWriter._flush

    def dies(self, rows):
        if self.split == "train" and len(self.records) == n - 1:
            raise KeyboardInterrupt("killed")
        real_flush(self, rows)

    monkeypatch.setattr(shards.ShardWriter, "_flush", dies)


def test_prepare_counts_every_step(prepared):
    m = prepared.manifest
    stats = m["stats"]
    assert stats["read"]["documents"] == 60 and stats["read"]["skipped_files"] == 2
    assert any("blob.bin" in s for s in stats["read"]["skipped"]) and any(
        "latin1.txt" in s for s in stats["read"]["skipped"]
    )
    assert stats["clean"]["steps"]["mask_emails"]["replacements"] == 1
    assert stats["dedup"]["exact"]["docs"] == 3 and stats["dedup"]["near"]["docs"] == 2
    kept = stats["kept"]
    assert kept["train"]["documents"] + kept["val"]["documents"] == 55
    assert kept["val"]["documents"] >= 1
    assert m["dtype"] == "uint16" and m["vocab_size"] == 300 and m["kind"] == "tokens"
    train = m["splits"]["train"]
    assert len(train["shards"]) >= 2 and all(r["count"] == 1024 for r in train["shards"][:-1])
    assert sum(r["count"] for r in train["shards"]) == train["tokens"]
    assert json.loads((prepared.out_dir / "stats.json").read_text()) == stats
    assert not (prepared.out_dir / shards.WORK).exists()


def test_shards_decode_to_the_kept_documents(prepared, corpus):
    m, out = prepared.manifest, prepared.out_dir
    codec = TextCodec.from_file(out / "tokenizer.json")
    text = {}
    for split in ("train", "val"):
        ids = np.concatenate(
            [np.fromfile(out / r["files"]["tokens"]["file"], dtype=m["dtype"]) for r in m["splits"][split]["shards"]]
        )
        assert ids[-1] == 0  # every document ends with <|endoftext|>
        docs = codec.decode(ids.tolist()).split("<|endoftext|>")[:-1]
        assert len(docs) == m["splits"][split]["documents"]
        text[split] = docs
    assert not set(text["train"]) & set(text["val"])
    assert sum("<email>" in d for d in text["train"] + text["val"]) == 1
    originals = {p.read_text().rstrip("\n") for p in sorted(corpus.glob("doc_*.txt"))[:55] if "@" not in p.read_text()}
    assert originals <= {d.rstrip("\n") for d in text["train"] + text["val"]}


def test_one_and_two_workers_write_the_same_bytes(corpus, prepared, tmp_path):
    two = prepare([str(corpus)], tmp_path / "two", small_cfg(), workers=2, progress=False)
    assert tree_bytes(two.out_dir) == tree_bytes(prepared.out_dir)


def test_same_settings_reuse_other_settings_refused(corpus, prepared):
    again = prepare([str(corpus)], prepared.out_dir, small_cfg(), progress=False)
    assert again.manifest == prepared.manifest
    with pytest.raises(EmberError, match="or other settings"):
        prepare([str(corpus)], prepared.out_dir, small_cfg(vocab_size=400), progress=False)


def test_strict_names_the_unreadable_file(corpus, tmp_path):
    with pytest.raises(EmberError, match="blob.bin"):
        prepare([str(corpus)], tmp_path / "s", small_cfg(), strict=True, progress=False)


def test_tampered_shard_refused_at_load_and_by_verify(prepared, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(prepared.out_dir, out)
    assert verify_dir(out, progress=False) == []
    victim = out / prepared.manifest["splits"]["train"]["shards"][1]["files"]["tokens"]["file"]
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(EmberError, match=victim.name):
        PackedTokens(out, shards.load_manifest(out), "train", seq_len=16)
    PackedTokens(out, shards.load_manifest(out), "train", seq_len=16, verify="size")  # size-only check passes
    assert [p.split(":")[0] for p in verify_dir(out, progress=False)] == [victim.name]


def test_structured_sources(tmp_path):
    rng = random.Random(1)
    docs = [make_doc(rng, 60) for _ in range(12)]
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[:4]))
        + "\nnot json\n"
        + json.dumps({"other": 1})
        + "\n"
    )
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs[4:8]}), tmp_path / "b.parquet")
    pacsv.write_csv(pa.table({"body": docs[8:12]}), tmp_path / "c.csv")
    jsonl = prepare([str(tmp_path / "a.jsonl")], tmp_path / "j", small_cfg(tokenizer="bytes"), progress=False).manifest
    assert jsonl["stats"]["read"]["documents"] == 4 and jsonl["stats"]["read"]["skipped_files"] == 2
    assert jsonl["vocab_size"] == 256
    tables = prepare(
        [str(tmp_path / "*.parquet"), str(tmp_path / "c.csv")],
        tmp_path / "t",
        small_cfg(text_field="body"),
        progress=False,
    ).manifest
    assert tables["stats"]["read"]["documents"] == 8


def test_missing_source_and_mixed_kinds(tmp_path, corpus):
    with pytest.raises(EmberError, match="does not exist"):
        prepare([str(tmp_path / "nope")], tmp_path / "o", small_cfg(), progress=False)
    with pytest.raises(EmberError, match="mix text and images"):
        prepare([str(corpus), "digits"], tmp_path / "o", small_cfg(), progress=False)


def test_describe_names_the_steps(prepared):
    text = describe(prepared.out_dir)
    for word in ("tokens", "train", "val", "mask_emails", "exact", "near", "first training text"):
        assert word in text


# --- resume ---------------------------------------------------------------------


def test_interrupted_prepare_resumes_without_redoing_work(corpus, prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "UNIT_BYTES", 4096)  # several units
    reference = prepare([str(corpus)], tmp_path / "ref", small_cfg(), progress=False)
    calls = []
    real_clean = prepare_mod._clean_unit

    def dies_on_third_unit(*args):
        calls.append(args[0].index)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_clean(*args)

    monkeypatch.setattr(prepare_mod, "_clean_unit", dies_on_third_unit)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], tmp_path / "out", small_cfg(), progress=False)
    assert len(list((tmp_path / "out" / shards.WORK).glob("clean_*.json"))) == 2

    calls.clear()
    monkeypatch.setattr(prepare_mod, "_clean_unit", lambda *args: calls.append(args[0].index) or real_clean(*args))
    real_flush = shards.ShardWriter._flush
    die_writing_train_shard(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], tmp_path / "out", small_cfg(), progress=False)
    units = len(sources.plan_units([str(corpus)]).units)
    assert units > 4 and sorted(calls) == list(range(2, units))  # the two finished units were not redone

    calls.clear()
    monkeypatch.setattr(shards.ShardWriter, "_flush", real_flush)
    resumed = prepare([str(corpus)], tmp_path / "out", small_cfg(), progress=False)
    assert calls == [] and resumed.reused_units == units and resumed.reused_shards == 1
    assert tree_bytes(resumed.out_dir) == tree_bytes(reference.out_dir)


def test_changed_settings_of_unfinished_prepare_refused(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "_tokenize_unit", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], tmp_path / "out", small_cfg(), progress=False)
    with pytest.raises(EmberError, match="unfinished prepare"):
        prepare([str(corpus)], tmp_path / "out", small_cfg(vocab_size=500), progress=False)
    with pytest.raises(EmberError, match="unfinished prepare"):
        shards.load_manifest(tmp_path / "out")


@pytest.mark.slow
def test_sigkilled_prepare_resumes(tmp_path):
    """A real kill -9 in the middle of cleaning; the second run finishes with the same bytes."""
    import os
    import signal
    import time

    rng = random.Random(3)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"part{i}.txt").write_text("".join(make_doc(rng, 2000) + "\n\n" for _ in range(90)))
    cmd = [sys.executable, "-m", "ember", "data", "prepare", str(src), "--vocab-size", "300"]
    subprocess.run(cmd + ["--out", str(tmp_path / "ref")], check=True, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "out")], stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(list((tmp_path / "out" / shards.WORK).glob("clean_*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((tmp_path / "out" / shards.WORK).glob("clean_*.json")))
    assert 2 <= done < 8
    result = subprocess.run(cmd + ["--out", str(tmp_path / "out")], check=True, capture_output=True, text=True)
    assert f"resumed: {done} unit(s)" in result.stderr
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "ref")


# --- images -----------------------------------------------------------------------


def test_digits_prepare_mean_std_and_stratified_split(tmp_path):
    m = prepare(["digits"], tmp_path / "d", small_cfg(), progress=False).manifest
    assert m["kind"] == "images" and m["image_shape"] == [1, 8, 8] and m["num_classes"] == 10
    assert m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"] == 1797
    assert m["splits"]["val"]["samples"] == 360  # scikit-learn rounds the test share up
    from ember.data.mapped import ImageShards

    train = ImageShards(tmp_path / "d", m, "train")
    batch = train.get(np.arange(len(train)))
    x = batch["x"].double() / 255
    assert abs(x.mean().item() - m["mean"][0]) < 1e-9 and abs(x.std(unbiased=False).item() - m["std"][0]) < 1e-9
    val = ImageShards(tmp_path / "d", m, "val").get(np.arange(m["splits"]["val"]["samples"]))["y"]
    share_tr = np.bincount(batch["y"].numpy(), minlength=10) / len(batch["y"])
    share_va = np.bincount(val.numpy(), minlength=10) / len(val)
    assert np.abs(share_tr - share_va).max() < 0.01


def test_image_folder_and_npz(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).save(
                tmp_path / "folder" / label / f"{i}.png"
            )
    (tmp_path / "folder" / "dog" / "broken.png").write_bytes(b"not a png")
    m = prepare([str(tmp_path / "folder")], tmp_path / "f", small_cfg(val_fraction=0.2), progress=False).manifest
    assert m["image_shape"] == [3, 6, 5] and m["classes"] == ["cat", "dog"]
    assert m["stats"]["read"]["skipped_files"] == 1 and "broken.png" in m["stats"]["read"]["skipped"][0]
    assert m["splits"]["val"]["samples"] == 4
    np.savez(tmp_path / "arr.npz", x=rng.random((30, 4, 4)), y=np.arange(30) % 3)
    m = prepare([str(tmp_path / "arr.npz")], tmp_path / "n", small_cfg(val_fraction=0.2), progress=False).manifest
    assert m["image_shape"] == [1, 4, 4] and m["num_classes"] == 3


def test_a_given_tokenizer_is_used_as_is(prepared, corpus, tmp_path):
    given = prepared.out_dir / "tokenizer.json"
    result = prepare([str(corpus)], tmp_path / "g", small_cfg(tokenizer=str(given), vocab_size=5000), progress=False)
    assert result.manifest["tokenizer"]["sha256"] == prepared.manifest["tokenizer"]["sha256"]
    assert result.manifest["splits"] == prepared.manifest["splits"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(EmberError, match="not a readable tokenizers file"):
        prepare([str(corpus)], tmp_path / "b", small_cfg(tokenizer=str(bad)), progress=False)


def test_token_dtype_by_vocabulary():
    assert shards.token_dtype(65_536) == "uint16" and shards.token_dtype(65_537) == "uint32"


def test_big_jsonl_and_parquet_files_are_split_into_units(tmp_path, monkeypatch):
    """A byte range of a JSONL file owns the lines that start in it; Parquet splits by row
    groups. The documents, and so the prepared bytes, are the same as with one unit per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(9)
    docs = [make_doc(rng, rng.randint(5, 80)) for _ in range(300)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "big.parquet", row_group_size=20)
    whole = {}
    for name in ("big.jsonl", "big.parquet"):
        whole[name] = prepare([str(tmp_path / name)], tmp_path / f"one-{name}", small_cfg(), progress=False)
    monkeypatch.setattr(sources, "UNIT_BYTES", 3000)
    for name in ("big.jsonl", "big.parquet"):
        plan = sources.plan_units([str(tmp_path / name)])
        assert len(plan.units) > 5
        read = [d for u in plan.units for d in sources.read_documents(u)[0]]
        assert read == docs  # every document once, in order, across the cuts
        split = prepare([str(tmp_path / name)], tmp_path / f"many-{name}", small_cfg(), workers=2, progress=False)
        assert split.manifest["splits"] == whole[name].manifest["splits"]  # shards, sizes and hashes
        assert {k: v for k, v in tree_bytes(split.out_dir).items() if k != "manifest.json"} == {
            k: v for k, v in tree_bytes(whole[name].out_dir).items() if k != "manifest.json"
        }


# --- defects found in review: each must stay fixed ----------------------------------------


def test_every_npz_of_a_glob_is_read(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        np.savez(tmp_path / f"part{i}.npz", x=rng.random((50, 4, 4)), y=np.arange(50) % 5)
    m = prepare([str(tmp_path / "*.npz")], tmp_path / "o", small_cfg(val_fraction=0.2), progress=False).manifest
    assert m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"] == 100


def test_bad_npz_labels_are_refused_by_name(tmp_path):
    np.savez(tmp_path / "neg.npz", x=np.zeros((20, 4, 4)), y=np.arange(20) % 3 - 1)
    with pytest.raises(EmberError, match="neg.npz"):
        prepare([str(tmp_path / "neg.npz")], tmp_path / "o", small_cfg(), strict=True, progress=False)


def test_foreign_files_in_out_are_never_touched(corpus, tmp_path):
    out = tmp_path / "proj"
    (out / "work").mkdir(parents=True)
    (out / "work" / "notes.txt").write_text("mine")
    with pytest.raises(EmberError, match="did not write"):
        prepare([str(corpus)], out, small_cfg(), progress=False)
    assert (out / "work" / "notes.txt").read_text() == "mine"
    with pytest.raises(EmberError, match="Cannot create"):
        prepare([str(corpus)], corpus / "doc_000.txt" / "x", small_cfg(), progress=False)


def test_changed_sources_are_never_resumed_or_reused(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(4)
    for i in range(6):
        (src / f"{i}.txt").write_text(make_doc(rng, 400))
    monkeypatch.setattr(prepare_mod, "_tokenize_unit", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], tmp_path / "out", small_cfg(), progress=False)
    monkeypatch.undo()
    (src / "0a.txt").write_text(make_doc(rng, 400))  # a file added between the runs
    with pytest.raises(EmberError, match="unfinished prepare"):
        prepare([str(src)], tmp_path / "out", small_cfg(), progress=False)
    done = prepare([str(src)], tmp_path / "fresh", small_cfg(), progress=False)
    (src / "1.txt").write_text(make_doc(rng, 400))  # an edit after a finished prepare
    with pytest.raises(EmberError, match="other versions"):
        prepare([str(src)], done.out_dir, small_cfg(), progress=False)


def test_out_dir_inside_a_source_is_not_read(tmp_path):
    src = tmp_path / "src"
    (src / ".git").mkdir(parents=True)
    rng = random.Random(5)
    for i in range(4):
        (src / f"{i}.txt").write_text(make_doc(rng, 100))
    (src / ".git" / "objects").write_text(make_doc(rng, 100))
    first = prepare([str(src)], src / "prepared", small_cfg(), progress=False)
    assert first.manifest["stats"]["read"]["documents"] == 4  # the hidden folder is not a source
    again = prepare([str(src)], src / "prepared", small_cfg(), progress=False)  # its own output is not either
    assert again.manifest == first.manifest


def test_a_missing_middle_shard_is_rewritten_with_all_after_it(corpus, prepared, tmp_path, monkeypatch):
    die_writing_train_shard(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], tmp_path / "out", small_cfg(), progress=False)
    monkeypatch.undo()
    (tmp_path / "out" / "train_000001.tokens.bin").unlink()
    resumed = prepare([str(corpus)], tmp_path / "out", small_cfg(), progress=False)
    assert resumed.reused_shards == 1
    assert tree_bytes(resumed.out_dir) == tree_bytes(prepared.out_dir)


def test_special_token_text_in_a_document_stays_text(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"line {i}: before <|endoftext|> after\n" for i in range(30)))
    (tmp_path / "b.txt").write_text("".join(f"another document, line {i}\n" for i in range(30)))
    out = prepare([str(tmp_path)], tmp_path / "o", small_cfg(val_fraction=0.5), progress=False)
    codec = TextCodec.from_file(out.out_dir / "tokenizer.json")
    m = out.manifest
    ids = np.concatenate(
        [
            np.fromfile(out.out_dir / r["files"]["tokens"]["file"], dtype=m["dtype"])
            for s in ("train", "val")
            for r in m["splits"][s]["shards"]
        ]
    )
    assert int((ids == 0).sum()) == 2  # one separator per document, none from the text
    assert "line 7: before <|endoftext|> after" in codec.decode(ids.tolist())


def test_parquet_nulls_are_counted_and_image_folder_mistakes_explained(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    pq.write_table(pa.table({"text": ["one doc " * 20, None, "two doc " * 20]}), tmp_path / "n.parquet")
    m = prepare([str(tmp_path / "n.parquet")], tmp_path / "p", small_cfg(tokenizer="bytes"), progress=False).manifest
    assert m["stats"]["read"]["documents"] == 2 and m["stats"]["read"]["skipped_files"] == 1
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "dog").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "imgs" / "cat" / "0.png")
    with pytest.raises(EmberError, match="dog holds no images"):
        prepare([str(tmp_path / "imgs")], tmp_path / "i", small_cfg(), progress=False)
    (tmp_path / "broken" / "cat").mkdir(parents=True)
    (tmp_path / "broken" / "cat" / "0.png").write_bytes(b"nope")
    with pytest.raises(EmberError, match="no readable images"):
        prepare([str(tmp_path / "broken")], tmp_path / "b", small_cfg(), progress=False)


# --- the held-out test split (data.test_fraction) ------------------------------------------


def split_docs(result) -> dict[str, list[str]]:
    """The documents of each split of a prepared text set, decoded from its shards."""
    m, out = result.manifest, result.out_dir
    codec = TextCodec.from_file(out / "tokenizer.json")
    docs = {}
    for split in shards.splits_of(m):
        ids = np.concatenate(
            [np.fromfile(out / r["files"]["tokens"]["file"], dtype=m["dtype"]) for r in m["splits"][split]["shards"]]
        )
        docs[split] = codec.decode(ids.tolist()).split("<|endoftext|>")[:-1]
    return docs


def test_text_test_split_is_disjoint_and_the_three_cover_every_kept_document(corpus, prepared, tmp_path):
    result = prepare([str(corpus)], tmp_path / "t", small_cfg(test_fraction=0.2), progress=False)
    m, docs, old = result.manifest, split_docs(result), split_docs(prepared)
    assert list(m["splits"]) == ["train", "val", "test"] and list(m["stats"]["kept"]) == ["train", "val", "test"]
    for split in ("train", "val", "test"):
        assert len(docs[split]) == m["splits"][split]["documents"] == m["stats"]["kept"][split]["documents"] >= 1
    every = docs["train"] + docs["val"] + docs["test"]
    assert len(every) == len(set(every)) == 55  # disjoint, and every kept document once
    assert sorted(every) == sorted(old["train"] + old["val"])  # the same kept documents as without a test split
    assert docs["val"] == old["val"]  # val is the same hash band: a test split only takes from train
    assert m["settings"]["test_fraction"] == 0.2 and "test_fraction" not in prepared.manifest["settings"]
    assert result.manifest["settings_sha256"] != prepared.manifest["settings_sha256"]
    assert " test: " in "\n".join(prepare_mod.summary_lines(result)) and "\n  test " in describe(result.out_dir)
    test_shard = result.out_dir / m["splits"]["test"]["shards"][0]["files"]["tokens"]["file"]
    test_shard.write_bytes(b"\xff" * test_shard.stat().st_size)
    assert [p.split(":")[0] for p in verify_dir(result.out_dir, progress=False)] == [test_shard.name]


def test_test_fraction_zero_is_the_prepare_without_the_key(corpus, prepared, tmp_path):
    """Sets prepared before test_fraction existed keep their settings hash, cache key and bytes."""
    again = prepare([str(corpus)], tmp_path / "z", small_cfg(test_fraction=0.0), progress=False)
    assert tree_bytes(again.out_dir) == tree_bytes(prepared.out_dir)
    assert "test_fraction" not in prepared.manifest["settings"] and not shards.has_split(prepared.manifest, "test")
    settings = prepare_mod.full_settings([str(corpus)], small_cfg())
    assert prepare_mod.settings_hash(settings) == prepared.manifest["settings_sha256"]
    assert "\n  test " not in describe(prepared.out_dir) and len(prepare_mod.summary_lines(prepared)) == 2


def test_few_documents_give_each_split_one_or_a_clear_error(tmp_path):
    rng = random.Random(11)
    for i in range(3):
        (tmp_path / "src" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "src" / f"{i}.txt").write_text(make_doc(rng, 60))
    m = prepare(
        [str(tmp_path / "src")], tmp_path / "three", small_cfg(test_fraction=0.01, val_fraction=0.01), progress=False
    ).manifest
    assert [m["splits"][s]["documents"] for s in ("train", "val", "test")] == [1, 1, 1]
    (tmp_path / "src" / "2.txt").unlink()
    with pytest.raises(EmberError, match="at least 3 documents"):
        prepare([str(tmp_path / "src")], tmp_path / "two", small_cfg(test_fraction=0.1), progress=False)
    from ember.config import data_config_from_dict

    with pytest.raises(EmberError, match="leaves nothing to train on"):
        data_config_from_dict({"val_fraction": 0.5, "test_fraction": 0.5})


def image_rows(data_dir: Path, m: dict, split: str) -> list[tuple[bytes, int]]:
    from ember.data.mapped import ImageShards

    batch = ImageShards(data_dir, m, split).get(np.arange(m["splits"][split]["samples"]))
    return [(x.numpy().tobytes(), int(y)) for x, y in zip(batch["x"], batch["y"])]


def test_digits_three_way_split_is_stratified_disjoint_and_complete(tmp_path):
    from collections import Counter

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    old = prepare(["digits"], tmp_path / "old", small_cfg(), progress=False).manifest
    m = prepare(["digits"], tmp_path / "new", small_cfg(test_fraction=0.1), progress=False).manifest
    rows = {s: image_rows(tmp_path / "new", m, s) for s in ("train", "val", "test")}
    assert [len(rows[s]) for s in ("train", "val", "test")] == [1257, 360, 180]
    assert m["stats"]["kept"]["test"] == {"samples": 180}
    assert Counter(rows["train"] + rows["val"] + rows["test"]) == Counter(
        image_rows(tmp_path / "old", old, "train") + image_rows(tmp_path / "old", old, "val")
    )  # every image once
    # val is bit-identical with and without a test split, and to the two-way split ember always made
    x, y = load_digits(return_X_y=True)
    val_idx = np.sort(train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)[1])
    expected = [(np.rint(x[i].reshape(1, 8, 8) * (255 / 16)).astype(np.uint8).tobytes(), int(y[i])) for i in val_idx]
    assert rows["val"] == image_rows(tmp_path / "old", old, "val") == expected
    share = {s: np.bincount([label for _, label in rows[s]], minlength=10) / len(rows[s]) for s in rows}
    assert np.abs(share["test"] - share["train"]).max() < 0.01  # stratified: each class keeps its share
    pixels = np.frombuffer(b"".join(img for img, _ in rows["train"]), np.uint8) / 255
    assert abs(pixels.mean() - m["mean"][0]) < 1e-9  # normalisation from train only
    with pytest.raises(EmberError, match="test_fraction=0.001 leaves 2 of 1797 images for test"):
        prepare(["digits"], tmp_path / "tiny", small_cfg(test_fraction=0.001), progress=False)


def test_loaders_get_a_test_split_only_with_test_fraction(tmp_path):
    from ember.data import addition
    from ember.data.build import build_data

    data = build_data(DataConfig(name="digits", test_fraction=0.1), 8, 50, seed=0)
    assert len(data.test.dataset) == data.test.num_samples == 180 and not data.test.shuffle
    assert build_data(DataConfig(name="digits"), 8, 50, seed=0).test is None
    cfg = DataConfig(name="addition", max_digits=2, num_examples=300, test_fraction=0.05)
    train, val, test = addition.load_splits(cfg)
    pairs = {
        name: {addition.decode_src(s) for s in split["src"]}
        for name, split in (("train", train), ("val", val), ("test", test))
    }
    assert len(pairs["test"]) == len(test["src"]) == 500 and not pairs["test"] & (pairs["val"] | pairs["train"])
    plain = addition.load_splits(cfg.model_copy(update={"test_fraction": 0.0}))
    assert plain[2] is None and bool((plain[1]["src"] == val["src"]).all())  # val drawn as without a test split
