"""The training loop's invariants: exact accumulation, schedules in optimiser steps,
bit-identical resume, the run-directory contract, non-finite losses, early stopping."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch

from conftest import tiny_recipe
from ember.errors import EmberError
from ember.training.loop import train
from ember.training.schedules import lr_factor


def saved_checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def weights(run_dir):
    return safetensors.torch.load_file(str(run_dir / "model.safetensors"))


def metrics(run_dir, split=None):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == split]


@pytest.mark.parametrize("kind", ["gpt", "seq2seq", "rnn"])
def test_accumulation_equals_one_big_batch(tmp_path, kind):
    # seq2seq targets have padding, so per-micro-batch means would differ: only exact normalisation passes.
    small = tiny_recipe(
        kind, "train.batch_size=4", "train.grad_accum=3", "train.max_steps=3", "optim.name=sgd", "optim.lr=0.5"
    )
    big = tiny_recipe(
        kind, "train.batch_size=12", "train.grad_accum=1", "train.max_steps=3", "optim.name=sgd", "optim.lr=0.5"
    )
    a, b = weights(train(small, tmp_path / "a").run_dir), weights(train(big, tmp_path / "b").run_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    start = weights(train(tiny_recipe(kind, "train.max_steps=1", "optim.lr=1e-9"), tmp_path / "c").run_dir)
    assert any(not torch.allclose(a[n], start[n], atol=1e-4) for n in a)  # the steps did move the weights


def test_schedule_counts_optimizer_steps_under_accumulation(tmp_path):
    recipe = tiny_recipe(
        "gpt",
        "train.grad_accum=3",
        "train.max_steps=6",
        "schedule.name=cosine",
        "schedule.warmup_steps=2",
        "optim.lr=0.01",
    )
    run = train(recipe, tmp_path).run_dir
    logged = [r["lr"] for r in metrics(run)]
    expected = [0.01 * lr_factor(s, recipe.schedule, 6) for s in range(6)]
    assert logged == pytest.approx(expected)
    state = torch.load(sorted((run / "checkpoints").glob("step_*"))[-1] / "trainer.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 6 and state["step"] == 6


def resume_recipe(*extra):
    return tiny_recipe(
        "gpt",
        "train.deterministic=true",
        "model.dropout=0.2",
        "train.ema_decay=0.9",
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=5",
        "train.eval_every=3",
        *extra,
    )


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    full = weights(train(resume_recipe(), tmp_path / "full").run_dir)
    run = tmp_path / "cut"
    train(resume_recipe(), run)
    # Make it look as if the process died right after writing step 2's checkpoint.
    for p in (run / "checkpoints").glob("step_0000000[46]"):
        shutil.rmtree(p)
    (run / "model.safetensors").unlink()
    result = train(resume_recipe(), run, resume="auto")
    assert result.step == 6
    resumed = weights(run)
    assert all(torch.equal(full[n], resumed[n]) for n in full)
    steps = [r["step"] for r in metrics(run)]
    assert steps == [1, 2, 3, 4, 5, 6]  # entries past the checkpoint were replaced, not duplicated


def test_resume_with_augmentation_and_loader_workers_is_bit_identical(tmp_path):
    """Augmentation draws from the checkpointed RNG; prefetching workers do not move the position."""
    recipe = tiny_recipe(
        "cnn",
        "train.deterministic=true",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        "data.augment.rotation=20",
        "data.augment.scale=[0.8,1.2]",
        "data.num_workers=2",
    )
    full = weights(train(recipe, tmp_path / "full").run_dir)
    run = tmp_path / "cut"
    train(recipe, run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    (run / "model.safetensors").unlink()
    assert train(recipe, run, resume="auto").step == 6
    resumed = weights(run)
    assert all(torch.equal(full[n], resumed[n]) for n in full)
    plain = weights(
        train(tiny_recipe("cnn", "train.deterministic=true", "train.max_steps=6"), tmp_path / "plain").run_dir
    )
    assert not all(torch.equal(full[n], plain[n]) for n in full)  # the augmentation did change the training


def test_truncated_checkpoint_is_skipped_on_resume_auto(tmp_path):
    full = weights(train(resume_recipe(), tmp_path / "full").run_dir)
    run = tmp_path / "cut"
    train(resume_recipe(), run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    newest = next((run / "checkpoints" / "step_00000004").glob("state.safetensors"))
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="step_00000004"):
        result = train(resume_recipe(), run, resume="auto")
    assert result.step == 6
    assert all(torch.equal(full[n], weights(run)[n]) for n in full)


def test_run_directory_contract(tmp_path):
    run = train(tiny_recipe("gpt", "train.eval_every=2", "train.checkpoint_every=2"), tmp_path).run_dir
    assert (run / "recipe.yaml").is_file() and (run / "model.safetensors").is_file()
    assert not (run / "tb").exists() and not (run / "trackers.json").exists()  # trackers are asked for
    info = json.loads((run / "model.json").read_text())
    assert info["model"]["name"] == "gpt" and info["params"] > 0 and info["flops_per_item"] > 0
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s", "mfu", "peak_rss_mb"} <= r.keys() for r in rows)
    val = metrics(run, "val")
    assert [r["step"] for r in val] == [2, 4] and all("loss" in r and "ppl" in r for r in val)
    assert saved_checkpoints(run) == ["step_00000002", "step_00000004"]


def test_new_run_refuses_a_directory_with_checkpoints(tmp_path):
    train(tiny_recipe("rnn"), tmp_path)
    with pytest.raises(EmberError, match="--resume auto"):
        train(tiny_recipe("rnn"), tmp_path)


def test_resume_with_a_different_model_is_refused(tmp_path):
    train(tiny_recipe("rnn"), tmp_path)
    with pytest.raises(EmberError, match="model.hidden_size: checkpoint 32 vs recipe 64"):
        train(tiny_recipe("rnn", "model.hidden_size=64"), tmp_path, resume="auto")


def poison_after(monkeypatch, calls):
    import ember.training.layouts as layouts

    real, count = layouts.task_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        count["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if count["n"] > calls else loss

    monkeypatch.setattr(layouts, "task_loss", poisoned)


def test_nonfinite_loss_stops_without_a_poisoned_checkpoint(tmp_path, monkeypatch):
    poison_after(monkeypatch, calls=3)  # step 4 is the first bad one
    recipe = tiny_recipe("gpt", "train.max_steps=8", "train.checkpoint_every=2", "train.log_every=4")
    with pytest.raises(EmberError, match="non-finite .* at optimiser step 4.*step_00000002"):
        train(recipe, tmp_path)
    assert saved_checkpoints(tmp_path) == ["step_00000002"]
    assert not (tmp_path / "model.safetensors").exists()


def test_nonfinite_steps_are_skipped_when_asked(tmp_path, monkeypatch):
    poison_after(monkeypatch, calls=3)
    run = train(tiny_recipe("gpt", "train.max_steps=6", "train.on_nonfinite=skip"), tmp_path).run_dir
    assert metrics(run)[-1]["skipped_steps"] == 3
    assert all(torch.isfinite(w).all() for w in weights(run).values())


def test_early_stopping_ends_the_run(tmp_path):
    recipe = tiny_recipe(
        "cnn", "train.max_steps=50", "train.eval_every=2", "optim.lr=1e-9", "eval.patience=2", "eval.min_delta=0.05"
    )
    result = train(recipe, tmp_path)
    assert result.stopped_early and result.step == 6  # best at 2, no improvement at 4 and 6
    assert (tmp_path / "model.safetensors").is_file()


def test_l1_penalty_shrinks_weights(tmp_path):
    plain = weights(train(tiny_recipe("rnn", "train.max_steps=20", "optim.lr=0.01"), tmp_path / "a").run_dir)
    l1 = weights(
        train(tiny_recipe("rnn", "train.max_steps=20", "optim.lr=0.01", "optim.l1=0.01"), tmp_path / "b").run_dir
    )
    matrices = [n for n in plain if plain[n].ndim >= 2]
    assert sum(l1[n].abs().sum() for n in matrices) < 0.8 * sum(plain[n].abs().sum() for n in matrices)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    run = train(tiny_recipe("gpt", "train.precision=bf16", "train.max_steps=20", "optim.lr=3e-3"), tmp_path).run_dir
    losses = [r["loss"] for r in metrics(run)]
    assert losses[-1] < 0.8 * losses[0]


def test_activation_checkpointing_gives_the_same_weights(tmp_path):
    plain = weights(train(tiny_recipe("gpt", "model.n_layer=2"), tmp_path / "a").run_dir)
    ckpt = weights(
        train(tiny_recipe("gpt", "model.n_layer=2", "train.activation_checkpointing=true"), tmp_path / "b").run_dir
    )
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ema_weights_are_exported_and_differ_from_the_raw_ones(tmp_path):
    raw = weights(train(tiny_recipe("rnn", "optim.lr=0.01", "train.max_steps=10"), tmp_path / "a").run_dir)
    ema = weights(
        train(tiny_recipe("rnn", "optim.lr=0.01", "train.max_steps=10", "train.ema_decay=0.9"), tmp_path / "b").run_dir
    )
    start = weights(train(tiny_recipe("rnn", "optim.lr=1e-9", "train.max_steps=1"), tmp_path / "c").run_dir)
    # The EMA lags: it sits between the initial and the final raw weights.
    name = next(n for n in raw if raw[n].ndim >= 2)
    assert 0 < (ema[name] - start[name]).norm() < (raw[name] - start[name]).norm()


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    eager = weights(train(tiny_recipe("gpt"), tmp_path / "a").run_dir)
    compiled = weights(train(tiny_recipe("gpt", "train.compile=true"), tmp_path / "b").run_dir)
    for name in eager:
        torch.testing.assert_close(eager[name], compiled[name], rtol=1e-4, atol=1e-5, msg=name)


def test_resuming_a_finished_run_reports_its_metrics(tmp_path):
    first = train(tiny_recipe("rnn"), tmp_path)
    again = train(tiny_recipe("rnn"), tmp_path, resume="auto")
    assert again.step == first.step == 4
    assert again.metrics == pytest.approx(first.metrics)


def test_nan_gradient_is_caught_without_clipping(tmp_path, monkeypatch):
    import ember.training.layouts as layouts

    real, count = layouts.task_loss, {"n": 0}

    def nan_gradient(task, logits, *args, **kwargs):
        count["n"] += 1
        loss = real(task, logits, *args, **kwargs)
        # sqrt at 0: the value stays finite, its gradient is inf * 0 = NaN.
        return loss + torch.sqrt((logits * 0).sum()) if count["n"] > 2 else loss

    monkeypatch.setattr(layouts, "task_loss", nan_gradient)
    recipe = tiny_recipe("gpt", "optim.grad_clip=0", "train.max_steps=6", "train.checkpoint_every=2")
    with pytest.raises(EmberError, match="at optimiser step 3"):
        train(recipe, tmp_path)
    assert saved_checkpoints(tmp_path) == ["step_00000002"]


def test_non_finite_weights_are_never_saved():
    from ember.training.nonfinite import check_finite_weights

    model = torch.nn.Linear(2, 2)
    check_finite_weights(model, 1, None)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(EmberError, match="model weights became non-finite"):
        check_finite_weights(model, 1, None)


def test_resuming_an_older_checkpoint_abandons_the_newer_ones(tmp_path):
    run = train(resume_recipe(), tmp_path).run_dir
    train(
        resume_recipe("train.max_steps=5", "train.checkpoint_every=5"),
        run,
        resume=str(run / "checkpoints" / "step_00000002"),
    )
    assert saved_checkpoints(run) == ["step_00000002", "step_00000005"]


def test_resume_may_extend_the_run_but_not_change_the_optimiser(tmp_path):
    train(tiny_recipe("rnn"), tmp_path)
    before = (tmp_path / "recipe.yaml").read_text()
    with pytest.raises(EmberError, match="optim.lr: checkpoint 0.001 vs recipe 0.1"):
        train(tiny_recipe("rnn", "optim.lr=0.1"), tmp_path, resume="auto")
    assert (tmp_path / "recipe.yaml").read_text() == before  # a refused resume changes nothing
    result = train(tiny_recipe("rnn", "train.max_steps=7", "eval.max_batches=1"), tmp_path, resume="auto")
    assert result.step == 7


def test_a_line_cut_short_in_metrics_does_not_break_resume(tmp_path):
    run = train(resume_recipe(), tmp_path).run_dir
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    train(resume_recipe(), run, resume="auto")
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_early_stopping_follows_the_metric_direction_and_survives_resume(tmp_path):
    from ember.training.tasks import metric_mode

    assert (metric_mode("accuracy", "auto"), metric_mode("exact_match", "auto"), metric_mode("loss", "auto")) == (
        "max",
        "max",
        "min",
    )
    assert metric_mode("accuracy", "min") == "min"
    stuck = tiny_recipe(
        "cnn", "train.max_steps=50", "train.eval_every=2", "optim.lr=1e-9", "eval.patience=1", "eval.min_delta=0.05"
    )
    first = train(stuck, tmp_path / "b")
    assert first.stopped_early and first.step == 4
    again = train(stuck, tmp_path / "b", resume="auto")
    assert again.stopped_early and again.step == 4  # it stays stopped; no silent extra training
