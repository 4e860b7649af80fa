"""The text a BPE learns from when ``data.tokenizer_sample_mb`` is set: a sample of the training
split of about that many megabytes, so a corpus far larger than that does not spend days in the one
stage of prepare that does not parallelise (BPE training ran at about 4.9 MB of text per CPU-second
on one thread, so a 0.8 TB training split would take ~46 h).

A text is in the sample when a hash of its UTF-8 bytes falls below ``budget / total``: two passes,
the first only counting bytes, nothing held in memory, and the same sample for any file order,
worker count or engine (the prepared set stays byte-identical between them). The size is about the
budget, not exactly: a sum of independent coin flips.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field


@dataclass
class SampleCount:
    """What the BPE was trained on, counted while the trainer reads it."""

    documents: int = 0
    bytes: int = 0
    total_documents: int = 0
    total_bytes: int = 0
    sampled: bool = field(default=False)

    def line(self) -> str:
        """One line for the prepare log."""
        if not self.sampled:
            return f"tokenizer: trained on all {self.documents:,} training texts ({self.bytes / 1e6:.1f} MB)"
        return (
            f"tokenizer: trained on a sample of {self.documents:,} of {self.total_documents:,} training texts "
            f"({self.bytes / 1e6:.1f} of {self.total_bytes / 1e6:.1f} MB; data.tokenizer_sample_mb)"
        )


def sample_texts(texts: Callable[[], Iterable[str]], budget_mb: float, count: SampleCount) -> Iterator[str]:
    """The texts of ``texts()`` (called once or twice) to train on: all of them when ``budget_mb`` is 0
    or they fit in it, else those whose hash falls below budget / total. ``count`` is filled as it goes.

    >>> count = SampleCount()
    >>> docs = [f"document {i} " * 10 for i in range(1000)]
    >>> kept = list(sample_texts(lambda: docs, 0.01, count))
    >>> 0.5 < count.bytes / 10_000 < 1.5 and kept == [d for d in docs if d in set(kept)]
    True
    """
    if budget_mb > 0:
        for text in texts():
            count.total_documents += 1
            count.total_bytes += len(text.encode("utf-8"))
    share = budget_mb * 1e6 / count.total_bytes if budget_mb > 0 and count.total_bytes else 1.0
    count.sampled = share < 1.0
    for text in texts():
        data = text.encode("utf-8")
        if share < 1.0 and _unit_hash(data) >= share:
            continue
        count.documents += 1
        count.bytes += len(data)
        yield text


def _unit_hash(data: bytes) -> float:
    """A stable number in [0, 1) for a text (8 bytes of BLAKE2b: fast, and the same on every machine)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") / 2**64
