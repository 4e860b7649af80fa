"""Exact and near-duplicate detection for ``ember data prepare``, deterministic.

Worker processes compute, per document, an exact key (``exact_key``: sha256 of the
normalised text) and a MinHash signature (``signature``: datasketch over word n-gram
shingles). The parent feeds both, in a fixed document order, to one ``Deduplicator``,
which keeps the first document of each exact or near-duplicate cluster.

Nothing here uses Python's ``hash()`` of a str (salted per process): the same documents
in the same order get the same decisions in any process, on any run.

This module runs in spawned worker processes: it imports nothing heavy (no torch). The
recipe schema imports ``DedupConfig`` from here, so datasketch (0.4 s: it loads scipy) is
imported only by the functions that use it.
"""

from __future__ import annotations

import functools
import hashlib
from typing import TYPE_CHECKING, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ember.errors import EmberError

if TYPE_CHECKING:
    from datasketch import LeanMinHash, MinHash

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


class DedupConfig(BaseModel):
    """Which duplicates to remove, and how near-duplicates are found."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    exact: bool = Field(True, description="Remove copies whose normalised text (case, whitespace) is identical.")
    near: bool = Field(True, description="Remove near-copies found by MinHash LSH.")
    threshold: float = Field(
        0.8, gt=0, lt=1, description="Shingle Jaccard similarity from which two documents are near-duplicates.")
    num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations: more = a finer Jaccard estimate, slower.")
    ngram: int = Field(5, ge=1, le=64, description="Words per shingle.")
    seed: int = Field(1, description="Seed of the MinHash permutations.")


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
    minhash.update_batch(shingles(text, cfg.ngram))
    return minhash.hashvalues


class Deduplicator:
    """Feed documents in a fixed order; the first of each exact or near-duplicate cluster is kept.

    Near-duplicate candidates come from a MinHash LSH index of the kept documents; each
    is confirmed by the Jaccard estimate of the two signatures (≥ threshold), which cuts
    the LSH's false positives. Only kept documents enter the index, so a chain of small
    edits A → A' → A'' is judged against A, not against the removed A'.
    """

    def __init__(self, cfg: DedupConfig) -> None:
        from datasketch import LeanMinHash, MinHashLSH  # lazily: see the module docstring

        self.cfg = cfg
        self.seen = 0
        self.stats = {"exact": {"docs": 0, "bytes": 0}, "near": {"docs": 0, "bytes": 0}}
        self._exact: set[bytes] = set()
        self._lean_minhash = LeanMinHash
        try:
            self._lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS)
        except ValueError as err:  # e.g. threshold 0.99 with 16 permutations: a single band
            raise EmberError(f"dedup threshold={cfg.threshold} with num_perm={cfg.num_perm} gives no usable "
                             f"LSH banding ({err}). Use more permutations or a lower threshold.") from err
        self._signatures: dict[str, bytes] = {}  # kept documents' signatures; raw bytes, no array object each

    def check(self, key: str, exact: Optional[bytes], sig: Optional[np.ndarray], nbytes: int = 0) -> Optional[str]:
        """None if the document is new (it is then remembered, so later copies of it are
        dropped); else "exact" or "near". ``key``: a unique id (e.g. "unit3:17");
        ``exact``/``sig``: from ``exact_key``/``signature``, or None to skip that test;
        ``nbytes``: the document's size, summed into ``stats`` when it is removed.
        """
        self.seen += 1
        if self.cfg.exact and exact is not None:
            if exact in self._exact:
                return self._removed("exact", nbytes)
            # Remembered even if the document turns out a near-duplicate: a later
            # verbatim copy of it is then reported as what it is, an exact one.
            self._exact.add(exact)
        if self.cfg.near and sig is not None:
            if len(sig) != self.cfg.num_perm:
                raise ValueError(f"The signature of {key!r} has {len(sig)} values; "
                                 f"this deduplicator uses num_perm={self.cfg.num_perm}.")
            minhash = self._lean_minhash(seed=self.cfg.seed, hashvalues=sig, scheme=SCHEME)
            if self._is_near(minhash):
                return self._removed("near", nbytes)
            self._lsh.insert(key, minhash)  # raises ValueError if the key was used before
            self._signatures[key] = minhash.hashvalues.tobytes()
        return None

    def _is_near(self, minhash: LeanMinHash) -> bool:
        """Whether a kept document's signature agrees with ``minhash`` on ≥ threshold of the permutations."""
        values = minhash.hashvalues
        # The LSH returns candidates in set order (salted per process); the answer "any
        # confirmed candidate" does not depend on that order.
        for candidate in self._lsh.query(minhash):
            kept = np.frombuffer(self._signatures[candidate], dtype=values.dtype)
            if np.count_nonzero(kept == values) >= self.cfg.threshold * len(values):
                return True
        return False

    def _removed(self, kind: str, nbytes: int) -> str:
        self.stats[kind]["docs"] += 1
        self.stats[kind]["bytes"] += nbytes
        return kind
