"""ember eval: classifier metrics equal scikit-learn's, exact across ranks, and language-model losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from conftest import tiny_recipe
from ember.cli import main
from ember.config import load_recipe
from ember.data.build import build_data
from ember.errors import EmberError
from ember.eval.evaluate import evaluate
from ember.runs import load_trained_model
from ember.training.loop import train


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """A digits CNN trained just enough to be right on most, not all, samples."""
    run = tmp_path_factory.mktemp("cnn")
    train(tiny_recipe("cnn", "train.max_steps=40", "optim.lr=2e-2", "train.batch_size=32"), run)
    return run


def predictions(run) -> tuple[np.ndarray, np.ndarray]:
    """The run's model on its val split, one batch at a time: (true, predicted)."""
    recipe = load_recipe(run / "recipe.yaml")
    model, _ = load_trained_model(run)
    data = build_data(recipe.data, 50, 50, seed=recipe.train.seed)
    true, pred = [], []
    with torch.no_grad():
        for batch in data.val:
            true.append(batch["y"])
            pred.append(model(batch["x"]).argmax(-1))
    return torch.cat(true).numpy(), torch.cat(pred).numpy()


def test_classifier_metrics_equal_scikit_learn(cnn_run):
    report = evaluate(cnn_run)
    true, pred = predictions(cnn_run)
    m = report.metrics
    assert 0.3 < m["accuracy"] < 1.0  # a model with mistakes, or the comparison proves little
    assert m["accuracy"] == pytest.approx(accuracy_score(true, pred), abs=1e-6)
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(true, pred, average=avg, zero_division=0)
        assert (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]) == pytest.approx((p, r, f), abs=1e-6), avg
    p, r, f, support = precision_recall_fscore_support(true, pred, average=None, zero_division=0, labels=range(10))
    assert [row["f1"] for row in report.per_class] == pytest.approx(list(f), abs=1e-6)
    assert [row["support"] for row in report.per_class] == list(support)
    assert report.confusion_matrix == confusion_matrix(true, pred, labels=range(10)).tolist()
    assert report.samples == len(true)
    assert json.loads((cnn_run / "eval.json").read_text())["metrics"] == m


def test_two_ranks_equal_one_process_on_an_uneven_split(cnn_run, tmp_path, capsys):
    """180 samples in batches of 7 over 2 ranks: 13 batches each, the last ones short (6 and 5)."""
    single = evaluate(cnn_run, batch_size=7)
    proc = subprocess.run(
        [sys.executable, "-m", "ember", "eval", str(cnn_run), "--batch-size", "7", "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(f"{single.samples} samples") == 1  # rank 0 prints for the job
    both = json.loads((cnn_run / "eval.json").read_text())
    assert both["samples"] == single.samples == 180 and both["confusion_matrix"] == single.confusion_matrix
    counted = {k: v for k, v in both["metrics"].items() if k != "loss"}  # from integer counts: exact
    assert counted == {k: v for k, v in single.metrics.items() if k != "loss"}
    assert both["metrics"]["loss"] == pytest.approx(single.metrics["loss"], rel=1e-6)  # float sums, other order


def test_language_model_eval_gives_loss_perplexity_and_bits_per_byte(tmp_path):
    result = train(tiny_recipe("gpt", "eval.max_batches=0"), tmp_path)
    report = evaluate(tmp_path)
    assert report.metrics["loss"] == pytest.approx(result.metrics["loss"], rel=1e-6)
    assert report.metrics["ppl"] == pytest.approx(np.exp(result.metrics["loss"]), rel=1e-5)
    assert report.metrics["bpb"] == pytest.approx(result.metrics["bpb"], rel=1e-6)
    assert report.metrics["loss"] < evaluate(tmp_path, split="train").metrics["loss"] + 1.0  # finite, same scale


def test_mistakes_are_messages(cnn_run, tmp_path, capsys):
    with pytest.raises(EmberError, match="no test split"):
        evaluate(cnn_run, split="test")
    assert main(["eval", str(tmp_path)]) == 2
    assert "no recipe.yaml" in capsys.readouterr().err


def test_eval_on_the_held_out_test_split(tmp_path, capsys):
    """A run on digits prepared with data.test_fraction=0.1: --split test reads the 180 test images, once each."""
    train(tiny_recipe("cnn", "data.test_fraction=0.1"), tmp_path)
    assert main(["eval", str(tmp_path), "--split", "test"]) == 0
    assert "split test  180 samples" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())
    data = build_data(load_recipe(tmp_path / "recipe.yaml").data, 50, 50, seed=0)
    labels = torch.cat([batch["y"] for batch in data.test]).numpy()
    assert report["split"] == "test" and report["samples"] == len(labels) == 180
    assert [row["support"] for row in report["per_class"]] == np.bincount(labels, minlength=10).tolist()
    assert evaluate(tmp_path, split="val").samples == 180  # val_fraction 0.1 as before: 180 of 1797
