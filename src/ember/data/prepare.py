"""``ember data prepare``: raw sources → clean → dedup → tokenise → shards + manifest.

Text runs in phases; each writes its results under ``OUT/.ember-work/`` atomically, so a killed
prepare resumes where it stopped (a finished unit or shard is never redone):

1. clean (parallel, per unit): read, clean, hash (exact key) and MinHash each document;
2. dedup (in order): the first document of each exact or near-duplicate cluster is kept,
   and each kept one goes to train, val or test by a hash of its text and ``seed``;
3. tokenizer: train a byte-level BPE on the kept training text (or load one, or bytes);
4. tokenise (parallel, per unit): ids of each kept document followed by ``<|endoftext|>``;
5. shards: the units' ids, in unit order, cut into fixed-size shards.

A refusal of the data or the settings (an EmberError: no training text left, an unreadable file under
``--strict``) removes the unfinished prepare instead, so the same command starts over once the sources are
fixed; an interruption (Ctrl-C, a signal, ``kill``) or a full disk keeps it to resume
(``prepare_job.start_over_on_refusal``, for every kind).

Images: read (parallel, per unit), a stratified train/val(/test) split, per-channel mean/std of
the training images, shards. Every decision depends only on the data and the settings,
never on the worker count, so ``--workers 1`` and ``--workers 8`` write the same bytes.

Workers are spawned processes that re-import the calling script: call ``prepare`` with
workers > 1 under ``if __name__ == "__main__":``, from a script that does not import
torch at its top level, or each worker loads torch first. ``engine="ray"`` (``--engine ray``) runs
phases 1 and 4 and the near-duplicate search as tasks on a Ray cluster instead (``ember.data.engines``),
writing the same bytes.

Example::

    from ember.config import DataConfig
    result = prepare(["stdlib"], "data/stdlib", DataConfig(vocab_size=4096), workers=2)
    result.manifest["splits"]["train"]["tokens"]
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ember.atomic import sha256_file
from ember.cores import usable_cores
from ember.data import shards, sources
from ember.data.clean import CleanConfig, CleanStats, clean_document
from ember.data.dedup import SCHEME as MINHASH_SCHEME
from ember.data.dedup import SIGNATURE_DTYPE, DedupConfig, document_hashes, find_duplicates
from ember.data.engines import Engine, check_engine, open_engine
from ember.data.prepare_job import (
    TEST,
    TRAIN,
    VAL,
    PrepareJob,
    fit_codec,
    report_skipped,
    save_npz,
    start_over_on_refusal,
    stratified_split,
    write_text,
)
from ember.data.tokenizer import TextCodec, load_tokenizer
from ember.errors import EmberError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ember.config import DataConfig

# The DataConfig keys that change what prepare writes (the rest are training-time keys).
PREPARE_KEYS = {
    "text": (
        "max_bytes",
        "val_fraction",
        "test_fraction",
        "seed",
        "text_field",
        "tokenizer",
        "eos_token",
        "vocab_size",
        "special_tokens",
        "tokenizer_sample_mb",
        "shard_size",
        "clean",
        "dedup",
    ),
    "images": ("val_fraction", "test_fraction", "seed", "shard_size"),
    "table": (
        "val_fraction",
        "test_fraction",
        "seed",
        "shard_size",
        "label",
        "columns",
        "target",
        "kind",
        "one_hot_max",
    ),
    "labelled-text": (
        "kind",
        "val_fraction",
        "test_fraction",
        "seed",
        "shard_size",
        "label",
        "text_field",
        "tokenizer",
        "eos_token",
        "vocab_size",
        "special_tokens",
        "tokenizer_sample_mb",
        "seq_len",
        "clean",
    ),
    "pairs": (
        "kind",
        "val_fraction",
        "test_fraction",
        "seed",
        "shard_size",
        "source_field",
        "target_field",
        "tokenizer",
        "eos_token",
        "vocab_size",
        "special_tokens",
        "tokenizer_sample_mb",
        "seq_len",
        "src_len",
    ),
    "instruct": (
        "kind",
        "val_fraction",
        "test_fraction",
        "seed",
        "shard_size",
        "prompt_field",
        "response_field",
        "messages_field",
        "chat_template",
        "tokenizer",
        "eos_token",
        "vocab_size",
        "special_tokens",
        "tokenizer_sample_mb",
        "seq_len",
    ),
    "captions": (
        "kind",
        "captions",
        "image_field",
        "text_field",
        "val_fraction",
        "test_fraction",
        "seed",
        "shard_size",
        "tokenizer",
        "eos_token",
        "vocab_size",
        "special_tokens",
        "tokenizer_sample_mb",
        "seq_len",
    ),
}
# Keys left out of the settings at these values, so that a set prepared before the key existed
# keeps its settings hash (and the bundled sets their cache entry).
OMIT_AT = {
    "tokenizer_sample_mb": 0.0,
    "test_fraction": 0.0,
    "target": "auto",
    "kind": "auto",
    "one_hot_max": 32,
    "eos_token": "",
}
MAX_NAMED_SKIPS = 50  # the manifest names this many skipped files; the count is always exact
WORK = shards.WORK


@dataclass
class PrepareResult:
    out_dir: Path
    manifest: dict
    reused_units: int  # units an earlier, interrupted prepare had finished
    reused_shards: int
    seconds: float


def prepare_settings(sources_: list[str], cfg: DataConfig) -> dict:
    """What determines the output: the sources and the prepare keys of ``cfg``."""
    dumped = cfg.model_dump(mode="json")
    kind = prepare_kind(sources_, cfg)
    settings = {
        "sources": list(sources_),
        **{k: dumped[k] for k in PREPARE_KEYS[kind] if k not in OMIT_AT or dumped[k] != OMIT_AT[k]},
    }
    if kind == "text" and cfg.dedup.near:  # decisions from signatures of another scheme are another set
        settings["minhash"] = MINHASH_SCHEME
    if "stdlib" in sources_:  # the bundled corpus is this Python's own library
        settings["python"] = ".".join(map(str, sys.version_info[:3]))
    if (
        kind in ("text", "pairs", "captions")
        and cfg.tokenizer not in ("bpe", "bytes")
        and Path(cfg.tokenizer).is_file()
    ):
        settings["tokenizer_sha256"] = sha256_file(cfg.tokenizer)  # a changed file is a different set
    return settings


def full_settings(sources_: list[str], cfg: DataConfig, plan: sources.SourcePlan | None = None) -> dict:
    """``prepare_settings`` plus a fingerprint of every input file (size, modification time)."""
    plan = plan or _plan(sources_, cfg)
    return {**prepare_settings(sources_, cfg), "format": shards.FORMAT, "sources_sha256": _fingerprint(plan)}


def prepare_kind(sources_: list[str], cfg: DataConfig) -> str:
    """What the sources hold: ``data.kind`` when given, else recognised. With a label (``--label``): labelled
    text when the rows have the text field (``--field``, default text) and no ``--columns`` are named, else
    a table; without: pairs when the first source's rows have the source and target fields, else text or
    images by the files."""
    if cfg.kind != "auto":
        return cfg.kind
    if cfg.captions:
        return "captions"
    first = sources_[0] if sources_ else ""
    if cfg.label:
        has_text = first not in sources.BUNDLED and cfg.text_field in sources.peek_columns(first)
        return "labelled-text" if has_text and not cfg.columns else "table"
    kind = sources.source_kind(first) if first else "text"
    columns = set(sources.peek_columns(first)) if kind == "text" else set()
    if {cfg.source_field, cfg.target_field} <= columns:
        return "pairs"
    if {cfg.prompt_field, cfg.response_field} <= columns or cfg.messages_field in columns:
        return "instruct"
    return kind


def _plan(sources_: list[str], cfg: DataConfig, exclude: Path | None = None) -> sources.SourcePlan:
    """The work list: rows of table files for tables, labelled text and pairs; else text or images."""
    kind = prepare_kind(sources_, cfg)
    if kind == "pairs":  # rows, or two aligned plain-text files
        from ember.data.pairs import pairs_plan

        return pairs_plan(sources_, exclude)
    if kind == "captions":  # image folders, then the captions file
        from ember.data.caption_prepare import caption_plan

        return caption_plan(sources_, cfg, exclude)
    if kind in ("table", "labelled-text", "pairs", "instruct"):
        return sources.table_plan(sources_, exclude, kind)
    return sources.plan_units(sources_, cfg.max_bytes, exclude=exclude, text_field=cfg.text_field)


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# ---- the orchestration ----


def prepare(
    sources_: list[str],
    out_dir: str | Path,
    cfg: DataConfig,
    workers: int = 1,
    strict: bool = False,
    progress: bool = True,
    engine: str = "local",
) -> PrepareResult:
    """Prepare ``sources_`` into ``out_dir``; resume an interrupted prepare with the same settings.

    Returns at once when ``out_dir`` already holds a complete set prepared with the same
    settings; refuses (never overwrites) one prepared with different settings. ``engine`` (local, or ray
    for a Ray cluster: ``ember.data.engines``) changes where the work runs, never what is written.
    """
    if workers < 1:
        raise EmberError(f"--workers must be at least 1, got {workers}.")
    check_engine(engine, workers)
    start = time.time()
    out = Path(out_dir)
    # Everything a user can get wrong fails here, before anything is written.
    plan = _plan(sources_, cfg, exclude=out)
    if plan.kind == "text" and cfg.tokenizer not in ("bpe", "bytes"):
        load_tokenizer(cfg.tokenizer)
    settings = full_settings(sources_, cfg, plan)
    with _pool(workers, engine) as pool:  # a Ray cluster is joined (or refused) before anything is written
        _make_out_dir(out)
        # Any write the helpers below do not name (the lock, for one) still says "disk full".
        with shards.disk_space(out, None), _locked(out):
            work = out / WORK
            if (out / shards.MANIFEST).is_file():
                manifest = shards.load_manifest(out)
                if manifest.get("settings_sha256") != settings_hash(settings):
                    raise EmberError(
                        f"{out} already holds data prepared from other sources, other versions of them, or other "
                        f"settings. Nothing was changed: prepare into a new --out directory, or delete {out} first."
                    )
                shutil.rmtree(work, ignore_errors=True)  # left if a run died between the manifest and the clean-up
                return PrepareResult(out, manifest, 0, 0, time.time() - start)
            _check_work_settings(work, settings)
            with _Phases(progress) as phases:
                pool.check_shared(work / "settings.json")  # a cluster's nodes see the work directory
                job = _preparer(plan.kind)(plan, out, work, cfg, pool, phases, strict)
                with start_over_on_refusal(out):  # a refused set's fix starts over; an interrupted one resumes
                    manifest, reused_units, reused_shards = job.run()
            manifest.update(format=shards.FORMAT, settings=settings, settings_sha256=settings_hash(settings))
            write_text(out / "stats.json", json.dumps(manifest["stats"], indent=1) + "\n")
            shards.write_manifest(out, manifest)
            shutil.rmtree(work, ignore_errors=True)
    return PrepareResult(out, manifest, reused_units, reused_shards, time.time() - start)


def _preparer(kind: str) -> type[PrepareJob]:
    """The job that prepares sources of ``kind``; each kind lives in its own module."""
    if kind == "table":
        from ember.data.table_prepare import TablePrepare

        return TablePrepare
    if kind == "labelled-text":
        from ember.data.labelled_text import LabelledTextPrepare

        return LabelledTextPrepare
    if kind == "pairs":
        from ember.data.pairs import PairsPrepare

        return PairsPrepare
    if kind == "captions":
        from ember.data.caption_prepare import CaptionPrepare

        return CaptionPrepare
    if kind == "instruct":
        from ember.data.instruct import InstructPrepare

        return InstructPrepare
    return {"text": _TextPrepare, "images": _ImagePrepare}[kind]


def _fingerprint(plan: sources.SourcePlan) -> str:
    """A hash of the work list and every input file's size and modification time: a
    source edited, added or removed since is a different set (never resumed into)."""
    digest = hashlib.sha256()
    for unit in plan.units:
        digest.update(repr((unit.reader, unit.paths, unit.span, unit.label)).encode())
        for path in unit.paths:
            st = os.stat(path)
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _make_out_dir(out: Path) -> None:
    """Create ``out``, or accept it if it is empty or ember's own; never mix into other files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EmberError(
            f"Cannot create the output directory {out} ({err.strerror or err}). Choose a writable --out path."
        ) from None
    ours = {".lock", WORK, shards.MANIFEST}
    if (
        not (out / shards.MANIFEST).is_file()
        and not (out / WORK).is_dir()
        and any(p.name not in ours for p in out.iterdir())
    ):
        raise EmberError(
            f"{out} already holds files that `ember data prepare` did not write. Prepare into a new or empty "
            f"directory, so that nothing of yours is mixed with shards or removed."
        )


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One prepare per directory at a time (a second one waits, then finds the manifest)."""
    try:
        import fcntl  # POSIX only: imported here, so that ember itself imports on any system
    except ImportError:
        raise EmberError(
            f"ember data prepare locks {out} with fcntl, which this system ({sys.platform}) does not have: "
            f"preparing data needs a POSIX system. Prepare it on Linux or macOS (WSL on Windows), then copy "
            f"the prepared directory here."
        ) from None
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _signature_map(path: Path, rows: int, num_perm: int) -> np.ndarray:
    """A writable memory map for the MinHash signatures, its blocks reserved first: a disk that fills
    while pages of a memory map are written kills the process (SIGBUS) instead of raising ENOSPC."""
    sigs = np.lib.format.open_memmap(path, mode="w+", dtype=SIGNATURE_DTYPE, shape=(rows, num_perm))
    if hasattr(os, "posix_fallocate"):  # Linux and most POSIX systems; elsewhere the map stays sparse
        size = path.stat().st_size
        with shards.disk_space(path, size):
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
    return sigs


def _check_work_settings(work: Path, settings: dict) -> None:
    path = work / "settings.json"
    if path.is_file():
        if json.loads(path.read_text()) != settings:
            raise EmberError(
                f"{work.parent} holds an unfinished prepare with other sources or settings. Run that same command "
                f"again to finish it, or delete {work} to start over with the new settings."
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(settings, indent=1))


def _worker_init(parent: int, workers: int = 1) -> None:
    _limit_threads(workers)
    # Ctrl-C is the parent's to handle (it stops the pool); workers would each print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(parent)


def _limit_threads(workers: int) -> None:
    """Give this worker's tokenizers its share of the cores: N workers on C cores get C // N
    threads each (at least 1), so they use the machine without oversubscribing it (each
    starting a thread pool as wide as the machine made 2 workers cost 1.2x the CPU of one).
    Set before tokenizers is first used: its thread pool reads them once."""
    share = max(1, usable_cores() // workers)
    os.environ["RAYON_NUM_THREADS"] = str(share)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if share > 1 else "false"


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent: int) -> None:
    """End this worker when ``parent`` dies, even by ``kill -9`` (which runs no clean-up).

    Otherwise the workers block forever on a task queue whose write end they hold themselves,
    and keep the resource tracker (which waits for every holder of its pipe) alive too. Linux:
    the kernel sends SIGKILL on the parent's death. Everywhere: a daemon thread polls the
    parent id, which changes when the parent dies and the worker is re-parented."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (another libc): the thread below still works
            pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="ember-parent-watch", daemon=True).start()


def _watch_parent(parent: int, every: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)  # no clean-up to run: the parent's files are its own, and resume redoes unfinished units


@contextmanager
def _pool(workers: int, engine: str = "local") -> Iterator[Engine]:
    """The engine prepare's stages run on (``ember.data.engines``); local workers start with ``_worker_init``."""
    with open_engine(engine, workers, initializer=_worker_init, initargs=(os.getpid(), workers)) as pool:
        yield pool


class _Phases:
    """A progress bar per phase on a terminal; one line per finished phase otherwise."""

    def __init__(self, show: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ember.log import console, progress_wanted

        self.console = console()  # the log handler's: its lines print above the bars
        self.show = show and progress_wanted(logger)
        self.progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not (self.show and self.console.is_terminal),
        )

    def __enter__(self) -> _Phases:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    @contextmanager
    def phase(self, name: str, total: int, done: int = 0) -> Iterator[Callable[..., None]]:
        task = self.progress.add_task(name, total=total, completed=done, note=f"({done} reused)" if done else "")
        started = time.time()
        yield lambda n=1: self.progress.advance(task, n)
        self.progress.update(task, completed=total)
        if self.show and not self.console.is_terminal:
            reused = f", {done} reused from an earlier run" if done else ""
            logger.info("prepare: %s %d done in %.1fs%s", name, total, time.time() - started, reused)


# ---- text ----


def _clean_unit(
    unit: sources.Unit, text_field: str, clean: CleanConfig, dedup: DedupConfig, path: str
) -> sources.ReadReport:
    """Worker: read, clean, exact-hash and MinHash one unit into ``path`` (npz) + a json record.

    Takes the torch-free config sections, not the recipe's DataConfig: unpickling that
    would import torch into every worker."""
    docs, report = sources.read_documents(unit, text_field)
    stats = CleanStats()
    kept = [c for c in (clean_document(d, clean, stats) for d in docs) if c is not None]
    del docs  # a unit can be one huge document: hold the raw and the cleaned text no longer than needed
    encoded = [d.encode("utf-8") for d in kept]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    exact, sigs = document_hashes(kept, dedup)  # all documents of the unit at once, vectorised
    arrays = {"text": np.frombuffer(b"".join(encoded), dtype=np.uint8), "offsets": offsets, "exact": exact}
    if sigs is not None:
        arrays["sigs"] = sigs
    save_npz(Path(path), arrays)
    record = {
        "read": {"items": report.items, "bytes": report.bytes, "skipped": report.skipped},
        "clean": stats.to_dict(),
    }
    write_text(Path(path).with_suffix(".json"), json.dumps(record))  # last: marks the unit done
    return report


def _unit_docs(path: Path) -> list[str]:
    with np.load(path, allow_pickle=False) as f:
        text, offsets = f["text"].tobytes(), f["offsets"]
    return [text[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


@functools.lru_cache(maxsize=2)
def _cached_codec(codec_json: str) -> TextCodec:
    """The codec of a job's tokenizer text, parsed once per worker (6 ms each, once per unit before)."""
    from ember.data.tokenizer import codec_from_json

    return codec_from_json(codec_json)


def _tokenize_unit(
    clean_path: str, keep: np.ndarray, split: np.ndarray, codec_json: str, dtype: str, path: str, eos_id: int
) -> None:
    """Worker: ids of the kept documents of one unit, each ending with ``eos_id`` (``TextCodec.documents``),
    per split (``split`` holds each document's split code, an index into ``shards.SPLITS``)."""
    codec = _cached_codec(codec_json)
    docs = _unit_docs(Path(clean_path))
    kept = np.flatnonzero(keep)
    # One batch for every split: the tokenizer's threads share out the whole unit at once.
    encoded = [np.asarray(ids, dtype=dtype) for ids in codec.documents([docs[i] for i in kept], eos_id)]
    out = {}
    for code, name in enumerate(shards.SPLITS):
        chosen = np.flatnonzero(split[kept] == code)
        out[name] = np.concatenate([encoded[j] for j in chosen]) if len(chosen) else np.zeros(0, dtype=dtype)
        out[f"{name}_docs"] = np.int64(len(chosen))
        out[f"{name}_bytes"] = np.int64(sum(len(docs[kept[j]].encode("utf-8")) for j in chosen))
    save_npz(Path(path), out)


def _split_hash(key: bytes, seed: int) -> float:
    """A stable number in [0, 1) per document; below val_fraction → val, then test_fraction → test."""
    return int.from_bytes(hashlib.sha256(seed.to_bytes(8, "little", signed=True) + key).digest()[:8], "big") / 2**64


def _assign_splits(hashes: np.ndarray, kept: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """Each document's split code by its hash band: [0, val) → VAL, [val, val + test) → TEST, else TRAIN.

    Val, then test, get at least one of the ``kept`` documents whenever training keeps one too."""
    split = np.where(hashes < val_fraction, VAL, TRAIN).astype(np.int8)
    _at_least_one(split, hashes, kept, VAL)
    if test_fraction > 0:
        split[(split == TRAIN) & (hashes < val_fraction + test_fraction)] = TEST
        rest = kept[split[kept] != VAL]
        if len(rest) == 1:  # kept is 1 or 2 documents (with none, "no training text" says more)
            raise EmberError(
                f"data.test_fraction={test_fraction} needs at least 3 documents after cleaning and dedup (one each "
                f"for train, val and test); {len(kept)} are left. Use more data, or data.test_fraction=0 (no test split)."
            )
        _at_least_one(split, hashes, rest, TEST)
    return split


def _at_least_one(split: np.ndarray, hashes: np.ndarray, among: np.ndarray, code: int) -> None:
    """Too few documents ``among`` for the fraction to land on both sides of ``code``: the
    lowest hash gets ``code``, the rest train. A single document always trains."""
    if len(among) == 1:
        split[among] = TRAIN  # val is then empty, and training says so (test never gets here: too few is an error)
    elif len(among) >= 2 and ((split[among] == code).all() or not (split[among] == code).any()):
        split[among] = TRAIN
        split[among[np.argmin(hashes[among])]] = code


class _TextPrepare(PrepareJob):
    def clean_path(self, i: int) -> Path:
        return self.work / f"clean_{i:06d}.npz"

    def tok_path(self, i: int) -> Path:
        return self.work / f"tokens_{i:06d}.npz"

    def run(self) -> tuple[dict, int, int]:
        reused = self.clean()
        read, clean_stats = self.gather_clean_records()
        keep, split, dedup_stats = self.dedup()
        if not (keep & (split == TRAIN)).any():
            raise EmberError(
                f"No training text is left: {read['documents']} document(s) read, {clean_stats.docs_out} after cleaning, "
                f"{int(keep.sum())} after dedup, {int((keep & (split != TRAIN)).sum())} of them held out for validation "
                f"(and test). Check the sources (--field for JSONL/Parquet/CSV) and the data.clean and data.dedup settings."
            )
        codec, tok_entry = self.tokenizer(keep, split)
        dtype = shards.token_dtype(codec.vocab_size)
        self.tokenize(keep, split, codec, dtype, tok_entry["eos_id"])
        split_info, reused_shards = self.write_shards(dtype)
        stats = {
            "read": read,
            "clean": clean_stats.to_dict(),
            "dedup": dedup_stats,
            "kept": {s: {k: split_info[s][k] for k in ("documents", "bytes", "tokens")} for s in self.splits},
        }
        manifest = {
            "kind": "tokens",
            "dtype": dtype,
            "vocab_size": codec.vocab_size,
            "eot_id": tok_entry["eos_id"],  # what ends each document: the tokenizer's end-of-text id
            "bos_id": tok_entry["bos_id"],
            "tokenizer": tok_entry,
            "shard_size": self.cfg.shard_size,
            "splits": split_info,
            "stats": stats,
        }
        return manifest, reused, reused_shards

    def clean(self) -> int:
        todo = [u for u in self.units if not self.clean_path(u.index).with_suffix(".json").is_file()]
        done = len(self.units) - len(todo)
        with self.phases.phase("clean", len(self.units), done) as advance:
            jobs = [
                (u, self.cfg.text_field, self.cfg.clean, self.cfg.dedup, str(self.clean_path(u.index))) for u in todo
            ]
            for _ in self.pool.map_unordered(_clean_unit, jobs):
                advance()
        return done

    def gather_clean_records(self) -> tuple[dict, CleanStats]:
        read, clean_stats, skipped = {"documents": 0, "bytes": 0}, CleanStats(), []
        for u in self.units:
            record = json.loads(self.clean_path(u.index).with_suffix(".json").read_text())
            read["documents"] += record["read"]["items"]
            read["bytes"] += record["read"]["bytes"]
            skipped += record["read"]["skipped"]
            clean_stats.add(CleanStats.from_dict(record["clean"]))
        report_skipped(skipped, self.strict, self.phases)
        read["skipped_files"] = len(skipped)
        read["skipped"] = [f"{p}: {why}" for p, why in skipped[:MAX_NAMED_SKIPS]]
        return read, clean_stats

    def dedup(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """The keep mask and split codes of all cleaned documents, in unit order (cheap: redone on resume)."""
        sizes = []
        for u in self.units:
            with np.load(self.clean_path(u.index), allow_pickle=False) as f:
                sizes.append(len(f["offsets"]) - 1)
        n, near = sum(sizes), self.cfg.dedup.near
        exact, nbytes = np.empty((n, 32), dtype=np.uint8), np.empty(n, dtype=np.int64)
        # Signatures go to a memory map: 4 bytes x num_perm per document stay on disk.
        sigs = _signature_map(self.work / "signatures.npy", n, self.cfg.dedup.num_perm) if near and n else None
        start = 0
        with self.phases.phase("dedup", len(self.units)) as advance:
            for u, size in zip(self.units, sizes):
                with np.load(self.clean_path(u.index), allow_pickle=False) as f:
                    exact[start : start + size] = f["exact"]
                    nbytes[start : start + size] = np.diff(f["offsets"])
                    if sigs is not None:
                        sigs[start : start + size] = f["sigs"]
                start += size
                advance()
            keep_a, _, stats = find_duplicates(exact, sigs, nbytes, self.cfg.dedup, self.pool.near_edges)
        # fromiter: 8 bytes a document, not a list of Python floats (32) on top, at 10^8 documents and more
        hash_a = np.fromiter((_split_hash(key.tobytes(), self.cfg.seed) for key in exact), np.float64, len(exact))
        split_a = _assign_splits(hash_a, np.flatnonzero(keep_a), self.cfg.val_fraction, self.cfg.test_fraction)
        return keep_a, split_a, stats

    def tokenizer(self, keep: np.ndarray, split: np.ndarray) -> tuple[TextCodec, dict]:
        done = self.work / "tokenizer.done"
        codec, entry = fit_codec(self.cfg, self.out, lambda: self.train_docs(keep, split), self.phases, done.is_file())
        write_text(done, "")
        return codec, entry

    def train_docs(self, keep: np.ndarray, split: np.ndarray) -> Iterator[str]:
        start = 0
        for u in self.units:
            docs = _unit_docs(self.clean_path(u.index))
            mask = keep[start : start + len(docs)] & (split[start : start + len(docs)] == TRAIN)
            start += len(docs)
            yield from (d for d, m in zip(docs, mask) if m)

    def tokenize(self, keep: np.ndarray, split: np.ndarray, codec: TextCodec, dtype: str, eos_id: int) -> None:
        jobs, start, codec_json = [], 0, codec.to_json()  # one copy of the tokenizer text for every job
        for u in self.units:
            with np.load(self.clean_path(u.index), allow_pickle=False) as f:
                n = len(f["offsets"]) - 1
            if not self.tok_path(u.index).is_file():
                jobs.append(
                    (
                        str(self.clean_path(u.index)),
                        keep[start : start + n],
                        split[start : start + n],
                        codec_json,
                        dtype,
                        str(self.tok_path(u.index)),
                        eos_id,
                    )
                )
            start += n
        with self.phases.phase("tokenise", len(self.units), len(self.units) - len(jobs)) as advance:
            for _ in self.pool.map_unordered(_tokenize_unit, jobs):
                advance()

    def write_shards(self, dtype: str) -> tuple[dict, int]:
        info, reused = {}, 0
        for split in self.splits:
            record_path = self.work / f"shards_{split}.json"
            done = json.loads(record_path.read_text()) if record_path.is_file() else []
            # Only the unbroken run of finished shards from the first one counts: rows are skipped
            # by position, so a missing shard in the middle must be written again with all after it.
            done = list(
                itertools.takewhile(
                    lambda r: all(shards.check_file(self.out, e, full=False) is None for e in r["files"].values()), done
                )
            )
            reused += len(done)
            writer = shards.ShardWriter(self.out, split, self.cfg.shard_size, {"tokens": dtype}, done)
            # Record each finished shard, so a resumed prepare does not write it again.
            writer.on_shard = lambda record, p=record_path, w=writer: write_text(p, json.dumps(w.records))
            docs = nbytes = tokens = 0
            with self.phases.phase(f"shard {split}", len(self.units)) as advance:
                for u in self.units:
                    with np.load(self.tok_path(u.index), allow_pickle=False) as f:
                        ids = f[split]
                        docs += int(f[f"{split}_docs"])
                        nbytes += int(f[f"{split}_bytes"])
                    tokens += len(ids)
                    writer.write(tokens=ids)
                    advance()
            info[split] = {"documents": docs, "bytes": nbytes, "tokens": tokens, "shards": writer.close()}
        return info, reused


# ---- images ----


def _read_image_unit(unit: sources.Unit, geometry, path: str) -> sources.ReadReport:
    """Worker: decode one image unit into ``path`` (npz of uint8 or float32 images and int64 labels)."""
    x, y, report = sources.read_images(unit, geometry)
    save_npz(Path(path), {"x": x, "y": y})
    write_text(
        Path(path).with_suffix(".json"),
        json.dumps({"items": report.items, "bytes": report.bytes, "skipped": report.skipped}),
    )
    return report


class _ImagePrepare(PrepareJob):
    def unit_path(self, i: int) -> Path:
        return self.work / f"images_{i:06d}.npz"

    def run(self) -> tuple[dict, int, int]:
        geometry = sources.image_geometry(self.plan)
        todo = [u for u in self.plan.units if not self.unit_path(u.index).with_suffix(".json").is_file()]
        reused = len(self.plan.units) - len(todo)
        with self.phases.phase("read", len(self.plan.units), reused) as advance:
            for _ in self.pool.map_unordered(
                _read_image_unit, [(u, geometry, str(self.unit_path(u.index))) for u in todo]
            ):
                advance()
        records = [json.loads(self.unit_path(u.index).with_suffix(".json").read_text()) for u in self.plan.units]
        skipped = [tuple(s) for r in records for s in r["skipped"]]
        report_skipped(skipped, self.strict, self.phases)
        labels, shape, dtype = self.labels_and_shape(skipped)
        codes = stratified_split(labels, self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.seed)
        mean, std = self.mean_std(codes == TRAIN, 255.0 if dtype == "uint8" else 1.0)
        info = {}
        for split in self.splits:
            mask = codes == shards.SPLITS.index(split)
            writer = shards.ShardWriter(self.out, split, self.cfg.shard_size, {"images": dtype, "labels": "int64"})
            start = 0
            for u in self.plan.units:
                with np.load(self.unit_path(u.index), allow_pickle=False) as f:
                    x, y = f["x"], f["y"]
                m = mask[start : start + len(y)]
                start += len(y)
                writer.write(images=x[m], labels=y[m])
            info[split] = {"samples": int(mask.sum()), "shards": writer.close()}
        classes = self.plan.classes or [str(c) for c in range(int(labels.max()) + 1)]
        stats = {
            "read": {
                "samples": int(sum(r["items"] for r in records)),
                "bytes": int(sum(r["bytes"] for r in records)),
                "skipped_files": len(skipped),
                "skipped": [f"{p}: {why}" for p, why in skipped[:MAX_NAMED_SKIPS]],
            },
            "kept": {s: {"samples": info[s]["samples"]} for s in self.splits},
        }
        manifest = {
            "kind": "images",
            "image_shape": list(shape),
            "num_classes": len(classes),
            "classes": classes,
            "mean": mean,
            "std": std,
            "shard_size": self.cfg.shard_size,
            "splits": info,
            "stats": stats,
        }
        if dtype != "uint8":  # only then: a uint8 set's manifest is the same as before the key existed
            manifest["image_dtype"] = dtype
        return manifest, reused, 0

    def labels_and_shape(self, skipped: list) -> tuple[np.ndarray, tuple[int, ...], str]:
        """All labels, the one image shape (C, H, W) and the one pixel dtype of the read units."""
        labels, shapes, dtypes = [], set(), {}
        for u in self.plan.units:
            with np.load(self.unit_path(u.index), allow_pickle=False) as f:
                labels.append(f["y"])
                if len(f["y"]):
                    shapes.add(tuple(f["x"].shape[1:]))
                    dtypes.setdefault(str(f["x"].dtype), []).append(",".join(u.paths) or u.reader)
        if len(shapes) != 1:
            why = "".join(f" {p}: {w}." for p, w in skipped[:3])
            raise EmberError(
                f"The image sources have {'no readable images' if not shapes else f'different shapes {sorted(shapes)}'}."
                f"{why} Give images of one shape (C, H, W), or prepare each set separately."
            )
        if len(dtypes) > 1:
            kinds = "; ".join(f"{d} in {', '.join(p[:2])}" for d, p in sorted(dtypes.items()))
            raise EmberError(
                f"The image sources mix pixel types ({kinds}): 0-255 uint8 images and float (or wide integer) "
                f"arrays are on different scales, and ember changes neither. Save every array with one dtype "
                f"(e.g. all float32 on one scale), or prepare each set into its own --out directory."
            )
        return np.concatenate(labels), shapes.pop(), dtypes.popitem()[0]

    def mean_std(self, train: np.ndarray, scale: float) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the ``train`` images divided by ``scale`` (float64 sums): 255 for
        uint8 images (the [0, 1] scale the transform converts them to), 1 for float ones (as they are)."""
        total = total_sq = None
        count, start = 0, 0
        for u in self.plan.units:
            with np.load(self.unit_path(u.index), allow_pickle=False) as f:
                x = f["x"][train[start : start + len(f["y"])]].astype(np.float64) / scale
                start += len(f["y"])
            s, sq = x.sum(axis=(0, 2, 3)), (x * x).sum(axis=(0, 2, 3))
            total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
        return [float(m) for m in mean], [float(max(s, 1e-6)) for s in std]


def summary_lines(result: PrepareResult) -> list[str]:
    """One line per split, for the CLI, then what prepare decided for the kind."""
    m, lines = result.manifest, []
    unit = {
        "table": "rows",
        "labelled-text": "texts",
        "images": "images",
        "pairs": "pairs",
        "captions": "image-caption pairs",
        "instruct": "conversations",
    }.get(m["kind"], "samples")
    for split in shards.splits_of(m):
        s = m["splits"][split]
        what = (
            f"{s['tokens']:,} tokens, {s['documents']:,} documents"
            if m["kind"] == "tokens"
            else f"{s['samples']:,} {unit}"
        )
        lines.append(f"{split:>5}: {what} in {len(s['shards'])} shard(s)")
    if m["kind"] == "labelled-text":
        from ember.data import labelled_text

        return lines + labelled_text.summary(m)
    if m["kind"] == "pairs":
        from ember.data import pairs

        return lines + pairs.summary(m)
    if m["kind"] == "captions":
        from ember.data import caption_prepare

        return lines + caption_prepare.summary(m)
    if m["kind"] == "instruct":
        from ember.data import instruct

        return lines + instruct.summary(m)
    return lines + (_table_summary(m) if m["kind"] == "table" else [])


def _table_summary(m: dict) -> list[str]:
    """What prepare decided about a table's columns: never silent about a dropped column or a filled cell."""
    stats = m["stats"]
    lines = [
        f"table: {len(m['features'])} features, {m['num_classes']} classes of {m['label']!r}: {', '.join(m['classes'])}"
        if m.get("target") != "values"
        else f"table: {len(m['features'])} features, numeric target {m['label']!r} (regress): {_target_line(m)}"
    ]
    for name, why in stats["dropped_columns"].items():
        kind = "every training value distinct: a row id" if why == "id-like" else "one value in training"
        lines.append(f"dropped column {name!r}: {why} ({kind})")
    for spec in m["columns"]:
        if spec.get("encoding") == "index" and not spec.get("dropped"):
            n = len(spec["categories"])
            lines.append(f"column {spec['name']!r}: {n:,} categories (> data.one_hot_max): one index feature, embedded")
    for name in stats.get("decimal_comma", []):
        lines.append(
            f"column {name!r}: numbers with a decimal comma ('3,5' = 3.5: a ';'-separated file) read as numbers"
        )
    for name, n in stats["missing"].items():
        if n and name not in stats["dropped_columns"]:
            lines.append(f"column {name!r}: {n} missing cell(s) imputed")
    for split, cols in stats["unseen"].items():
        for name, n in cols.items():
            lines.append(f"column {name!r}: {n} {split} cell(s) hold a category unseen in training (all zeros)")
    return lines


def _target_line(m: dict) -> str:
    t = m["target_stats"]
    return f"training mean {t['mean']:.4g}, std {t['std']:.4g}, range [{t['min']:.4g}, {t['max']:.4g}]"
