"""ember continue: class filters, replay, EWC, and forgetting measured on the digits 0-4 → 5-9 split."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from conftest import tiny_recipe
from ember.cli import main
from ember.config import DataConfig
from ember.continual import continue_training
from ember.data.build import build_sets
from ember.data.folds import labels_of, replay_mix
from ember.errors import EmberError
from ember.plugins.ewc import ElasticAnchor, old_samples
from ember.training.loop import train

OLD = DataConfig(name="digits", val_fraction=0.2, classes=[0, 1, 2, 3, 4])
NEW = DataConfig(name="digits", val_fraction=0.2, classes=[5, 6, 7, 8, 9])
STEPS = (
    "train.max_steps=60",
    "train.batch_size=32",
    "optim.lr=2e-2",
    "train.log_every=1000",
    "eval.max_batches=0",
    "eval.metric=accuracy",
)


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A width-8 CNN that knows the digits 0-4 (and has never seen 5-9)."""
    run = tmp_path_factory.mktemp("old") / "digits-0-4"
    result = train(tiny_recipe("cnn", *STEPS, "data.classes=[0,1,2,3,4]", "data.val_fraction=0.2"), run)
    assert result.metrics["accuracy"] > 0.95
    return run


def test_classes_keep_those_classes_in_every_split_and_replay_mixes_its_share():
    full, old, new = build_sets(DataConfig(name="digits", val_fraction=0.2)), build_sets(OLD), build_sets(NEW)
    for split in ("train", "val"):
        assert set(labels_of(getattr(old, split)).tolist()) == {0, 1, 2, 3, 4}
        assert set(labels_of(getattr(new, split)).tolist()) == {5, 6, 7, 8, 9}
        assert len(getattr(old, split)) + len(getattr(new, split)) == len(getattr(full, split))
    mixed = replay_mix(new.train, old.train, 0.2, seed=0)
    labels = labels_of(mixed)
    assert abs((labels < 5).mean() - 0.2) < 0.005 and len(mixed) == len(new.train) + int((labels < 5).sum())
    again = labels_of(replay_mix(new.train, old.train, 0.2, seed=0))
    assert np.array_equal(labels, again)  # drawn once, by the seed: a resumed run sees the same set


def test_replay_reduces_forgetting_against_no_replay(old_run, tmp_path):
    plain = continue_training(old_run, NEW, overrides=list(STEPS), out=tmp_path / "plain")
    replayed = continue_training(old_run, NEW, replay=0.2, overrides=list(STEPS), out=tmp_path / "replay")
    for report in (plain, replayed):
        assert report.before_old["accuracy"] > 0.95 and report.before_new["accuracy"] == 0.0
        assert report.gain > 0.9  # both learn 5-9
    # Measured: forgetting 0.99 without replay (0-4 are never predicted again), 0.24 with 20 % replay.
    assert plain.forgetting > 0.8
    assert replayed.forgetting < plain.forgetting - 0.5
    saved = json.loads((tmp_path / "replay" / "continual.json").read_text())
    assert saved["forgetting"] == replayed.forgetting and saved["replay"] == 0.2


def test_ewc_pulls_the_weights_that_mattered_back(old_run, tmp_path):
    from ember.runs import load_trained_model

    model, _ = load_trained_model(old_run)
    samples = old_samples(OLD, 64, seed=0, device=torch.device("cpu"))
    anchor = ElasticAnchor(model, samples, "classify")
    assert anchor.penalty().item() == 0.0 and all((f >= 0).all() for f in anchor.fisher)
    assert sum(f.sum() for f in anchor.fisher) > 0
    drift = {}
    for ewc in (0.0, 1000.0):
        out = tmp_path / f"ewc{ewc}"
        continue_training(old_run, NEW, ewc=ewc, overrides=list(STEPS), out=out)
        moved, _ = load_trained_model(out)
        with torch.no_grad():
            for p, q in zip(anchor.params, moved.parameters()):
                p.copy_(q)
        drift[ewc] = anchor.penalty().item()  # how far the old task's important weights moved
    assert drift[1000.0] < 0.5 * drift[0.0]


def test_cli_prints_the_table_and_mistakes_are_messages(old_run, tmp_path, capsys):
    data = tmp_path / "new.yaml"
    data.write_text("data:\n  name: digits\n  val_fraction: 0.2\n  classes: [5, 6, 7, 8, 9]\n")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert (
            main(
                [
                    "continue",
                    str(old_run),
                    "--data",
                    str(data),
                    "--replay",
                    "0.2",
                    "--run-dir",
                    str(tmp_path / "c"),
                    "--set",
                    "train.max_steps=4",
                    "--set",
                    "train.progress=false",
                ]
            )
            == 0
        )
    assert "forgetting of the old" in printed.getvalue() and "new data accuracy" in printed.getvalue()
    assert main(["continue", str(old_run), "--data", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(EmberError, match="continual.old_data"):
        tiny_recipe("cnn", "continual.replay=0.2")
    with pytest.raises(EmberError, match="no class labels"):
        build_sets(DataConfig(name="stdlib", classes=[1], max_bytes=20_000, tokenizer="bytes", seq_len=32))
