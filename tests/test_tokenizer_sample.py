"""``data.tokenizer_sample_mb``: the BPE learns from a hash-chosen sample of the training split of
about the budget, the same whatever the worker count, and every document is still tokenised."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ember.config import DataConfig
from ember.data.prepare import prepare, prepare_settings
from ember.data.tokenizer_sample import SampleCount, sample_texts

WORDS = [f"w{i}q" for i in range(300)] + ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """200 documents, about 400 kB, in 20 files."""
    root, rng = tmp_path_factory.mktemp("sample-corpus"), random.Random(3)
    for f in range(20):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 400))) for _ in range(10)]
        (root / f"part_{f:02d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def test_the_sample_is_about_the_budget_and_stable():
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 150))) for _ in range(4000)]
    total = sum(len(d.encode()) for d in docs)
    count = SampleCount()
    kept = list(sample_texts(lambda: docs, total / 4 / 1e6, count))
    assert count.sampled and count.total_bytes == total and count.total_documents == 4000
    assert 0.2 < count.bytes / total < 0.3 and count.documents == len(kept)  # a quarter, within sampling noise
    # The same texts in another order: the same sample (it depends on each text, not on its place).
    again = list(sample_texts(lambda: list(reversed(docs)), total / 4 / 1e6, SampleCount()))
    assert sorted(again) == sorted(kept)
    everything = SampleCount()
    assert list(sample_texts(lambda: docs, 2 * total / 1e6, everything)) == docs and not everything.sampled
    assert list(sample_texts(lambda: docs, 0, SampleCount())) == docs


def test_prepare_trains_on_the_sample_and_tokenises_everything(corpus, tmp_path, caplog):
    cfg = dict(vocab_size=400, shard_size=4096, val_fraction=0.1)
    full = prepare([str(corpus)], tmp_path / "full", DataConfig(**cfg))
    with caplog.at_level("INFO", logger="ember"):
        one = prepare([str(corpus)], tmp_path / "one", DataConfig(**cfg, tokenizer_sample_mb=0.1))
    two = prepare([str(corpus)], tmp_path / "two", DataConfig(**cfg, tokenizer_sample_mb=0.1), workers=2)
    sampled = (tmp_path / "one" / "tokenizer.json").read_bytes()
    assert sampled == (tmp_path / "two" / "tokenizer.json").read_bytes()  # any worker count, the same BPE
    assert sampled != (tmp_path / "full" / "tokenizer.json").read_bytes()
    assert one.manifest["splits"] == two.manifest["splits"]  # the same shards, byte for byte (sha256 inside)
    for split in ("train", "val"):  # every kept document is still tokenised
        assert one.manifest["splits"][split]["documents"] == full.manifest["splits"][split]["documents"]
    line = next(r.getMessage() for r in caplog.records if "tokenizer: trained on a sample" in r.getMessage())
    kept_mb = float(line.split("(")[1].split(" of ")[0])
    assert 0.05 < kept_mb < 0.15, line  # about 0.1 MB of the ~0.35 MB training split
    # A budget above the training split trains on all of it: the same set as without one.
    bigger = prepare([str(corpus)], tmp_path / "big", DataConfig(**cfg, tokenizer_sample_mb=100))
    assert (tmp_path / "big" / "tokenizer.json").read_bytes() == (tmp_path / "full" / "tokenizer.json").read_bytes()
    assert bigger.manifest["splits"] == full.manifest["splits"]


def test_settings_name_the_sample_only_when_set_and_a_given_tokenizer_refuses_it():
    assert "tokenizer_sample_mb" not in prepare_settings(["x.txt"], DataConfig())  # older sets stay valid
    assert prepare_settings(["x.txt"], DataConfig(tokenizer_sample_mb=5))["tokenizer_sample_mb"] == 5
    with pytest.raises(ValueError, match="trains none"):
        DataConfig(tokenizer="bytes", tokenizer_sample_mb=5)


def test_the_flag_reaches_prepare_and_a_refusal_names_the_data_section(corpus, tmp_path, capsys):
    from ember.cli import main

    argv = ["data", "prepare", str(corpus), "--out", str(tmp_path / "x"), "--tokenizer", "bytes"]
    assert main([*argv, "--tokenizer-sample-mb", "1"]) == 2
    err = capsys.readouterr().err
    assert "  - data: data.tokenizer_sample_mb=1.0 chooses the text a BPE is trained on" in err and "recipe:" not in err
    assert not (tmp_path / "x").exists()
