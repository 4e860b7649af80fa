"""Sequence pairs for seq2seq (issue 17): prepare from rows or two aligned files, truncation, bad rows,
beam search, BLEU, idempotent and resumed prepare; the shipped recipe's quality (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import prepare_killed_in, shard_hashes
from ember.config import DataConfig, load_recipe
from ember.data import pairs
from ember.data.prepare import prepare
from ember.data.shards import load_manifest
from ember.data.spec import IGNORE_INDEX
from ember.errors import EmberError
from ember.eval.decoded import bleu
from ember.generation import beam_search, greedy_decode

ROWS = [
    {"source": "1 2", "target": "twelve"},
    {"source": "4 0", "target": "forty"},
    {"source": "7", "target": "seven"},
    {"source": "3 5", "target": "thirty five"},
    {"source": "9 9", "target": "ninety nine"},
    {"source": "2 1", "target": "twenty one"},
    {"source": "6 0", "target": "sixty"},
    {"source": "8 8", "target": "eighty eight"},
    {"source": "1 5", "target": "fifteen"},
    {"source": "5 4", "target": "fifty four"},
]


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"kind": "pairs", "vocab_size": 300, "val_fraction": 0.2, "seq_len": 16, **kw})


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arrays(out: Path) -> dict[str, bytes]:
    m = load_manifest(out)
    return {
        e["file"]: (out / e["file"]).read_bytes()
        for s in m["splits"].values()
        for r in s["shards"]
        for e in r["files"].values()
    }


def test_rows_and_two_aligned_files_prepare_the_same_pairs(tmp_path):
    rows = write_jsonl(tmp_path / "p.jsonl", ROWS)
    (tmp_path / "src.txt").write_text("".join(r["source"] + "\n" for r in ROWS))
    (tmp_path / "tgt.txt").write_text("".join(r["target"] + "\r\n" for r in ROWS))  # Windows line ends too
    a = prepare([str(rows)], tmp_path / "a", DataConfig(vocab_size=300, val_fraction=0.2), progress=False)
    b = prepare([str(tmp_path / "src.txt"), str(tmp_path / "tgt.txt")], tmp_path / "b", cfg(), progress=False)
    assert a.manifest["kind"] == b.manifest["kind"] == "pairs"  # the JSONL was recognised by its fields
    assert arrays(tmp_path / "a") == arrays(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    m = a.manifest
    v = m["tokenizer"]["vocab_size"]
    assert (m["pad_id"], m["bos_id"], m["eos_id"], m["vocab_size"]) == (v, v + 1, v + 2, v + 3)
    assert m["splits"]["train"]["samples"] == 8 and m["splits"]["val"]["samples"] == 2
    sets = pairs.pair_sets(cfg(), tmp_path / "a", m)
    batch = sets.train.get(torch.arange(8))
    assert batch["src"].shape == (8, m["src_len"]) and batch["tgt_in"].shape == batch["tgt_out"].shape == (
        8,
        m["tgt_len"],
    )
    assert (batch["tgt_in"][:, 0] == m["bos_id"]).all()
    ends = (batch["tgt_out"] == m["eos_id"]).float().argmax(1)
    for row, end in zip(batch["tgt_out"], ends.tolist()):  # eos once per row, only IGNORE_INDEX after it
        assert (row[end + 1 :] == IGNORE_INDEX).all() and (row[:end] < m["pad_id"]).all()
    assert sets.spec.task == "seq2seq" and sets.spec.src_len == m["src_len"] and sets.spec.pad_id == m["pad_id"]
    from ember.data.inspect import describe

    shown = describe(tmp_path / "a")
    first = int(np.flatnonzero(pairs.random_split(10, 0.2, 0.0, 0) == 0)[0])  # the first training row
    assert f"first training pair: {ROWS[first]['source']!r} -> {ROWS[first]['target']!r}" in shown
    assert "      8 pairs" in shown and "truncated: 0 source(s), 0 target(s)" in shown


def test_long_pairs_are_cut_and_counted(tmp_path):
    rows = write_jsonl(tmp_path / "p.jsonl", ROWS)
    result = prepare([str(rows)], tmp_path / "d", cfg(tokenizer="bytes", src_len=2, seq_len=6), progress=False)
    m = result.manifest
    # bytes: "1 2" is 3 bytes (9 of 10 sources are longer than 2); a target keeps 5 bytes before eos
    assert (m["src_len"], m["tgt_len"]) == (2, 6)
    # 7 targets are longer than 5 bytes: twelve, thirty five, ninety nine, twenty one, eighty eight, fifteen, fifty four
    assert m["stats"]["truncated"] == {"sources": 9, "targets": 7}
    lines = pairs.summary(m)
    assert "truncated: 9 source(s), 7 target(s)" in lines[1] and "raise data.src_len" in lines[1]
    stats = json.loads((tmp_path / "d" / "stats.json").read_text())
    assert stats["truncated"] == {"sources": 9, "targets": 7}
    # Without caps the widths are the longest pair's: nothing is cut.
    whole = prepare([str(rows)], tmp_path / "w", cfg(tokenizer="bytes"), progress=False).manifest
    assert (whole["src_len"], whole["tgt_len"], whole["stats"]["truncated"]) == (3, 13, {"sources": 0, "targets": 0})


@pytest.mark.parametrize(
    "row, says",
    [
        ({"source": "1 2"}, "The target of row 3 of"),
        ({"source": "1 2", "target": "  "}, "is empty"),
        ({"source": 12, "target": "twelve"}, "is not text but int"),
    ],
)
def test_a_bad_row_is_named_with_its_fix(tmp_path, row, says):
    rows = write_jsonl(tmp_path / "p.jsonl", [*ROWS[:2], row, *ROWS[2:]])
    with pytest.raises(EmberError, match=says) as err:
        prepare([str(rows)], tmp_path / "d", cfg(), progress=False)
    assert "row 3 of" in str(err.value) and "fix or remove" in str(err.value)


def test_missing_fields_and_unequal_files_are_refused(tmp_path):
    rows = write_jsonl(tmp_path / "p.jsonl", [{"question": "1", "answer": "one"}] * 5)
    with pytest.raises(EmberError, match="no 'source' or 'target' field.*'question', 'answer'.*--source-field"):
        prepare([str(rows)], tmp_path / "d", cfg(), progress=False)
    with_fields = prepare(
        [str(rows)], tmp_path / "q", cfg(source_field="question", target_field="answer"), progress=False
    )
    assert with_fields.manifest["splits"]["train"]["samples"] == 4
    (tmp_path / "src.txt").write_text("a\nb\nc\n")
    (tmp_path / "tgt.txt").write_text("x\ny\n")
    with pytest.raises(EmberError, match=r"src.txt has 3 lines, .*tgt.txt has 2"):
        prepare([str(tmp_path / "src.txt"), str(tmp_path / "tgt.txt")], tmp_path / "e", cfg(), progress=False)
    (tmp_path / "tgt.txt").write_text("x\n\nz\n")
    with pytest.raises(EmberError, match=r"The target of line 2 of .*src.txt / .*tgt.txt is empty; .*both files"):
        prepare([str(tmp_path / "src.txt"), str(tmp_path / "tgt.txt")], tmp_path / "e", cfg(), progress=False)
    (tmp_path / "tgt.txt").write_text("x\ny\nz\n")  # fixed: the same command now prepares
    fixed = prepare([str(tmp_path / "src.txt"), str(tmp_path / "tgt.txt")], tmp_path / "e", cfg(), progress=False)
    assert fixed.manifest["stats"]["read"]["samples"] == 3


def test_prepare_again_is_a_no_op_and_an_interrupted_one_finishes_the_same(tmp_path, monkeypatch):
    rows = write_jsonl(tmp_path / "p.jsonl", ROWS)
    first = prepare([str(rows)], tmp_path / "d", cfg(), progress=False)
    again = prepare([str(rows)], tmp_path / "d", cfg(), progress=False)
    assert again.manifest == first.manifest
    with pytest.raises(EmberError, match="other settings"):
        prepare([str(rows)], tmp_path / "d", cfg(seed=1), progress=False)
    from ember.data import shards

    real = shards.write_manifest
    monkeypatch.setattr(shards, "write_manifest", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prepare([str(rows)], tmp_path / "r", cfg(), progress=False)
    assert not (tmp_path / "r" / "manifest.json").exists() and (tmp_path / "r" / ".ember-work").is_dir()
    monkeypatch.setattr(shards, "write_manifest", real)
    resumed = prepare([str(rows)], tmp_path / "r", cfg(), progress=False)
    assert resumed.manifest["settings_sha256"] == first.manifest["settings_sha256"]
    assert arrays(tmp_path / "r") == {k: v for k, v in arrays(tmp_path / "d").items()}


class _Scripted(torch.nn.Module):
    """A decoder whose next-token probabilities depend on the last token only (eos 0, bos 1):
    after bos: 2 (0.55) or 3 (0.45); after 2: eos 0.4, 2 0.3, 3 0.3; after 3: eos 0.99."""

    TABLE = {1: [0.0, 0.0, 0.55, 0.45], 2: [0.4, 0.0, 0.3, 0.3], 3: [0.99, 0.0, 0.005, 0.005], 0: [1.0, 0, 0, 0]}

    def encode(self, src):
        return torch.zeros(1, 1, 1), torch.ones(1, 1, 1, 1, dtype=torch.bool)

    def decode(self, tgt, memory, mask):
        probs = torch.tensor([[self.TABLE[t] for t in row] for row in tgt.tolist()], dtype=torch.float64)
        return probs.clamp_min(1e-12).log()


def test_beam_search_finds_the_likelier_answer_greedy_misses():
    model, src = _Scripted(), torch.zeros(1, 1, dtype=torch.long)
    assert greedy_decode(model, src, bos=1, eos=0, max_len=5) == [2, 0]  # mean log p = (ln .55 + ln .4) / 2
    assert beam_search(model, src, bos=1, eos=0, max_len=5, beam=1) == [2, 0]
    assert beam_search(model, src, bos=1, eos=0, max_len=5, beam=2) == [3, 0]  # (ln .45 + ln .99) / 2: higher


def test_beam_one_is_greedy_on_a_real_model():
    from ember.data.spec import DataSpec
    from ember.models.seq2seq import Seq2Seq, Seq2SeqConfig

    torch.manual_seed(0)
    spec = DataSpec(task="seq2seq", vocab_size=20, seq_len=8, src_len=6, pad_id=17, bos_id=18, eos_id=19)
    model = Seq2Seq(Seq2SeqConfig(n_embd=32, n_head=2, max_len=10), spec).eval()
    for _ in range(10):
        src = torch.randint(0, 17, (1, 6))
        assert beam_search(model, src, 18, 19, 8, beam=1) == greedy_decode(model, src, 18, 19, 8)


def test_bleu_on_known_examples():
    assert bleu([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert bleu([[5, 6, 7, 8]], [[1, 2, 3, 4]]) == 0.0
    # precisions 4/5, 3/4, 2/3, 1/2; same length: no brevity penalty
    assert bleu([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 6]]) == pytest.approx((0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25)
    assert bleu([[1, 2, 3, 4]], [[1, 2, 3, 4, 5, 6]]) == pytest.approx(math.exp(1 - 6 / 4))  # all precise, short
    # corpus-level: the counts are summed before the precisions are taken
    corpus = bleu([[1, 2, 3, 4], [1, 2, 3, 9]], [[1, 2, 3, 4], [1, 2, 3, 4]])
    assert corpus == pytest.approx((7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25)


def test_the_sample_is_numbers_in_words(tmp_path):
    path = pairs.write_sample(tmp_path / "n.jsonl", seed=0, count=500)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len({r["source"] for r in rows}) == 500
    assert pairs.number_words(4027) == "four thousand twenty seven"
    assert pairs.number_words(90015) == "ninety thousand fifteen"
    assert pairs.number_words(100) == "one hundred" and pairs.number_words(0) == "zero"
    assert all(pairs.number_words(int(r["source"].replace(" ", ""))) == r["target"] for r in rows)
    assert path.read_text() == pairs.write_sample(tmp_path / "m.jsonl", seed=0, count=500).read_text()


@pytest.mark.slow
def test_the_shipped_pairs_recipe_reaches_its_stated_quality(tmp_path):
    from ember.eval.evaluate import evaluate
    from ember.generation import generate
    from ember.training.loop import train

    sample = pairs.write_sample(tmp_path / "numbers.jsonl")
    data = tmp_path / "numbers"
    prepare([str(sample)], data, DataConfig(vocab_size=512, test_fraction=0.1), progress=False)
    recipe_path = Path(__file__).parent.parent / "recipes" / "seq2seq-pairs.yaml"
    recipe = load_recipe(recipe_path, [f"data.path={data}", "train.progress=false", "train.checkpoint_every=0"])
    result = train(recipe, tmp_path / "run")
    assert result.metrics["exact_match"] >= 0.97  # teacher-forced, validation
    report = evaluate(result.run_dir, split="test", decode_samples=0)
    assert report.decoding["samples"] == 800
    assert report.metrics["decoded_exact_match"] >= 0.95 and report.metrics["bleu"] >= 0.97  # README, BENCHMARKS
    assert generate(result.run_dir, prompt="4 0 2 7") == "four thousand twenty seven"
    assert generate(result.run_dir, prompt="9 0 0 1 5", beam=3) == "ninety thousand fifteen"
    assert np.isfinite(report.metrics["loss"])


def test_decoded_metrics_count_the_first_samples_exactly():
    from ember.data.loader import ArrayDataset, BatchLoader
    from ember.data.spec import DataSpec
    from ember.eval.decoded import decoded_metrics

    model = _Scripted()
    model.weight = torch.nn.Parameter(torch.zeros(1))  # a device to read
    # greedy answers [2, eos] to every source; the references: 2, 3, 2 then eos
    tgt_out = torch.tensor([[2, 0, IGNORE_INDEX], [3, 0, IGNORE_INDEX], [2, 0, IGNORE_INDEX]])
    data = ArrayDataset(src=torch.zeros(3, 1, dtype=torch.long), tgt_in=tgt_out.clamp_min(0), tgt_out=tgt_out)
    spec = DataSpec(task="seq2seq", vocab_size=4, seq_len=3, src_len=1, pad_id=0, bos_id=1, eos_id=0)
    loader = BatchLoader(data, 2, shuffle=False, seed=0, drop_last=False)
    every = decoded_metrics(model, loader, spec)
    assert every["samples"] == 3 and every["decoded_exact_match"] == pytest.approx(2 / 3)
    assert every["bleu"] == 0.0  # one-token answers have no 2-grams: BLEU-4 without smoothing is 0
    first = decoded_metrics(model, loader, spec, limit=2, beam=2)
    assert first["samples"] == 2 and first["decoded_exact_match"] == 0.5  # beam 2 answers [3, eos] to both


def test_files_are_units_read_in_parallel_and_a_killed_prepare_resumes(tmp_path, monkeypatch):
    from ember.data import pairs as pairs_module

    rows = [{"source": f"{i} {i + 1}", "target": f"n{i}"} for i in range(90)]
    paths = []
    for k in range(3):
        path = tmp_path / f"part{k}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[k::3]))
        paths.append(str(path))
    cfg = DataConfig(tokenizer="bytes", val_fraction=0.2)
    one = prepare(paths, tmp_path / "one", cfg, progress=False).manifest
    two = prepare(paths, tmp_path / "two", cfg, workers=2, progress=False).manifest
    files = shard_hashes
    assert (
        files(one) == files(two)
        and one["splits"]["train"]["samples"] == 72
        and one["kind"] in ("pairs", "labelled-text")
    )
    cut = lambda: prepare(paths, tmp_path / "cut", cfg, progress=False)  # noqa: E731
    prepare_killed_in(pairs_module, "_tokenize_unit", monkeypatch, cut)  # as if killed while tokenising
    resumed = prepare(paths, tmp_path / "cut", cfg, progress=False)
    assert resumed.reused_units == 3 and files(resumed.manifest) == files(one)
