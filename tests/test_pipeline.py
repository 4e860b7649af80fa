"""Pipeline parallelism (ember.training.pipeline): splitting a GPT or a Llama into stages, and
2-process GPipe and 1F1B training on CPU (gloo) that must equal single-process
training on the same batches.

The 2-process part runs this file as a script under ``torch.distributed.run``
(one launch for all schedule variants: each launch costs ~10 s of start-up).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from ember.data.spec import IGNORE_INDEX
from ember.errors import EmberError
from ember.models.gpt import GPT, GPTConfig
from ember.models.llama import Llama, LlamaConfig
from ember.training.pipeline import GPTStage, LlamaStage, build_schedule, split_gpt, stage_blocks
from ember.training.tasks import count_targets, summed_loss

VOCAB, SEQ, N_MICRO, MICRO_BATCH, STEPS, CLIP, LR = 64, 16, 4, 2, 3, 0.5, 1e-3
# Variants run in the one launch: (name, schedule kind, activation checkpointing, model).
VARIANTS = [
    ("gpipe", "gpipe", False, "gpt"),
    ("1f1b", "1f1b", False, "gpt"),
    ("1f1b-ckpt", "1f1b", True, "gpt"),
    ("llama-1f1b-ckpt", "1f1b", True, "llama"),
]


def tiny_gpt(n_layer: int = 3, tie: bool = False, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, block_size=SEQ, dropout=0.0, tie_weights=tie)
    return GPT(cfg, vocab_size=VOCAB)


def tiny_llama(n_layer: int = 3, tie: bool = False, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig(n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32, block_size=SEQ, tie_weights=tie)
    return Llama(cfg, vocab_size=VOCAB)


TINY = {"gpt": tiny_gpt, "llama": tiny_llama}


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS batches of N_MICRO micro-batches, concatenated. Each micro-batch ignores a
    different number of targets, so a per-micro-batch mean would differ from the
    loop's normalisation by the step's target count."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randint(0, VOCAB, (N_MICRO * MICRO_BATCH, SEQ), generator=gen)
        y = torch.randint(0, VOCAB, (N_MICRO * MICRO_BATCH, SEQ), generator=gen)
        for m in range(N_MICRO):
            y[m * MICRO_BATCH, : 3 * m] = IGNORE_INDEX
        out.append((x, y))
    return out


# --------------------------------------------------------------------------- splitting (one process)


@pytest.mark.parametrize("n_layer,n_stages", [(1, 1), (4, 2), (5, 2), (7, 3), (8, 8), (10, 4)])
def test_stage_blocks_are_contiguous_even_and_cover_every_block(n_layer, n_stages):
    ranges = stage_blocks(n_layer, n_stages)
    assert len(ranges) == n_stages
    assert [i for r in ranges for i in r] == list(range(n_layer))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # extras on the early stages, not the LM-head one
    assert stage_blocks(5, 2) == [range(0, 3), range(3, 5)]


def test_tied_weights_are_refused_with_the_fix():
    with pytest.raises(EmberError, match=r"model\.tie_weights=false") as err:
        split_gpt(tiny_gpt(tie=True), n_stages=2, stage_index=0)
    assert "first stage" in str(err.value) and "last" in str(err.value)
    assert isinstance(split_gpt(tiny_gpt(tie=True), 1, 0), GPTStage)  # one stage keeps the tie
    with pytest.raises(EmberError, match=r"the Llama ties its LM head.*model\.tie_weights=false"):
        split_gpt(tiny_llama(tie=True), n_stages=2, stage_index=0)
    assert isinstance(split_gpt(tiny_llama(), 2, 1), LlamaStage)


def test_what_cannot_be_split_is_refused():
    with pytest.raises(EmberError, match="at least one block"):
        split_gpt(tiny_gpt(n_layer=2), n_stages=3, stage_index=0)
    with pytest.raises(EmberError, match="supports models gpt and llama only"):
        split_gpt(torch.nn.Linear(4, 4), 2, 0)
    with pytest.raises(EmberError, match="does not exist"):
        split_gpt(tiny_gpt(), n_stages=2, stage_index=2)


def test_schedules_that_cannot_run_are_refused_before_any_communication():
    stage = split_gpt(tiny_gpt(), 2, 0)
    with pytest.raises(EmberError, match="at least as many micro-batches as stages"):
        build_schedule(stage, 0, 4, torch.device("cpu"), n_microbatches=2, kind="1f1b")
    with pytest.raises(EmberError, match="gpipe"):
        build_schedule(stage, 0, 2, torch.device("cpu"), n_microbatches=2, kind="zb")


def test_stage_state_dicts_partition_the_full_state_dict():
    full = tiny_gpt(n_layer=5).state_dict()
    stages = [split_gpt(tiny_gpt(n_layer=5), 3, s).state_dict() for s in range(3)]
    keys = [set(sd) for sd in stages]
    assert set().union(*keys) == set(full)
    assert sum(len(k) for k in keys) == len(full)  # disjoint
    assert "tok_emb.weight" in keys[0] and "lm_head.weight" in keys[2] and "blocks.4.attn.q.weight" in keys[2]
    assert keys[1] == {k for k in full if k.startswith(("blocks.2.", "blocks.3."))}
    for sd in stages:  # same names, same values: a full checkpoint loads into any stage
        assert all(torch.equal(sd[k], full[k]) for k in sd)


@pytest.mark.parametrize("kind,checkpointing", [("gpt", False), ("gpt", True), ("llama", True)])
def test_stages_chained_in_one_process_are_the_full_model(kind, checkpointing):
    x, y = batches()[0]
    full = TINY[kind]()
    summed_loss(full(x), y).backward()
    model = TINY[kind]()
    model.grad_checkpointing = checkpointing
    stages = [split_gpt(model, 2, s) for s in range(2)]
    calls = []
    if checkpointing:  # run_blocks must go through torch.utils.checkpoint
        real = torch.utils.checkpoint.checkpoint
        torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        summed_loss(stages[1](stages[0](x)), y).backward()
    finally:
        if checkpointing:
            torch.utils.checkpoint.checkpoint = real
    assert len(calls) == (3 if checkpointing else 0)
    grads = {n: p.grad for s in stages for n, p in s.named_parameters()}
    assert grads.keys() == dict(full.named_parameters()).keys()
    assert max((grads[n] - p.grad).abs().max().item() for n, p in full.named_parameters()) < 1e-6


# --------------------------------------------------------------------------- 2 processes


def reference_run(kind: str = "gpt") -> dict:
    """Single-process training of the full model on the same batches, normalised as the loop does."""
    model = TINY[kind]()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses, norms, first_grads = [], [], {}
    for step, (x, y) in enumerate(batches()):
        opt.zero_grad(set_to_none=True)
        loss = summed_loss(model(x), y) / count_targets(y)
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        losses.append(loss.item())
        opt.step()
    model.eval()
    x, y = batches()[0]
    with torch.no_grad():
        logits = model(x)
    return {
        "weights": model.state_dict(),
        "losses": losses,
        "norms": norms,
        "grads": first_grads,
        "eval_logits": logits,
        "eval_loss": summed_loss(logits, y).item(),
    }


def worker(out: Path) -> None:
    """One rank of the 2-stage pipeline: trains every variant, writes what it saw to ``out``."""
    import torch.distributed as dist

    from ember.training.pipeline import build_schedule, clip_grad_norm_across, pipeline_eval, pipeline_step

    dist.init_process_group("gloo")
    rank, n_stages = dist.get_rank(), dist.get_world_size()
    for name, kind, checkpointing, model_kind in VARIANTS:
        model = TINY[model_kind]()
        model.grad_checkpointing = checkpointing
        stage = split_gpt(model, n_stages, rank)
        schedule = build_schedule(stage, rank, n_stages, torch.device("cpu"), N_MICRO, kind)
        opt = torch.optim.AdamW(stage.parameters(), lr=LR, weight_decay=0.1)
        losses, norms, first_grads = [], [], {}
        start = time.perf_counter()
        for step, (x, y) in enumerate(batches()):
            opt.zero_grad(set_to_none=True)
            losses.append(pipeline_step(schedule, rank, n_stages, x, y).item())
            if step == 0:
                first_grads = {n: p.grad.clone() for n, p in stage.named_parameters()}
            norms.append(clip_grad_norm_across(stage.parameters(), CLIP).item())
            opt.step()
            if step == 0:  # a validation mid-run: switching the schedule to eval and back must not disturb training
                stage.eval()
                pipeline_eval(schedule, rank, n_stages, x, y)
                stage.train()
        seconds = time.perf_counter() - start
        stage.eval()
        x, y = batches()[0]
        logits, eval_loss = pipeline_eval(schedule, rank, n_stages, x, y)
        torch.save(
            {
                "weights": stage.state_dict(),
                "losses": losses,
                "norms": norms,
                "grads": first_grads,
                "eval_logits": logits,
                "eval_loss": eval_loss.item(),
                "seconds": seconds,
            },
            out / f"{name}.rank{rank}.pt",
        )
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pp")
    from conftest import run_on_two_ranks  # here: this file also runs as the ranks' script

    run_on_two_ranks(__file__, str(out))
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_two_stage_pipeline_trains_exactly_like_one_process(pipeline_runs, variant):
    model_kind = next(v[3] for v in VARIANTS if v[0] == variant)
    ref = reference_run(model_kind)
    ranks = [torch.load(pipeline_runs / f"{variant}.rank{r}.pt", weights_only=False) for r in range(2)]
    # Gradients straight from the schedule, before AdamW (which would hide a constant
    # gradient scale, e.g. an extra division by the micro-batch count).
    assert max_diff({**ranks[0]["grads"], **ranks[1]["grads"]}, ref["grads"]) < 1e-6
    for r in ranks:  # every stage reports the step loss and the all-stage gradient norm
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-6)
        assert r["norms"] == pytest.approx(ref["norms"], rel=1e-5)
    assert min(ref["norms"]) > CLIP  # clipping did act in every step
    weights = {**ranks[0]["weights"], **ranks[1]["weights"]}
    assert max_diff(weights, ref["weights"]) < 1e-5
    assert max_diff(ref["weights"], TINY[model_kind]().state_dict()) > 1e-3  # training moved the weights
    # Forward-only evaluation after training: logits and summed loss on the last stage only.
    assert ranks[0]["eval_logits"] is None
    assert (ranks[1]["eval_logits"] - ref["eval_logits"]).abs().max().item() < 1e-5
    assert ranks[1]["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)


if __name__ == "__main__":  # one rank of the 2-process launch above
    worker(Path(sys.argv[1]))
    os._exit(0)  # skip interpreter shutdown, where gloo's threads sometimes abort (see ember/__main__.py)
