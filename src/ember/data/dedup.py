"""Exact and near-duplicate detection for ``ember data prepare``, deterministic.

Worker processes compute, per document, an exact key (``exact_key``: sha256 of the
normalised text) and a MinHash signature (``signature``: datasketch over word n-gram
shingles). The parent gathers both, in a fixed document order, and ``find_duplicates``
keeps the first document of each exact or near-duplicate cluster, with array
operations only (sorting band keys, as an on-disk LSH would), so its memory does not
grow with a Python object per document.

Nothing here uses Python's ``hash()`` of a str (salted per process): the same documents
in the same order get the same decisions in any process, on any run.

This module runs in spawned worker processes: it imports nothing heavy (no torch). The
recipe schema imports ``DedupConfig`` from here, so datasketch (0.4 s: it loads scipy) is
imported only by the functions that use it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from ember.errors import EmberError
from ember.schema import RecipeModel, Seed

if TYPE_CHECKING:
    from datasketch import MinHash

# datasketch 2's default permutation scheme: a bijective affine map over 32-bit hashes,
# so hash values are uint32 (half the memory of the legacy uint64 ones). Signatures made
# with another scheme cannot be compared with these.
SCHEME = "affine32"
SIGNATURE_DTYPE = np.uint32
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
    return " ".join(text.lower().split())


def exact_key(text: str) -> bytes:
    """The 32-byte sha256 digest of the normalised text."""
    return hashlib.sha256(normalize(text).encode("utf-8", "surrogatepass")).digest()


def shingles(text: str, ngram: int) -> list[bytes]:
    """The distinct UTF-8 shingles of ``text``: each run of ``ngram`` consecutive words of
    the normalised text, joined by one space, in order of first appearance.

    A set in meaning (MinHash sketches the set, so a repeat adds nothing and is not
    returned). A document of fewer than ``ngram`` words is one shingle of all of them,
    and an empty one is the single shingle ``b""``.
    """
    words = normalize(text).encode("utf-8", "surrogatepass").split(b" ")
    if len(words) <= ngram:
        return [b" ".join(words)]
    # zip of shifted lists yields each n-gram as a tuple without a Python-level loop
    grams = map(b" ".join, zip(*(words[i:] for i in range(ngram))))
    return list(dict.fromkeys(grams))


@functools.lru_cache(maxsize=8)
def _template(num_perm: int, seed: int) -> MinHash:
    from datasketch import MinHash

    # Drawing permutations makes a new MinHash cost ~80 µs, a copy ~20 µs: on 150-word
    # documents 8.2k signatures/s instead of 5.1k. So draw them once per process.
    return MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME)


def signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """The MinHash hash values of ``text``'s shingles: ``SIGNATURE_DTYPE[cfg.num_perm]``.

    The same on every process and run: shingles are hashed with SHA-1 and the
    permutations drawn from ``numpy.random.RandomState(cfg.seed)`` (datasketch's own).
    """
    minhash = _template(cfg.num_perm, cfg.seed).copy()
    for batch in shingle_batches(text, cfg.ngram):
        minhash.update_batch(batch)
    return minhash.hashvalues


# Shingles per MinHash update: datasketch builds a [num_perm, n] uint64 matrix for n shingles,
# so one update of a 50 MB document (8 M shingles) would need ~25 GB; batches of the words in
# 256 KB of text keep it near 50 MB whatever the document's size.
BATCH_BYTES = 1 << 18


def shingle_batches(text: str, ngram: int, batch_bytes: int = BATCH_BYTES) -> Iterator[list[bytes]]:
    """``shingles(text, ngram)`` in batches of the words of about ``batch_bytes`` of text each.

    Together the batches hold the same set of shingles (a shingle may appear in two), which is
    all MinHash sees: updating with each batch in turn gives the signature of the whole set.
    """
    data = normalize(text).encode("utf-8", "surrogatepass")
    if data.count(b" ") < ngram:  # at most ngram words: one shingle of all of them
        yield [data]
        return
    carry: list[bytes] = []  # the last ngram - 1 words of the previous batch: the shingles across the cut
    pos = 0
    while pos < len(data):
        end = data.find(b" ", pos + batch_bytes)
        end = len(data) if end < 0 else end
        words = carry + data[pos:end].split(b" ")
        yield list(dict.fromkeys(map(b" ".join, zip(*(words[i:] for i in range(ngram))))))
        carry = words[-(ngram - 1) :] if ngram > 1 else []
        pos = end + 1


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
        _, first = np.unique(np.ascontiguousarray(exact).view("V32").ravel(), return_index=True)
        reason[:] = 1
        reason[first] = 0
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
