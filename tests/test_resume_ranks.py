"""Invariant 4 under several processes (issue #15): a 2-rank DDP or FSDP run stopped at a
checkpoint and resumed on 2 ranks equals the uninterrupted run, bit for bit, val metrics
included. The cnn cases hold BatchNorm running statistics, which data-parallel ranks keep
apart (each from its own batches) and which one rank's copy in the checkpoint cannot restore."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from test_distributed import launch, output, weights

STEPS = [
    "train.max_steps=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=5",
    "train.eval_every=3",
    "train.deterministic=true",
]
MODELS = {
    "gpt": ["model.dropout=0.1", "train.batch_size=2", "eval.batch_size=8", "eval.max_batches=4"],
    # as recipes/cnn-digits.yaml: augmentation and dropout, both drawn per rank; every val sample
    "cnn": [
        "model.dropout=0.1",
        "data.augment.rotation=10",
        "data.augment.scale=[0.9,1.1]",
        "data.augment.translate=0.1",
        "eval.max_batches=0",
    ],
}


def val_metrics(run: Path) -> list[dict]:
    """The logged validations, less their wall-clock time."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


def run_cut_and_resume(tmp_path: Path, kind: str, strategy: str, *extra: str) -> None:
    recipe = tiny_recipe(kind, *STEPS, *MODELS[kind], f"parallel.strategy={strategy}", *extra)
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = launch(tmp_path, recipe, full)
    assert proc.returncode == 0, output(proc)
    shutil.copytree(full, cut)  # the same run, as if the job had died right after step 2's checkpoint
    shutil.rmtree(cut / "checkpoints" / "step_00000004")
    (cut / "model.safetensors").unlink()
    resumed = launch(tmp_path, recipe, cut, "--resume", "auto")
    assert resumed.returncode == 0, output(resumed)
    assert "resumed from" in resumed.stderr
    steps = [
        json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines() if '"val"' not in line
    ]
    assert steps == [1, 2, 3, 4]  # trained again from step 3 on
    before, again = weights(full), weights(cut)
    assert before.keys() == again.keys()
    differ = [name for name in before if not torch.equal(before[name], again[name])]
    assert not differ, differ
    # the step-3 validation (after the resume) and the last one: the same numbers
    assert val_metrics(cut) == val_metrics(full)
    if kind == "cnn":  # the whole split: the last validation is that of the model exported (rank 0's
        from ember.eval.evaluate import evaluate  # BatchNorm statistics), so ember eval agrees with it

        assert evaluate(full).metrics["loss"] == pytest.approx(val_metrics(full)[-1]["loss"], abs=1e-6)


# ddp with an EMA: its BatchNorm statistics, averaged from each rank's own, differ by rank too
def test_two_rank_ddp_resume_of_a_batchnorm_cnn_with_ema_is_bit_identical(tmp_path):
    run_cut_and_resume(tmp_path, "cnn", "ddp", "train.ema_decay=0.9")


@pytest.mark.slow
@pytest.mark.parametrize("kind,strategy", [("cnn", "ddp"), ("cnn", "fsdp"), ("gpt", "ddp"), ("gpt", "fsdp")])
def test_two_rank_resume_is_bit_identical_in_every_layout(tmp_path, kind, strategy):
    run_cut_and_resume(tmp_path, kind, strategy)


def test_each_rank_gets_back_its_own_buffers_or_rank_0s():
    """Saved by 2 ranks: rank r takes rank r's BatchNorm statistics back; a rank the checkpoint
    did not have takes rank 0's (the RNG's rule); an older checkpoint without them leaves the
    weights' buffers alone."""
    from torch import nn

    from ember.data.loader import ArrayDataset, BatchLoader
    from ember.training.plugin import Plugins
    from ember.training.precision import build_scaler
    from ember.training.resume import Progress, own_buffers, restore_trainer_state, trainer_state

    def parts():
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=0.1), lambda s: 1.0)
        loader = BatchLoader(ArrayDataset(x=torch.zeros(4, 1)), 2, shuffle=False, seed=0, drop_last=True)
        return model, scheduler, build_scaler("fp32", torch.device("cpu")), loader

    model, scheduler, scaler, loader = parts()
    state = trainer_state(scheduler, scaler, Plugins([]), loader, Progress(step=2), tiny_recipe("cnn"), 2, model)
    assert set(state["buffers_ranks"][0]["model"]) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    by_rank = [{name: torch.full_like(value, r + 1) for name, value in own_buffers(model).items()} for r in (0, 1)]
    state["buffers_ranks"] = [{"model": buffers, "ema": {}} for buffers in by_rank]
    for rank, expected in [(0, by_rank[0]), (1, by_rank[1]), (3, by_rank[0])]:
        fresh, scheduler, scaler, loader = parts()
        restore_trainer_state(state, scheduler, scaler, Plugins([]), loader, rank, fresh)
        got = own_buffers(fresh)
        assert all(torch.equal(got[name], expected[name]) for name in expected)
    fresh, scheduler, scaler, loader = parts()
    older = {key: value for key, value in state.items() if key != "buffers_ranks"}
    restore_trainer_state(older, scheduler, scaler, Plugins([]), loader, 1, fresh)
    assert torch.equal(fresh[1].running_var, torch.ones(2))  # untouched


# slow: the default suite resumes a one-process state file on 2 fsdp ranks in tests/test_distributed.py
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_one_process_state_file_resumes_on_two_ranks_as_its_dcp_twin(tmp_path, strategy):
    """One process saves a state file (no DCP); resumed on 2 ranks (each cutting its own part of
    every whole tensor under fsdp) it continues exactly as the same checkpoint in DCP's format
    (the older one-process format, and what several ranks write) does: bit-identical weights."""
    from ember.training.loop import train
    from test_checkpoint import rewrite_as_dcp

    one = tiny_recipe("gpt", *STEPS, *MODELS["gpt"], "train.batch_size=4")
    two = tiny_recipe("gpt", *STEPS, *MODELS["gpt"], f"parallel.strategy={strategy}")  # 2 x 2: the same global batch
    source = tmp_path / "one"
    train(one, source)
    assert (source / "checkpoints" / "step_00000002" / "state.safetensors").is_file()
    shutil.rmtree(source / "checkpoints" / "step_00000004")
    (source / "model.safetensors").unlink()
    twin = tmp_path / "twin"
    shutil.copytree(source, twin)
    rewrite_as_dcp(twin / "checkpoints" / "step_00000002")
    for run in (source, twin):
        proc = launch(tmp_path, two, run, "--resume", "auto")
        assert proc.returncode == 0, output(proc)
        assert "resumed from" in proc.stderr
    a, b = weights(source), weights(twin)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert val_metrics(source) == val_metrics(twin)
