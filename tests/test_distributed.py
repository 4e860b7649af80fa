"""Data parallel training on 2 CPU processes (gloo), launched the way users launch it:
``ember train RECIPE --nproc 2`` (torch.distributed.run underneath)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import tiny_recipe
from ember.errors import EmberError
from ember.training.loop import train


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run_dir / "model.safetensors"))


def launch(tmp_path: Path, recipe, run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(recipe.to_yaml())
    return subprocess.run(
        [sys.executable, "-m", "ember", "train", str(path), "--run-dir", str(run_dir), "--nproc", "2", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def output(proc: subprocess.CompletedProcess) -> str:
    """What a failed launch printed: enough of both streams to see every rank's error."""
    return f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-12000:]}"


def assert_same_weights(a: dict, b: dict, tol: float = 1e-6) -> None:
    """Largest absolute difference of any weight <= tol (0 = bit-identical)."""
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


@pytest.mark.parametrize(
    "kind,strategy,batch",
    [
        ("gpt", "ddp", 2),
        pytest.param("seq2seq", "ddp", 2, marks=pytest.mark.slow),
        ("gpt", "fsdp", 2),
        ("gpt", "tp", 4),
        ("gpt", "pp", 4),
    ],
)
def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, kind, strategy, batch):
    """2 ranks x batch 2 x 2 accumulation steps = 1 process x batch 8: the same weights,
    whether the ranks hold whole replicas (ddp) or shards (fsdp). Under tp both ranks read
    the same batch of 4 and each computes half of every block; under pp (1F1B over the 2
    micro-batches) each holds half of the blocks."""
    common = [
        "train.max_steps=4",
        "train.deterministic=true",
        "model.dropout=0.0",
        "optim.grad_clip=0.5",
        "eval.max_batches=0",
        "eval.batch_size=3",
    ]  # the whole split, in batches that leave ranks uneven
    if strategy == "pp":
        common += ["model.tie_weights=false", "model.n_layer=2"]  # embedding and head live on different stages
    recipe = tiny_recipe(
        kind, *common, f"train.batch_size={batch}", "train.grad_accum=2", f"parallel.strategy={strategy}"
    )
    ddp = launch(tmp_path, recipe, tmp_path / "ddp")
    assert ddp.returncode == 0, output(ddp)
    single = train(tiny_recipe(kind, *common, "train.batch_size=8"), tmp_path / "single")
    assert_same_weights(weights(tmp_path / "ddp"), weights(single.run_dir))
    assert ddp.stdout.count("done: step 4") == 1  # rank 0 reports for the job
    val_ddp = [line for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert len(val_ddp) == 1  # one writer
    assert json.loads(val_ddp[0])["loss"] == pytest.approx(single.metrics["loss"], rel=1e-5)  # every sample once


RESHARD = [
    "train.max_steps=6",
    "train.checkpoint_every=3",
    "train.deterministic=true",
    "model.dropout=0.0",
    "train.keep_checkpoints=5",
    "optim.grad_clip=0.5",
    "parallel.strategy=fsdp",
]


def cut_after_step_3(run: Path) -> None:
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    (run / "model.safetensors").unlink()


@pytest.mark.parametrize("strategy", ["fsdp", "pp"])
def test_a_run_saved_on_two_ranks_resumes_on_one(tmp_path, strategy):
    """Shards saved by 2 ranks load into one process (batch 4); the run continues as the
    uninterrupted one-process run does. fsdp: each rank a half of every tensor, batch 2 each;
    pp: each rank the tensors of its stage, 2 micro-batches of 2."""
    model = ["model.tie_weights=false", "model.n_layer=2"]
    layout = ["train.batch_size=2"] if strategy == "fsdp" else ["train.batch_size=2", "train.grad_accum=2"]
    whole = weights(train(tiny_recipe("gpt", *RESHARD, *model, "train.batch_size=4"), tmp_path / "whole").run_dir)
    run = tmp_path / "cut"
    proc = launch(tmp_path, tiny_recipe("gpt", *RESHARD, *model, *layout, f"parallel.strategy={strategy}"), run)
    assert proc.returncode == 0, output(proc)
    assert len(list((run / "checkpoints" / "step_00000003").glob("*.distcp"))) == 2  # one shard file per rank
    cut_after_step_3(run)
    assert train(tiny_recipe("gpt", *RESHARD, *model, "train.batch_size=4"), run, resume="auto").step == 6
    assert_same_weights(whole, weights(run), tol=1e-5)


def test_a_run_saved_in_one_process_resumes_on_two_ranks(tmp_path):
    whole_run = train(tiny_recipe("gpt", *RESHARD, "train.batch_size=2", "train.grad_accum=2"), tmp_path / "whole")
    run = tmp_path / "cut"
    train(tiny_recipe("gpt", *RESHARD, "train.batch_size=2", "train.grad_accum=2"), run)
    cut_after_step_3(run)
    proc = launch(tmp_path, tiny_recipe("gpt", *RESHARD, "train.batch_size=2"), run, "--resume", "auto")
    assert proc.returncode == 0, output(proc)
    assert "resumed from" in proc.stderr
    assert_same_weights(weights(whole_run.run_dir), weights(run), tol=1e-5)
    steps = [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' not in line
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_another_global_batch_is_refused(tmp_path):
    run = train(tiny_recipe("gpt", "train.batch_size=4"), tmp_path).run_dir
    with pytest.raises(EmberError, match="global batch of 4 .* product x 1 is 4"):
        train(tiny_recipe("gpt", "train.batch_size=2", "train.max_steps=8"), run, resume="auto")
    assert (
        train(
            tiny_recipe("gpt", "train.batch_size=2", "train.grad_accum=2", "train.max_steps=6"), run, resume="auto"
        ).step
        == 6
    )


@pytest.mark.slow  # the default suite resumes a 2-rank ddp run exactly in tests/test_resume_ranks.py
def test_ddp_checkpoint_resumes_exactly(tmp_path):
    recipe = tiny_recipe(
        "gpt",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        "train.deterministic=true",
        "model.dropout=0.1",
        "train.keep_checkpoints=5",
        "parallel.strategy=ddp",
    )
    for run in (tmp_path / "full", tmp_path / "cut"):
        proc = launch(tmp_path, recipe, run)
        assert proc.returncode == 0, output(proc)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    (run / "model.safetensors").unlink()
    resumed = launch(tmp_path, recipe, run, "--resume", "auto")
    assert resumed.returncode == 0, output(resumed)
    assert_same_weights(weights(tmp_path / "full"), weights(run), tol=0.0)  # each rank's dropout stream restored


def test_single_strategy_under_two_processes_is_refused(tmp_path):
    proc = launch(tmp_path, tiny_recipe("gpt"), tmp_path / "r", "--set", "parallel.strategy=single")
    assert proc.returncode != 0 and "parallel.strategy=ddp" in proc.stderr


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_in_bounded_time(tmp_path):
    """Rank 1 raises at its third step; rank 0 must not hang in the next all-reduce."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import os
        if os.environ.get("RANK") == "1" and os.environ.get("EMBER_TEST_BREAK"):
            from ember.training.layouts import Layout
            real, calls = Layout.forward_backward, []
            def broken(*args, **kwargs):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("rank 1 broke on purpose")
                return real(*args, **kwargs)
            Layout.forward_backward = broken
    """)
    )
    recipe = tiny_recipe("gpt", "train.max_steps=50", "parallel.timeout_s=30")
    start = time.time()
    proc = launch(
        tmp_path,
        recipe,
        tmp_path / "r",
        env={"EMBER_TEST_BREAK": "1", "PYTHONPATH": os.pathsep.join([str(hook), *sys.path])},
    )
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert "rank 1 broke on purpose" in proc.stderr
    assert elapsed < 90, elapsed


def test_auto_picks_single_for_one_process_and_the_plan_for_several():
    from ember.training.distributed import DistContext
    from ember.training.parallelize import choose_strategy

    recipe = tiny_recipe("gpt")
    assert recipe.parallel.strategy == "auto"
    assert choose_strategy(recipe, DistContext()) == ("single", 1)
    # A tiny model fits one device many times over: the simplest layout that uses both, ddp.
    assert choose_strategy(recipe, DistContext(world_size=2)) == ("ddp", 1)
    assert choose_strategy(
        tiny_recipe("gpt", "parallel.strategy=fsdp+tp", "parallel.tp=2"), DistContext(world_size=4)
    ) == ("fsdp+tp", 2)


def test_layouts_that_cannot_work_are_refused_with_the_fix():
    from ember.training.distributed import DistContext, with_layout
    from ember.training.layouts import LAYOUTS

    def check_supported(recipe, strategy):
        LAYOUTS[strategy](DistContext(), recipe).check()

    with pytest.raises(EmberError, match="parallel.tp .* divisor of 4"):
        with_layout(DistContext(world_size=4), "fsdp+tp", tp=3)
    with pytest.raises(EmberError, match="train.ema_decay=0"):
        check_supported(tiny_recipe("gpt", "train.ema_decay=0.9"), "fsdp")
    for setting, fix in [
        ("train.precision=bf16", None),
        ("optim.l1=0.01", "optim.l1=0"),
        ("train.compile=true", "train.compile=false"),
    ]:
        if fix is None:
            check_supported(tiny_recipe("gpt", setting), "pp")  # bf16 runs
        else:
            with pytest.raises(EmberError, match=fix):
                check_supported(tiny_recipe("gpt", setting), "pp")


@pytest.mark.slow
def test_fsdp_and_tensor_parallel_on_a_2x2_mesh_equal_one_process(tmp_path):
    """4 ranks: 2 data-parallel groups of 2 tensor-parallel ranks, batch 2 x accumulation 2 per
    group = one process with batch 8."""
    common = ["train.max_steps=3", "train.deterministic=true", "model.dropout=0.0", "optim.grad_clip=0.5"]
    recipe = tiny_recipe("gpt", *common, "train.batch_size=2", "train.grad_accum=2", "parallel.strategy=fsdp+tp")
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    proc = subprocess.run(
        [sys.executable, "-m", "ember", "train", str(path), "--run-dir", str(tmp_path / "mesh"), "--nproc", "4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, output(proc)
    assert "fsdp+tp x 4" in proc.stderr
    single = train(tiny_recipe("gpt", *common, "train.batch_size=8"), tmp_path / "single")
    assert_same_weights(weights(tmp_path / "mesh"), weights(single.run_dir), tol=1e-5)


@pytest.mark.slow
def test_two_nodes_meet_through_c10d_rendezvous(tmp_path):
    """Two torchrun agents, as on two machines (here both on localhost), one process each,
    meeting at a c10d rendezvous endpoint: the job trains as one 2-rank run."""
    recipe = tiny_recipe("gpt", "parallel.strategy=fsdp")
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=localhost:{port}",
                "--rdzv-id=ember-test",
                "-m",
                "ember",
                "train",
                str(path),
                "--run-dir",
                str(tmp_path / "run"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs
    assert sum(out.count("done: step 4") for out, _ in outputs) == 1  # one rank 0 reports for the job
    assert "fsdp x 2" in "".join(err for _, err in outputs)
    assert (tmp_path / "run" / "model.safetensors").is_file()
