"""Data parallel training on 2 CPU processes (gloo), launched the way users launch it:
``ember train RECIPE --nproc 2`` (torch.distributed.run underneath)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import tiny_recipe
from ember.train.loop import train


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run_dir / "model.safetensors"))


def launch(tmp_path: Path, recipe, run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(recipe.to_yaml())
    return subprocess.run([sys.executable, "-m", "ember", "train", str(path), "--run-dir", str(run_dir), "--nproc", "2", *extra],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def assert_same_weights(a: dict, b: dict, tol: float = 1e-6) -> None:
    """Largest absolute difference of any weight <= tol (0 = bit-identical)."""
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


@pytest.mark.parametrize("kind", ["gpt", "seq2seq"])
def test_ddp_equals_one_process_with_the_same_global_batch(tmp_path, kind):
    """2 ranks x batch 2 x 2 accumulation steps = 1 process x batch 8: the same weights."""
    common = ["train.max_steps=4", "train.deterministic=true", "model.dropout=0.0", "optim.grad_clip=0.5"]
    ddp = launch(tmp_path, tiny_recipe(kind, *common, "train.batch_size=2", "train.grad_accum=2"), tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = train(tiny_recipe(kind, *common, "train.batch_size=8"), tmp_path / "single")
    assert_same_weights(weights(tmp_path / "ddp"), weights(single.run_dir))
    assert ddp.stdout.count("done: step 4") == 1  # rank 0 reports for the job
    val_ddp = [line for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert len(val_ddp) == 1  # one writer


def test_ddp_checkpoint_resumes_exactly(tmp_path):
    recipe = tiny_recipe("gpt", "train.max_steps=6", "train.checkpoint_every=3", "train.deterministic=true",
                         "model.dropout=0.1", "train.keep_checkpoints=5", "parallel.strategy=ddp")
    for run in (tmp_path / "full", tmp_path / "cut"):
        proc = launch(tmp_path, recipe, run)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for p in (run / "checkpoints").glob("step_00000006.*"):
        p.unlink()
    (run / "model.safetensors").unlink()
    resumed = launch(tmp_path, recipe, run, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "full"), weights(run), tol=0.0)  # each rank's dropout stream restored


def test_single_strategy_under_two_processes_is_refused(tmp_path):
    proc = launch(tmp_path, tiny_recipe("gpt"), tmp_path / "r", "--set", "parallel.strategy=single")
    assert proc.returncode != 0 and "parallel.strategy=ddp" in proc.stderr


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_in_bounded_time(tmp_path):
    """Rank 1 raises at its third step; rank 0 must not hang in the next all-reduce."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        if os.environ.get("RANK") == "1" and os.environ.get("EMBER_TEST_BREAK"):
            import ember.train.loop as loop
            real, calls = loop.optimizer_step, []
            def broken(*args, **kwargs):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("rank 1 broke on purpose")
                return real(*args, **kwargs)
            loop.optimizer_step = broken
    """))
    recipe = tiny_recipe("gpt", "train.max_steps=50", "parallel.timeout_s=30")
    start = time.time()
    proc = launch(tmp_path, recipe, tmp_path / "r",
                  env={"EMBER_TEST_BREAK": "1", "PYTHONPATH": os.pathsep.join([str(hook), *sys.path])})
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert "rank 1 broke on purpose" in proc.stderr
    assert elapsed < 90, elapsed
