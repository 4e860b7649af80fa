"""LoRA: adapters on a frozen model, trained alone, checkpointed alone, merged exactly, planned smaller.

The contract every plugin keeps (bit-identical resume, exact accumulation) is tested for lora
in tests/test_plugins.py with the others; here is what only LoRA does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import tiny_recipe
from ember.config import recipe_from_dict
from ember.errors import EmberError
from ember.models.registry import build_model
from ember.plan import plan
from ember.plugins import prepare_model
from ember.plugins.lora import merge_adapters
from ember.runs import load_trained_model, starting_model
from ember.training.checkpoint import saved_names
from ember.training.loop import train
from ember.training.low_rank import adapted_layers, attach_adapters, freeze_base
from ember.training.memory import data_spec

COMMON = ("train.deterministic=true", "optim.name=adamw", "optim.lr=0.01", "model.dropout=0.0")
LORA = {"name": "lora", "rank": 4, "alpha": 8.0, "targets": ["q", "v"]}


def with_plugins(recipe, *entries):
    return recipe_from_dict({**recipe.model_dump(mode="json"), "plugins": list(entries)})


def lora_recipe(*overrides, entry=None):
    return with_plugins(tiny_recipe("gpt", *COMMON, *overrides), entry or LORA)


def tiny_gpt(*overrides):
    recipe = tiny_recipe("gpt", *overrides)
    return build_model(recipe.model, data_spec(recipe), recipe.objective).eval()


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run_dir / "model.safetensors"))


def test_adapters_start_at_the_base_model_and_merge_into_it_exactly():
    torch.manual_seed(0)
    model = tiny_gpt("model.tie_weights=false")
    x = torch.randint(0, 256, (2, 16))
    before = model(x)
    names = attach_adapters(model, rank=4, alpha=8.0, dropout=0.1, targets=["q", "v", "lm_head"])
    assert names == ["blocks.0.attn.q", "blocks.0.attn.v", "lm_head"]
    assert torch.equal(model(x), before)  # B starts at zero: training starts from the base model
    for _, layer in adapted_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    adapted = model(x)
    assert (adapted - before).abs().max() > 1e-2
    merged = merge_adapters(model)
    assert merged is model and not adapted_layers(model)
    assert not any("lora" in k for k in model.state_dict()) and not model.blocks[0].attn.q._forward_hooks
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


def test_only_adapters_and_train_also_stay_trainable():
    model = tiny_gpt()
    attach_adapters(model, rank=2, alpha=2.0, dropout=0.0, targets=["fc", "proj"])
    freeze_base(model, ["ln_f"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "blocks.0.attn.proj.lora_A",
        "blocks.0.attn.proj.lora_B",
        "blocks.0.mlp.fc.lora_A",
        "blocks.0.mlp.fc.lora_B",
        "blocks.0.mlp.proj.lora_A",
        "blocks.0.mlp.proj.lora_B",
        "ln_f.weight",  # the tiny GPT has no biases
    ]


def test_unknown_targets_and_a_tied_head_are_refused_with_the_fix():
    with pytest.raises(EmberError, match=r"\['query'\] name no Linear layer.*'fc', 'k', 'lm_head', 'proj', 'q', 'v'"):
        attach_adapters(tiny_gpt(), rank=2, alpha=2.0, dropout=0.0, targets=["q", "query"])
    with pytest.raises(EmberError, match=r"cannot adapt \['lm_head'\]: its weight is tied"):
        attach_adapters(tiny_gpt(), rank=2, alpha=2.0, dropout=0.0, targets=["lm_head"])
    with pytest.raises(EmberError, match="train_also names \\['head'\\]"):
        freeze_base(tiny_gpt(), ["head"])
    with pytest.raises(EmberError, match="lora plugin is not supported with parallel.strategy=tp"):
        from ember.training.distributed import DistContext
        from ember.training.layouts import LAYOUTS

        LAYOUTS["tp"](DistContext(), lora_recipe()).check()


def test_a_lora_run_trains_the_adapters_on_its_frozen_start_and_checkpoints_them_alone(tmp_path):
    before = train(tiny_recipe("gpt", *COMMON, "train.max_steps=3"), tmp_path / "base")
    base = before.run_dir
    recipe = lora_recipe(f"init.from_run={base}", "train.max_steps=6", "train.checkpoint_every=3", "optim.lr=0.05")
    run = train(recipe, tmp_path / "lora")
    start, end = weights(base), weights(run.run_dir)
    assert all(torch.equal(start[n], end[n]) for n in start)  # the base is untouched
    adapters = sorted(set(end) - set(start))
    assert adapters == [f"blocks.0.attn.{m}.lora_{ab}" for m in "qv" for ab in "AB"]
    assert all(end[n].abs().sum() > 0 for n in adapters if n.endswith("lora_B"))  # B left zero: it trained
    assert run.metrics["loss"] < before.metrics["loss"]  # and it learned (the same validation split)
    saved = saved_names(run.run_dir / "checkpoints" / "step_00000006")
    assert sorted(k for k in saved if k.startswith("model.")) == [f"model.{n}" for n in adapters]
    assert not any(k.startswith("optimizer.state.") and ".lora_" not in k for k in saved)
    # The finished run loads with its adapters, and merged it computes the same.
    model, info = load_trained_model(run.run_dir)
    assert info["lora"]["rank"] == 4 and info["lora"]["targets"] == ["q", "v"]
    x = torch.randint(0, 256, (2, 16))
    adapted = model(x)
    torch.testing.assert_close(merge_adapters(model)(x), adapted, rtol=1e-5, atol=1e-5)


def test_a_resume_onto_another_frozen_base_is_refused(tmp_path):
    first = train(tiny_recipe("gpt", *COMMON, "train.max_steps=2"), tmp_path / "first").run_dir
    other = train(tiny_recipe("gpt", *COMMON, "train.max_steps=3"), tmp_path / "other").run_dir
    recipe = lora_recipe(f"init.from_run={first}", "train.max_steps=4", "train.checkpoint_every=2")
    run = train(recipe, tmp_path / "lora").run_dir
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    for name in ("model.safetensors", "model.json"):  # the starting run replaced by another one
        shutil.copy(other / name, first / name)
    with pytest.raises(EmberError, match="trained on top of frozen base weights .* other than the ones this run"):
        train(recipe, run, resume="auto")


def test_a_run_from_a_lora_run_starts_from_its_merged_weights(tmp_path):
    source = train(lora_recipe("train.max_steps=3", "optim.lr=0.05"), tmp_path / "lora").run_dir
    merged, _ = load_trained_model(source)
    merge_adapters(merged)
    follow = tiny_recipe("gpt", *COMMON, f"init.from_run={source}")  # a full fine-tune of it
    start, _ = starting_model(follow, data_spec(follow))
    assert prepare_model(follow.plugins, start) == {}  # as build_run prepares it: nothing to add to model.json
    assert start.state_dict().keys() == merged.state_dict().keys()
    assert all(torch.equal(start.state_dict()[n], v) for n, v in merged.state_dict().items())
    assert all(p.requires_grad for p in start.parameters())


def test_plan_counts_gradients_and_optimiser_state_of_the_adapters_only():
    full = tiny_recipe("gpt", "optim.name=adamw", "model.n_embd=64", "model.n_layer=2", "model.tie_weights=false")
    lora = with_plugins(full, {**LORA, "targets": ["q", "k", "v", "proj", "fc"]})
    plans = [plan(r, gpus=2, gpu_memory="1GB") for r in (full, lora)]
    a, b = (p.layouts for p in plans)
    single_full, single_lora = a[0].memory, b[0].memory
    adapters = 2 * (4 * 3 * (64 + 64) + 4 * (64 + 64) + 4 * (64 + 256) + 4 * (256 + 64))  # per layer: A + B
    assert single_lora.params == single_full.params + 4 * adapters  # the adapters are parameters too
    assert single_lora.grads == 4 * adapters  # gradients and optimiser state of the adapters alone
    assert single_lora.optimizer == 8 * adapters + 4 * 24  # and a step count per tensor (2 layers x 6 x A, B)
    assert single_full.grads == single_full.params
    assert single_lora.total < single_full.total - single_full.grads
    ddp_full, ddp_lora = (next(lay for lay in layouts if lay.strategy == "ddp") for layouts in (a, b))
    assert ddp_full.memory.total - ddp_lora.memory.total > 2 * single_full.grads  # buckets and state shrink too
    assert f"{adapters:,} of the {single_lora.params // 4:,} parameters train" in plans[1].notes[-1]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_on_two_ranks_equals_one_process_with_the_same_global_batch(tmp_path, strategy):
    """2 gloo ranks x batch 2 x 2 accumulation steps = 1 process x batch 8, clipping included: the
    adapters exist before DDP registers its buckets and before FSDP shards the parameters."""
    import os
    import subprocess
    import sys

    common = ("train.max_steps=3", "optim.grad_clip=0.5", "eval.max_batches=2", "optim.name=sgd", "optim.lr=0.5")
    entry = {**LORA, "targets": ["q", "v", "fc"], "train_also": ["ln_f"]}
    recipe = lora_recipe(
        *common, "train.batch_size=2", "train.grad_accum=2", f"parallel.strategy={strategy}", entry=entry
    )
    (tmp_path / "two.yaml").write_text(recipe.to_yaml())
    command = [sys.executable, "-m", "ember", "train", str(tmp_path / "two.yaml"), "--run-dir", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, "--nproc", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    one = weights(train(lora_recipe(*common, "train.batch_size=8", entry=entry), tmp_path / "one").run_dir)
    two = weights(tmp_path / "two")
    assert one.keys() == two.keys() and any("lora_B" in n for n in two)
    worst = max((one[n] - two[n]).abs().max().item() for n in one)
    assert worst <= 1e-6, worst


def test_lora_on_llama_with_activation_checkpointing_equals_without(tmp_path):
    """llama's gate and up are targets too; blocks recomputed in the backward pass give the adapters
    the same gradients (the frozen embedding's output requires no gradient: non-reentrant checkpoints)."""
    raw = tiny_recipe("gpt", *COMMON, "train.max_steps=3").model_dump(mode="json")
    raw["model"] = {"name": "llama", "n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "block_size": 32}
    raw["plugins"] = [{**LORA, "targets": ["q", "v", "gate", "up", "proj"], "train_also": ["norm_f"]}]
    ends = []
    for checkpointing in (False, True):
        raw["train"]["activation_checkpointing"] = checkpointing
        ends.append(weights(train(recipe_from_dict(raw), tmp_path / str(checkpointing)).run_dir))
    assert sum("lora_B" in n for n in ends[0]) == 6 and all(torch.equal(ends[0][n], ends[1][n]) for n in ends[0])
    assert all(ends[1][n].abs().sum() > 0 for n in ends[1] if n.endswith("lora_B"))


def test_lora_with_ema_exports_the_average_of_its_adapters(tmp_path):
    recipe = with_plugins(
        tiny_recipe("gpt", *COMMON, "train.max_steps=3", "optim.lr=0.05"), LORA, {"name": "ema", "decay": 0.5}
    )
    end = weights(train(recipe, tmp_path / "r").run_dir)
    model, _ = load_trained_model(tmp_path / "r")
    assert all(torch.equal(model.state_dict()[n], end[n]) for n in end)
    assert all(end[n].abs().sum() > 0 for n in end if n.endswith("lora_B"))


@pytest.mark.slow
def test_an_fsdp_lora_checkpoint_of_two_ranks_resumes_in_one_process(tmp_path):
    """Invariant 5 with only the adapters in the checkpoint: saved sharded by 2 ranks, resumed on 1."""
    import os
    import subprocess
    import sys

    common = ("train.max_steps=4", "train.checkpoint_every=2", "optim.name=sgd", "optim.lr=0.5")
    whole = weights(train(lora_recipe(*common, "train.batch_size=4"), tmp_path / "whole").run_dir)
    recipe = lora_recipe(*common, "train.batch_size=2", "parallel.strategy=fsdp")
    (tmp_path / "two.yaml").write_text(recipe.to_yaml())
    run = tmp_path / "two"
    command = [
        sys.executable,
        "-m",
        "ember",
        "train",
        str(tmp_path / "two.yaml"),
        "--run-dir",
        str(run),
        "--nproc",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "model.safetensors").unlink()
    assert train(lora_recipe(*common, "train.batch_size=4"), run, resume="auto").step == 4
    resumed = weights(run)
    assert resumed.keys() == whole.keys()
    assert max((resumed[n] - whole[n]).abs().max().item() for n in whole) <= 1e-6


def test_pruning_and_quantising_a_lora_run_work_on_its_merged_weights(tmp_path):
    """An adapter's dense update would fill the pruned zeros again: compression merges first."""
    from ember.compress.prune import prune
    from ember.compress.quantize import quantize

    run = train(lora_recipe("train.max_steps=3", "optim.lr=1e-2"), tmp_path / "lora").run_dir
    merged = merge_adapters(load_trained_model(run)[0])
    x = torch.randint(0, 64, (2, 8))
    pruned, info = load_trained_model(prune(run, 0.5, out=tmp_path / "pruned").run)
    assert "lora" not in info and not adapted_layers(pruned)
    q = pruned.blocks[0].attn.q.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)  # the zeros stay zeros
    kept = q != 0
    assert torch.equal(q[kept], merged.blocks[0].attn.q.weight[kept])  # the merged weights, pruned
    int8, info = load_trained_model(quantize(run, out=tmp_path / "int8").run)
    assert "lora" not in info and not adapted_layers(int8)
    torch.testing.assert_close(int8(x), merged(x), atol=0.05, rtol=0.05)
