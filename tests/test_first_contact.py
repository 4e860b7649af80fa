"""Issue #20, first-contact paper cuts: a run directory that does not exist, `ember train --help`,
and `--resume auto` on a run that has finished."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

import ember.training.loop as loop
from ember.cli import main
from ember.config import load_recipe
from ember.errors import EmberError
from ember.training.resume import already_finished

CNN = Path(__file__).parent.parent / "recipes" / "cnn-digits.yaml"
TINY = [
    "train.max_steps=3",
    "train.progress=false",
    "train.peak_flops=1",
    "train.eval_every=0",
    "eval.max_batches=1",
    "model.width=8",
]


@pytest.mark.parametrize("command", [["eval"], ["generate"], ["quantize"], ["probe"], ["export", "--out", "x"]])
def test_a_run_that_does_not_exist_is_named_with_the_runs_beside_it(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "cnn-digits-20261202-101500").mkdir(parents=True)
    (tmp_path / "runs" / "gpt").mkdir()
    assert main([command[0], "runs/cnn", *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "runs/cnn does not exist. Did you mean runs/cnn-digits-20261202-101500?" in err
    assert "has no recipe.yaml" not in err and "--run-dir runs/cnn" in err
    assert main([command[0], "runs/zzz", *command[1:]]) == 2  # nothing close: the runs there, newest first
    assert "runs/ holds (newest first): runs/gpt, runs/cnn-digits-20261202-101500." in capsys.readouterr().err
    assert main([command[0], "elsewhere/cnn", *command[1:]]) == 2
    assert f"There is no elsewhere/ in {tmp_path}" in capsys.readouterr().err


def test_train_help_shows_two_examples_and_where_the_keys_are(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "ember train recipes/cnn-digits.yaml --run-dir runs/cnn --set train.max_steps=200" in out
    assert "ember train --run-dir runs/cnn --resume auto" in out
    assert "ember recipe explain KEY" in out and "Recipe reference" in out


@pytest.mark.slow
def test_resume_auto_on_a_finished_run_says_so_without_rebuilding_it(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    done = loop.train(load_recipe(CNN, TINY), run_dir=run)
    written = {n: (run / n).stat().st_mtime_ns for n in ("model.safetensors", "model.json")}
    info = json.loads((run / "model.json").read_text())
    caplog.set_level(logging.INFO, logger="ember")

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a finished run was rebuilt")

    monkeypatch.setattr(loop, "build_run", no_rebuild)
    started = time.perf_counter()
    again = loop.train(load_recipe(run / "recipe.yaml", ["train.log_every=1"]), run_dir=run, resume="auto")
    assert time.perf_counter() - started < 2.0
    assert (again.step, again.metrics, again.stopped_early) == (3, done.metrics, False) and info["step"] == 3
    assert f"{run} already finished at step 3 (model.safetensors written); nothing to do" in caplog.text
    assert written == {n: (run / n).stat().st_mtime_ns for n in written}  # nothing written again
    # Anything else takes the full resume, as before: more steps train on, another recipe is refused there.
    assert already_finished(run, load_recipe(run / "recipe.yaml", ["train.max_steps=4"])) is None
    assert already_finished(run, load_recipe(run / "recipe.yaml", ["eval.max_batches=2"])) is None  # other metrics
    monkeypatch.undo()
    with pytest.raises(EmberError, match="different recipe"):
        loop.train(load_recipe(run / "recipe.yaml", ["optim.lr=0.5"]), run_dir=run, resume="auto")
    (run / "model.safetensors").write_bytes(b"damaged")  # a damaged export is written again from the checkpoint
    assert already_finished(run, load_recipe(run / "recipe.yaml")) is None
    assert loop.train(load_recipe(run / "recipe.yaml"), run_dir=run, resume="auto").metrics == done.metrics
