"""ember plan: counts against real models, fake-tensor memory against real CPU tensors and
the CPU allocator, the layout formulas, the recommendation and the errors."""

from __future__ import annotations

import contextlib
import glob
import math
import time
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import sample_data_overrides, tiny_recipe
from ember.config import load_recipe, recipe_from_dict
from ember.errors import EmberError
from ember.models.registry import build_model
from ember.plan import (
    HEADROOM,
    allocator_peak,
    check_memory,
    data_spec,
    format_plan,
    measure_step,
    model_facts,
    parse_memory,
    plan,
    predicted_run_bytes,
    reference_step,
)
from ember.plugins import prepare_model
from ember.training.optim import build_optimizer
from ember.training.tasks import FORWARD, summed_loss

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(glob.glob(str(ROOT / "recipes" / "*.yaml")))
GIB = 2**30


def gpt(*overrides: str):
    """A small GPT on a 2048-token BPE (the data is never prepared: plan reads the recipe only)."""
    base = [
        "data.tokenizer=bpe",
        "data.vocab_size=2048",
        "data.seq_len=128",
        "model.block_size=128",
        "model.n_layer=2",
        "model.n_embd=128",
        "model.n_head=4",
        "train.batch_size=8",
    ]
    return tiny_recipe("gpt", *base, *overrides)


def llama(*overrides: str):
    """The same size of Llama, with grouped-query attention (4 query heads, 2 key/value heads)."""
    return gpt("model.name=llama", "model.n_kv_head=2", *overrides)


def big_gpt(*overrides: str):
    """48 layers x 6400 wide, 2048 tokens of context: about 24 B parameters."""
    return gpt(
        "model.n_layer=48",
        "model.n_embd=6400",
        "model.n_head=64",
        "model.block_size=2048",
        "data.seq_len=2048",
        "data.vocab_size=50304",
        "train.precision=bf16",
        "train.batch_size=16",
        *overrides,
    )


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: Path(p).stem)
def test_params_equal_a_real_cpu_model_for_each_shipped_recipe(path, tmp_path):
    recipe = load_recipe(path, sample_data_overrides(path, tmp_path))
    real = build_model(recipe.model, data_spec(recipe), recipe.objective)
    prepare_model(recipe.plugins, real)  # as a run prepares it: LoRA's adapters are parameters too
    p = plan(recipe)
    assert p.params == sum(t.numel() for t in real.parameters())
    assert p.flops_per_item == pytest.approx(real.flops_per_item())
    per_sample = ("digits", "captions", "text", "table")  # classifiers: FLOPs per sample, else per token
    assert p.item == ("sample" if any(word in path for word in per_sample) else "token")


@pytest.mark.parametrize("path", [p for p in RECIPES if "digits" in p or "addition" in p], ids=lambda p: Path(p).stem)
def test_data_spec_from_the_recipe_equals_the_built_data(path):
    from ember.data.build import build_sets

    recipe = load_recipe(path)
    assert data_spec(recipe) == build_sets(recipe.data, recipe.objective).spec


@pytest.mark.slow
def test_data_spec_of_the_demo_equals_its_prepared_data():
    from ember.data.build import DATASETS

    recipe = load_recipe(ROOT / "recipes" / "gpt-tiny.yaml")
    assert data_spec(recipe) == DATASETS[recipe.data.name](recipe.data).spec


def test_state_bytes_equal_real_tensors_after_an_adamw_step():
    recipe = gpt()
    memory = plan(recipe).layouts[0].memory
    model = build_model(recipe.model, data_spec(recipe))
    optimizer = build_optimizer(model, recipe.optim)
    x = torch.randint(0, 2048, (2, 128))
    summed_loss(model(x), x).backward()
    optimizer.step()
    nbytes = lambda ts: sum(t.untyped_storage().nbytes() for t in ts)  # noqa: E731
    assert memory.params == nbytes(model.parameters())
    assert memory.grads == nbytes(p.grad for p in model.parameters())
    assert memory.optimizer == nbytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


# --------------------------------------------------------------------------- fake tensors against real ones


def real_saved_bytes(model, spec, micro_batch: int, precision: str) -> int:
    """What autograd saves on a real CPU forward: unique storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    kept = []  # keep every packed tensor alive so that no storage address is reused

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        kept.append(t)
        return t

    from ember.training.memory_trace import _dummy_batch

    cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        logits, targets = FORWARD[spec.task](model, _dummy_batch(spec, micro_batch))
        summed_loss(logits, targets)
    return sum(seen.values())


CASES = [
    ("gpt", "fp32", False),
    ("gpt", "bf16", False),
    ("gpt", "fp32", True),
    ("gpt", "bf16", True),
    ("llama", "fp32", False),
    ("llama", "bf16", True),
    ("seq2seq", "fp32", False),
    ("vit", "bf16", False),
    ("cnn", "fp32", False),
    ("cnn", "bf16", True),
]


@pytest.mark.parametrize("kind,precision,ckpt", CASES, ids=lambda v: str(v))
def test_fake_saved_bytes_equal_a_real_cpu_forward(kind, precision, ckpt):
    recipe = {
        "gpt": gpt(),
        "llama": llama(),
        "seq2seq": load_recipe(ROOT / "recipes/seq2seq-addition.yaml"),
        "vit": load_recipe(ROOT / "recipes/vit-digits.yaml"),
        "cnn": load_recipe(ROOT / "recipes/cnn-digits.yaml"),
    }[kind]
    spec = data_spec(recipe)
    with FakeTensorMode():
        fake = build_model(recipe.model, spec)
        fake.grad_checkpointing = ckpt
        measured = measure_step(fake, spec, 4, precision).saved
    real = build_model(recipe.model, spec)
    real.grad_checkpointing = ckpt
    real.train()
    expected = real_saved_bytes(real, spec, 4, precision)
    print(f"{kind} {precision} ckpt={ckpt}: fake {measured:,} B, real {expected:,} B")
    assert measured == pytest.approx(expected, rel=0.01)


def test_memory_is_affine_in_the_micro_batch():
    recipe = gpt("train.precision=bf16")
    spec = data_spec(recipe)
    with FakeTensorMode():
        model = build_model(recipe.model, spec)
        one, two, eight = (measure_step(model, spec, b, "bf16") for b in (1, 2, 8))
    guess = one.at(two, 8)
    assert guess.saved == pytest.approx(eight.saved, rel=0.01)
    assert guess.peak() == pytest.approx(eight.peak(), rel=0.01)
    # Affine, not proportional: the bf16 weight copies do not grow with the batch.
    assert one.saved_weight == eight.saved_weight > 0
    assert eight.saved - eight.saved_weight == pytest.approx(8 * (one.saved - one.saved_weight), rel=0.01)


def test_activation_checkpointing_saves_less():
    plain, ckpt = (plan(gpt(f"train.activation_checkpointing={c}")).layouts[0].memory for c in ("false", "true"))
    print(f"activations: {plain.activations:,} B plain, {ckpt.activations:,} B checkpointed")
    assert ckpt.activations < plain.activations / 2
    assert ckpt.total < plain.total


# --------------------------------------------------------------------------- the prediction against the CPU allocator


def two_training_steps(recipe) -> None:
    """Build, then two optimiser steps as ember's loop takes them; the second is the peak."""
    spec = data_spec(recipe)
    model = build_model(recipe.model, spec)
    model.grad_checkpointing = recipe.train.activation_checkpointing
    optimizer = build_optimizer(model, recipe.optim)
    for _ in range(2):
        tokens = torch.randint(0, spec.vocab_size, (recipe.train.batch_size, spec.seq_len + 1))
        reference_step(model, optimizer, tokens, recipe.train.precision, recipe.optim.grad_clip)


@pytest.mark.parametrize(
    "kind,precision,ckpt",
    [("gpt", "fp32", "false"), ("gpt", "bf16", "false"), ("gpt", "fp32", "true"), ("llama", "fp32", "false")],
)
def test_predicted_total_matches_the_cpu_allocator_peak_of_a_real_step(kind, precision, ckpt):
    # The allocator sees every tensor byte (the CPU allocator does not cache), so the
    # fake-tensor timeline should land within a fraction of a per cent; 2 % leaves room for
    # the data batch and small temporaries of clipping and the optimiser.
    recipe = {"gpt": gpt, "llama": llama}[kind](
        f"train.precision={precision}", f"train.activation_checkpointing={ckpt}"
    )
    predicted = plan(recipe).layouts[0].memory.total
    measured = allocator_peak(lambda: two_training_steps(recipe))
    print(
        f"{precision} ckpt={ckpt}: predicted {predicted / 1e6:.2f} MB, measured {measured / 1e6:.2f} MB "
        f"({predicted / measured - 1:+.2%})"
    )
    assert predicted == pytest.approx(measured, rel=0.02)


# --------------------------------------------------------------------------- layouts


def by_strategy(p) -> dict:
    return {lay.strategy: lay for lay in p.layouts}


def test_sharded_layouts_hold_their_share():
    recipe = gpt("model.n_layer=8", "model.n_embd=256", "model.n_head=8", "train.batch_size=4")
    p = plan(recipe, gpus=4)
    lay = by_strategy(p)
    single, fsdp, tp, pp = lay["single"].memory, lay["fsdp"].memory, lay["tp"].memory, lay["pp"].memory
    assert lay["fsdp"].dp == lay["tp"].tp == lay["pp"].pp == 4
    for part in ("params", "grads", "optimizer"):
        assert getattr(fsdp, part) == pytest.approx(getattr(single, part) / 4, rel=1e-3)
        assert getattr(tp, part) < getattr(single, part) / 2  # the blocks split, the embeddings whole
        assert getattr(pp, part) < getattr(single, part) / 2  # two of eight blocks per stage
    facts = model_facts(build_model(recipe.model, data_spec(recipe)), recipe, data_spec(recipe))
    gathered = 4 * (facts.other_params + 3 * facts.largest_block)  # root + two blocks + one block's grads, fp32
    assert fsdp.other >= gathered
    assert fsdp.activations == single.activations
    assert tp.activations < single.activations
    assert lay["ddp"].memory.other == single.other + single.grads  # DDP's gradient buckets
    assert fsdp.total < lay["ddp"].memory.total


def test_llama_tensor_parallelism_needs_whole_key_value_heads():
    recipe = llama("model.n_layer=4", "model.n_head=8", "model.n_kv_head=2", "model.n_embd=256", "train.batch_size=4")
    p = plan(recipe, gpus=4)
    lay = by_strategy(p)
    assert "tp" not in lay and any("do not divide n_kv_head=2" in n for n in p.notes)
    assert lay["fsdp+tp"].tp == 2  # 2-way tp: one key/value head (and its 4 query heads) per rank
    two = by_strategy(plan(recipe, gpus=2))
    single, tp = two["single"].memory, two["tp"].memory
    for part in ("params", "grads", "optimizer"):
        assert getattr(tp, part) < 0.8 * getattr(single, part)  # the blocks split, the embeddings whole
    assert tp.activations < single.activations  # what q, k, v, attention and SwiGLU save is split too
    assert two["pp"].memory.params < single.params


def test_pipeline_holds_its_micro_batches_in_flight():
    recipe = gpt("model.n_layer=8", "train.batch_size=8", "train.grad_accum=8")
    pp = by_strategy(plan(recipe, gpus=4))["pp"]
    assert pp.micro_batch == 8 and "8 micro-batches" in pp.note and "1F1B" in pp.note
    assert pp.memory.overlap == 0  # gradients accumulate over the micro-batches


def test_a_small_model_on_one_gpu_is_planned_single():
    p = plan(gpt(), gpus=1, gpu_memory="24GB", gpu="l4")
    assert [lay.strategy for lay in p.layouts] == ["single"]
    assert p.recommended.strategy == "single" and p.recommended.micro_batch == 8
    assert p.recommended.memory.total < 0.01 * p.gpu_memory
    assert p.tokens_per_s_estimate == pytest.approx(0.4 * 60e12 / p.flops_per_item)


def test_a_24b_gpt_on_8_gpus_needs_sharding():
    p = plan(big_gpt(), gpus=8, gpu_memory="80GB", gpu="h100")
    lay = by_strategy(p)
    print(format_plan(p))
    assert 23e9 < p.params < 25e9
    assert not lay["single"].fits and not lay["ddp"].fits
    assert lay["single"].memory.params == 4 * p.params
    assert p.recommended is not None and p.recommended.strategy in ("fsdp", "tp", "fsdp+tp", "pp")
    assert p.recommended.memory.total <= HEADROOM * 80e9
    assert p.recommended.gpus == 8
    assert 0 < p.tokens_per_s_estimate < 8 * 989e12 / p.flops_per_item


def test_nothing_fits_says_so():
    p = plan(gpt(), gpus=1, gpu_memory="8MB")  # the fp32 state alone is 10.8 MB
    assert p.recommended is None and p.tokens_per_s_estimate is None
    assert any("activation_checkpointing" in n for n in p.notes)
    assert "no layout fits" in format_plan(p)


def test_format_plan_is_a_table():
    p = plan(gpt(), gpus=2)
    text = format_plan(p)
    assert "strategy" in text and "total" in text and "recommended: ddp" in text
    rows = [
        line for line in text.splitlines() if line.split(" ", 1)[0] in {"single", "ddp", "fsdp", "tp", "pp", "fsdp+tp"}
    ]
    assert len(rows) == len(p.layouts)


def test_recurrent_models_are_measured_on_real_cpu_tensors():
    p = plan(load_recipe(ROOT / "recipes/rnn-digits.yaml"), gpus=2)
    assert "real CPU tensors" in p.notes[0]
    assert any("no Transformer blocks" in n for n in p.notes)
    assert {lay.strategy for lay in p.layouts} == {"single", "ddp", "fsdp"}


def test_a_small_model_fake_tensors_cannot_trace_is_measured_on_the_cpu(monkeypatch):
    def refuse(self):
        raise NotImplementedError("no fake kernel")

    monkeypatch.setattr(FakeTensorMode, "__enter__", refuse)
    fallback = plan(gpt())
    monkeypatch.undo()
    assert "real CPU tensors (fake tensors failed: no fake kernel)" in fallback.notes[0]
    assert fallback.layouts[0].memory.total == pytest.approx(plan(gpt()).layouts[0].memory.total, rel=0.01)
    monkeypatch.setattr(FakeTensorMode, "__enter__", refuse)
    with pytest.raises(EmberError, match="too large"):
        plan(big_gpt())


# --------------------------------------------------------------------------- inputs and errors


@pytest.mark.parametrize(
    "text,expected",
    [
        ("80GB", 80 * 10**9),
        ("80GiB", 80 * GIB),
        ("24G", 24 * 10**9),
        ("512MB", 512 * 10**6),
        ("1.5 tib", int(1.5 * 2**40)),
        (" 40gb ", 40 * 10**9),
        (4096, 4096),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "80", "-1GB", "0GB", "80PB", "GB", 0])
def test_bad_memory_is_an_ember_error_naming_the_flag(text):
    with pytest.raises(EmberError, match="--gpu-memory"):
        parse_memory(text)


def test_bad_gpus_and_gpu_are_ember_errors():
    with pytest.raises(EmberError, match="--gpus"):
        plan(gpt(), gpus=0)
    with pytest.raises(EmberError, match="h100, h200") as err:
        plan(gpt(), gpu="v100")
    assert "'v100'" in str(err.value)
    assert plan(gpt(), gpu="H100-PCIe").gpu == "H100 PCIe"
    with pytest.raises(EmberError, match="--gpu-memory"):
        plan(gpt(), gpu_memory="eighty")
    assert math.isfinite(plan(gpt(), gpu_memory=80 * GIB).tokens_per_s_estimate)


# --------------------------------------------------------------------------- the memory check before a run


def free_memory(monkeypatch, nbytes: int) -> None:
    """This machine, as far as the check can tell, has ``nbytes`` free (deterministic on any machine)."""
    from ember import hardware

    monkeypatch.setattr(hardware, "available_memory", lambda device: nbytes)
    monkeypatch.delenv("EMBER_SKIP_MEMORY_CHECK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_a_model_larger_than_memory_is_refused_before_it_is_built(monkeypatch, tmp_path):
    import resource

    from ember import train
    from ember.training import components

    free_memory(monkeypatch, 16 * GIB)
    monkeypatch.setattr(components, "starting_model", lambda *a: pytest.fail("the model was built"))
    recipe = tiny_recipe("gpt", "model.n_embd=8192", "model.n_layer=64", "model.n_head=64")  # ~52 B parameters
    start, rss = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(EmberError) as err:
        train(recipe, tmp_path / "run")
    assert time.perf_counter() - start < 15
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 1 << 20  # kB: under 1 GiB more at peak
    text = str(err.value)
    assert "GB" in text and "17.2 GB free" in text and "EMBER_SKIP_MEMORY_CHECK=1" in text
    assert "train.batch_size" in text and "fsdp" in text


def test_a_tiny_recipe_passes_the_check_and_the_override_skips_it(monkeypatch):
    recipe = gpt()
    free_memory(monkeypatch, 16 * GIB)
    check_memory(recipe, data_spec(recipe), torch.device("cpu"))
    free_memory(monkeypatch, 1000)
    with pytest.raises(EmberError, match="this CPU has 1 kB free"):
        check_memory(recipe, data_spec(recipe), torch.device("cpu"))
    monkeypatch.setenv("EMBER_SKIP_MEMORY_CHECK", "1")
    check_memory(recipe, data_spec(recipe), torch.device("cpu"))


def test_the_check_uses_the_plan_of_a_training_step_when_the_state_is_not_negligible(monkeypatch):
    recipe = gpt()
    predicted = plan(recipe).layouts[0].memory.total  # single, at micro-batch train.batch_size
    bytes_, what = predicted_run_bytes(recipe, data_spec(recipe), budget=2 * predicted)
    assert bytes_ == predicted and "peak of a training step" in what
    free_memory(monkeypatch, int(predicted / HEADROOM) - 1)  # the state fits, the step does not
    with pytest.raises(EmberError, match="at the peak of a training step"):
        check_memory(recipe, data_spec(recipe), torch.device("cpu"))
    free_memory(monkeypatch, int(predicted / HEADROOM) + 1)
    check_memory(recipe, data_spec(recipe), torch.device("cpu"))


def test_sharded_layouts_and_cpu_ranks_sharing_a_machine_are_counted(monkeypatch):
    recipe = big_gpt()
    spec = data_spec(recipe)
    single = predicted_run_bytes(recipe, spec)[0]
    assert predicted_run_bytes(recipe, spec, "fsdp", ranks=8)[0] < single / 4
    free_memory(monkeypatch, 100 * 10**9)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 10**9, 141 * 10**9))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(EmberError, match="shared by 8 ranks"):  # eight CPU ranks of one machine share its memory
        check_memory(recipe, spec, torch.device("cpu"), "fsdp", ranks=8)
    with pytest.raises(EmberError, match="cuda:0 has 100 GB free"):
        check_memory(recipe, spec, torch.device("cuda", 0), "ddp", ranks=8)


def test_a_distillation_teachers_weights_count_against_the_memory(monkeypatch, tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    with open(teacher / "model.safetensors", "wb") as f:
        f.truncate(60 << 20)  # 60 MiB of (sparse) weights
    student = gpt()
    free_memory(monkeypatch, 100 << 20)
    check_memory(student, data_spec(student), torch.device("cpu"))  # the student alone (about 60 MB) fits
    taught = recipe_from_dict(
        {**student.model_dump(mode="json"), "plugins": [{"name": "distill", "teacher": str(teacher)}]}
    )
    with pytest.raises(EmberError, match="plus the teacher's .* of weights"):
        check_memory(taught, data_spec(taught), torch.device("cpu"))
