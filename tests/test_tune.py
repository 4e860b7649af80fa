"""ember tune: spaces, grid coverage, pruning, resuming a study, one sampler across ranks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import optuna
import pytest
import yaml

from conftest import tiny_recipe
from ember import search as tune_module
from ember.cli import main
from ember.config import load_recipe
from ember.errors import EmberError
from ember.search import grid_points, load_space, tune, with_params
from ember.training.loop import train

FAST = ("train.max_steps=4", "train.eval_every=2", "eval.max_batches=1")


def write_space(tmp_path, space: dict):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return load_space(path)


def load_study(run_dir):
    return optuna.load_study(study_name="ember", storage=f"sqlite:///{(run_dir / 'study.db').resolve()}")


def test_space_files_are_checked(tmp_path):
    space = write_space(
        tmp_path,
        {
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "model.width": {"type": "int", "low": 4, "high": 12, "step": 4},
            "optim.name": {"type": "categorical", "choices": ["adamw", "sgd"]},
            "model.dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1},
        },
    )
    assert with_params(tiny_recipe("cnn"), {"optim.lr": 0.5, "model.width": 4}).optim.lr == 0.5
    with pytest.raises(EmberError, match="continuous log range"):
        grid_points(space)
    del space["optim.lr"]
    assert grid_points(space) == {
        "model.width": [4, 8, 12],
        "optim.name": ["adamw", "sgd"],
        "model.dropout": [0.0, 0.1, 0.2],
    }
    (tmp_path / "bad.yaml").write_text("optim.lr: {type: float, low: 0.0, high: 1.0, log: true}\n")
    with pytest.raises(EmberError, match="log range needs low > 0"):
        load_space(tmp_path / "bad.yaml")
    bad_key = write_space(tmp_path, {"optim.learning_rate": {"type": "float", "low": 0.1, "high": 0.2}})
    with pytest.raises(EmberError, match="learning_rate"):
        tune(tiny_recipe("cnn"), bad_key, trials=1, run_dir=tmp_path / "t")
    with pytest.raises(EmberError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")


def test_grid_search_visits_every_point_once(tmp_path):
    space = write_space(
        tmp_path,
        {
            "model.width": {"type": "int", "low": 4, "high": 8, "step": 4},
            "optim.lr": {"type": "categorical", "choices": [0.01, 0.02, 0.05]},
        },
    )
    report = tune(tiny_recipe("cnn", *FAST), space, sampler="grid", trials=10, run_dir=tmp_path / "t", pruner="none")
    visited = sorted((t["params"]["model.width"], t["params"]["optim.lr"]) for t in report.trials)
    assert visited == sorted((w, lr) for w in (4, 8) for lr in (0.01, 0.02, 0.05))  # 6 points, each once, then it stops
    assert all(t["state"] == "complete" for t in report.trials)
    values = [t["value"] for t in report.trials]
    assert values == sorted(values) and report.best["value"] == values[0]  # ranked, best first
    best = load_recipe(tmp_path / "t" / "best.yaml")
    assert (best.model.width, best.optim.lr) == (
        report.best["params"]["model.width"],
        report.best["params"]["optim.lr"],
    )


def test_a_bad_trial_is_pruned_early(tmp_path):
    # Learning rates that learn and one that cannot: once a trial has finished, the median
    # pruner stops the hopeless one at its first validation (step 10 of 20).
    space = write_space(tmp_path, {"optim.lr": {"type": "categorical", "choices": [0.05, 0.03, 0.02, 1e-7]}})
    recipe = tiny_recipe(
        "cnn", "train.max_steps=20", "train.eval_every=10", "eval.max_batches=4", "train.batch_size=32"
    )
    report = tune(recipe, space, sampler="grid", trials=4, run_dir=tmp_path / "t", pruner="median", startup_trials=1)
    by_lr = {t["params"]["optim.lr"]: t for t in report.trials}
    first = min(t["trial"] for t in report.trials)
    assert by_lr[1e-7]["trial"] != first, "the grid order put the hopeless trial first; pick another sampler seed"
    assert by_lr[1e-7]["state"] == "pruned" and by_lr[1e-7]["steps"] == 10
    assert [t["state"] for t in report.trials if t["trial"] == first] == ["complete"]
    assert len(load_study(tmp_path / "t").trials[by_lr[1e-7]["trial"]].intermediate_values) == 1


def test_an_interrupted_study_resumes_with_its_finished_trials(tmp_path, monkeypatch, caplog):
    space = write_space(tmp_path, {"optim.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}})
    recipe = tiny_recipe(
        "cnn", "train.max_steps=6", "train.eval_every=2", "train.checkpoint_every=2", "eval.max_batches=1"
    )
    run = tmp_path / "t"
    first = tune(recipe, space, sampler="random", trials=2, run_dir=run, pruner="none")
    model0 = run / "trials" / "trial_0000" / "model.safetensors"
    stamp = model0.stat().st_mtime_ns

    def interrupted(trial_recipe, run_dir, judge):  # Ctrl-C at step 4 of the next trial
        def judge_then_stop(step, metrics):
            if step == 4:
                raise KeyboardInterrupt("interrupted")
            return judge(step, metrics)

        return train(trial_recipe, run_dir=run_dir, resume="auto", on_eval=judge_then_stop)

    monkeypatch.setattr(tune_module, "run_trial", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune(recipe, space, sampler="random", trials=3, run_dir=run, pruner="none")
    monkeypatch.undo()
    caplog.set_level(logging.INFO, logger="ember")
    caplog.clear()
    final = tune(recipe, space, sampler="random", trials=3, run_dir=run, pruner="none")
    said = caplog.text  # tune's and the run's lines are log messages
    assert "2 finished trial(s), 1 to go" in said and "1 interrupted trial(s) will continue" in said
    assert "resumed from" in said and "at step 2" in said  # the retried trial picked up its checkpoint
    assert model0.stat().st_mtime_ns == stamp  # finished trials are not run again
    states = {t["trial"]: t["state"] for t in final.trials}
    assert states == {0: "complete", 1: "complete", 2: "fail", 3: "complete"}
    trials = {t["trial"]: t for t in final.trials}
    assert trials[3]["params"] == trials[2]["params"] and trials[3]["run_dir"] == trials[2]["run_dir"]
    assert [t["params"] for t in first.trials] == [trials[t["trial"]]["params"] for t in first.trials]


def test_tune_command_prints_the_ranking_and_importances(tmp_path, capsys):
    (tmp_path / "space.yaml").write_text(
        "optim.lr: {type: float, low: 0.01, high: 0.2, log: true}\nmodel.width: {type: int, low: 4, high: 8, step: 4}\n"
    )
    code = main(
        [
            "tune",
            "recipes/cnn-digits.yaml",
            "--space",
            str(tmp_path / "space.yaml"),
            "--trials",
            "3",
            "--sampler",
            "random",
            "--run-dir",
            str(tmp_path / "t"),
            "--set",
            "train.max_steps=3",
            "--set",
            "train.eval_every=3",
            "--set",
            "train.progress=false",
            "--set",
            "eval.max_batches=1",
            "--set",
            "schedule.warmup_steps=0",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "rank trial" in out and "importance: " in out and "best: trial" in out
    report = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert len(report["trials"]) == 3 and set(report["importances"]) == {"optim.lr", "model.width"}
    assert (
        main(
            [
                "tune",
                "recipes/cnn-digits.yaml",
                "--space",
                str(tmp_path / "space.yaml"),
                "--sampler",
                "grid",
                "--run-dir",
                str(tmp_path / "g"),
            ]
        )
        == 2
    )
    assert "Grid search needs a finite set" in capsys.readouterr().err


def test_two_ranks_sample_once_and_train_together(tmp_path):
    """Invariant 7: one rank samples and broadcasts; the study holds each trial once."""
    (tmp_path / "space.yaml").write_text("optim.lr: {type: float, low: 0.01, high: 0.2, log: true}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-m",
        "ember",
        "tune",
        "recipes/cnn-digits.yaml",
        "--space",
        str(tmp_path / "space.yaml"),
        "--trials",
        "2",
        "--sampler",
        "random",
        "--pruner",
        "none",
        "--run-dir",
        str(tmp_path / "t"),
        "--nproc",
        "2",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.eval_every=3",
        "--set",
        "train.progress=false",
        "--set",
        "model.width=8",
        "--set",
        "parallel.strategy=ddp",
        "--set",
        "schedule.warmup_steps=0",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_study(tmp_path / "t")
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    for t in study.trials:
        trained = load_recipe(tmp_path / "t" / "trials" / f"trial_{t.number:04d}" / "recipe.yaml")
        assert trained.optim.lr == t.params["optim.lr"] and "ddp x 2" in done.stdout + done.stderr
