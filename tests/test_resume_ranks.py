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

STEPS = ["train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=5", "train.eval_every=3",
         "train.deterministic=true", "eval.max_batches=0"]  # every val sample, on both ranks
MODELS = {
    "gpt": ["model.dropout=0.1", "train.batch_size=2"],
    # as recipes/cnn-digits.yaml: augmentation and dropout, both drawn per rank
    "cnn": ["model.dropout=0.1", "data.augment.rotation=10", "data.augment.scale=[0.9,1.1]",
            "data.augment.translate=0.1"],
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
    for later in ("step_00000004", "step_00000006"):
        shutil.rmtree(cut / "checkpoints" / later)
    (cut / "model.safetensors").unlink()
    resumed = launch(tmp_path, recipe, cut, "--resume", "auto")
    assert resumed.returncode == 0, output(resumed)
    assert "resumed from" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines() if '"val"' not in line]
    assert steps == [1, 2, 3, 4, 5, 6]  # trained again from step 3 on
    before, again = weights(full), weights(cut)
    assert before.keys() == again.keys()
    differ = [name for name in before if not torch.equal(before[name], again[name])]
    assert not differ, differ
    # the step-3 validation (after the resume) and the last one: the same numbers
    assert val_metrics(cut) == val_metrics(full)


# ddp with an EMA: its BatchNorm statistics, averaged from each rank's own, differ by rank too
@pytest.mark.parametrize("kind,strategy,extra", [("cnn", "ddp", ["train.ema_decay=0.9"]), ("gpt", "fsdp", [])])
def test_two_rank_resume_is_bit_identical(tmp_path, kind, strategy, extra):
    run_cut_and_resume(tmp_path, kind, strategy, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("kind,strategy", [("cnn", "ddp"), ("cnn", "fsdp"), ("gpt", "ddp")])
def test_two_rank_resume_is_bit_identical_in_every_layout(tmp_path, kind, strategy):
    run_cut_and_resume(tmp_path, kind, strategy)
