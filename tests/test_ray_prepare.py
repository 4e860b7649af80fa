"""`ember data prepare --engine ray`: the same bytes as the local engine, the distributed near-duplicate
search equal to the in-process one, a killed worker recovered, and a missing Ray explained.

The Ray tests share one local cluster (2 CPUs, started once per module: Ray takes ~10 s to start);
without Ray installed they are skipped, the rest still run."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from ember.cli import main
from ember.config import DataConfig
from ember.data import dedup
from ember.data import prepare as prepare_mod
from ember.data.engines import check_engine
from ember.data.prepare import prepare
from ember.errors import EmberError

WORDS = [f"w{i}q" for i in range(300)] + ["def", "return", "class", "import", "self"]


def make_doc(rng: random.Random, n_words: int = 90) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def near_copy(rng: random.Random, doc: str) -> str:
    words = doc.split(" ")
    words[rng.randrange(len(words))] = "changed"
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """4 JSONL files (4 units) of 40 documents, with exact and near copies planted across files."""
    root = tmp_path_factory.mktemp("ray_corpus")
    rng = random.Random(3)
    files = [[make_doc(rng) for _ in range(40)] for _ in range(4)]
    for k in range(4):  # copies of file k's documents in file k+1: exact (case, spaces) and near
        files[(k + 1) % 4].append(files[k][k].upper())
        files[(k + 1) % 4].append(near_copy(rng, files[k][k + 5]))
        files[(k + 2) % 4].append(near_copy(rng, files[k][k + 9]))
    for k, docs in enumerate(files):
        (root / f"part_{k}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def cfg() -> DataConfig:
    return DataConfig(vocab_size=300, shard_size=2048, val_fraction=0.2)


def tree(out: Path) -> dict[str, bytes]:
    """Every file prepare wrote, by relative path (the lock file aside)."""
    return {
        str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def local_tree(corpus, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "out"
    result = prepare([str(corpus)], out, cfg(), progress=False)
    assert result.manifest["stats"]["dedup"]["exact"]["docs"] == 4
    assert result.manifest["stats"]["dedup"]["near"]["docs"] >= 6  # the planted near copies are found
    return tree(out)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ember[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    # This module's task functions (the self-killing unit below) travel by value: workers cannot import tests.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


def planted_signatures(n: int, num_perm: int, seed: int) -> np.ndarray:
    """Random signatures with near copies: some rows take another's values with a few changed."""
    rng = np.random.default_rng(seed)
    sigs = rng.integers(0, 2**32, size=(n, num_perm), dtype=np.uint32)
    for i in range(0, n // 4, 2):
        j, k = rng.integers(n), rng.integers(0, num_perm // 3)
        sigs[j] = sigs[i]
        sigs[j, rng.choice(num_perm, k, replace=False)] = rng.integers(0, 2**32, k, dtype=np.uint32)
    return sigs


# ---- without Ray: the shuffle is the in-process search ----


@pytest.mark.parametrize("partitions,block", [(2, 10_000), (5, 137), (16, 301)])
def test_shuffled_near_duplicates_equal_the_in_process_search(partitions, block):
    dcfg = dedup.DedupConfig()
    sigs = planted_signatures(2000, dcfg.num_perm, seed=partitions)
    ids = np.sort(np.random.default_rng(0).choice(len(sigs), 1900, replace=False))  # some left out (exact copies)
    expected = dedup.near_edges(sigs, ids, dcfg)
    assert len(expected) >= 100  # the planted copies are there to be found
    got = dedup.shuffled_near_edges(sigs, ids, dcfg, partitions, block)
    np.testing.assert_array_equal(got, expected)
    # and through find_duplicates: the same decisions
    exact = np.random.default_rng(1).integers(0, 256, size=(len(sigs), 32), dtype=np.uint8)
    exact[5] = exact[3]
    nbytes = np.ones(len(sigs), dtype=np.int64)
    local = dedup.find_duplicates(exact, sigs, nbytes, dcfg)
    shuffled = dedup.find_duplicates(
        exact, sigs, nbytes, dcfg, functools.partial(dedup.shuffled_near_edges, partitions=partitions, block=block)
    )
    np.testing.assert_array_equal(local[1], shuffled[1])
    assert local[2] == shuffled[2] and local[2]["near"]["docs"] > 50


def test_every_bucket_lands_whole_in_one_partition():
    dcfg = dedup.DedupConfig()
    sigs = planted_signatures(500, dcfg.num_perm, seed=9)
    ids = np.arange(len(sigs))
    a = dedup.band_partition_map(sigs, ids[:250], dcfg, 4)
    b = dedup.band_partition_map(sigs, ids[250:], dcfg, 4)
    owner = {}
    for pieces in (a, b):
        for p, (band, keys, _) in enumerate(pieces):
            for bucket in set(zip(band.tolist(), keys.tolist())):
                assert owner.setdefault(bucket, p) == p
    bands, _ = dedup.lsh_bands(dcfg)
    assert sum(len(piece[2]) for pieces in (a, b) for piece in pieces) == bands * len(sigs)  # nothing lost


def test_exact_keys_first_of_each_as_np_unique_with_shared_prefixes():
    """The driver's exact search sorts 8-byte prefixes; keys that share one are told apart whole."""
    rng = np.random.default_rng(5)
    for trial in range(60):
        n = int(rng.integers(1, 300))
        exact = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
        for _ in range(int(rng.integers(0, n))):  # copies, and different keys with the same first 8 bytes
            i, j = rng.integers(n, size=2)
            width = 32 if rng.random() < 0.5 else 8
            exact[j, :width] = exact[i, :width]
        if trial % 10 == 0:
            exact[:] = exact[0]
        _, expected = np.unique(exact.view("V32").ravel(), return_index=True)
        got = dedup._first_of_each_key(exact, chunk=int(rng.integers(1, 40)))
        np.testing.assert_array_equal(np.sort(got), np.sort(expected))


# ---- a missing Ray, and engine choices ----


def test_missing_ray_is_one_paragraph_naming_the_extra(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(EmberError, match=r"pip install 'ember\[ray\]'"):
        prepare([str(corpus)], tmp_path / "out", cfg(), progress=False, engine="ray")
    assert not (tmp_path / "out").exists()  # said before anything is written
    code = main(["data", "prepare", str(corpus), "--out", str(tmp_path / "cli"), "--engine", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'ember[ray]'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_engine_choices_are_checked():
    with pytest.raises(EmberError, match="--engine must be one of local, ray"):
        check_engine("dask", 1)
    with pytest.raises(EmberError, match="--workers 4 is the local engine's"):
        check_engine("ray", 4)


# ---- on a local Ray cluster ----


def test_no_running_cluster_is_one_paragraph_never_a_new_cluster(corpus, tmp_path, monkeypatch):
    """Runs before the module's Ray session starts (file order): ember joins a cluster, never starts one."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ember[ray]')")
    assert not ray.is_initialized()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` leaves its address: none here

    # "auto" also joins any Ray server process it finds running on the machine (a developer's own cluster)
    def none_running() -> frozenset:
        return frozenset()

    none_running.cache_clear = lambda: None  # Ray clears the real one's cache
    monkeypatch.setattr("ray._private.services.find_gcs_addresses", none_running, raising=False)
    with pytest.raises(EmberError, match=r"no Ray cluster runs on this machine\. Start one \(`ray start --head`"):
        prepare([str(corpus)], tmp_path / "out", cfg(), progress=False, engine="ray")
    assert not ray.is_initialized() and not (tmp_path / "out").exists()  # refused before anything is written
    with socket.socket() as free:  # a port nothing listens on: a cluster that has stopped
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(EmberError, match=rf"address \S+:{port} \(RAY_ADDRESS\), and nothing answers there"):
        prepare([str(corpus)], tmp_path / "out", cfg(), progress=False, engine="ray")
    assert not ray.is_initialized() and not (tmp_path / "out").exists()  # refused before anything is written


def test_ray_writes_the_local_engines_bytes(corpus, local_tree, ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative --out: the tasks work in the driver's directory
    result = prepare([str(corpus)], "ray_out", cfg(), progress=False, engine="ray")
    assert result.manifest["stats"]["dedup"]["near"]["docs"] >= 6
    got = tree(tmp_path / "ray_out")
    assert sorted(got) == sorted(local_tree)
    assert {name for name in got if got[name] != local_tree[name]} == set()


def test_ray_near_duplicates_equal_the_in_process_search(ray_session, tmp_path):
    from ember.data.ray_engine import RayEngine

    dcfg = dedup.DedupConfig()
    sigs = planted_signatures(3000, dcfg.num_perm, seed=4)
    path = tmp_path / "signatures.npy"
    mapped = np.lib.format.open_memmap(path, mode="w+", dtype=sigs.dtype, shape=sigs.shape)
    mapped[:] = sigs
    ids = np.arange(0, len(sigs), dtype=np.int64)
    engine = RayEngine(block=700)  # 5 map blocks
    expected = dedup.near_edges(sigs, ids, dcfg)
    assert len(expected) >= 100
    np.testing.assert_array_equal(engine.near_edges(mapped, ids, dcfg), expected)  # read from the file
    np.testing.assert_array_equal(engine.near_edges(sigs, ids, dcfg), expected)  # an in-memory array
    engine.close()
    assert ray_session.is_initialized()  # a session it did not start is left connected


def test_a_node_that_does_not_see_the_work_directory_is_named(ray_session, tmp_path):
    from ember.data.ray_engine import RayEngine

    engine = RayEngine()
    (tmp_path / "seen").write_text("")
    engine.check_shared(tmp_path / "seen")  # every node (here: this machine) sees it
    with pytest.raises(EmberError, match="do not see .*absent.*shared storage"):
        engine.check_shared(tmp_path / "absent")
    engine.close()


def length_plus(text: str, i: int) -> tuple[int, int]:
    return i, len(text) + i


def test_map_unordered_many_jobs_through_a_window_with_a_shared_argument(ray_session):
    from ember.data.ray_engine import IN_FLIGHT_PER_CPU, RayEngine

    engine = RayEngine()
    big = "x" * (1 << 17)  # put once in the object store, not sent with each task
    n = 3 * IN_FLIGHT_PER_CPU * engine.cpus()
    got = sorted(engine.map_unordered(length_plus, [(big, i) for i in range(n)]))
    assert got == [(i, len(big) + i) for i in range(n)]
    engine.close()


def dies_first_time(marker: str, real, *job):
    """A unit task that kills its own worker process (SIGKILL, no clean-up) the first time any runs."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return real(*job)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_is_recovered_with_the_same_bytes(corpus, local_tree, ray_session, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    dying = functools.partial(dies_first_time, str(marker), prepare_mod._clean_unit)
    monkeypatch.setattr(prepare_mod, "_clean_unit", dying)
    prepare([str(corpus)], tmp_path / "out", cfg(), progress=False, engine="ray")
    assert marker.is_file()  # a worker did die mid-job
    assert tree(tmp_path / "out") == local_tree


def test_an_error_in_a_task_reaches_the_user(corpus, ray_session, tmp_path, monkeypatch):
    def refuses(*job):
        raise EmberError("this unit cannot be read: fix it")

    monkeypatch.setattr(prepare_mod, "_clean_unit", refuses)
    with pytest.raises(EmberError, match="On a Ray worker: this unit cannot be read: fix it"):
        prepare([str(corpus)], tmp_path / "out", cfg(), progress=False, engine="ray")


@pytest.mark.slow
def test_cli_on_a_two_node_cluster_by_ray_address(corpus, local_tree, ray_session, tmp_path):
    """`ember data prepare --engine ray` in its own process, connected by RAY_ADDRESS to a head node and a
    second node (two raylets on this machine, one CPU each): the local engine's bytes."""
    import subprocess

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "OMP_NUM_THREADS": "1"}
        argv = ["data", "prepare", str(corpus), "--out", str(tmp_path / "out"), "--engine", "ray"]
        argv += ["--vocab-size", "300", "--shard-size", "2048", "--val-fraction", "0.2"]
        done = subprocess.run([sys.executable, "-m", "ember", *argv], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert len(cluster.list_all_nodes()) == 2
    finally:
        cluster.shutdown()
    assert tree(tmp_path / "out") == local_tree


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,source,settings",
    [
        (None, "digits", {}),
        ("labelled-text", "lt.jsonl", {"label": "package"}),
        ("pairs", "pairs.jsonl", {}),
        ("table", "table.csv", {"label": "diagnosis"}),
        ("instruct", "ins.jsonl", {}),
    ],
)
def test_other_kinds_on_ray_write_the_local_bytes(kind, source, settings, ray_session, tmp_path):
    from ember.data.samples import write_sample

    if kind:
        write_sample(kind, tmp_path / source, seed=0)
        source = str(tmp_path / source)
    trees = []
    for engine in ("local", "ray"):
        prepare([source], tmp_path / engine, DataConfig(**settings), progress=False, engine=engine)
        trees.append(tree(tmp_path / engine))
    assert len(trees[0]) >= 3 and trees[0] == trees[1]
