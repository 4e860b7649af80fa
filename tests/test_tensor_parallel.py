"""Tensor parallelism (ember.training.tensor_parallel) on 2 CPU processes (gloo).

The multi-process checks run once: this file, started as a script under
``torch.distributed.run``, runs every check on both ranks and rank 0 writes the
measured differences to a JSON file that the tests below read.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.gpt import GPT, GPTConfig
from ember.models.layers import Block
from ember.models.llama import Llama, LlamaConfig
from ember.models.seq2seq import Seq2Seq, Seq2SeqConfig
from ember.models.vit import ViT, ViTConfig
from ember.training.grad_norm import grad_norm_, total_grad_norm
from ember.training.optim import split_decay
from ember.training.tensor_parallel import apply_tensor_parallel, separate_dtensor_groups, tp_problem

S2S = DataSpec("seq2seq", vocab_size=20, seq_len=10, src_len=12, pad_id=0, bos_id=1, eos_id=2)


def tiny_gpt(tie: bool = True, n_head: int = 2, n_embd: int = 32, dropout: float = 0.0) -> GPT:
    cfg = GPTConfig(n_layer=2, n_head=n_head, n_embd=n_embd, block_size=16, dropout=dropout, tie_weights=tie)
    return GPT(cfg, vocab_size=64)


# --------------------------------------------------------------------------- unit tests, one process


def test_a_model_without_blocks_is_refused():
    problem = tp_problem(nn.Sequential(nn.Linear(4, 4)), 2)
    assert "gpt, llama, vit or seq2seq" in problem and "ddp or fsdp" in problem
    with pytest.raises(EmberError, match="gpt, llama, vit or seq2seq"):
        # Refused before the mesh is used, so a stand-in mesh will do.
        apply_tensor_parallel(nn.Linear(4, 4), SimpleNamespace(ndim=1, size=lambda: 2))


def test_a_tp_degree_must_divide_the_heads():
    problem = tp_problem(tiny_gpt(n_head=3, n_embd=48), 2)
    assert "does not divide n_head=3" in problem and "model.n_head" in problem
    assert "n_head=2" in tp_problem(tiny_gpt(), 4)
    assert tp_problem(tiny_gpt(), 2) is None and tp_problem(tiny_gpt(), 1) is None
    assert tp_problem(Seq2Seq(Seq2SeqConfig(n_head=4, n_embd=32), S2S), 4) is None


def tiny_llama(n_kv_head: int = 2, **fields) -> Llama:
    cfg = LlamaConfig(n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32, ffn_hidden=64, block_size=16, **fields)
    return Llama(cfg, vocab_size=64)


def test_a_tp_degree_must_divide_the_key_value_heads_too():
    problem = tp_problem(tiny_llama(n_kv_head=1), 2)
    assert "does not divide n_kv_head=1" in problem and "model.n_kv_head" in problem
    assert tp_problem(tiny_llama(n_kv_head=2), 2) is None
    assert "n_head=4" in tp_problem(tiny_llama(), 8)
    with pytest.raises(EmberError, match="n_kv_head=1"):
        apply_tensor_parallel(tiny_llama(n_kv_head=1), SimpleNamespace(ndim=1, size=lambda: 2))


def test_grad_norm_equals_torch_on_plain_parameters():
    torch.manual_seed(0)
    a, b = tiny_gpt(), tiny_gpt()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 64, (2, 8))
    for m in (a, b):
        m(x).square().mean().backward()
    expected = torch.nn.utils.clip_grad_norm_(a.parameters(), 1e-3)
    assert total_grad_norm(b.parameters()).item() == pytest.approx(expected.item(), rel=1e-6)
    assert grad_norm_(b.parameters(), 1e-3).item() == pytest.approx(expected.item(), rel=1e-6)
    assert max((p.grad - q.grad).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) < 1e-9
    groups = [{"params": list(a.parameters()), "weight_decay": 0.1}]
    assert separate_dtensor_groups(groups) == groups  # nothing sharded: nothing to split


# --------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def tp(tmp_path_factory) -> dict:
    """Launch this file on 2 gloo ranks once; the measured differences, from rank 0."""
    out = tmp_path_factory.mktemp("tp") / "results.json"
    from conftest import run_on_two_ranks  # here: this file also runs as the ranks' script

    run_on_two_ranks(__file__, str(out))
    return json.loads(out.read_text())


def test_a_tensor_parallel_block_equals_the_unsharded_block(tp):
    r = tp["block"]
    assert r["sharded"] == [
        "attn.k",
        "attn.proj",
        "attn.q",
        "attn.v",
        "cross.k",
        "cross.proj",
        "cross.q",
        "cross.v",
        "mlp.fc",
        "mlp.proj",
    ]
    assert r["out"] <= 1e-6 and r["grad_x"] <= 1e-6 and r["grad_memory"] <= 1e-6
    assert r["grads"] <= 1e-6 and r["n_grads"] == 26  # every weight and bias of the block


@pytest.mark.parametrize("tie", [True, False])
def test_tensor_parallel_gpt_trains_like_the_unsharded_one(tp, tie):
    """3 AdamW steps with gradients clipped to norm 0.5: the same weights and grad norms."""
    r = tp[f"gpt_tie_{tie}"]
    assert min(r["ref_norms"]) > 0.5  # the clipping did act
    assert r["norm"] <= 1e-6 * max(r["ref_norms"]) and r["loss"] <= 1e-5
    assert r["weights"] <= 1e-5 and r["full_state_dict_plain"]
    assert r["replicated_grads_across_ranks"] == 0.0  # no all-reduce over the tp group needed
    assert r["reloaded_forward"] <= 1e-6  # set_model_state_dict puts full tensors back into the shards


def test_seq2seq_and_vit_forward_equal_the_unsharded_models(tp):
    assert tp["seq2seq"]["out"] <= 1e-6 and tp["seq2seq"]["grads"] <= 1e-6
    assert tp["vit"]["out"] <= 1e-6


def test_tensor_parallel_llama_equals_the_unsharded_one(tp):
    """Grouped-query attention (4 query heads, 2 key/value heads: one group per rank), qkv biases,
    a sliding window, SwiGLU; checkpointed blocks; 2 AdamW steps."""
    r = tp["llama"]
    assert r["sharded"] == ["attn.k", "attn.proj", "attn.q", "attn.v", "mlp.gate", "mlp.proj", "mlp.up"]
    assert r["kv_rows_per_rank"] == 8  # one key/value head of head_dim 8 each
    assert r["out"] <= 1e-5 and r["grads"] <= 1e-6 and r["weights"] <= 1e-5


def test_dropout_needs_the_same_seed_on_a_tp_group(tp):
    r = tp["dropout"]
    assert r["same_seed_across_ranks"] == 0.0
    assert r["rank_seed_across_ranks"] > 1e-3  # different masks: the replicas no longer agree


def test_torch_clip_grad_norm_rejects_the_mixed_model(tp):
    """Why grad_norm_ exists; when torch learns this, grad_norm_ can go."""
    assert "mixed torch.Tensor and DTensor" in tp["torch_clip_error"]


# --------------------------------------------------------------------------- the worker (each rank)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    return max(((a[k] - b[k]).abs().max().item() for k in a), default=0.0)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def across_ranks(t: torch.Tensor) -> float:
    """The largest difference between this tensor on rank 0 and on any other rank."""
    import torch.distributed as dist

    copies = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, t.contiguous())
    return max((c - copies[0]).abs().max().item() for c in copies)


def plain_grads(model: nn.Module) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return torch.cat([p.grad.flatten() for p in model.parameters() if not isinstance(p, DTensor)])


def check_block(mesh) -> dict:
    """A decoder block (self- and cross-attention, MLP): output, input and parameter gradients."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    ref = Block(32, 4, 0.0, causal=True, cross=True)
    for name, p in ref.named_parameters():  # biases start at zero; random ones test their sharding too
        if name.endswith("bias"):
            nn.init.normal_(p, std=0.02)
    block = apply_tensor_parallel(copy.deepcopy(ref), mesh)
    x, memory, upstream = torch.randn(2, 6, 32), torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    memory_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]
    result = {}
    for name, m in (("ref", ref), ("tp", block)):
        xi, mi = x.clone().requires_grad_(), memory.clone().requires_grad_()
        out = m(xi, None, mi, memory_mask)
        (out * upstream).mean().backward()  # a mean, as a loss is: gradients of order 1e-2
        result[name] = (out.detach(), xi.grad, mi.grad)
    grads = {n: full(p.grad) for n, p in block.named_parameters()}
    sharded = sorted({n.rsplit(".", 1)[0] for n, p in block.named_parameters() if isinstance(p, DTensor)})
    return {
        "out": (result["tp"][0] - result["ref"][0]).abs().max().item(),
        "grad_x": (result["tp"][1] - result["ref"][1]).abs().max().item(),
        "grad_memory": (result["tp"][2] - result["ref"][2]).abs().max().item(),
        "grads": max_diff(grads, {n: p.grad for n, p in ref.named_parameters()}),
        "n_grads": len(grads),
        "largest_grad": max(p.grad.abs().max().item() for p in ref.parameters()),
        "sharded": sharded,
    }


def check_gpt_training(mesh, tie: bool) -> dict:
    """3 clipped AdamW steps, TP vs unsharded; tie=True uses the foreach kernels (CUDA's default)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    torch.manual_seed(0)
    ref = tiny_gpt(tie)
    model = apply_tensor_parallel(copy.deepcopy(ref), mesh)
    model.grad_checkpointing = not tie  # recomputation through DTensor layers too

    def adamw(m: nn.Module, foreach):
        decay, no_decay = split_decay(m)
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        # lr 1e-3: Adam's first step moves a weight by ~lr whatever its gradient, so a gradient
        # near eps (1e-8) turns float32 rounding (1e-9) into a visible difference (2e-5 at lr 1e-2).
        return torch.optim.AdamW(separate_dtensor_groups(groups), lr=1e-3, foreach=foreach)

    foreach = True if tie else None
    opt_ref, opt = adamw(ref, None), adamw(model, foreach)
    r = {"ref_norms": [], "norm": 0.0, "loss": 0.0, "replicated_grads_across_ranks": 0.0}
    for _ in range(3):
        x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
        losses = []
        for m, opt_m in ((ref, opt_ref), (model, opt)):
            opt_m.zero_grad()
            loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
            loss.backward()
            losses.append(loss.item())
            if m is ref:
                norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            else:
                spread = across_ranks(plain_grads(model))
                r["replicated_grads_across_ranks"] = max(r["replicated_grads_across_ranks"], spread)
                norm = grad_norm_(model.parameters(), 0.5, foreach=foreach)
            opt_m.step()
        r["ref_norms"].append(norm_ref.item())
        r["norm"] = max(r["norm"], abs(norm.item() - norm_ref.item()))
        r["loss"] = max(r["loss"], abs(losses[1] - losses[0]))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    r["full_state_dict_plain"] = all(type(t) is torch.Tensor for t in state.values())
    r["weights"] = max_diff(state, ref.state_dict())
    torch.manual_seed(1)  # other weights, then the trained ones loaded into the shards
    fresh = apply_tensor_parallel(tiny_gpt(tie), mesh)
    set_model_state_dict(fresh, ref.state_dict(), options=StateDictOptions(full_state_dict=True))
    x = torch.randint(0, 64, (2, 16))
    r["reloaded_forward"] = (fresh(x) - ref(x)).abs().max().item()
    return r


def check_llama(mesh) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    ref = tiny_llama(qkv_bias=True, sliding_window=5)
    model = apply_tensor_parallel(copy.deepcopy(ref), mesh)
    model.grad_checkpointing = True
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, model)]
    r = {"out": 0.0, "grads": 0.0}
    for _ in range(2):
        x, y = torch.randint(0, 64, (3, 12)), torch.randint(0, 64, (3, 12))
        outs = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            out = m(x)
            F.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
            outs.append(out.detach())
        grads = {n: full(p.grad) for n, p in model.named_parameters()}
        r["out"] = max(r["out"], (outs[1] - outs[0]).abs().max().item())
        r["grads"] = max(r["grads"], max_diff(grads, {n: p.grad for n, p in ref.named_parameters()}))
        for opt in opts:
            opt.step()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    r["weights"] = max_diff(state, ref.state_dict())
    block = model.blocks[0]
    r["sharded"] = sorted({n.rsplit(".", 1)[0] for n, p in block.named_parameters() if isinstance(p, DTensor)})
    r["kv_rows_per_rank"] = block.attn.k.weight.to_local().size(0)
    return r


def check_seq2seq(mesh) -> dict:
    torch.manual_seed(0)
    ref = Seq2Seq(Seq2SeqConfig(n_encoder_layer=1, n_decoder_layer=2, n_head=2, n_embd=32, max_len=16), S2S)
    model = apply_tensor_parallel(copy.deepcopy(ref), mesh)
    src, tgt = torch.randint(3, 20, (3, 12)), torch.randint(3, 20, (3, 10))
    src[1, 7:] = S2S.pad_id  # the key mask reaches the sharded heads
    outs = []
    for m in (ref, model):
        out = m(src, tgt)
        out.square().mean().backward()
        outs.append(out.detach())
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    return {
        "out": (outs[1] - outs[0]).abs().max().item(),
        "grads": max_diff(grads, {n: p.grad for n, p in ref.named_parameters()}),
    }


def check_vit(mesh) -> dict:
    torch.manual_seed(0)
    ref = ViT(ViTConfig(patch_size=2, n_layer=1, n_head=2, n_embd=32), (1, 8, 8), 5)
    model = apply_tensor_parallel(copy.deepcopy(ref), mesh)
    x = torch.randn(2, 1, 8, 8)
    return {"out": (model(x) - ref(x)).abs().max().item()}


def check_dropout(mesh, rank: int) -> dict:
    """Train-mode logits on the two ranks, dropout seeded alike vs by global rank."""
    torch.manual_seed(0)
    model = apply_tensor_parallel(tiny_gpt(dropout=0.2), mesh).train()
    x = torch.randint(0, 64, (2, 16))
    r = {}
    for name, seed in (("same_seed_across_ranks", 7), ("rank_seed_across_ranks", 7 + rank)):
        torch.manual_seed(seed)
        r[name] = across_ranks(model(x).detach())
    return r


def check_torch_clip(mesh) -> str:
    torch.manual_seed(0)
    model = apply_tensor_parallel(tiny_gpt(), mesh)
    model(torch.randint(0, 64, (2, 8))).square().mean().backward()
    try:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    except RuntimeError as e:
        return str(e)
    return ""


def worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        results = {
            "block": check_block(mesh),
            "gpt_tie_True": check_gpt_training(mesh, tie=True),
            "gpt_tie_False": check_gpt_training(mesh, tie=False),
            "seq2seq": check_seq2seq(mesh),
            "llama": check_llama(mesh),
            "vit": check_vit(mesh),
            "dropout": check_dropout(mesh, rank),
            "torch_clip_error": check_torch_clip(mesh),
        }
        if rank == 0:
            out.write_text(json.dumps(results, indent=1))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    os._exit(0)  # skip interpreter shutdown, where gloo's threads sometimes abort (see ember/__main__.py)
