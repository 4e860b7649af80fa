"""ember ensemble: each member scored as ember eval scores it; mean, vote and soup equal hand computations."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from conftest import tiny_recipe
from ember.cli import main
from ember.config import load_recipe
from ember.data.build import build_data
from ember.errors import EmberError
from ember.eval.crossval import cross_validate
from ember.eval.ensemble import _members_on, check_members, ensemble
from ember.eval.evaluate import ClassifierMetrics, evaluate
from ember.generation import generate
from ember.runs import load_trained_model
from ember.training.loop import train

CNN = ("train.max_steps=40", "optim.lr=2e-2", "train.batch_size=32")


@pytest.fixture(scope="module")
def cnn_runs(tmp_path_factory):
    """Three digits CNNs, different train.seed, trained just enough to make different mistakes."""
    root = tmp_path_factory.mktemp("cnns")
    for seed in (1, 2, 3):
        train(tiny_recipe("cnn", *CNN, f"train.seed={seed}"), root / f"seed{seed}")
    return [root / f"seed{seed}" for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory):
    """Tiny GPTs: a and b differ in train.seed; a and c share it (and the model), c trains longer."""
    root = tmp_path_factory.mktemp("gpts")
    for name, sets in (("a", ["train.seed=1"]), ("b", ["train.seed=2"]), ("c", ["train.seed=1", "train.max_steps=8"])):
        train(tiny_recipe("gpt", *sets), root / name)
    return {name: root / name for name in "abc"}


def member_outputs(runs, split_batches: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every run's model on the first run's val split, batch by batch: (targets, [float64 logits per run])."""
    recipe = load_recipe(runs[0] / "recipe.yaml")
    size = recipe.eval.batch_size or recipe.train.batch_size
    data = build_data(recipe.data, size, size, seed=recipe.train.seed)
    models = [load_trained_model(run)[0] for run in runs]
    targets, logits = [], [[] for _ in runs]
    with torch.no_grad():
        for i, batch in enumerate(data.val):
            if split_batches and i == split_batches:
                break
            targets.append(batch["y"])
            for out, model in zip(logits, models):
                out.append(model(batch["x"]).double())
    return torch.cat(targets).numpy(), [torch.cat(out).numpy() for out in logits]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("method", ["mean", "vote"])
def test_members_equal_ember_eval_and_the_ensemble_equals_a_hand_computation(cnn_runs, tmp_path, method):
    report = ensemble(cnn_runs, method=method, out=tmp_path / "e.json")
    for run, member in zip(cnn_runs, report.members):
        assert member["metrics"] == pytest.approx(evaluate(run).metrics, rel=1e-6)
    true, logits = member_outputs(cnn_runs)
    probs = np.stack([softmax(x) for x in logits])  # [members, samples, classes]
    mean = probs.mean(0)
    if method == "mean":
        pred = mean.argmax(-1)
        loss = -np.log(mean[np.arange(len(true)), true]).mean()
        assert report.ensemble["metrics"]["loss"] == pytest.approx(loss, rel=1e-5)
    else:
        votes = np.eye(10)[probs.argmax(-1)].sum(0)
        pred = (votes + 0.5 * mean).argmax(-1)
        assert "loss" not in report.ensemble["metrics"]  # a vote has no probability
    m = report.ensemble["metrics"]
    assert m["accuracy"] == pytest.approx(accuracy_score(true, pred), abs=1e-6)
    assert m["f1_macro"] == pytest.approx(f1_score(true, pred, average="macro", zero_division=0), abs=1e-6)
    assert report.ensemble["confusion_matrix"] == confusion_matrix(true, pred, labels=range(10)).tolist()
    assert report.samples == len(true) == 180
    assert json.loads((tmp_path / "e.json").read_text()) == report.to_dict()


def test_a_vote_is_a_majority_and_a_tie_goes_to_the_likelier_class():
    def member(*rows):  # a "model" answering fixed logits for a batch of len(rows) samples
        return lambda x: torch.tensor(rows, dtype=torch.float32)

    # Sample 0: two votes for class 1 outweigh one confident vote for class 0 (whose mean probability is higher).
    # Sample 1: one vote each; class 2 has the highest mean probability.
    models = [member([9, 0, 0], [5, 0, 0]), member([0, 1, 0], [0, 5, 0]), member([0, 1, 0], [0, 0, 9])]
    tallies = [ClassifierMetrics(3, torch.device("cpu")) for _ in models]
    batch = {"x": torch.zeros(2), "y": torch.tensor([1, 2])}
    scores, _ = _members_on(batch, "classify", models, [contextlib.nullcontext] * 3, tallies, "vote")
    assert scores.argmax(-1).tolist() == [1, 2]
    mean_only, _ = _members_on(batch, "classify", models, [contextlib.nullcontext] * 3, tallies, "mean")
    assert mean_only.argmax(-1).tolist() == [0, 2]


def test_mean_ensemble_scores_at_least_the_mean_of_its_members(cnn_runs, tmp_path):
    report = ensemble(cnn_runs, method="mean", out=tmp_path / "e.json")
    members = [m["metrics"]["accuracy"] for m in report.members]
    ours = report.ensemble["metrics"]["accuracy"]
    print(f"members {members}, mean {np.mean(members):.4f}, ensemble {ours:.4f}")
    assert ours >= np.mean(members)
    assert report.gains["accuracy"]["vs_mean"] == pytest.approx(ours - np.mean(members))
    assert report.gains["loss"]["vs_mean"] >= 0  # a lower loss counts as a gain: -log is convex


def test_the_mean_ensemble_of_the_digits_fold_models_scores_at_least_their_mean(tmp_path):
    cross_validate(tiny_recipe("cnn", *CNN, "data.test_fraction=0.2"), folds=3, run_dir=tmp_path / "cv")
    folds = sorted((tmp_path / "cv").glob("fold_*"))
    report = ensemble(folds, split="test")  # the one split no fold trained or validated on
    members = [m["metrics"]["accuracy"] for m in report.members]
    print(f"folds {members}, mean {np.mean(members):.4f}, ensemble {report.ensemble['metrics']['accuracy']:.4f}")
    assert report.ensemble["metrics"]["accuracy"] >= np.mean(members)
    assert json.loads((tmp_path / "cv" / "ensemble-mean.json").read_text())["split"] == "test"
    soup = ensemble(folds, method="soup", split="test")  # fold runs share model section and train.seed
    assert (tmp_path / "cv" / "ensemble-soup" / "model.safetensors").is_file() and soup.samples == report.samples


@pytest.fixture(scope="module")
def soup_members(tmp_path_factory):
    """Two CNNs from one initialisation (model section and train.seed), trained differently."""
    root = tmp_path_factory.mktemp("soup")
    train(tiny_recipe("cnn", *CNN), root / "a")
    train(tiny_recipe("cnn", *CNN, "train.max_steps=30", "train.batch_size=16"), root / "b")
    return [root / "a", root / "b"]


def test_a_soup_averages_the_weights_into_a_run_that_evaluates(soup_members, tmp_path):
    report = ensemble(soup_members, method="soup", out=tmp_path / "soup.json")
    soup_dir = tmp_path / "soup"
    assert report.soup_run == str(soup_dir)
    states = [safetensors.torch.load_file(run / "model.safetensors") for run in soup_members]
    soup = safetensors.torch.load_file(soup_dir / "model.safetensors")
    assert soup.keys() == states[0].keys()
    for name, tensor in soup.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (states[0][name] + states[1][name]) / 2, rtol=1e-6, atol=1e-7)
        else:  # counters (BatchNorm's num_batches_tracked) come from the first member
            assert torch.equal(tensor, states[0][name])
    assert any(not torch.equal(states[0][k], states[1][k]) for k in soup)  # the members did differ
    model, info = load_trained_model(soup_dir)
    assert info["soup_of"] == [str(r) for r in soup_members]
    assert evaluate(soup_dir).metrics == pytest.approx(report.ensemble["metrics"], rel=1e-6)


def test_a_language_model_soup_generates(gpt_runs, tmp_path):
    ensemble([gpt_runs["a"], gpt_runs["c"]], method="soup", out=tmp_path / "soup.json", max_batches=1)
    assert isinstance(generate(tmp_path / "soup", prompt="def ", max_new_tokens=5), str)


def copy_run(run, to, **data) -> object:
    """A copy of ``run`` whose recipe.yaml has ``data`` keys (or, with model=..., model keys) changed."""
    shutil.copytree(run, to)
    raw = yaml.safe_load((to / "recipe.yaml").read_text())
    raw["model"].update(data.pop("model", {}))
    raw["data"].update(data)
    (to / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return to


def test_mistakes_are_messages(cnn_runs, soup_members, gpt_runs, tmp_path):
    with pytest.raises(EmberError, match="same initial weights"):
        ensemble(cnn_runs[:2], method="soup", out=tmp_path / "a.json")
    wider = copy_run(soup_members[1], tmp_path / "wider", model={"width": 16})
    with pytest.raises(EmberError, match="same initial weights"):
        ensemble([soup_members[0], wider], method="soup", out=tmp_path / "b.json")
    with pytest.raises(EmberError, match="not a soup"):  # the soup directory would overwrite run a
        ensemble(soup_members, method="soup", out=soup_members[0].parent / "a.json")
    with pytest.raises(EmberError, match="needs classifiers"):
        ensemble([gpt_runs["a"], gpt_runs["b"]], method="vote")
    other = copy_run(cnn_runs[1], tmp_path / "other", val_fraction=0.2)
    with pytest.raises(EmberError, match="other data.*val_fraction"):
        ensemble([cnn_runs[0], other])
    with pytest.raises(EmberError, match="other data"):
        ensemble([cnn_runs[0], gpt_runs["a"]])
    with pytest.raises(EmberError, match="at least two runs"):
        ensemble(cnn_runs[:1])
    with pytest.raises(EmberError, match="not an ensemble method"):
        ensemble(cnn_runs, method="median")
    with pytest.raises(EmberError, match="not a finished run"):
        ensemble([cnn_runs[0], tmp_path])


def test_fold_runs_are_compared_on_test_not_on_their_own_held_out_folds(cnn_runs, tmp_path):
    folds = [copy_run(cnn_runs[i], tmp_path / f"fold_{i}", folds=3, fold=i) for i in range(3)]
    with pytest.raises(EmberError, match="--split test"):
        ensemble(folds)
    recipes = [load_recipe(f / "recipe.yaml") for f in folds]
    infos = [json.loads((f / "model.json").read_text()) for f in folds]
    check_members(folds, recipes, infos, "mean", "test")  # differing only in data.fold: one data set


def test_language_model_mean_is_minus_log_of_the_mean_probability(gpt_runs, tmp_path):
    runs = [gpt_runs["a"], gpt_runs["b"]]
    report = ensemble(runs, method="mean", max_batches=3, out=tmp_path / "lm.json")
    for run, member in zip(runs, report.members):
        assert member["metrics"] == pytest.approx(evaluate(run, max_batches=3).metrics, rel=1e-6)
    true, logits = member_outputs(runs, split_batches=3)
    log_probs = [torch.log_softmax(torch.from_numpy(x), -1) for x in logits]
    mean_logp = torch.logsumexp(torch.stack(log_probs), 0) - np.log(2)
    picked = mean_logp.gather(-1, torch.from_numpy(true)[..., None])
    m = report.ensemble["metrics"]
    assert m["loss"] == pytest.approx(-picked.mean().item(), rel=1e-5)
    assert m["accuracy"] == pytest.approx((mean_logp.argmax(-1).numpy() == true).mean(), abs=1e-6)
    assert m["ppl"] == pytest.approx(np.exp(m["loss"]), rel=1e-5)
    assert m["loss"] <= np.mean([mm["metrics"]["loss"] for mm in report.members])  # -log is convex
    assert report.samples == true.shape[0] == 24


def test_cli_prints_a_table_and_writes_the_report(cnn_runs, capsys):
    assert main(["ensemble", *map(str, cnn_runs), "--method", "vote"]) == 0
    out = capsys.readouterr().out
    written = cnn_runs[0].parent / "ensemble-vote.json"  # the runs' common parent
    assert f"written to {written}" in out
    assert "ensemble (vote)" in out and "ensemble vs best member / mean member" in out
    assert all(str(run) in out for run in cnn_runs)
    report = json.loads(written.read_text())
    assert report["method"] == "vote" and len(report["members"]) == 3 and "per_class" in report["ensemble"]
    assert main(["ensemble", str(cnn_runs[0])]) == 2
    assert "at least two runs" in capsys.readouterr().err


@pytest.mark.slow  # exact multi-rank evaluation stays in the fast suite through ember eval's 2-rank test
def test_two_ranks_equal_one_process(cnn_runs, tmp_path):
    single = ensemble(cnn_runs[:2], batch_size=7, out=tmp_path / "one.json")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ember",
            "ensemble",
            *map(str, cnn_runs[:2]),
            "--batch-size",
            "7",
            "--nproc",
            "2",
            "--out",
            str(tmp_path / "two.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    both = json.loads((tmp_path / "two.json").read_text())
    assert both["samples"] == single.samples == 180
    for ours, theirs in zip([*both["members"], both["ensemble"]], [*single.members, single.ensemble]):
        counted = {k: v for k, v in ours["metrics"].items() if k != "loss"}  # from integer counts: exact
        assert counted == {k: v for k, v in theirs["metrics"].items() if k != "loss"}
        assert ours["metrics"]["loss"] == pytest.approx(theirs["metrics"]["loss"], rel=1e-6)
