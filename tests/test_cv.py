"""Cross-validation: folds are disjoint and cover the data; ember cv trains, scores and resumes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import tiny_recipe
from ember.cli import main
from ember.data.build import build_data
from ember.data.folds import Pooled, Subset, fold_indices
from ember.data.loader import ArrayDataset
from ember.errors import EmberError
from ember.eval.crossval import cross_validate, summarize


@pytest.mark.parametrize("labels", [None, np.repeat(np.arange(3), [10, 7, 6])])
def test_folds_are_disjoint_and_cover_the_data(labels):
    n, k = 23, 5
    held = [fold_indices(n, k, i, seed=3, labels=labels)[1] for i in range(k)]
    together = np.concatenate(held)
    assert len(together) == n and set(together.tolist()) == set(range(n))  # each sample held out exactly once
    for i in range(k):
        train_idx, held_idx = fold_indices(n, k, i, seed=3, labels=labels)
        assert not set(train_idx.tolist()) & set(held_idx.tolist())
        assert len(train_idx) + len(held_idx) == n
        if labels is not None:  # stratified: each class in each fold within one sample of its share
            counts = np.bincount(labels[held_idx], minlength=3)
            assert np.all(np.abs(counts - np.bincount(labels) / k) <= 1)
    assert not np.array_equal(held[0], fold_indices(n, k, 0, seed=4, labels=labels)[1])  # the seed shuffles


def test_pooled_and_subset_gather_in_the_order_asked():
    a = ArrayDataset(x=torch.arange(5), y=torch.arange(5) * 10)
    b = ArrayDataset(x=torch.arange(100, 103), y=torch.arange(100, 103) * 10)
    pool = Pooled(a, b)
    assert len(pool) == 8
    got = pool.get(torch.tensor([6, 0, 5, 4, 7]))
    assert got["x"].tolist() == [101, 0, 100, 4, 102] and got["y"].tolist() == [1010, 0, 1000, 40, 1020]
    assert Subset(pool, np.array([7, 1])).get(torch.tensor([1, 0]))["x"].tolist() == [1, 102]


def test_fold_runs_hold_out_each_digit_once():
    recipe = tiny_recipe("cnn")
    plain = build_data(recipe.data, 50, 50, seed=0)
    pool = Pooled(plain.train.dataset, plain.val.dataset)
    everything = Counter(bytes(x.numpy()) for x in pool.get(torch.arange(len(pool)))["x"])
    held = Counter()
    for fold in range(3):
        cfg = recipe.data.model_copy(update={"folds": 3, "fold": fold, "stratified_folds": True})
        data = build_data(cfg, 50, 50, seed=0)
        assert len(data.train.dataset) + len(data.val.dataset) == len(pool)
        held.update(bytes(x.numpy()) for x in data.val.dataset.get(torch.arange(len(data.val.dataset)))["x"])
    assert held == everything


def test_summary_is_mean_and_sample_std():
    s = summarize([{"accuracy": 0.8, "loss": 1.0}, {"accuracy": 0.9, "loss": 2.0}, {"accuracy": 1.0, "loss": 3.0}])
    assert s["accuracy"]["mean"] == pytest.approx(0.9) and s["accuracy"]["std"] == pytest.approx(0.1)
    assert s["loss"] == pytest.approx({"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0})


def test_cv_trains_scores_and_resumes_without_retraining(tmp_path, caplog):
    recipe = tiny_recipe("cnn", "train.max_steps=30", "optim.lr=2e-2", "train.batch_size=32", "eval.max_batches=0")
    report = cross_validate(recipe, folds=3, run_dir=tmp_path / "cv", stratified=True)
    assert report.summary["accuracy"]["std"] > 0  # three different models on three different folds
    assert sum(report.fold_samples) == 1797  # every digit held out exactly once
    for i, m in enumerate(report.fold_metrics):
        assert json.loads((tmp_path / "cv" / f"fold_{i}" / "eval.json").read_text())["metrics"] == m
    saved = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert saved["summary"] == report.summary

    # An interrupted cv: fold 2 lost its model and report, fold 1 its report only.
    mtime0 = (tmp_path / "cv" / "fold_0" / "model.safetensors").stat().st_mtime_ns
    (tmp_path / "cv" / "fold_2" / "model.safetensors").unlink()
    (tmp_path / "cv" / "fold_2" / "eval.json").unlink()
    (tmp_path / "cv" / "fold_1" / "eval.json").unlink()
    caplog.set_level(logging.INFO, logger="ember")
    caplog.clear()
    again = cross_validate(recipe, folds=3, run_dir=tmp_path / "cv", stratified=True)
    out = caplog.text  # the fold lines are log messages (ember.eval.crossval)
    assert "fold 1/3 (done" in out and "fold 2/3 (evaluate)" in out and "fold 3/3 (train)" in out
    assert (tmp_path / "cv" / "fold_0" / "model.safetensors").stat().st_mtime_ns == mtime0  # not retrained
    assert again.fold_metrics[:2] == report.fold_metrics[:2]
    assert again.fold_metrics[2] == pytest.approx(report.fold_metrics[2], abs=1e-6)  # same fold, same result

    with pytest.raises(EmberError, match="different recipe"):
        cross_validate(
            tiny_recipe("cnn", "train.max_steps=7", "optim.lr=2e-2", "train.batch_size=32", "eval.max_batches=0"),
            folds=3,
            run_dir=tmp_path / "cv",
            stratified=True,
        )


def test_cv_command_prints_mean_and_std(tmp_path, capsys):
    code = main(
        [
            "cv",
            "recipes/cnn-digits.yaml",
            "--folds",
            "2",
            "--run-dir",
            str(tmp_path / "cv"),
            "--set",
            "train.max_steps=3",
            "--set",
            "train.progress=false",
            "--set",
            "model.width=8",
            "--set",
            "train.eval_every=0",
            "--set",
            "train.checkpoint_every=0",
            "--set",
            "schedule.warmup_steps=0",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "2-fold cross-validation" in out and "± std" in out and "accuracy" in out
    assert main(["cv", "recipes/cnn-digits.yaml", "--folds", "1"]) == 2
    assert "at least 2 folds" in capsys.readouterr().err


def test_language_model_folds_are_contiguous_blocks_of_windows():
    assert fold_indices(10, 5, 1, seed=0, shuffle=False)[1].tolist() == [2, 3]
    recipe = tiny_recipe("gpt")
    plain = build_data(recipe.data, 8, 8, seed=0)
    windows = len(plain.train.dataset) + len(plain.val.dataset)
    cfg = recipe.data.model_copy(update={"folds": 4, "fold": 3})
    data = build_data(cfg, 8, 8, seed=0)
    assert len(data.train.dataset) + len(data.val.dataset) == windows
    held = data.val.dataset.index.tolist()
    assert held == list(range(held[0], held[0] + len(held))) and held[-1] == windows - 1  # the last block
    with pytest.raises(EmberError, match="needs class labels"):
        build_data(recipe.data.model_copy(update={"folds": 4, "stratified_folds": True}), 8, 8, seed=0)


@pytest.mark.slow  # the shared process group of several runs stays in the fast suite through tune's 2-rank test
def test_two_process_cross_validation_equals_one_process(tmp_path):
    """Each fold trained by 2 ranks (DDP, same global batch) scores as the 1-process fold."""
    # The LSTM (no batch norm, no dropout, no augmentation): two ranks of 32 are one batch of 64.
    args = [
        "cv",
        "recipes/rnn-digits.yaml",
        "--folds",
        "2",
        "--set",
        "train.max_steps=4",
        "--set",
        "model.hidden_size=16",
        "--set",
        "train.progress=false",
        "--set",
        "schedule.warmup_steps=0",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.checkpoint_every=0",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    one = subprocess.run(
        [sys.executable, "-m", "ember", *args, "--run-dir", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "ember",
            *args,
            "--run-dir",
            str(tmp_path / "two"),
            "--nproc",
            "2",
            "--set",
            "train.batch_size=32",
            "--set",
            "parallel.strategy=ddp",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    a, b = (json.loads((tmp_path / d / "cv.json").read_text()) for d in ("one", "two"))
    assert a["fold_samples"] == b["fold_samples"]
    for fa, fb in zip(a["fold_metrics"], b["fold_metrics"]):
        assert fa["accuracy"] == pytest.approx(fb["accuracy"], abs=1e-6) and fa["loss"] == pytest.approx(
            fb["loss"], abs=1e-4
        )


def test_the_fold_models_hint_names_a_split_the_data_has(tmp_path):
    """`ember cv` ends by pointing at `ember ensemble ... --split test`: only where there is a test split."""
    from ember.cli import _fold_models_hint
    from ember.config import load_recipe

    without = _fold_models_hint(load_recipe("recipes/mlp-digits.yaml"), tmp_path)  # test_fraction 0
    assert "--set data.test_fraction=0.1" in without and "no test split" in without
    with_test = _fold_models_hint(load_recipe("recipes/mlp-digits.yaml", ["data.test_fraction=0.1"]), tmp_path)
    assert with_test == f"the fold models: ember ensemble {tmp_path}/fold_* --split test"
