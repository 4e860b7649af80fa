"""Shared test fixtures: a private data cache and tiny recipes that train in a second."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from ember.config import Recipe, apply_overrides, recipe_from_dict

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
    """Overrides that point a shipped recipe on data a user prepares (data.name=prepared) at a sample of
    that data written and prepared into ``tmp_path``, as the recipe's header says; [] for the others."""
    if Path(recipe_path).stem == "clip-captions":
        from ember.config import DataConfig
        from ember.data.caption_prepare import write_sample
        from ember.data.prepare import prepare

        mapping = write_sample(tmp_path / "sample")
        cfg = DataConfig(captions=str(mapping), test_fraction=0.1)
        prepare([str(tmp_path / "sample" / "images")], tmp_path / "data", cfg, progress=False)
        return [f"data.path={tmp_path / 'data'}"]
    if Path(recipe_path).stem == "seq2seq-pairs":
        from ember.config import DataConfig
        from ember.data.pairs import write_sample
        from ember.data.prepare import prepare

        sample = write_sample(tmp_path / "numbers.jsonl")
        prepare([str(sample)], tmp_path / "numbers", DataConfig(vocab_size=512, test_fraction=0.1), progress=False)
        return [f"data.path={tmp_path / 'numbers'}"]
    if Path(recipe_path).stem == "rnn-text":
        from ember.config import DataConfig
        from ember.data.prepare import prepare
        from ember.data.samples import write_sample

        sample = write_sample("labelled-text", tmp_path / "stdlib-functions.jsonl")
        cfg = DataConfig(label="package", test_fraction=0.1, vocab_size=1024, seq_len=128)
        prepare([str(sample)], tmp_path / "texts", cfg, progress=False)
        return [f"data.path={tmp_path / 'texts'}"]
    return []
