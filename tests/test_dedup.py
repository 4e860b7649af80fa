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

from ember.data.dedup import (
    SIGNATURE_DTYPE,
    DedupConfig,
    exact_key,
    find_duplicates,
    lsh_bands,
    shingles,
    signature,
    signatures,
)
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
    words[at : at + length] = rng.choice(vocab, size=length)
    return " ".join(words)


def decide(docs: list[str], cfg: DedupConfig) -> list[str | None]:
    """Per document: None (kept), "exact" or "near"."""
    exact = np.frombuffer(b"".join(exact_key(d) for d in docs), dtype=np.uint8).reshape(-1, 32)
    sigs = np.stack([signature(d, cfg) for d in docs]) if docs else np.zeros((0, cfg.num_perm), SIGNATURE_DTYPE)
    _, reason, _ = find_duplicates(exact, sigs, np.array([len(d) for d in docs]), cfg)
    return [(None, "exact", "near")[r] for r in reason]


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


def test_normalize_in_pieces_equals_normalize_at_once(monkeypatch):
    """A huge text is normalised a piece at a time (cut at whitespace): the same string, final
    sigmas, Unicode spaces, ligatures and dotted capitals included."""
    from ember.data import dedup

    rng = np.random.default_rng(5)
    alphabet = list("abcXYZ ΣσΟΔΥΣ \u2003\u00a0\t\nİﬃ") + ["  ", "\r\n", "ΟΔΟΣ "]
    text = "".join(rng.choice(alphabet, size=20_000).tolist())
    whole = " ".join(text.lower().split())
    monkeypatch.setattr(dedup, "_NORMALIZE_PIECE", 37)
    assert dedup.normalize(text) == whole
    assert dedup.normalize(" " * 100) == "" and dedup.normalize("ΟΔΟΣ" * 30) == ("ΟΔΟΣ" * 30).lower()


def test_config_is_validated():
    with pytest.raises(ValidationError):
        DedupConfig(threshold=1.0)
    with pytest.raises(EmberError, match="num_perm"):
        lsh_bands(DedupConfig(threshold=0.99, num_perm=16))
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


def stdlib_near_copies(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """(a real source file of the standard library, a copy with 2-40 % of its lines replaced by lines of
    another file): near-duplicates of real text, shingle Jaccard from ~0.3 to ~0.95."""
    import sysconfig
    from pathlib import Path

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [t for t in (f.read_text(encoding="utf-8", errors="replace") for f in files) if 3000 < len(t) < 40000]
    pairs = []
    for k in rng.choice(len(texts), size=n, replace=False):
        lines, donor = texts[k].split("\n"), texts[(k + 1) % len(texts)].split("\n")
        changed = rng.choice(len(lines), size=max(1, int(len(lines) * rng.uniform(0.02, 0.4))), replace=False)
        for i in changed:
            lines[i] = donor[int(rng.integers(len(donor)))]
        pairs.append((texts[k], "\n".join(lines)))
    return pairs


def test_jaccard_estimates_on_real_near_copies_are_unbiased_and_within_sampling_error():
    """The vectorised signatures estimate the exact shingle Jaccard as a MinHash should: each
    error within 4.5 standard deviations of a 128-sample estimate, no bias, mean error near the
    expected sqrt(J(1-J)/128)·sqrt(2/pi)."""
    rng = np.random.default_rng(3)
    cfg = DedupConfig()
    errors, sigmas = [], []
    for a, b in stdlib_near_copies(rng, 80):
        true = jaccard(a, b)
        sa, sb = signatures([a, b], cfg)
        errors.append(np.mean(sa == sb) - true)
        sigmas.append(np.sqrt(true * (1 - true) / cfg.num_perm))
    errors, sigmas = np.array(errors), np.array(sigmas)
    assert (np.abs(errors) <= 4.5 * sigmas + 1e-9).all(), np.max(np.abs(errors) / np.maximum(sigmas, 1e-9))
    assert abs(errors.mean()) < 3 * np.sqrt((sigmas**2).mean() / len(errors))  # no bias
    assert np.abs(errors).mean() < 1.3 * (sigmas * np.sqrt(2 / np.pi)).mean()


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
    exact = np.frombuffer(b"".join(exact_key(d) for d in docs), dtype=np.uint8).reshape(-1, 32)
    keep, reason, stats = find_duplicates(
        exact, None, np.array([len(d.encode()) for d in docs]), DedupConfig(near=False)
    )
    assert keep.tolist() == [True, False, True, False] and reason.tolist() == [0, 1, 0, 1]
    assert stats == {"exact": {"docs": 2, "bytes": 21 + 20}, "near": {"docs": 0, "bytes": 0}}


def test_switches_and_bad_input():
    rng = np.random.default_rng(2)
    vocab, (doc,) = random_docs(rng, 1)
    near = replace_span(rng, doc, vocab, 3)
    assert decide([doc, doc, near], DedupConfig(exact=False)) == [
        None,
        "near",
        "near",
    ]  # without exact, copies are near
    assert decide([doc, doc, near], DedupConfig(near=False)) == [None, "exact", None]
    assert decide([], DedupConfig()) == []
    with pytest.raises(ValueError, match="num_perm"):
        find_duplicates(np.zeros((1, 32), np.uint8), np.zeros((1, 64), SIGNATURE_DTYPE), np.ones(1), DedupConfig())


def test_lsh_candidates_below_threshold_are_kept():
    # Pairs of Jaccard ≈ 0.65 (27 of 150 words replaced): the recall-leaning LSH makes
    # about 40% of them candidates; confirming by the signatures' agreement keeps them all.
    rng = np.random.default_rng(4)
    vocab, docs = random_docs(rng, 30)
    copies = [replace_span(rng, d, vocab, 27) for d in docs]
    assert all(0.6 < jaccard(d, c) < 0.7 for d, c in zip(docs, copies))
    assert decide(docs + copies, DedupConfig()) == [None] * 60


def test_a_cluster_keeps_only_its_first_document():
    # A → A' → A'': A' is a near-copy of A, A'' of A' but not of A. They form one
    # cluster (connected by confirmed pairs), of which the first document stays.
    rng = np.random.default_rng(3)
    vocab, (a,) = random_docs(rng, 1)
    a1 = replace_span(rng, a, vocab, 7, at=30)
    a2 = replace_span(rng, a1, vocab, 7, at=100)
    assert jaccard(a, a1) > 0.85 and jaccard(a1, a2) > 0.85 and jaccard(a, a2) < 0.75
    cfg = DedupConfig(num_perm=1024)  # σ of the estimate ≈ 0.013: the 0.06 margins are 4.5σ
    assert decide([a, a1, a2], cfg) == [None, "near", "near"]
    assert decide([a, a2], cfg) == [None, None]
    assert decide([a2, a1], cfg) == [None, "near"]


def test_big_buckets_cost_two_pairs_per_member():
    # 300 copies of one document land in one bucket of every band: candidate pairs grow
    # linearly (each member with the bucket's first and its predecessor), not as 300².
    rng = np.random.default_rng(5)
    _, (doc,) = random_docs(rng, 1)
    cfg = DedupConfig(exact=False)
    decisions = decide([doc] * 300, cfg)
    assert decisions[0] is None and decisions.count("near") == 299


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
    # Ground truth: of each planted pair (a cluster of two) the one fed later should go.
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
