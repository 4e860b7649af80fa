"""Hugging Face import (init.from_hf) and export (ember export --format hf) are exact (DESIGN
invariant 11): tiny random transformers models of each family, saved with save_pretrained (also
sharded), give the same logits in ember; ember runs exported give the same logits and greedy
continuation in transformers; hf → ember → hf gives back the very same tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from conftest import tiny_recipe
from ember.config import load_recipe, recipe_from_dict
from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.interop.hf import bytes_tokenizer, export_hf
from ember.interop.hf_config import resolve_model_section
from ember.interop.hf_import import check_hf_tokenizer, load_hf_weights
from ember.interop.hf_weights import read_safetensors
from ember.models.registry import MODEL_CONFIGS, build_model
from ember.runs import write_model_info

transformers = pytest.importorskip("transformers")
needs_llama = pytest.mark.skipif("llama" not in MODEL_CONFIGS, reason="ember's llama model is not registered yet")

VOCAB, PADDED, T = 300, 320, 16  # the tokenizer's size; the checkpoint's embedding rows (padded, as real ones are)
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 20


def tokenizer_json(path: Path) -> Path:
    """A byte-level BPE of VOCAB tokens with <|endoftext|> at id 0, saved as tokenizer.json."""
    from ember.data.tokenizer import train_bpe

    train_bpe([TEXT] * 4, vocab_size=VOCAB, min_frequency=1).save(str(path))
    return path


def hf_family(kind: str):
    """(model class, config) of a tiny model of each family, every feature ember maps switched on."""
    t = transformers
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=PADDED)
    small.update(max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
    if kind == "gpt2":
        cfg = t.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, vocab_size=PADDED, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        return t.GPT2LMHeadModel, cfg
    if kind == "llama":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        scaling["original_max_position_embeddings"] = 16
        cfg = t.LlamaConfig(**small, num_key_value_heads=2, rope_scaling=scaling, rope_theta=5000.0)
        return t.LlamaForCausalLM, cfg
    if kind == "mistral":
        return t.MistralForCausalLM, t.MistralConfig(**small, num_key_value_heads=2, sliding_window=5)
    return t.Qwen2ForCausalLM, t.Qwen2Config(**small, num_key_value_heads=1, tie_word_embeddings=True)


def hf_checkpoint(tmp_path: Path, kind: str, sharded: bool = False):
    """A random transformers model of ``kind`` saved with its tokenizer in tmp_path/kind; returns (dir, model)."""
    cls, cfg = hf_family(kind)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # no zero biases or unit norms left: every tensor must land in its place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / kind
    model.save_pretrained(out, max_shard_size="20KB" if sharded else "1GB")
    tokenizer_json(out / "tokenizer.json")
    return out, model


def ember_from(hf_dir: Path) -> tuple[torch.nn.Module, dict]:
    section = resolve_model_section(None, hf_dir)
    model = build_model(
        MODEL_CONFIGS[section["name"]].model_validate(section), DataSpec("lm", vocab_size=VOCAB, seq_len=T)
    )
    return load_hf_weights(model, hf_dir, section).eval(), section


def max_diff(ours: torch.nn.Module, theirs, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(ids) - theirs(ids).logits).abs().max().item()


FAMILIES = ["gpt2", pytest.param("llama", marks=needs_llama), pytest.param("mistral", marks=needs_llama)]
FAMILIES.append(pytest.param("qwen2", marks=needs_llama))


@pytest.mark.parametrize("kind", FAMILIES)
def test_imported_checkpoint_gives_transformers_logits(tmp_path, kind):
    hf_dir, theirs = hf_checkpoint(tmp_path, kind, sharded=kind in ("gpt2", "llama"))
    if kind in ("gpt2", "llama"):
        assert (hf_dir / "model.safetensors.index.json").is_file()  # the sharded path is the one tested
    ours, section = ember_from(hf_dir)
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    assert max_diff(ours, theirs, ids) <= 1e-5
    assert ours.tok_emb.num_embeddings == PADDED
    if kind == "mistral":  # the window is shorter than the sequence: it matters, and it matches
        assert section["sliding_window"] == 5
    if kind == "qwen2":
        assert section["qkv_bias"] and section["tie_weights"] and ours.lm_head.weight is ours.tok_emb.weight


def fake_run(tmp_path: Path, model: torch.nn.Module, section: dict, tokenizer: Path | None) -> Path:
    """A run directory as training leaves it (model.safetensors, model.json, tokenizer.json)."""
    run = tmp_path / "run"
    run.mkdir()
    safetensors.torch.save_model(model, str(run / "model.safetensors"))
    spec = DataSpec("lm", vocab_size=VOCAB, seq_len=T, bos_id=0, eos_id=0)
    write_model_info(run, {"model": section, "data": spec.to_dict()})
    if tokenizer is not None:
        (run / "tokenizer.json").write_text(tokenizer.read_text())
    return run


@pytest.mark.parametrize("kind", FAMILIES)
def test_hf_to_ember_to_hf_gives_back_the_same_tensors(tmp_path, kind):
    hf_dir, theirs = hf_checkpoint(tmp_path, kind, sharded=kind == "gpt2")
    ours, section = ember_from(hf_dir)
    result = export_hf(fake_run(tmp_path, ours, section, hf_dir / "tokenizer.json"), tmp_path / "out")
    before, after = read_safetensors(hf_dir), safetensors.torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [type(theirs).__name__] and config["model_type"] == kind
    assert config["vocab_size"] == PADDED and config["eos_token_id"] == 0 and config["torch_dtype"] == "float32"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(2))
    assert max_diff(ours, back, ids) <= 1e-5


def test_model_section_is_read_from_config_and_contradictions_are_refused(tmp_path):
    hf_dir, _ = hf_checkpoint(tmp_path, "gpt2")
    base = {"data": {"name": "stdlib", "seq_len": T}, "init": {"from_hf": str(hf_dir)}}
    recipe = recipe_from_dict(base)
    assert recipe.model.name == "gpt" and recipe.model.n_embd == 32 and recipe.model.activation == "gelu_tanh"
    assert recipe_from_dict({**base, "model": {"name": "gpt", "dropout": 0.1, "n_layer": 2}}).model.dropout == 0.1
    with pytest.raises(EmberError, match=r"model\.n_embd: recipe 64, config\.json 32"):
        recipe_from_dict({**base, "model": {"name": "gpt", "n_embd": 64}})
    with pytest.raises(EmberError, match="model.name=gpt"):
        recipe_from_dict({**base, "model": {"name": "llama"}})
    with pytest.raises(EmberError, match="keep one of them"):
        recipe_from_dict({**base, "init": {"from_hf": str(hf_dir), "from_run": "runs/x"}})
    # The saved recipe holds the whole section: it loads without the checkpoint directory.
    saved = recipe_from_dict({**base, "model": recipe.model.model_dump(mode="json")}).model_dump(mode="json")
    saved["init"]["from_hf"] = str(tmp_path / "gone")
    assert recipe_from_dict(saved).model == recipe.model


def test_unsupported_checkpoints_are_refused_with_the_reason(tmp_path):
    hf_dir, _ = hf_checkpoint(tmp_path, "gpt2")
    config = json.loads((hf_dir / "config.json").read_text())
    for change, reason in (
        ({"activation_function": "relu"}, "activation 'relu'"),
        ({"n_inner": 100}, "n_inner"),
        ({"model_type": "bert", "architectures": ["BertModel"]}, "model_type is 'bert'"),
    ):
        (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(EmberError, match=reason):
            resolve_model_section(None, hf_dir)
    (hf_dir / "config.json").write_text(json.dumps(config))
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(EmberError, match="pickle"):
        ember_from(hf_dir)


@needs_llama
def test_unsupported_llama_features_are_refused(tmp_path):
    hf_dir, _ = hf_checkpoint(tmp_path, "llama")
    config = json.loads((hf_dir / "config.json").read_text())
    for change, reason in (
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, "'yarn'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ):
        (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(EmberError, match=reason):
            resolve_model_section(None, hf_dir)


def test_original_gpt2_layout_and_an_untied_head_import(tmp_path):
    """The hub's first GPT-2 files have no ``transformer.`` prefix and keep the causal-mask buffers; a
    GPT-2 may also have its own LM head."""
    cls, cfg = hf_family("gpt2")
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    theirs = cls(cfg).eval()
    with torch.no_grad():
        theirs.lm_head.weight.add_(torch.randn_like(theirs.lm_head.weight))
    theirs.save_pretrained(tmp_path / "hf")
    tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    stored = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in stored.items()}
    old["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    safetensors.torch.save_file(old, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    ours, section = ember_from(tmp_path / "hf")
    assert not section["tie_weights"] and ours.lm_head.weight is not ours.tok_emb.weight
    assert max_diff(ours, theirs, torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(4))) <= 1e-5


def test_data_of_another_tokenizer_is_refused(tmp_path):
    hf_dir, _ = hf_checkpoint(tmp_path, "gpt2")
    check_hf_tokenizer(hf_dir, (hf_dir / "tokenizer.json").read_text())  # its own: accepted
    for other in (bytes_tokenizer().to_str(), json.dumps({"codec": "bytes"})):
        with pytest.raises(EmberError, match="another tokenizer"):
            check_hf_tokenizer(hf_dir, other)
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(EmberError, match="no tokenizer.json"):
        check_hf_tokenizer(hf_dir, other)


def test_a_checkpoint_with_fewer_rows_than_its_tokenizer_is_refused(tmp_path):
    from ember.runs import starting_model

    cls, cfg = hf_family("gpt2")
    cfg.vocab_size = VOCAB - 20
    cls(cfg).save_pretrained(tmp_path / "hf")
    tokenizer = tokenizer_json(tmp_path / "hf" / "tokenizer.json").read_text()
    recipe = recipe_from_dict({"data": {"name": "stdlib", "seq_len": T}, "init": {"from_hf": str(tmp_path / "hf")}})
    with pytest.raises(EmberError, match="280 embedding rows .* 300 tokens"):
        starting_model(recipe, DataSpec("lm", vocab_size=VOCAB, seq_len=T), tokenizer)


def test_a_tied_checkpoint_whose_head_differs_is_refused(tmp_path):
    hf_dir, _ = hf_checkpoint(tmp_path, "gpt2")
    tensors = safetensors.torch.load_file(str(hf_dir / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
    safetensors.torch.save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EmberError, match="tie_word_embeddings=true but lm_head.weight differs"):
        ember_from(hf_dir)


def test_bf16_checkpoint_loads_into_fp32(tmp_path):
    hf_dir, theirs = hf_checkpoint(tmp_path, "gpt2")
    tensors = {
        k: v.to(torch.bfloat16) for k, v in safetensors.torch.load_file(str(hf_dir / "model.safetensors")).items()
    }
    safetensors.torch.save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    ours, _ = ember_from(hf_dir)
    assert ours.tok_emb.weight.dtype == torch.float32
    assert torch.equal(ours.tok_emb.weight, tensors["transformer.wte.weight"].float())


def test_export_refuses_a_classifier_an_unmerged_lora_run_and_a_narrowed_model(tmp_path):
    from ember.interop.export import export_run

    run = tmp_path / "cls"
    run.mkdir()
    (run / "model.json").write_text(json.dumps({"model": {"name": "cnn"}, "data": {"task": "classify"}}))
    with pytest.raises(EmberError, match="--format onnx"):
        export_run(run, tmp_path / "out", fmt="hf")
    (run / "model.json").write_text(json.dumps({"model": {"name": "gpt"}, "data": {"task": "lm"}, "lora": {"rank": 4}}))
    with pytest.raises(EmberError, match="--merge"):
        export_run(run, tmp_path / "out", fmt="hf")
    pruned = {"model": {"name": "gpt"}, "data": {"task": "lm"}, "pruning": {"structured": True}}
    (run / "model.json").write_text(json.dumps(pruned))
    with pytest.raises(EmberError, match="pruned structurally"):
        export_run(run, tmp_path / "out", fmt="hf")


def test_export_refuses_a_directory_holding_another_model(tmp_path):
    hf_dir, _ = hf_checkpoint(tmp_path, "gpt2", sharded=True)
    ours, section = ember_from(hf_dir)
    run = fake_run(tmp_path, ours, section, hf_dir / "tokenizer.json")
    with pytest.raises(EmberError, match="already holds other files"):
        export_hf(run, hf_dir)  # its shards would sit beside the new model.safetensors
    assert export_hf(run, tmp_path / "out").max_abs_diff <= 1e-5
    assert export_hf(run, tmp_path / "out").max_abs_diff <= 1e-5  # an earlier export is replaced


def test_export_without_transformers_says_it_did_not_check(tmp_path, monkeypatch):
    import importlib.util

    hf_dir, _ = hf_checkpoint(tmp_path, "gpt2")
    ours, section = ember_from(hf_dir)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else find_spec(name, *a)
    )
    result = export_hf(fake_run(tmp_path, ours, section, hf_dir / "tokenizer.json"), tmp_path / "out")
    assert result.max_abs_diff is None and not result.check
    assert any("not checked" in line for line in result.lines())


def test_bytes_tokenizer_encodes_as_the_bytes_codec():
    text = "héllo, wörld\n\tdef f(): ✓"
    assert bytes_tokenizer().encode(text).ids == list(text.encode("utf-8"))
    assert bytes_tokenizer().decode(list(text.encode("utf-8"))) == text


TINY_MODELS = {
    "gpt": ["model.activation=gelu_tanh"],
    "llama": ["model.name=llama", "model.n_kv_head=1", "model.tie_weights=true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt", pytest.param("llama", marks=needs_llama)])
def test_exported_ember_run_loads_in_transformers_with_the_same_greedy_continuation(tmp_path, name):
    from ember.cli import main
    from ember.generation import run_codec, sample_tokens
    from ember.runs import load_trained_model
    from ember.training.loop import train

    run = train(tiny_recipe("gpt", *TINY_MODELS[name]), tmp_path / "run").run_dir
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    ours, info = load_trained_model(run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = "def main():\n    "
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == run_codec(run).encode(prompt)
    assert max_diff(ours, theirs, ids) <= 1e-5
    n = info["data"]["seq_len"] - ids.size(1)
    ember_ids = sample_tokens(ours, ids, n, info["data"]["seq_len"], temperature=0)
    hf_ids = theirs.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert hf_ids[0].tolist() == ember_ids[0].tolist()
    assert tokenizer.decode(hf_ids[0]) == run_codec(run).decode(ember_ids[0])


@pytest.mark.slow
def test_training_from_hf_starts_at_transformers_loss(tmp_path, monkeypatch):
    from ember.cli import main
    from ember.training import tasks
    from ember.training.loop import train

    hf_dir, theirs = hf_checkpoint(tmp_path, "gpt2")
    (tmp_path / "src").mkdir()
    for module in (json, pytest, F):  # a few real source files: varied text that cleaning keeps
        (tmp_path / "src" / f"{module.__name__}.py").write_text(Path(module.__file__).read_text())
    flags = ["--tokenizer", str(hf_dir / "tokenizer.json"), "--out", str(tmp_path / "data"), "--set", f"seq_len={T}"]
    assert main(["data", "prepare", str(tmp_path / "src"), *flags]) == 0
    batches = []

    def recording(model, batch):
        batches.append({k: v.clone() for k, v in batch.items()})
        return model(batch["x"]), batch["y"]

    monkeypatch.setitem(tasks.FORWARD, "lm", recording)
    raw = tiny_recipe("gpt").model_dump(mode="json") | {"init": {"from_hf": str(hf_dir)}}
    raw["data"] = {"name": "prepared", "path": str(tmp_path / "data"), "seq_len": T}
    del raw["model"]  # read from config.json
    run = train(recipe_from_dict(raw), tmp_path / "run").run_dir
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    with torch.no_grad():
        logits = theirs(batches[0]["x"]).logits
    expected = F.cross_entropy(logits.flatten(0, 1), batches[0]["y"].flatten()).item()
    assert first["step"] == 1 and abs(first["loss"] - expected) <= 1e-5
    assert all(math.isfinite(json.loads(line)["loss"]) for line in (run / "metrics.jsonl").read_text().splitlines())
    hf_dir.rename(tmp_path / "moved")  # the run's recipe holds the model section config.json gave
    assert load_recipe(run / "recipe.yaml").model.model_dump() == resolve_model_section(None, tmp_path / "moved")
    assert train(load_recipe(run / "recipe.yaml", ["train.max_steps=6"]), run, resume="auto").step == 6


@pytest.mark.slow
def test_a_lora_run_exports_merged(tmp_path):
    pytest.importorskip("ember.plugins.lora", reason="the LoRA plugin is not in this ember yet")
    from ember.interop.export import export_run
    from ember.runs import load_trained_model
    from ember.training.loop import train

    recipe = tiny_recipe("gpt", "plugins=[{name: lora, rank: 2, targets: [q, v]}]", "optim.lr=0.05")
    run = train(recipe, tmp_path / "run").run_dir
    with pytest.raises(EmberError, match="--merge"):
        export_run(run, tmp_path / "hf", fmt="hf")
    result = export_run(run, tmp_path / "hf", fmt="hf", merge=True)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    with_adapters, _ = load_trained_model(run)  # unmerged: the adapters add their update in the forward
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(3))
    assert max_diff(with_adapters, theirs, ids) <= 1e-5
    stored = safetensors.torch.load_file(str(run / "model.safetensors"))  # the base, beside its adapters
    exported = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    q = exported["transformer.h.0.attn.c_attn.weight"].t()[: stored["blocks.0.attn.q.weight"].size(0)]
    assert (q - stored["blocks.0.attn.q.weight"]).abs().max() > 1e-4  # the trained update is folded in
