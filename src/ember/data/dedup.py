"""Exact and near-duplicate detection for ``ember data prepare``, deterministic.

Worker processes compute, per document, an exact key (``exact_key``: sha256 of the
normalised text) and a MinHash signature (``signatures``: word n-gram shingles hashed
and permuted in numpy, many documents at once). The parent gathers both, in a fixed document order, and ``find_duplicates``
keeps the first document of each exact or near-duplicate cluster, with array
operations only (sorting band keys, as an on-disk LSH would), so its memory does not
grow with a Python object per document.

Nothing here uses Python's ``hash()`` of a str (salted per process): the same documents
in the same order get the same decisions in any process, on any run.

This module runs in spawned worker processes: it imports nothing heavy (no torch). The
recipe schema imports ``DedupConfig`` from here, so datasketch (0.4 s: it loads scipy) is
imported only by ``lsh_bands``, for its choice of bands.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Iterator

import numpy as np
from pydantic import Field

from ember.errors import EmberError
from ember.schema import RecipeModel, Seed

# How signatures are made (see "MinHash, vectorised" below). Signatures of another scheme
# cannot be compared with these, so it is part of a prepared set's settings: a set or an
# unfinished prepare made with another is never mixed with this one.
SCHEME = "ember-poly64-affine32"
SIGNATURE_DTYPE = np.uint32
# Text hashed per batch: the word-hash arrays take ~40 bytes per byte of text (10 MB).
BATCH_BYTES = 1 << 18
# (false positive, false negative) weights for datasketch's choice of LSH bands. Every
# candidate is confirmed against its signature, so false positives cost one comparison
# while false negatives lose duplicates: at threshold 0.8 and 128 permutations the equal
# default (9 bands of 13) finds a pair of Jaccard 0.85 69% of the time, these (16 of 8) 99%.
LSH_WEIGHTS = (0.05, 0.95)


class DedupConfig(RecipeModel):
    """Which duplicates to remove, and how near-duplicates are found."""

    exact: bool = Field(True, description="Remove copies whose normalised text (case, whitespace) is identical.")
    near: bool = Field(True, description="Remove near-copies found by MinHash LSH.")
    threshold: float = Field(
        0.8, gt=0, lt=1, description="Shingle Jaccard similarity from which two documents are near-duplicates."
    )
    num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations: more = a finer Jaccard estimate, slower."
    )
    ngram: int = Field(5, ge=1, le=64, description="Words per shingle.")
    seed: Seed = Field(1, description="Seed of the MinHash permutations (0 to 2**32 - 1).")


def normalize(text: str) -> str:
    """Lower-cased, every whitespace run one space, stripped: what both keys are taken of."""
    if len(text) <= _NORMALIZE_PIECE:
        return " ".join(text.lower().split())
    # A huge document a piece at a time, cut at whitespace: split() of 50 MB made a list of 8 M
    # str objects (~500 MB). Cut there, lower() and split() give the same result per piece
    # (whitespace is neither cased nor case-ignorable, so even the final-sigma rule agrees).
    pieces, pos = [], 0
    while pos < len(text):
        cut = _WHITESPACE.search(text, pos + _NORMALIZE_PIECE)
        end = len(text) if cut is None else cut.start()
        piece = " ".join(text[pos:end].lower().split())
        if piece:
            pieces.append(piece)
        pos = end
    return " ".join(pieces)


_NORMALIZE_PIECE = 1 << 20
_WHITESPACE = re.compile(r"\s")  # str.isspace() characters, what str.split() splits at


def normalized_bytes(text: str) -> bytes:
    """``normalize(text)`` as UTF-8 (lone surrogates kept): the bytes both keys are computed from."""
    return normalize(text).encode("utf-8", "surrogatepass")


def exact_key(text: str) -> bytes:
    """The 32-byte sha256 digest of the normalised text."""
    return hashlib.sha256(normalized_bytes(text)).digest()


def shingles(text: str, ngram: int) -> list[bytes]:
    """The distinct UTF-8 shingles of ``text``: each run of ``ngram`` consecutive words of
    the normalised text, joined by one space, in order of first appearance.

    A set in meaning (MinHash sketches the set, so a repeat adds nothing and is not
    returned). A document of fewer than ``ngram`` words is one shingle of all of them,
    and an empty one is the single shingle ``b""``.
    """
    words = normalized_bytes(text).split(b" ")
    if len(words) <= ngram:
        return [b" ".join(words)]
    # zip of shifted lists yields each n-gram as a tuple without a Python-level loop
    grams = map(b" ".join, zip(*(words[i:] for i in range(ngram))))
    return list(dict.fromkeys(grams))


# --- MinHash, vectorised in numpy ------------------------------------------------------
# A shingle's hash is built from its words' hashes, so no Python code runs per shingle:
# a word's hash is a polynomial over its bytes (prefix sums of byte x P^i, mod 2^64, made
# position-free by P^-start), mixed by the MurmurHash3 64-bit finalizer; a shingle's is
# the same polynomial over its words' hashes, mixed again; its top 32 bits go through
# datasketch 2's "affine32" permutations (a*h + b mod 2^32, a odd: a bijection). Every step
# is a function of the shingle's bytes alone, so a document's signature does not depend on
# the batch, the unit or the worker it was computed in.
_P = 0x9E3779B97F4A7C15  # odd: invertible mod 2^64
_P_INV = pow(_P, -1, 1 << 64)
_R = 0xC2B2AE3D27D4EB4F  # the word-level polynomial's base
_LONG = 1 << 20  # a word longer than this (no space in 1 MB) is hashed a chunk at a time


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (a bijection): every input bit reaches every output bit."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _powers(base: int, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64: a read-only view of a table kept per base, grown when a
    batch needs more (cumprod per batch was 40 % of the hashing time)."""
    table = _POWER_TABLES.get(base)
    if table is None or len(table) < n:
        table = np.full(max(n, 4 * BATCH_BYTES + 2), base, dtype=np.uint64)
        table[0] = 1
        with np.errstate(over="ignore"):
            table = np.cumprod(table, dtype=np.uint64)
        table.flags.writeable = False
        _POWER_TABLES[base] = table
    return table[:n]


_POWER_TABLES: dict[int, np.ndarray] = {}


def _poly_words(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(polynomial, length) of each b" "-separated word of ``data``: sum of (byte + 1) x P^i."""
    b = np.frombuffer(data, dtype=np.uint8)
    sep = np.flatnonzero(b == 32)
    starts = np.concatenate([[0], sep + 1])
    ends = np.concatenate([sep, [len(b)]])
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(b) + 1, dtype=np.uint64)
        np.cumsum((b.astype(np.uint64) + np.uint64(1)) * _powers(_P, len(b)), out=prefix[1:])
        poly = (prefix[ends] - prefix[starts]) * _powers(_P_INV, len(b) + 1)[starts]
    return poly, (ends - starts).astype(np.uint64)


def _long_word_poly(word: bytes) -> int:
    """The polynomial of one word too long for ``_poly_words``, a chunk at a time."""
    total = 0
    for start in range(0, len(word), _LONG):
        chunk_poly, _ = _poly_words(word[start : start + _LONG])
        total = (total + int(chunk_poly[0]) * pow(_P, start, 1 << 64)) % (1 << 64)
    return total


def _word_hash_pieces(data: bytes) -> Iterator[np.ndarray]:
    """A 64-bit hash of each b" "-separated word of ``data``, in pieces of about ``BATCH_BYTES``
    of text (cut at spaces: a word is never split, so its hash is the same in any cut)."""
    pos = 0
    while True:
        end = data.find(b" ", pos + BATCH_BYTES) if len(data) - pos > 2 * BATCH_BYTES else -1
        piece = data[pos:] if end < 0 else data[pos:end]
        if len(piece) <= 4 * BATCH_BYTES:
            poly, length = _poly_words(piece)
        else:  # holds a word of megabytes: hash the others together, that one by chunks
            words = piece.split(b" ")
            poly, length = _poly_words(b" ".join(w if len(w) <= _LONG else b"" for w in words))
            for i, w in enumerate(words):
                if len(w) > _LONG:
                    poly[i], length[i] = _long_word_poly(w), len(w)
        with np.errstate(over="ignore"):
            yield _fmix64(poly + length * np.uint64(_R))
        if end < 0:
            return
        pos = end + 1


def _combine(words: np.ndarray, starts: np.ndarray, counts: np.ndarray, ngram: int) -> np.ndarray:
    """The 32-bit hash of each run of ``counts[j]`` (<= ngram) word hashes from ``starts[j]``:
    fmix64(count + sum of word x R^k), top 32 bits. Depends only on the run's words."""
    h = counts.astype(np.uint64)  # the word count: "a b" and "a b c" never collide
    with np.errstate(over="ignore"):
        for k, power in enumerate(_powers(_R, ngram)):
            take = counts > k
            h[take] += words[starts[take] + k] * power
        return (_fmix64(h) >> np.uint64(32)).astype(np.uint32)


def _windows(words: np.ndarray, ngram: int) -> np.ndarray:
    """The hash of every run of ``ngram`` consecutive ``words`` (there are at least ngram)."""
    count = len(words) - ngram + 1
    h = np.full(count, ngram, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k, power in enumerate(_powers(_R, ngram)):
            h += words[k : k + count] * power
        return (_fmix64(h) >> np.uint64(32)).astype(np.uint32)


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of each permutation as [num_perm, 1] columns, a odd; from ``RandomState(seed)``."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = gen.randint(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return a[:, None], b[:, None]


# Shingles per permutation block: [128, 4096] uint32 is 2 MB, within a core's cache (1.6x faster than 16 MB).
SHINGLES_PER_BLOCK = 1 << 12


def _min_hash(hashes: np.ndarray, doc: np.ndarray, sigs: np.ndarray, cfg: DedupConfig) -> None:
    """Lower ``sigs[d]`` to the permuted minimum of the ``hashes`` of document ``d`` (``doc``: each
    hash's document, non-decreasing), a bounded block of shingles at a time."""
    a, b = _permutations(cfg.num_perm, cfg.seed)
    for start in range(0, len(hashes), SHINGLES_PER_BLOCK):
        h, d = hashes[start : start + SHINGLES_PER_BLOCK], doc[start : start + SHINGLES_PER_BLOCK]
        with np.errstate(over="ignore"):
            values = a * h[None, :] + b  # uint32: the wrap-around is the mod 2^32
        first = np.flatnonzero(np.concatenate([[True], d[1:] != d[:-1]]))
        mins = np.minimum.reduceat(values, first, axis=1).T
        sigs[d[first]] = np.minimum(sigs[d[first]], mins)


def _batch_signatures(docs: list[bytes], index: np.ndarray, sigs: np.ndarray, cfg: DedupConfig) -> None:
    """Signatures of several normalised documents at once, into ``sigs[index]``."""
    words = np.concatenate(list(_word_hash_pieces(b" ".join(docs))))
    counts = np.array([d.count(b" ") + 1 for d in docs], dtype=np.int64)  # an empty one is one empty word
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n = cfg.ngram
    short = counts < n  # fewer words than ngram: one shingle of them all (exactly ngram: its one window)
    if short.any():
        _min_hash(_combine(words, starts[short], counts[short], n), index[short], sigs, cfg)
    if (~short).any():
        owner = np.repeat(index, counts)
        if len(words) >= n:
            valid = np.flatnonzero(owner[: len(words) - n + 1] == owner[n - 1 :])  # windows inside a document
            _min_hash(_windows(words, n)[valid], owner[valid], sigs, cfg)


def _big_signature(data: bytes, i: int, sigs: np.ndarray, cfg: DedupConfig) -> None:
    """The signature of one normalised document bigger than a batch, a piece at a time; the
    last ngram - 1 words of each piece start the next, so every window is hashed once."""
    n = cfg.ngram
    if data.count(b" ") + 1 < n:
        words = np.concatenate(list(_word_hash_pieces(data)))
        hashes = _combine(words, np.zeros(1, np.int64), np.array([len(words)]), n)
        _min_hash(hashes, np.array([i]), sigs, cfg)
        return
    carry = np.zeros(0, dtype=np.uint64)
    for piece in _word_hash_pieces(data):
        words = np.concatenate([carry, piece])
        if len(words) >= n:
            hashes = _windows(words, n)
            _min_hash(hashes, np.full(len(hashes), i), sigs, cfg)
        carry = words[len(words) - (n - 1) :] if n > 1 else carry


def signatures(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """The MinHash signatures of ``texts``: ``SIGNATURE_DTYPE[len(texts), cfg.num_perm]``.

    The share of equal values in two rows estimates the Jaccard similarity of the two texts'
    ``shingles(text, cfg.ngram)``. Texts are hashed together in batches of about
    ``BATCH_BYTES`` (a bigger one alone, a piece at a time), so memory is bounded by the batch.
    """
    return _signatures([normalized_bytes(t) for t in texts], cfg)


def signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """The MinHash signature of one text (see ``signatures``): ``SIGNATURE_DTYPE[cfg.num_perm]``."""
    return signatures([text], cfg)[0]


def document_hashes(texts: list[str], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """(``exact_key`` of each text as uint8 [N, 32], ``signatures`` or None when ``cfg.near`` is
    off), normalising each text once for both."""
    data = [normalized_bytes(t) for t in texts]
    keys = np.frombuffer(b"".join(hashlib.sha256(d).digest() for d in data), dtype=np.uint8).reshape(-1, 32)
    return keys, (_signatures(data, cfg) if cfg.near else None)


def _signatures(data: list[bytes], cfg: DedupConfig) -> np.ndarray:
    sigs = np.full((len(data), cfg.num_perm), np.iinfo(SIGNATURE_DTYPE).max, dtype=SIGNATURE_DTYPE)
    batch: list[bytes] = []
    index: list[int] = []
    size = 0
    for i, doc in enumerate(data):
        if len(doc) > BATCH_BYTES:
            _big_signature(doc, i, sigs, cfg)
            continue
        batch.append(doc)
        index.append(i)
        size += len(doc) + 1
        if size >= BATCH_BYTES:
            _batch_signatures(batch, np.array(index), sigs, cfg)
            batch, index, size = [], [], 0
    if batch:
        _batch_signatures(batch, np.array(index), sigs, cfg)
    return sigs


def lsh_bands(cfg: DedupConfig) -> tuple[int, int]:
    """(bands, rows per band) datasketch picks for the threshold, permutations and weights."""
    from datasketch import MinHashLSH

    try:
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS)
    except ValueError as err:  # e.g. threshold 0.99 with 16 permutations: a single band
        raise EmberError(
            f"dedup threshold={cfg.threshold} with num_perm={cfg.num_perm} gives no usable "
            f"LSH banding ({err}). Use more permutations or a lower threshold."
        ) from err
    return lsh.b, lsh.r


def _band_keys(sigs: np.ndarray, rows: slice, chunk: int = 1 << 20) -> np.ndarray:
    """A 64-bit key per document for one band (FNV-style mix of its hash values), in chunks
    so that a memory-mapped signature matrix is read a slice at a time."""
    keys = np.empty(len(sigs), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(sigs), chunk):
            block = np.asarray(sigs[start : start + chunk, rows], dtype=np.uint64)
            h = np.full(len(block), 0xCBF29CE484222325, dtype=np.uint64)
            for column in block.T:
                h = (h ^ column) * np.uint64(0x100000001B3)
            keys[start : start + chunk] = h
    return keys


def _candidate_pairs(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[n, 2] pairs (earlier, later) of documents sharing a bucket: each member with the
    bucket's first and with its predecessor (2 pairs per member, however big the bucket)."""
    order = np.argsort(keys, kind="stable")  # stable: within a bucket, document order
    sorted_keys, members = keys[order], ids[order]
    same = sorted_keys[1:] == sorted_keys[:-1]  # member i+1 shares i's bucket
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    first = members[starts[np.searchsorted(starts, np.arange(len(members)), side="right") - 1]]
    later = np.flatnonzero(np.concatenate([[False], same]))
    pairs = np.concatenate(
        [np.stack([members[later - 1], members[later]], 1), np.stack([first[later], members[later]], 1)]
    )
    return np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)


def _confirmed(pairs: np.ndarray, sigs: np.ndarray, threshold: float, chunk: int = 1 << 16) -> np.ndarray:
    """The pairs whose signatures agree on ≥ threshold of the permutations (Jaccard estimate)."""
    keep = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), chunk):
        a, b = pairs[start : start + chunk, 0], pairs[start : start + chunk, 1]
        keep[start : start + chunk] = (np.asarray(sigs[a]) == np.asarray(sigs[b])).mean(axis=1) >= threshold
    return pairs[keep]


def near_edges(sigs: np.ndarray, ids: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """The confirmed near-duplicate pairs (earlier, later) among documents ``ids`` (ascending), band by
    band in this process: [n, 2] int64, sorted and unique."""
    bands, rows = lsh_bands(cfg)
    pairs = [
        _confirmed(_candidate_pairs(_band_keys(sigs, slice(b * rows, (b + 1) * rows))[ids], ids), sigs, cfg.threshold)
        for b in range(bands)
    ]
    return unique_edges(pairs)


def unique_edges(pairs: list[np.ndarray]) -> np.ndarray:
    """The distinct pairs of several [n, 2] pair arrays, sorted: [m, 2] int64."""
    pairs = [p for p in pairs if len(p)]
    return np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), dtype=np.int64)


# ---- the same search as a shuffle: what a cluster runs, out of core ----
# Map: each block of documents computes every band's key and scatters (band, key, document) rows
# by the key's hash range into P partitions. Reduce: each partition holds whole buckets (a bucket is
# one band's one key), so it finds and confirms its candidate pairs exactly as ``near_edges`` does.
# The union of the partitions' pairs is ``near_edges``'s, pair for pair.


def band_partition_map(
    sigs: np.ndarray, ids: np.ndarray, cfg: DedupConfig, partitions: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Map side of the shuffle: for the documents ``ids`` (ascending) every band's key, as one
    (band uint16, key uint64, document int64) triple of arrays per partition (a range of key hashes)."""
    bands, rows = lsh_bands(cfg)
    block = np.asarray(sigs[ids])  # this block's rows only: a memory map is read a block at a time
    keys = np.concatenate([_band_keys(block, slice(b * rows, (b + 1) * rows)) for b in range(bands)])
    band = np.repeat(np.arange(bands, dtype=np.uint16), len(ids))
    doc = np.tile(np.asarray(ids, dtype=np.int64), bands)
    # The key's top 32 bits scaled to [0, partitions): contiguous hash ranges, no overflow in uint64.
    part = ((keys >> np.uint64(32)) * np.uint64(partitions)) >> np.uint64(32)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1, dtype=np.uint64))
    return [(band[o], keys[o], doc[o]) for o in (order[bounds[p] : bounds[p + 1]] for p in range(partitions))]


def band_partition_reduce(
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]], sigs: np.ndarray, threshold: float
) -> np.ndarray:
    """Reduce side of the shuffle: the confirmed pairs of one partition, from every map block's piece of
    it. Per band, in document order, exactly the candidates ``near_edges`` finds in those buckets."""
    band, keys, doc = (np.concatenate([p[i] for p in pieces]) for i in range(3))
    if not len(doc):
        return np.zeros((0, 2), dtype=np.int64)
    order = np.lexsort((doc, band))  # by band, then document: _candidate_pairs' stable sort needs the latter
    band, keys, doc = band[order], keys[order], doc[order]
    cuts = np.flatnonzero(np.diff(band)) + 1
    pairs = [_candidate_pairs(k, d) for k, d in zip(np.split(keys, cuts), np.split(doc, cuts))]
    return _confirmed(unique_edges(pairs), sigs, threshold)


def shuffled_near_edges(
    sigs: np.ndarray, ids: np.ndarray, cfg: DedupConfig, partitions: int, block: int = 1 << 18
) -> np.ndarray:
    """``near_edges`` computed by the shuffle, in this process: map blocks of ``block`` documents, reduce
    ``partitions`` hash ranges. What an engine distributes; here, the reference it is tested against."""
    maps = [band_partition_map(sigs, ids[s : s + block], cfg, partitions) for s in range(0, len(ids), block)]
    return unique_edges([band_partition_reduce([m[p] for m in maps], sigs, cfg.threshold) for p in range(partitions)])


def find_duplicates(
    exact: np.ndarray,
    sigs: np.ndarray | None,
    nbytes: np.ndarray,
    cfg: DedupConfig,
    find_edges: Callable[[np.ndarray, np.ndarray, DedupConfig], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Which of N documents (in their fixed order) to keep.

    ``exact``: uint8 [N, 32] keys (``exact_key``); ``sigs``: [N, num_perm] signatures (may be a
    memory map) or None; ``nbytes``: each document's size for the statistics.
    Exact: the first document with a key is kept. Near (among those): documents sharing an
    LSH bucket become candidate pairs, a pair is confirmed when the signatures agree on
    ≥ threshold of the permutations, and each connected cluster of confirmed pairs keeps its
    first document. Memory is a few arrays of N (per band) plus the candidate pairs, never
    a Python object per document, so it scales to hundreds of millions of documents.
    ``find_edges(sigs, ids, cfg)`` finds the confirmed pairs among ``ids``: ``near_edges`` (the
    default, in this process) or an engine's distributed search, which finds the same pairs.
    Returns (keep mask, reason array: 0 kept / 1 exact / 2 near, stats).
    """
    n = len(exact)
    reason = np.zeros(n, dtype=np.int8)
    if cfg.exact and n:
        reason[:] = 1
        reason[_first_of_each_key(exact)] = 0
    if cfg.near and sigs is not None and n:
        if sigs.shape[1] != cfg.num_perm:
            raise ValueError(f"signatures have {sigs.shape[1]} values; dedup uses num_perm={cfg.num_perm}")
        edges = (find_edges or near_edges)(sigs, np.flatnonzero(reason == 0), cfg)
        if len(edges):
            reason[_not_first_of_cluster(edges, n)] = 2
    stats = {
        kind: {"docs": int((reason == code).sum()), "bytes": int(nbytes[reason == code].sum())}
        for kind, code in (("exact", 1), ("near", 2))
    }
    return reason == 0, reason, stats


def _first_of_each_key(exact: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """The index of the first document with each distinct 32-byte key: ``np.unique(..., return_index=True)``
    at a quarter of its memory (~28 B a document instead of ~110): sorted by the keys' first 8 bytes, with
    whole keys compared only where those agree (a copy, or rarely two keys sharing a prefix)."""
    prefix = np.ascontiguousarray(exact[:, :8]).view(">u8").ravel()
    order = np.argsort(prefix, kind="stable")  # stable: within a run of one prefix, document order
    prefix = prefix[order]
    is_start = np.concatenate([[True], prefix[1:] != prefix[:-1]])
    del prefix
    starts = np.flatnonzero(is_start)
    later = np.flatnonzero(~is_start)  # sorted positions after their run's first
    head = starts[np.searchsorted(starts, later, side="right") - 1]
    same = np.ones(len(later), dtype=bool)
    for c in range(0, len(later), chunk):
        same[c : c + chunk] = (exact[order[later[c : c + chunk]]] == exact[order[head[c : c + chunk]]]).all(axis=1)
    if same.all():
        return order[starts]
    # Runs where different keys share a prefix (about once in 4,000 corpora of 10^8 documents): whole.
    mixed = np.unique(head[~same])
    firsts = [order[starts[~np.isin(starts, mixed)]]]
    for start in mixed:
        end = starts[np.searchsorted(starts, start, side="right")] if start < starts[-1] else len(order)
        members = order[start:end]  # in document order
        _, i = np.unique(np.ascontiguousarray(exact[members]).view("V32").ravel(), return_index=True)
        firsts.append(members[i])
    return np.concatenate(firsts)


def _not_first_of_cluster(edges: np.ndarray, n: int) -> np.ndarray:
    """Documents in a connected cluster of ``edges`` that are not its smallest index."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    involved = np.unique(edges)
    first = np.full(label.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, label[involved], involved)
    return involved[first[label[involved]] != involved]
