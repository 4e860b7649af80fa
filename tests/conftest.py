"""Shared test fixtures: a private data cache and tiny recipes that train in a second."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from ember.config import Recipe, apply_overrides, recipe_from_dict
from ember.recipe_header import header_commands

# CI draws the same fuzzing examples on every run (a red build names a change, not a draw);
# a developer's runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Small enough to train a few steps in well under a second on 2 CPU cores.
TINY = {
    "gpt": {
        "data": {"name": "stdlib", "seq_len": 32, "max_bytes": 200_000, "tokenizer": "bytes"},
        "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
    },
    "seq2seq": {
        "data": {"name": "addition", "max_digits": 2, "num_examples": 2000},
        "model": {
            "name": "seq2seq",
            "n_encoder_layer": 1,
            "n_decoder_layer": 1,
            "n_head": 2,
            "n_embd": 32,
            "max_len": 8,
        },
    },
    "rnn": {
        "data": {"name": "digits-rows"},
        "model": {"name": "rnn", "kind": "gru", "hidden_size": 32},
    },
    "cnn": {
        "data": {"name": "digits"},
        "model": {"name": "cnn", "width": 8, "depth": 1, "stages": 2},
    },
}
QUIET = {
    "train": {
        "progress": False,
        "peak_flops": 1e12,
        "eval_every": 0,
        "checkpoint_every": 0,
        "max_steps": 4,
        "batch_size": 8,
        "log_every": 1,
    },
    "eval": {"max_batches": 2},
}


def tiny_recipe(kind: str, *overrides: str) -> Recipe:
    """A tiny recipe of ``kind`` with ``section.key=value`` overrides on top."""
    raw = {section: dict(values) for section, values in TINY[kind].items()}
    for section, values in QUIET.items():
        raw.setdefault(section, {}).update(values)
    return recipe_from_dict(apply_overrides(raw, list(overrides)))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("EMBER_CACHE", str(tmp_path_factory.mktemp("ember-cache")))
    yield
    mp.undo()


def sample_data_overrides(recipe_path: str | Path, tmp_path: Path) -> list[str]:
    """Overrides that point a shipped recipe on data a user prepares (data.name=prepared) at that data,
    written and prepared in ``tmp_path`` by the very ``ember data sample`` and ``ember data prepare``
    commands its header gives (so the header stays true); [] for the other recipes."""
    import yaml

    from ember.cli import main

    text = Path(recipe_path).read_text()
    data = (yaml.safe_load(text) or {}).get("data") or {}
    if data.get("name") != "prepared":
        return []
    commands = header_commands(text)
    assert commands, f"{recipe_path} reads prepared data but its header gives no `ember data` commands"
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        for argv in commands:
            assert main(argv) == 0, f"{recipe_path}: `ember {' '.join(argv)}` failed"
    finally:
        os.chdir(here)
    init = (yaml.safe_load(text) or {}).get("init") or {}
    checkpoint = [f"init.from_hf={tmp_path / init['from_hf']}"] if init.get("from_hf") else []
    return [f"data.path={tmp_path / data['path']}", *checkpoint]


def shard_hashes(manifest: dict) -> list[str]:
    """The sha256 of every shard file of a prepared directory's manifest, in order."""
    return [f["sha256"] for s in manifest["splits"].values() for r in s["shards"] for f in r["files"].values()]


def prepare_killed_in(module, function: str, monkeypatch, run) -> None:
    """Call ``run()`` with ``module.function`` (a prepare worker) raising KeyboardInterrupt on its second
    call, as if the prepare were killed there; the function is restored afterwards."""
    import pytest

    real, calls = getattr(module, function), []

    def dies_on_the_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(module, function, dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(module, function, real)


def run_on_two_ranks(script: str, *args: str, timeout: int = 300) -> None:
    """Run ``script`` (a test file's worker) under ``torch.distributed.run`` on 2 local gloo ranks, one
    thread each, with this checkout's ember importable; a failure shows the launch's output."""
    import subprocess
    import sys

    import ember

    src = str(Path(ember.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script, *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
