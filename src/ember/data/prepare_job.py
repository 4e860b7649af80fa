"""What every kind of ``ember data prepare`` shares: the job a preparer runs (its plan, output and work
directories, settings, worker pool and progress phases), the split codes, the stratified split, and the
atomic work-file writers.

A kind (text, images, a table, labelled text, pairs, captions) is a ``PrepareJob`` subclass whose
``run()`` returns ``(manifest, reused units, reused shards)``; ``ember.data.prepare`` picks it by kind.

This module does not import torch (prepare's worker processes import it).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ember.atomic import atomic_path, sha256_file, write_text_atomic
from ember.data import shards, sources
from ember.data.tokenizer import TextCodec, load_tokenizer, token_roles, train_bpe
from ember.data.tokenizer_sample import SampleCount, sample_texts
from ember.errors import EmberError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ember.config import DataConfig

TRAIN, VAL, TEST = (shards.SPLITS.index(s) for s in ("train", "val", "test"))  # a document's split code


@dataclass
class PrepareJob:
    """One prepare's inputs; ``run()`` returns (manifest, reused units, reused shards)."""

    plan: sources.SourcePlan
    out: Path
    work: Path
    cfg: DataConfig
    pool: Any  # prepare's worker pool: map_unordered(fn, jobs)
    phases: Any  # prepare's progress: phase(name, total, done) and console
    strict: bool

    @property
    def units(self) -> list[sources.Unit]:
        return self.plan.units

    def each_unit(self, phase: str, done: Callable[[sources.Unit], Path], fn: Callable, job: Callable) -> int:
        """``fn(*job(unit))`` in the worker pool for every unit whose ``done(unit)`` file does not exist yet
        (an interrupted prepare's finished units are skipped), under a progress phase; returns how many units
        were already done."""
        todo = [u for u in self.units if not done(u).is_file()]
        with self.phases.phase(phase, len(self.units), len(self.units) - len(todo)) as advance:
            for _ in self.pool.map_unordered(fn, [job(u) for u in todo]):
                advance()
        return len(self.units) - len(todo)

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this prepare writes: test only when data.test_fraction > 0."""
        return tuple(s for s in shards.SPLITS if s != "test" or self.cfg.test_fraction > 0)


@contextmanager
def start_over_on_refusal(out: Path) -> Iterator[None]:
    """An EmberError inside (a refusal of the data or the settings: no text left, a bad file under --strict,
    one class) removes the unfinished prepare from ``out``: its work directory and the shards or tokenizer it
    wrote. The fix changes the sources or the settings, and the same command must then start over, not find an
    unfinished prepare of the old ones (or files it did not write). An error that promises to resume (a full
    disk, a lost Ray worker: ``shards.promises_resume``) keeps them, as does an interruption (Ctrl-C, a signal,
    kill: not an EmberError)."""
    try:
        yield
    except EmberError as err:
        if not shards.promises_resume(err):
            discard_unfinished(out)
        raise


def discard_unfinished(out: Path) -> None:
    """Remove an unfinished prepare's work directory and the outputs it wrote beside it (never another file)."""
    shutil.rmtree(out / shards.WORK, ignore_errors=True)
    for path in out.iterdir():
        if (shards.is_shard_file(path.name) or path.name in ("tokenizer.json", "stats.json")) and path.is_file():
            path.unlink(missing_ok=True)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A work file, atomically; a full disk is an EmberError naming it (a worker's reaches the parent)."""
    with shards.disk_space(path, sum(np.asarray(a).nbytes for a in arrays.values())):
        with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_text(path: Path, text: str, durable: bool = True) -> None:
    with shards.disk_space(path, len(text.encode("utf-8"))):
        write_text_atomic(path, text, durable)


def report_skipped(skipped: list, strict: bool, phases) -> None:
    if not skipped:
        return
    names = "\n".join(f"  {p}: {why}" for p, why in skipped[:10]) + ("\n  ..." if len(skipped) > 10 else "")
    if strict:
        raise EmberError(
            f"{len(skipped)} input file(s) or record(s) could not be read (--strict):\n{names}\n"
            f"Fix or remove them, or run without --strict to skip them (they are counted in stats.json)."
        )
    logger.warning("prepare: skipped %d unreadable file(s) or record(s):\n%s", len(skipped), names)


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Each image's split code, keeping each class's share in every split (scikit-learn's stratified
    split): val first, the same images as without a test split, then test from the rest."""
    n, classes = len(labels), len(np.unique(labels))
    n_val = round(n * val_fraction)
    if min(n_val, n - n_val) < classes:
        raise EmberError(
            f"data.val_fraction={val_fraction} leaves {n_val} of {n} samples for validation; both splits "
            f"need at least {classes} (one per class). Use a val_fraction that leaves both enough (e.g. 0.2), "
            f"more samples, or fewer classes."
        )
    split = np.full(n, TRAIN, dtype=np.int8)
    split[stratified_pick(np.arange(n), labels, val_fraction, seed)] = VAL
    if test_fraction > 0:
        rest = np.flatnonzero(split == TRAIN)
        n_test = int(np.ceil(n * test_fraction))  # a share of all images, rounded up as scikit-learn does
        if min(n_test, len(rest) - n_test) < classes:
            raise EmberError(
                f"data.test_fraction={test_fraction} leaves {n_test} of {n} images for test and {len(rest) - n_test} "
                f"for training; each needs at least {classes} (one per class). Use more images, a test_fraction "
                f"such as 0.1 that leaves both enough, or data.test_fraction=0 (no test split)."
            )
        split[stratified_pick(rest, labels[rest], n_test, seed)] = TEST
    return split


def stratified_pick(index: np.ndarray, labels: np.ndarray, size: float | int, seed: int) -> np.ndarray:
    """``size`` (a share or a count) of ``index``, stratified by ``labels`` when every class can be split."""
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(index, test_size=size, stratify=_strata(labels), random_state=seed)[1]
    except ValueError:  # too few of each class for the size asked
        return train_test_split(index, test_size=size, random_state=seed)[1]


def _strata(labels: np.ndarray) -> np.ndarray:
    """The labels to stratify by: a class of a single sample cannot be split, so such classes share one
    stratum (or, when there is one such class, join the largest class's): the other classes keep their
    shares, where a single one used to unstratify every class."""
    values, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    single = counts[inverse] == 1
    if not single.any() or single.all():
        return labels
    strata = inverse.copy()
    strata[single] = len(values) if single.sum() > 1 else int(np.argmax(counts))
    return strata


def fit_codec(
    cfg: DataConfig,
    out: Path,
    train_texts: Callable[[], Iterable[str]],
    phases: Any,
    reuse: bool = False,
    vocab_size: int | None = None,
) -> tuple[TextCodec, dict]:
    """The codec of ``data.tokenizer``: bytes, a given tokenizer.json (copied to ``out``), or a byte-level BPE
    of ``vocab_size`` (default ``data.vocab_size``) trained on ``train_texts()`` (the training split only; a
    sample of it with ``data.tokenizer_sample_mb``, see ``ember.data.tokenizer_sample``) and
    saved as ``out/tokenizer.json`` — or, with ``reuse``, the one an interrupted prepare already saved there.
    Also its manifest entry, with the roles of its special ids (``tokenizer.token_roles``)."""
    choice, path = cfg.tokenizer, out / "tokenizer.json"
    if choice == "bytes":
        return TextCodec(None), {"kind": "bytes", "vocab_size": 256, **token_roles(None).to_dict()}
    if choice != "bpe":
        tok = load_tokenizer(choice)
        with shards.disk_space(path, os.path.getsize(choice)), atomic_path(path) as tmp:
            shutil.copyfile(choice, tmp)
    elif reuse and path.is_file():
        tok = load_tokenizer(path)
    else:
        count = SampleCount()
        with phases.phase("tokenizer", 1):
            texts = sample_texts(train_texts, cfg.tokenizer_sample_mb, count)
            tok = train_bpe(texts, vocab_size or cfg.vocab_size, cfg.special_tokens)
        logger.info("prepare: %s", count.line())
        write_text(path, tok.to_str(pretty=True))  # what tok.save writes, with Python's errors on a full disk
    entry = {
        "kind": tokenizer_kind(tok),
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "vocab_size": tok.get_vocab_size(),
        "special_tokens": {t.content: i for i, t in sorted(tok.get_added_tokens_decoder().items()) if t.special},
        **token_roles(tok, cfg.eos_token).to_dict(),
    }
    return TextCodec(tok), entry


def tokenizer_kind(tok) -> str:
    """What a ``tokenizers`` tokenizer is: its model (bpe, wordpiece, unigram, wordlevel), "byte-level" first
    when it pre-tokenises bytes (GPT-2's and ember's BPE)."""
    import json

    spec = json.loads(tok.to_str())
    kind = str((spec.get("model") or {}).get("type", "unknown")).lower()
    pre = json.dumps(spec.get("pre_tokenizer") or {})
    return f"byte-level {kind}" if '"ByteLevel"' in pre else kind


# ---- work files of texts and ids, packed: one byte (or id) array and each item's offset ----


def pack_texts(texts: list[str], name: str = "text") -> dict[str, np.ndarray]:
    """``texts`` as one UTF-8 byte array ``name`` and ``name_offsets`` (item i is bytes [o[i], o[i + 1]))."""
    encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return {name: np.frombuffer(b"".join(encoded), dtype=np.uint8), f"{name}_offsets": offsets}


def unpack_texts(arrays: dict[str, np.ndarray], name: str = "text") -> list[str]:
    blob, offsets = arrays[name].tobytes(), arrays[f"{name}_offsets"]
    return [blob[offsets[i] : offsets[i + 1]].decode("utf-8", "surrogatepass") for i in range(len(offsets) - 1)]


def pack_ids(ids: list, dtype: str, name: str = "ids") -> dict[str, np.ndarray]:
    """Rows of token ids as one array ``name`` of ``dtype`` and ``name_offsets``."""
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(i) for i in ids], out=offsets[1:])
    flat = np.concatenate([np.asarray(i, dtype=dtype) for i in ids]) if ids else np.zeros(0, dtype=dtype)
    return {name: flat, f"{name}_offsets": offsets}


def unpack_ids(arrays: dict[str, np.ndarray], name: str = "ids") -> list[np.ndarray]:
    return np.split(arrays[name], arrays[f"{name}_offsets"][1:-1])


def load_npz(path: Path, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays ``names`` (None: every one) of a work file; the others are not read (never pickles)."""
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in (f.files if names is None else names)}
