"""The llama model: the same logits as Hugging Face transformers' Llama, Qwen2 and Mistral for the
same weights (fp32, 1e-5), its RoPE scaling, grouped-query attention, sliding window, config
checks and FLOP estimate."""

from __future__ import annotations

import pytest
import torch

from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.layers import measure_forward_flops
from ember.models.llama import Llama, LlamaConfig, RopeScaling, rope_inv_freq
from ember.models.registry import build_model

transformers = pytest.importorskip("transformers")

VOCAB, T = 96, 24


def hf_to_ember(name: str) -> str:
    """A transformers *ForCausalLM parameter name -> the ember Llama's."""
    name = name.removeprefix("model.")
    for hf, ours in (
        ("embed_tokens", "tok_emb"),
        ("layers.", "blocks."),
        ("input_layernorm", "norm_1"),
        ("post_attention_layernorm", "norm_2"),
        ("self_attn.q_proj", "attn.q"),
        ("self_attn.k_proj", "attn.k"),
        ("self_attn.v_proj", "attn.v"),
        ("self_attn.o_proj", "attn.proj"),
        ("mlp.gate_proj", "mlp.gate"),
        ("mlp.up_proj", "mlp.up"),
        ("mlp.down_proj", "mlp.proj"),
    ):
        name = name.replace(hf, ours)
    return "norm_f.weight" if name == "norm.weight" else name


def copy_weights(hf_model: torch.nn.Module, ours: Llama) -> None:
    state = {hf_to_ember(k): v for k, v in hf_model.state_dict().items()}
    if ours.lm_head.weight is ours.tok_emb.weight:
        state.pop("lm_head.weight", None)  # tied: one matrix, loaded through tok_emb
        missing, unexpected = ours.load_state_dict(state, strict=False)
        assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    else:
        ours.load_state_dict(state, strict=True)


def compare(hf_cls_name: str, hf_kwargs: dict, cfg: LlamaConfig, t: int = T) -> float:
    """Max |logit difference| between a random transformers model and ours with its weights."""
    torch.manual_seed(0)
    hf_config = getattr(transformers, hf_cls_name.replace("ForCausalLM", "Config"))(
        vocab_size=VOCAB,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.ffn_width,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_weights,
        attn_implementation="eager",
        **hf_kwargs,
    )
    hf_model = getattr(transformers, hf_cls_name)(hf_config).eval()
    with torch.no_grad():  # RMSNorm gains are 1 at init: make them tell
        for name, p in hf_model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    ours = build_model(cfg, DataSpec("lm", vocab_size=VOCAB, seq_len=t)).eval()
    copy_weights(hf_model, ours)
    x = torch.randint(0, VOCAB, (2, t))
    with torch.no_grad():
        expected = hf_model(input_ids=x).logits
        got = ours(x)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


def test_llama_logits_equal_transformers_with_gqa_and_llama3_rope() -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    # head_dim 16: wavelengths 2 pi (kept), 32.6 (interpolated), longer (divided by factor) against 64 / 4 and 64 / 1
    scaling["original_max_position_embeddings"] = 64
    cfg = LlamaConfig(
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        block_size=128,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(type="llama3", factor=8.0, original_max_position_embeddings=64),
    )
    hf_kwargs = {"rope_parameters": {**scaling, "rope_theta": 500000.0}}
    assert compare("LlamaForCausalLM", hf_kwargs, cfg) <= 1e-5


def test_qwen2_logits_equal_transformers_with_qkv_bias_and_tied_head() -> None:
    cfg = LlamaConfig(
        n_layer=2, n_head=4, n_kv_head=1, n_embd=32, ffn_hidden=80, qkv_bias=True, tie_weights=True, block_size=32
    )
    hf_kwargs = {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    assert compare("Qwen2ForCausalLM", hf_kwargs, cfg.model_copy(update={"rope_theta": 1000000.0})) <= 1e-5


def test_mistral_logits_equal_transformers_with_a_sliding_window_shorter_than_the_input() -> None:
    cfg = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=16, sliding_window=5, block_size=32)
    hf_kwargs = {"sliding_window": 5, "head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    assert compare("MistralForCausalLM", hf_kwargs, cfg) <= 1e-5


@pytest.mark.parametrize("rope_type", ["linear", "llama3"])
def test_rope_frequencies_equal_transformers(rope_type: str) -> None:
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": rope_type, "rope_theta": 500000.0, "factor": 4.0}
    if rope_type == "llama3":
        params |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = HFLlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=params)
    expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    ours = rope_inv_freq(128, 500000.0, RopeScaling(type=rope_type, factor=4.0, original_max_position_embeddings=64))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    plain = rope_inv_freq(128, 500000.0, None)
    assert (ours <= plain).all() and (ours < plain).any()  # scaling only ever slows rotations


def test_grouped_query_attention_without_enable_gqa_expands_the_heads_alike(monkeypatch) -> None:
    import ember.models.llama as llama

    cfg = LlamaConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, sliding_window=3, block_size=16)
    model = build_model(cfg, DataSpec("lm", vocab_size=VOCAB, seq_len=16)).eval()
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        fused = model(x)
        monkeypatch.setattr(llama, "SDPA_GQA", False)  # what torch 2.4 (no enable_gqa) runs
        torch.testing.assert_close(model(x), fused, rtol=0, atol=1e-6)


def test_sliding_window_hides_tokens_beyond_it() -> None:
    cfg = LlamaConfig(n_layer=1, n_head=2, n_embd=32, sliding_window=4, block_size=16)
    model = build_model(cfg, DataSpec("lm", vocab_size=VOCAB, seq_len=16)).eval()
    x = torch.randint(0, VOCAB, (1, 16))
    changed = x.clone()
    changed[0, 2] = (x[0, 2] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert not torch.allclose(a[0, 5], b[0, 5])  # position 5 sees 2..5
    torch.testing.assert_close(a[0, 6:], b[0, 6:])  # one layer: position 6 on sees 3.. only


def test_defaults_follow_llama() -> None:
    cfg = LlamaConfig(n_embd=96, n_head=4)
    assert (cfg.kv_heads, cfg.head_channels, cfg.ffn_width) == (4, 24, 256)  # int(8*96/3) = 256
    assert LlamaConfig(n_embd=4096, n_head=32).ffn_width == 10944  # (Llama 2 rounds to 256: 11008)
    model = build_model(LlamaConfig(n_layer=8, n_embd=256, n_head=4), DataSpec("lm", vocab_size=VOCAB, seq_len=8))
    assert model.lm_head.weight is not model.tok_emb.weight
    assert torch.equal(model.blocks[0].norm_1.weight, torch.ones(256))
    assert model.blocks[0].attn.q.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for proj in (model.blocks[3].attn.proj, model.blocks[3].mlp.proj):
        assert proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2 * 8)


def test_config_defaults_stay_put() -> None:
    """Saved model.json files, recipes and the Hugging Face mapping read back to these values."""
    assert LlamaConfig().model_dump() == {
        "name": "llama",
        "n_head": 4,
        "n_embd": 128,
        "dropout": 0.0,
        "n_layer": 4,
        "n_kv_head": 0,
        "head_dim": 0,
        "ffn_hidden": 0,
        "block_size": 256,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "norm_eps": 1e-5,
        "qkv_bias": False,
        "tie_weights": False,
        "sliding_window": 0,
        "vocab_size": 0,
    }
    scaling = RopeScaling(type="llama3", factor=8.0)
    assert scaling.model_dump() == {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


@pytest.mark.parametrize(
    ("fields", "match"),
    [({"n_head": 4, "n_kv_head": 3}, "n_kv_head"), ({"rope_scaling": {"type": "yarn", "factor": 2}}, "type")],
)
def test_config_refuses_bad_values(fields: dict, match: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=match):
        LlamaConfig(n_embd=48, **fields)


def test_vocab_size_pads_the_embedding_and_never_shrinks_it() -> None:
    spec = DataSpec("lm", vocab_size=VOCAB, seq_len=8)
    model = build_model(LlamaConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=128), spec)
    assert model.tok_emb.weight.shape == (128, 32) and model.lm_head.out_features == 128
    with pytest.raises(EmberError, match="vocab_size=64"):
        build_model(LlamaConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64), spec)
    with pytest.raises(EmberError, match="block_size"):
        build_model(LlamaConfig(n_layer=1, n_head=2, n_embd=32, block_size=4), spec)


@pytest.mark.parametrize("n_kv_head", [0, 2])
def test_flops_match_the_formula_and_the_counter(n_kv_head: int) -> None:
    cfg = LlamaConfig(n_layer=3, n_head=4, n_kv_head=n_kv_head, n_embd=64, head_dim=32, block_size=32)
    model = build_model(cfg, DataSpec("lm", vocab_size=50, seq_len=32))
    n = model.num_params() - 50 * 64  # the token table is a lookup; the untied head is a matmul
    assert model.flops_per_item() == 6 * n + 12 * 3 * (4 * 32) * 32
    measured = 3 * measure_forward_flops(model, torch.zeros(1, 32, dtype=torch.long)) / 32
    assert measured == pytest.approx(model.flops_per_item(), rel=0.02)


# --------------------------------------------------------------------------- end to end: train, generate, compress, scale

LLAMA = ("model.name=llama", "model.n_head=4", "model.n_kv_head=2")


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    from conftest import tiny_recipe
    from ember.training.loop import train

    return train(tiny_recipe("gpt", *LLAMA, "train.max_steps=8"), tmp_path_factory.mktemp("llama") / "run").run_dir


def test_a_trained_llama_generates_and_its_int8_copy_loads_and_generates(llama_run, tmp_path):
    from ember.compress.quantize import quantize
    from ember.generation import generate
    from ember.runs import load_trained_model

    assert isinstance(generate(llama_run, prompt="def ", max_new_tokens=8), str)
    result = quantize(llama_run, method="int8-dynamic", out=tmp_path / "int8")
    float_row, int8_row = result.rows
    assert int8_row.bytes < 0.6 * float_row.bytes
    assert int8_row.quality == pytest.approx(float_row.quality, rel=0.02)  # val loss barely moves
    model, _ = load_trained_model(tmp_path / "int8")
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), load_trained_model(llama_run)[0](x), atol=0.05, rtol=0)
    assert isinstance(generate(tmp_path / "int8", prompt="def ", max_new_tokens=8), str)


@pytest.mark.parametrize("method", ["l1-unstructured", "global"])
def test_unstructured_pruning_masks_every_projection_of_a_llama(method: str) -> None:
    from ember.compress.prune import mask_smallest, prunable_layers, sparsity

    cfg = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, tie_weights=True)
    model = build_model(cfg, DataSpec("lm", vocab_size=VOCAB, seq_len=8))
    layers = prunable_layers(model)
    assert len(layers) == 2 * 7 and model.lm_head not in layers  # q k v proj gate up proj; the tied head stays
    mask_smallest(model, method, 0.5)
    assert sparsity(model) == pytest.approx(0.5, abs=1e-3)
    assert not (model.tok_emb.weight == 0).any() and (model.blocks[0].norm_1.weight == 1).all()
    assert torch.isfinite(model(torch.randint(0, VOCAB, (1, 8)))).all()


def test_structured_prune_of_a_llama_run_saves_a_smaller_model_that_loads(llama_run, tmp_path):
    from ember.compress.prune import prune
    from ember.generation import generate
    from ember.runs import load_trained_model

    result = prune(llama_run, amount=0.4, method="structured", out=tmp_path / "pruned", say=lambda text: None)
    source, pruned = result.rows[0].params, result.rows[-1].params
    assert 0.5 * source < pruned <= 0.6 * source
    model, _ = load_trained_model(tmp_path / "pruned")
    assert sum(p.numel() for p in model.parameters()) == pruned
    assert isinstance(generate(tmp_path / "pruned", prompt="def ", max_new_tokens=8), str)


def test_a_llama_student_distils_a_gpt_teacher_with_exact_accumulation(tmp_path):
    from conftest import tiny_recipe
    from ember.compress.distill import distill
    from ember.runs import load_trained_model
    from ember.training.loop import train

    teacher = train(tiny_recipe("gpt", "train.max_steps=10", "optim.lr=1e-2"), tmp_path / "teacher").run_dir
    student = (*LLAMA, "model.n_embd=16", "train.max_steps=3")
    big = distill(teacher, tiny_recipe("gpt", *student, "train.batch_size=8"), 3.0, 0.7, tmp_path / "big")
    small = distill(
        teacher, tiny_recipe("gpt", *student, "train.batch_size=4", "train.grad_accum=2"), 3.0, 0.7, tmp_path / "small"
    )
    plain = train(tiny_recipe("gpt", *student, "train.batch_size=8"), tmp_path / "plain")
    a, b, c = (load_trained_model(r.run_dir)[0].state_dict() for r in (big, small, plain))
    assert load_trained_model(big.run_dir)[1]["model"]["name"] == "llama"
    for k in a:
        # Equal up to the order of float sums, which Adam's normalisation amplifies (4e-6 seen on an AMX
        # Xeon, whose kernels split a batch of 8 and two of 4 differently); 10x below the teacher's effect.
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4  # the teacher did change the steps
    hidden = distill(teacher, tiny_recipe("gpt", *student), 3.0, 0.7, tmp_path / "hidden", hidden_weight=1.0)
    d = load_trained_model(hidden.run_dir)[0].state_dict()
    assert max((a[k] - d[k]).abs().max().item() for k in a) > 1e-5  # hidden states matched at llama's norm_f


@pytest.mark.slow  # a 2-process launch: about 20 s each
@pytest.mark.parametrize(("strategy", "batch"), [("ddp", 2), ("fsdp", 2), ("tp", 4), ("pp", 4)])
def test_two_llama_ranks_equal_one_process(tmp_path, strategy, batch):
    """2 ranks x batch 2 x 2 accumulation steps = 1 process x batch 8 (as tests/test_distributed.py for gpt);
    under tp both ranks read the same batch of 4 and hold one key/value group each; under pp (1F1B over
    the 2 micro-batches) each holds one of the 2 blocks."""
    from conftest import tiny_recipe
    from ember.training.loop import train
    from test_distributed import assert_same_weights, launch, output, weights

    common = [*LLAMA, "train.max_steps=3", "train.deterministic=true", "optim.grad_clip=0.5", "eval.max_batches=0"]
    if strategy == "pp":
        common += ["model.n_layer=2"]  # llama's head is untied by default: embedding and head on different stages
    layout = [f"train.batch_size={batch}", "train.grad_accum=2", f"parallel.strategy={strategy}"]
    recipe = tiny_recipe("gpt", *common, *layout)
    proc = launch(tmp_path, recipe, tmp_path / strategy)
    assert proc.returncode == 0, output(proc)
    single = train(tiny_recipe("gpt", *common, "train.batch_size=8"), tmp_path / "single")
    # tp sums each row-parallel output over the ranks in another order: 3e-6 after 3 AdamW steps
    assert_same_weights(weights(tmp_path / strategy), weights(single.run_dir), tol=1e-5 if strategy == "tp" else 1e-6)


@pytest.mark.slow  # a 4-process launch: about a minute on 2 cores
def test_llama_on_a_2x2_fsdp_tp_mesh_equals_one_process(tmp_path):
    """2 data-parallel groups of 2 tensor-parallel ranks (one key/value group each), batch 2 x
    accumulation 2 per group = one process with batch 8."""
    import subprocess
    import sys

    from conftest import tiny_recipe
    from ember.training.loop import train
    from test_distributed import assert_same_weights, output, weights

    common = [*LLAMA, "train.max_steps=3", "train.deterministic=true", "optim.grad_clip=0.5", "eval.max_batches=0"]
    recipe = tiny_recipe("gpt", *common, "train.batch_size=2", "train.grad_accum=2", "parallel.strategy=fsdp+tp")
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    command = [sys.executable, "-m", "ember", "train", str(path), "--run-dir", str(tmp_path / "mesh"), "--nproc", "4"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, output(proc)
    assert "fsdp+tp x 4" in proc.stderr
    single = train(tiny_recipe("gpt", *common, "train.batch_size=8"), tmp_path / "single")
    assert_same_weights(weights(tmp_path / "mesh"), weights(single.run_dir), tol=1e-5)
