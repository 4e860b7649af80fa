"""Deduplication: exact keys, shingles, MinHash signatures and the keep-the-first decisions.

The planted test measures recall and precision of near-duplicate removal against a
ground truth computed exactly from shingle sets.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from ember.data.dedup import SIGNATURE_DTYPE, DedupConfig, Deduplicator, exact_key, shingles, signature
from ember.errors import EmberError


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    sa, sb = set(shingles(a, ngram)), set(shingles(b, ngram))
    return len(sa & sb) / len(sa | sb)


def random_docs(rng: np.random.Generator, n: int, words: int = 150) -> tuple[list[str], list[str]]:
    """(a vocabulary of 3000 random words, n documents of ``words`` words drawn from it)."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(3000)]
    return vocab, [" ".join(rng.choice(vocab, size=words)) for _ in range(n)]


def replace_span(rng: np.random.Generator, text: str, vocab: list[str], length: int, at: int | None = None) -> str:
    words = text.split()
    at = int(rng.integers(0, len(words) - length + 1)) if at is None else at
    words[at:at + length] = rng.choice(vocab, size=length)
    return " ".join(words)


def decide(docs: list[str], cfg: DedupConfig) -> list[str | None]:
    dedup = Deduplicator(cfg)
    return [dedup.check(f"d{i}", exact_key(d), signature(d, cfg)) for i, d in enumerate(docs)]


# --- keys and shingles ----------------------------------------------------------------


def test_exact_key_ignores_case_and_whitespace_only():
    key = exact_key("Hello  World\n\tagain ")
    assert len(key) == 32
    assert exact_key("hello world again") == key
    assert exact_key("hello world, again") != key


def test_shingles_are_distinct_word_ngrams():
    assert shingles("A b  C d", 2) == [b"a b", b"b c", b"c d"]
    assert shingles("x y x y x y", 2) == [b"x y", b"y x"]  # a set: repeats are not returned
    assert shingles("one two", 5) == [b"one two"]  # fewer words than ngram: one shingle of all
    assert shingles("  ", 5) == [b""]
    assert shingles("héllo wörld", 1) == ["héllo".encode(), "wörld".encode()]


def test_config_is_validated():
    with pytest.raises(ValidationError):
        DedupConfig(threshold=1.0)
    with pytest.raises(EmberError, match="num_perm"):
        Deduplicator(DedupConfig(threshold=0.99, num_perm=16))
    with pytest.raises(ValidationError):
        DedupConfig(num_perm=8)
    with pytest.raises(ValidationError):
        DedupConfig(shingle=3)  # a typo is an error, not a silent default


# --- signatures -----------------------------------------------------------------------


def test_signature_shape_and_jaccard_estimate():
    rng = np.random.default_rng(0)
    vocab, (doc,) = random_docs(rng, 1, words=400)
    near = replace_span(rng, doc, vocab, 40, at=180)
    cfg = DedupConfig(num_perm=256)
    a, b = signature(doc, cfg), signature(near, cfg)
    assert a.dtype == SIGNATURE_DTYPE and a.shape == (256,)
    assert np.array_equal(a, signature(doc, cfg))
    true = jaccard(doc, near)
    assert 0.7 < true < 0.85
    assert abs(np.mean(a == b) - true) < 0.1  # 3.5 standard deviations at 256 permutations
    assert not np.array_equal(a, signature(doc, DedupConfig(num_perm=256, seed=2)))


def _signatures_in_child(docs: list[str], cfg: DedupConfig) -> list[np.ndarray]:
    return [signature(d, cfg) for d in docs]


def _decisions_in_child(docs: list[str], cfg: DedupConfig) -> list[str | None]:
    return decide(docs, cfg)


def test_signature_and_decisions_are_the_same_in_a_spawned_process():
    # A spawned interpreter has a different str hash salt: this fails if anything
    # depends on hash() of a str (or on set order).
    rng = np.random.default_rng(1)
    vocab, docs = random_docs(rng, 40, words=100)
    docs += [replace_span(rng, d, vocab, 1) for d in docs[:10]] + [d.upper() for d in docs[10:15]]  # J ≈ 0.9
    cfg = DedupConfig()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child_sigs = pool.apply(_signatures_in_child, (docs[:2], cfg))
        child_decisions = pool.apply(_decisions_in_child, (docs, cfg))
    for mine, theirs in zip(_signatures_in_child(docs[:2], cfg), child_sigs):
        assert np.array_equal(mine, theirs)
    assert decide(docs, cfg) == child_decisions
    assert child_decisions.count("exact") == 5 and child_decisions.count("near") == 10


def test_modules_do_not_import_torch():
    code = "import sys, ember.data.dedup, ember.data.clean; sys.exit('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


# --- the deduplicator -------------------------------------------------------------------


def test_exact_copies_are_dropped_and_the_first_kept():
    docs = ["The quick brown fox.", "the  QUICK brown\nfox.", "Another doc.", "The quick brown fox."]
    dedup = Deduplicator(DedupConfig(near=False))
    got = [dedup.check(str(i), exact_key(d), None, nbytes=len(d.encode())) for i, d in enumerate(docs)]
    assert got == [None, "exact", None, "exact"]
    assert dedup.stats == {"exact": {"docs": 2, "bytes": 21 + 20}, "near": {"docs": 0, "bytes": 0}}
    assert dedup.seen == 4


def test_switches_and_bad_input():
    rng = np.random.default_rng(2)
    vocab, (doc,) = random_docs(rng, 1)
    near = replace_span(rng, doc, vocab, 3)
    cfg = DedupConfig(exact=False)
    assert decide([doc, doc, near], cfg) == [None, "near", "near"]  # without exact, copies are near
    assert decide([doc, doc, near], DedupConfig(near=False)) == [None, "exact", None]
    dedup = Deduplicator(cfg)
    dedup.check("a", None, signature(doc, cfg))
    with pytest.raises(ValueError):
        dedup.check("a", None, signature(replace_span(rng, doc, vocab, 100), cfg))  # key used twice
    with pytest.raises(ValueError):
        dedup.check("b", None, signature(doc, DedupConfig(num_perm=64)))


def test_lsh_candidates_below_threshold_are_kept():
    # Pairs of Jaccard ≈ 0.65 (27 of 150 words replaced): the recall-leaning LSH makes
    # about 40% of them candidates; confirming by the signatures' agreement keeps them all.
    rng = np.random.default_rng(4)
    vocab, docs = random_docs(rng, 30)
    copies = [replace_span(rng, d, vocab, 27) for d in docs]
    assert all(0.6 < jaccard(d, c) < 0.7 for d, c in zip(docs, copies))
    assert decide(docs + copies, DedupConfig()) == [None] * 60


def test_removed_near_duplicates_do_not_attract_more():
    # A → A' → A'': A' is a near-copy of A, A'' of A' but not of A. A' is removed
    # and never indexed, so A'' stays (judged against A only).
    rng = np.random.default_rng(3)
    vocab, (a,) = random_docs(rng, 1)
    a1 = replace_span(rng, a, vocab, 7, at=30)
    a2 = replace_span(rng, a1, vocab, 7, at=100)
    assert jaccard(a, a1) > 0.85 and jaccard(a1, a2) > 0.85 and jaccard(a, a2) < 0.75
    cfg = DedupConfig(num_perm=1024)  # σ of the estimate ≈ 0.013: the 0.06 margins are 4.5σ
    assert decide([a, a1, a2], cfg) == [None, "near", None]
    assert decide([a, a2], cfg) == [None, None]
    assert decide([a1, a2], cfg) == [None, "near"]


def test_planted_near_duplicates_recall_and_precision():
    rng = np.random.default_rng(2024)
    vocab, docs = random_docs(rng, 400)
    planted = []  # (original index, copy text)
    for i in rng.choice(len(docs), size=100, replace=False):
        # Replace a run of 3-8 words (2-5%); a contiguous run changes length+4
        # shingles, so the copy's Jaccard stays ≥ 0.85. Checked exactly below.
        while True:
            copy = replace_span(rng, docs[i], vocab, int(rng.integers(3, 9)))
            if jaccard(docs[i], copy) >= 0.85:
                break
        planted.append((int(i), copy))
    texts = docs + [copy for _, copy in planted]
    pair = {len(docs) + k: i for k, (i, _) in enumerate(planted)}
    pair.update({i: c for c, i in pair.items()})
    order = rng.permutation(len(texts))
    position = {int(t): p for p, t in enumerate(order)}
    # Ground truth: of each planted pair the one fed later should go.
    expected = {max(c, i, key=position.get) for c, i in pair.items()}

    cfg = DedupConfig()
    decisions = decide([texts[t] for t in order], cfg)
    removed = {int(order[p]) for p, d in enumerate(decisions) if d is not None}
    assert all(decisions[position[t]] == "near" for t in removed)

    kept_before = []  # a removal is right if some earlier kept document is truly ≥ threshold
    correct = 0
    shingle_sets = [set(shingles(t, cfg.ngram)) for t in texts]
    for t in map(int, order):
        if t in removed:
            s = shingle_sets[t]
            correct += any(len(s & shingle_sets[k]) / len(s | shingle_sets[k]) >= cfg.threshold for k in kept_before)
        else:
            kept_before.append(t)
    recall = len(removed & expected) / len(expected)
    precision = correct / max(len(removed), 1)
    print(f"planted near-duplicates: recall {recall:.3f}, precision {precision:.3f}, removed {len(removed)}")
    assert recall >= 0.95 and precision >= 0.95
