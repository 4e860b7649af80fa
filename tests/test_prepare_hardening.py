"""Issue #15: data preparation hardening — float arrays kept as they are, workers that die with
their parent, cleaning linear in the input, a full disk explained, and what fuzzing found."""

from __future__ import annotations

import json
import re
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from ember.config import DataConfig
from ember.data import dedup, sources
from ember.data.prepare import _clean_unit, prepare
from ember.errors import EmberError


def one_line(n_bytes: int, seed: int = 0) -> str:
    """A single line of ``n_bytes`` of random words (no newline): the worst shape for line heuristics."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}x" for i in range(5000)])
    words = rng.choice(vocab, size=n_bytes // 4 + 1)
    return " ".join(words.tolist())[:n_bytes]


def small_cfg(**kw) -> DataConfig:
    return DataConfig(**{"vocab_size": 300, "shard_size": 1024, "val_fraction": 0.2, **kw})


# --- 3. cleaning is linear in the input ------------------------------------------------------


def test_minhash_memory_stays_bounded_on_one_huge_line():
    """datasketch builds a [num_perm, shingles] matrix per update: one update of a 5 MB line
    peaked near 1 GB (a 50 MB line ~25 GB: the "minutes" of the issue were swapping)."""
    text = one_line(5_000_000)
    tracemalloc.start()
    try:
        dedup.signature(text, dedup.DedupConfig())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200e6, f"signature of a 5 MB line peaked at {peak / 1e6:.0f} MB"


def reference_signature(text: str, cfg: dedup.DedupConfig) -> np.ndarray:
    """The signature from ``shingles`` (the definition), one shingle at a time: each shingle's own
    words hashed, combined, then every permutation's minimum over the set."""
    hashes = []
    for shingle in dedup.shingles(text, cfg.ngram):
        words = np.concatenate(list(dedup._word_hash_pieces(shingle)))
        hashes.append(dedup._combine(words, np.zeros(1, np.int64), np.array([len(words)]), len(words))[0])
    a, b = dedup._permutations(cfg.num_perm, cfg.seed)
    return (a * np.array(hashes, dtype=np.uint32)[None, :] + b).min(axis=1)


@pytest.mark.parametrize("ngram", [1, 3, 5])
def test_vectorised_signatures_equal_the_definition_across_batches(monkeypatch, ngram):
    """Documents hashed together (short ones, empty ones, ones cut into pieces) give exactly the
    signature of their shingle sets taken one by one, whatever the batch size."""
    cfg = dedup.DedupConfig(ngram=ngram)
    texts = [one_line(20_000, seed=1), "", "one two", "a b c d e", "Héllo  wörld\n\tagain and again", one_line(3000)]
    expected = np.stack([reference_signature(t, cfg) for t in texts])
    assert np.array_equal(dedup.signatures(texts, cfg), expected)
    monkeypatch.setattr(dedup, "BATCH_BYTES", 1000)  # the 20 kB line in ~20 pieces, shingles across every cut
    monkeypatch.setattr(dedup, "SHINGLES_PER_BLOCK", 7)  # permutation blocks cut inside documents
    assert np.array_equal(dedup.signatures(texts, cfg), expected)
    assert np.array_equal(dedup.signature(texts[0], cfg), expected[0])


def test_a_word_of_megabytes_hashes_as_the_same_word_anywhere(monkeypatch):
    """A word longer than a batch is hashed by chunks, to the value the one-piece path gives it."""
    monkeypatch.setattr(dedup, "BATCH_BYTES", 1000)
    monkeypatch.setattr(dedup, "_LONG", 3000)
    word = one_line(10_000).replace(" ", "")
    text = f"a b {word} c d e f"
    (whole,) = dedup._poly_words(word.encode())[0:1]
    assert dedup._long_word_poly(word.encode()) == int(whole[0])
    cfg = dedup.DedupConfig(ngram=2)
    assert np.array_equal(dedup.signature(text, cfg), reference_signature(text, cfg))


def test_a_5mb_single_line_cleans_in_bounded_time(tmp_path):
    """The whole clean phase of one unit (read, clean, exact key, MinHash) on a 5 MB line:
    about 1.5 s on a 2-core CPU; the bound leaves a wide margin for a loaded machine."""
    path = tmp_path / "line.txt"
    path.write_text(one_line(5_000_000))
    unit = sources.plan_units([str(path)]).units[0]
    cfg = small_cfg()
    started = time.perf_counter()
    report = _clean_unit(unit, "text", cfg.clean, cfg.dedup, str(tmp_path / "clean_000000.npz"))
    seconds = time.perf_counter() - started
    assert report.items == 1 and seconds < 30, f"{seconds:.1f} s"


class _CountingFile:
    """A binary file that counts the bytes read through it."""

    def __init__(self, f, counter: list[int]) -> None:
        self.f, self.counter = f, counter

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.counter[0] += len(data)
        return data

    def readline(self) -> bytes:
        data = self.f.readline()
        self.counter[0] += len(data)
        return data

    def seek(self, pos: int) -> int:
        return self.f.seek(pos)

    def tell(self) -> int:
        return self.f.tell()


def test_jsonl_units_inside_one_long_line_do_not_reread_it(tmp_path, monkeypatch):
    """A JSONL file is cut into byte ranges; each range used to skip the line begun before it
    with readline(), reading the rest of a long line again per range (quadratic)."""
    line = json.dumps({"text": one_line(400_000)}) + "\n"
    path = tmp_path / "one.jsonl"
    path.write_text(line + json.dumps({"text": "a short second document"}) + "\n")
    monkeypatch.setattr(sources, "UNIT_BYTES", 4096)
    units = sources.plan_units([str(path)]).units
    assert len(units) > 90
    counter = [0]
    real_open = open
    monkeypatch.setattr(sources, "open", lambda p, mode="r": _CountingFile(real_open(p, mode), counter), raising=False)
    docs = [d for u in units for d in sources.read_documents(u)[0]]
    assert len(docs) == 2 and docs[1] == "a short second document"
    assert counter[0] < 3 * path.stat().st_size, f"read {counter[0]:,} bytes of a {path.stat().st_size:,}-byte file"


# --- 4. a full disk is explained, and prepare resumes after it ---------------------------------


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("texts")
    for i in range(30):
        (root / f"doc_{i:02d}.txt").write_text(one_line(3000, seed=100 + i).replace(" w1", "\nw1") + "\n")
    return root


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".lock"}


def disk_full_on(monkeypatch, method: str, name_prefix: str) -> None:
    """Make ``Path.<method>`` raise ENOSPC when it writes a file whose name starts with ``name_prefix``
    (the temporary file beside the final one), as a full disk would."""
    import errno

    real = getattr(Path, method)

    def write(self, data, *args, **kwargs):
        if self.name.startswith(name_prefix):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, method, write)


@pytest.fixture(scope="module")
def reference(texts, tmp_path_factory):
    return prepare([str(texts)], tmp_path_factory.mktemp("ref") / "out", small_cfg(), progress=False)


@pytest.mark.parametrize(
    "method, prefix, needed",
    [
        ("write_bytes", "train_000001.tokens.bin.", 2048),  # the second train shard: 1024 uint16 tokens
        ("write_text", "tokenizer.json.", None),
        ("write_text", "manifest.json.", None),
    ],
)
def test_a_full_disk_names_the_file_the_space_and_resumes(
    texts, reference, tmp_path, monkeypatch, method, prefix, needed
):
    assert len(reference.manifest["splits"]["train"]["shards"]) >= 3
    out = tmp_path / "out"
    disk_full_on(monkeypatch, method, prefix)
    with pytest.raises(EmberError) as caught:
        prepare([str(texts)], out, small_cfg(), progress=False)
    message = str(caught.value)
    assert prefix.rstrip(".") in message and "disk is full" in message and "run the same" in message
    assert re.search(r"and [\d,]+ bytes are free there", message)  # the free space, measured
    if needed:
        assert f"needed {needed:,} bytes" in message
    monkeypatch.undo()
    resumed = prepare([str(texts)], out, small_cfg(), progress=False)
    assert resumed.reused_units == len(sources.plan_units([str(texts)]).units)  # nothing cleaned twice
    if method == "write_bytes":
        assert resumed.reused_shards == 1
    assert tree_bytes(out) == tree_bytes(reference.out_dir)


def test_a_full_disk_in_a_worker_file_is_explained(texts, tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(EmberError, match=r"clean_000000\.npz needed [\d,]+ bytes"):
        prepare([str(texts)], tmp_path / "out", small_cfg(), progress=False)


# --- 2. workers die with their parent ------------------------------------------------------------


def session_processes(sid: int) -> dict[int, str]:
    """{pid: command line} of the live (not zombie) processes of session ``sid``, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended while we looked
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            found[int(entry.name)] = cmdline
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_kill_9_of_prepare_takes_its_workers_and_the_resource_tracker_with_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):  # ~8 MB: several seconds of cleaning for two workers on two cores
        (src / f"part{i}.txt").write_text(one_line(1_000_000, seed=i).replace(" w2", "\nw2"))
    cmd = [
        sys.executable,
        "-m",
        "ember",
        "data",
        "prepare",
        str(src),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "2",
        "--vocab-size",
        "300",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            children = {p: c for p, c in session_processes(proc.pid).items() if p != proc.pid}
            if sum("spawn_main" in c for c in children.values()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "prepare ended before its workers were seen: give it more text"
        assert sum("spawn_main" in c for c in children.values()) >= 2, children
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while session_processes(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        left = session_processes(proc.pid)
        assert not left, f"still running 10 s after kill -9 of the parent: {left}"
    finally:
        for pid in session_processes(proc.pid):  # never leave them behind, even when the test fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_the_portable_fallback_watches_the_parent_without_prctl(tmp_path):
    """Where prctl is missing (macOS, BSD), a thread polling getppid() ends the worker."""
    import os
    import signal
    import subprocess
    import sys

    grandchild = (
        "import os, sys; from ember.data.prepare import _watch_parent; "
        "print('ready', flush=True); _watch_parent(int(sys.argv[1]), every=0.05)"
    )
    parent = (
        "import os, subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}, str(os.getpid())]); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "ready"  # the grandchild shares the parent's stdout
        assert child in session_processes(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while child in session_processes(proc.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert child not in session_processes(proc.pid)
    finally:
        for pid in session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)


# --- 1. float .npz arrays are kept as they are ---------------------------------------------------


def float_features(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float 'images' far outside [0, 1] (e.g. sensor readings near 650), 3 classes told apart by level."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = 600.0 + 40.0 * y[:, None, None] + rng.normal(0, 5, (n, 4, 4))
    return x, y


def prepared_images(out: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from ember.data.mapped import ImageShards
    from ember.data.shards import load_manifest

    m = load_manifest(out)
    batch = ImageShards(out, m, split).get(np.arange(m["splits"][split]["samples"]))
    return batch["x"].numpy(), batch["y"].numpy()


def test_float_npz_values_are_kept_exactly_and_normalised_by_their_statistics(tmp_path):
    x, y = float_features()
    np.savez(tmp_path / "f.npz", x=x, y=y)
    m = prepare([str(tmp_path / "f.npz")], tmp_path / "out", small_cfg(), progress=False).manifest
    assert m["image_dtype"] == "float32" and m["image_shape"] == [1, 4, 4]
    got = np.concatenate([prepared_images(tmp_path / "out", s)[0] for s in ("train", "val")])
    assert got.dtype == np.float32 and got.max() > 600  # was divided by 255 and clipped to 1.0
    assert sorted(got.reshape(len(got), -1).tolist()) == sorted(x.astype(np.float32).reshape(len(x), -1).tolist())
    train_x = prepared_images(tmp_path / "out", "train")[0].astype(np.float64)
    assert abs(train_x.mean() - m["mean"][0]) < 1e-4 and abs(train_x.std() - m["std"][0]) < 1e-4
    from ember.data.build import build_sets

    sets = build_sets(DataConfig(name="prepared", path=str(tmp_path / "out")))
    batch = sets.val_transform(sets.val.get(np.arange(len(sets.val))))
    assert batch["x"].dtype.is_floating_point and abs(float(batch["x"].mean())) < 0.5  # normalised, not clipped
    from ember.data.inspect import describe

    assert "float32" in describe(tmp_path / "out")


def test_a_float_npz_trains_end_to_end_with_a_cnn(tmp_path):
    from conftest import tiny_recipe
    from ember.training.loop import train

    x, y = float_features(240)
    np.savez(tmp_path / "f.npz", x=x, y=y)
    prepare([str(tmp_path / "f.npz")], tmp_path / "data", small_cfg(), progress=False)
    recipe = tiny_recipe("cnn", "data.name=prepared", f"data.path={tmp_path / 'data'}", "data.augment.rotation=10")
    train(recipe, tmp_path / "run")  # geometric augmentation works on float values
    assert (tmp_path / "run" / "model.safetensors").is_file()
    with pytest.raises(EmberError, match="clip them"):
        from ember.data.augment import AugmentConfig, build_image_transform

        build_image_transform([600.0], [30.0], AugmentConfig(brightness=0.2), "float32")


def test_integer_npz_values_are_kept_or_refused_never_clipped(tmp_path):
    rng = np.random.default_rng(2)
    y = np.arange(60) % 3
    wide = rng.integers(-1000, 5000, (60, 4, 4)).astype(np.int32)  # beyond 0..255: kept as float32, exactly
    np.savez(tmp_path / "wide.npz", x=wide, y=y)
    m = prepare([str(tmp_path / "wide.npz")], tmp_path / "w", small_cfg(), progress=False).manifest
    got = np.concatenate([prepared_images(tmp_path / "w", s)[0] for s in ("train", "val")])
    assert (
        m["image_dtype"] == "float32"
        and got.min() < 0
        and sorted(got.ravel().tolist()) == sorted(wide.ravel().tolist())
    )
    small = rng.integers(0, 2, (60, 4, 4)).astype(np.int64)  # 0/1 in int64: uint8, the same 0 and 1 (was 0 and 255)
    np.savez(tmp_path / "small.npz", x=small, y=y)
    m = prepare([str(tmp_path / "small.npz")], tmp_path / "s", small_cfg(), progress=False).manifest
    got = np.concatenate([prepared_images(tmp_path / "s", s)[0] for s in ("train", "val")])
    assert "image_dtype" not in m and got.dtype == np.uint8 and set(got.ravel().tolist()) == {0, 1}
    np.savez(tmp_path / "huge.npz", x=np.full((60, 4, 4), 1 << 40, dtype=np.int64), y=y)
    with pytest.raises(EmberError, match="cannot be kept exactly"):
        prepare([str(tmp_path / "huge.npz")], tmp_path / "h", small_cfg(), progress=False)
    np.savez(tmp_path / "nan.npz", x=np.full((60, 4, 4), np.nan), y=y)
    with pytest.raises(EmberError, match="NaN or infinite"):
        prepare([str(tmp_path / "nan.npz")], tmp_path / "n", small_cfg(), progress=False)


def test_uint8_and_float_npz_sources_are_not_mixed(tmp_path):
    y = np.arange(60) % 3
    np.savez(tmp_path / "a.npz", x=np.zeros((60, 4, 4), np.uint8) + y[:, None, None].astype(np.uint8), y=y)
    np.savez(tmp_path / "b.npz", x=float_features(60)[0], y=y)
    with pytest.raises(EmberError, match="mix pixel types"):
        prepare([str(tmp_path / "*.npz")], tmp_path / "o", small_cfg(), progress=False)


def test_a_full_disk_for_the_signature_map_is_explained_not_a_sigbus(texts, tmp_path, monkeypatch):
    """The MinHash signatures live in a memory map; its blocks are reserved up front, so a full
    disk is an ENOSPC paragraph there, not a SIGBUS later while its pages are written."""
    import errno
    import os

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this system")
    calls = []

    def full(fd, offset, length):
        calls.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(EmberError, match=r"signatures\.npy needed [\d,]+ bytes .* resumes"):
        prepare([str(texts)], tmp_path / "out", small_cfg(), progress=False)
    assert calls and calls[0] > 0


# --- a refused prepare starts over once the sources are fixed; an interrupted one resumes ---------


DOCS = [one_line(400, seed=200 + i) for i in range(12)]


def write_jsonl(path: Path, texts: list[str], field: str = "text", extra: str = "") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts) + extra)
    return path


def image_folder(root: Path, n: int = 10, broken: bool = False) -> Path:
    """Two classes of ``n`` 6x5 RGB images each; ``broken``: dog/9.png is not an image."""
    from PIL import Image

    for c, label in enumerate(("cat", "dog")):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((6, 5, 3), 20 * c + i, np.uint8)).save(root / label / f"{i}.png")
    if broken:
        (root / "dog" / "9.png").write_bytes(b"not a png")
    return root


@pytest.mark.parametrize(
    "broken, strict, refusal",
    [
        ("other-field", False, "No training text is left"),  # every row's text under another field
        ("bad-line", True, r"could not be read \(--strict\)"),
    ],
)
def test_a_refused_text_prepare_starts_over_once_the_sources_are_fixed(tmp_path, broken, strict, refusal):
    from ember.data import shards

    src, out, config = tmp_path / "docs.jsonl", tmp_path / "out", small_cfg(tokenizer="bytes")
    if broken == "other-field":
        write_jsonl(src, DOCS, field="body")
    else:
        write_jsonl(src, DOCS, extra="not json\n")
    with pytest.raises(EmberError, match=refusal):
        prepare([str(src)], out, config, strict=strict, progress=False)
    assert not (out / shards.WORK).exists()
    write_jsonl(src, DOCS)  # the fix; then the same command (was: "an unfinished prepare with other sources")
    result = prepare([str(src)], out, config, strict=strict, progress=False)
    assert result.reused_units == 0 and result.manifest["stats"]["read"]["documents"] == len(DOCS)
    assert sum(result.manifest["stats"]["kept"][s]["documents"] for s in ("train", "val")) == len(DOCS)


@pytest.mark.parametrize(
    "odd, strict, refusal",
    [
        ("too-few", False, "both splits need at least 2"),  # 2 images a class: 1 for validation
        ("broken", True, r"could not be read \(--strict\)"),
    ],
)
def test_a_refused_image_prepare_starts_over_once_the_images_are_fixed(tmp_path, odd, strict, refusal):
    from ember.data import shards

    root, out = tmp_path / "img", tmp_path / "out"
    image_folder(root, n=2) if odd == "too-few" else image_folder(root, broken=True)
    with pytest.raises(EmberError, match=refusal):
        prepare([str(root)], out, small_cfg(), strict=strict, progress=False)
    assert not (out / shards.WORK).exists()
    image_folder(root)  # the fix: ten images a class, each a PNG
    result = prepare([str(root)], out, small_cfg(), strict=strict, progress=False)
    m = result.manifest
    assert result.reused_units == 0 and m["image_shape"] == [3, 6, 5] and m["classes"] == ["cat", "dog"]
    assert m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"] == 20


@pytest.mark.parametrize("kind", ["text", "images"])
@pytest.mark.parametrize("stop", ["interrupt", "disk-full"])
def test_an_interrupted_or_disk_full_text_or_image_prepare_still_resumes(tmp_path, monkeypatch, kind, stop):
    from ember.data import prepare as prepare_mod
    from ember.data import shards

    if kind == "text":
        monkeypatch.setattr(sources, "UNIT_BYTES", 1024)  # about three documents a unit: four units
        for i, doc in enumerate(DOCS):
            (tmp_path / "src").mkdir(exist_ok=True)
            (tmp_path / "src" / f"{i:02d}.txt").write_text(doc + "\n")
        src, worker, config = [str(tmp_path / "src")], "_clean_unit", small_cfg(tokenizer="bytes")
    else:
        src, worker, config = [str(image_folder(tmp_path / "img"))], "_read_image_unit", small_cfg()
    reference = prepare(src, tmp_path / "ref", config, progress=False)
    real, calls = getattr(prepare_mod, worker), []

    def stops_on_the_second(*args):
        calls.append(args)
        if len(calls) == 2:
            if stop == "interrupt":
                raise KeyboardInterrupt("killed")
            raise EmberError(f"The disk is full: writing {args[-1]} failed. {shards.RESUMES}")
        return real(*args)

    monkeypatch.setattr(prepare_mod, worker, stops_on_the_second)
    with pytest.raises((KeyboardInterrupt, EmberError)):
        prepare(src, tmp_path / "out", config, progress=False)
    assert (tmp_path / "out" / shards.WORK / "settings.json").is_file()
    monkeypatch.setattr(prepare_mod, worker, real)
    resumed = prepare(src, tmp_path / "out", config, progress=False)
    assert resumed.reused_units == 1 and tree_bytes(tmp_path / "out") == tree_bytes(reference.out_dir)


def test_a_late_refusal_removes_the_shards_and_tokenizer_it_wrote(texts, reference, tmp_path, monkeypatch):
    """A refusal after shards and the tokenizer are in --out: they go with the work directory (the fixed
    rerun would otherwise find files it did not write), and the same command then prepares the same bytes."""
    from ember.data import prepare as prepare_mod

    real = prepare_mod._TextPrepare.write_shards

    def refused_after_writing(self, dtype):
        real(self, dtype)
        raise EmberError("refused after the shards were written")

    monkeypatch.setattr(prepare_mod._TextPrepare, "write_shards", refused_after_writing)
    out = tmp_path / "out"
    with pytest.raises(EmberError, match="refused after"):
        prepare([str(texts)], out, small_cfg(), progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    monkeypatch.undo()
    assert tree_bytes(prepare([str(texts)], out, small_cfg(), progress=False).out_dir) == tree_bytes(reference.out_dir)
