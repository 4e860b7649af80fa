"""A user's own Hugging Face model and tokenizer through ember, in the variants tests/test_hf_interop.py
does not build: Llama checkpoints with a head_dim other than hidden/heads, linear RoPE scaling, tied heads,
saved in bf16/fp16 and sharded, import exactly; an export writes back what the checkpoint said (Llama 3's
list of eos ids, generation_config.json, the tokenizer's unknown and added special tokens), and says so
when transformers' AutoTokenizer would cut text otherwise than the run's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ember.config import recipe_from_dict
from ember.data.spec import DataSpec
from ember.data.tokenizer import load_tokenizer, train_bpe
from ember.errors import EmberError
from ember.interop.hf import export_hf, tokenizer_notes, write_checkpoint
from ember.interop.hf_config import resolve_model_section
from ember.interop.hf_import import load_hf_weights
from ember.models.registry import MODEL_CONFIGS, build_model
from ember.runs import starting_model, write_model_info

transformers = pytest.importorskip("transformers")

VOCAB, ROWS, T = 300, 320, 16  # ids drawn below VOCAB; the checkpoint's embedding rows; tokens
TEXT = "def add(a, b):\n    return a + b  # 12345 and 678\n\nclass Point:\n    x: int = 0\n" * 20


def llama_style_tokenizer(extra: tuple[str, ...] = ()):
    """A Llama-style BPE (<unk> <s> </s>, a template starting each text with <s>) with ``extra`` special
    tokens added after its vocabulary, as a user adds chat tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(extra), special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([TEXT] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in extra])
    return tok


def llama_checkpoint(out: Path, dtype=torch.float32, shard: bool = False, **fields) -> Path:
    """A random transformers LlamaForCausalLM (every tensor perturbed) saved with a Llama-style tokenizer."""
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config.update(vocab_size=ROWS, max_position_embeddings=64, rms_norm_eps=1e-5, **fields)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.to(dtype).save_pretrained(out, max_shard_size="20KB" if shard else "1GB")
    llama_style_tokenizer().save(str(out / "tokenizer.json"))
    return out


def ember_llama(hf_dir: Path) -> torch.nn.Module:
    section = resolve_model_section(None, hf_dir)
    model = build_model(MODEL_CONFIGS["llama"].model_validate(section), DataSpec("lm", vocab_size=VOCAB, seq_len=T))
    return load_hf_weights(model, hf_dir, section).eval()


LINEAR = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
VARIANTS = {
    "head_dim 16 (hidden/heads = 8), one kv head": dict(head_dim=16, num_key_value_heads=1),
    "head_dim 4, tied, linear RoPE, sharded": dict(head_dim=4, tie_word_embeddings=True, rope_parameters=LINEAR),
    "bf16, grouped-query, theta 5e5": dict(dtype=torch.bfloat16, num_key_value_heads=2, rope_theta=500000.0),
    "fp16, tied": dict(dtype=torch.float16, tie_word_embeddings=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_variants_import_with_transformers_logits(tmp_path, variant):
    fields = dict(VARIANTS[variant])
    hf_dir = llama_checkpoint(tmp_path / "hf", shard="sharded" in variant, **fields)
    if "sharded" in variant:
        assert (hf_dir / "model.safetensors.index.json").is_file()
    # transformers' own fp32 reading of the saved files (a model cast to bf16 in memory keeps bf16 RoPE tables)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = ember_llama(hf_dir)
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-5
    assert (ours.lm_head.weight is ours.tok_emb.weight) == fields.get("tie_word_embeddings", False)


def test_export_writes_back_the_checkpoints_eos_ids_and_generation_config(tmp_path):
    """Llama 3 ends a turn at either of two eos ids; a run imported from it used to export one of them, and
    generation_config.json's settings were lost."""
    hf_dir = llama_checkpoint(tmp_path / "hf", bos_token_id=1, eos_token_id=[2, 299])
    generation = {"bos_token_id": 1, "eos_token_id": [2, 299, 5], "do_sample": True, "temperature": 0.6}
    (hf_dir / "generation_config.json").write_text(json.dumps({**generation, "transformers_version": "5.0"}))
    tokenizer = (hf_dir / "tokenizer.json").read_text()
    recipe = recipe_from_dict({"data": {"name": "stdlib", "seq_len": T}, "init": {"from_hf": str(hf_dir)}})
    spec = DataSpec("lm", vocab_size=VOCAB, seq_len=T, bos_id=1, eos_id=2)
    model, carried = starting_model(recipe, spec, tokenizer)
    assert carried == {
        "hf_source": {"ids": {"bos_token_id": 1, "eos_token_id": [2, 299]}, "generation_config": generation}
    }

    run = tmp_path / "run"
    run.mkdir()
    safetensors.torch.save_model(model, str(run / "model.safetensors"))
    write_model_info(run, {"model": recipe.model.model_dump(mode="json"), "data": spec.to_dict(), **carried})
    (run / "tokenizer.json").write_text(tokenizer)
    result = export_hf(run, tmp_path / "out")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5 and result.notes == ()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, [2, 299])
    written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert written == {**generation, "pad_token_id": 2}  # the data's eos pads, as before
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [2, 299, 5]
    # A run started from that run (ember continue, prune, another fine-tune) carries the ids on.
    again = recipe_from_dict({**recipe.model_dump(mode="json"), "init": {"from_run": str(run)}})
    assert starting_model(again, spec, tokenizer)[1] == carried


def test_export_keeps_the_tokenizers_unknown_and_added_special_tokens(tmp_path):
    tokenizer = llama_style_tokenizer(extra=("<|im_start|>", "<|im_end|>", "<pad>"))
    section = MODEL_CONFIGS["llama"].model_validate({"name": "llama", "n_layer": 1, "n_head": 2, "n_embd": 32})
    model = build_model(section, DataSpec("lm", vocab_size=VOCAB, seq_len=T)).eval()
    write_checkpoint(tmp_path / "out", model, section.model_dump(mode="json"), tokenizer, bos=1, eos=2)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (theirs.unk_token, theirs.bos_token, theirs.eos_token) == ("<unk>", "<s>", "</s>")
    assert theirs.pad_token == "<pad>"  # its own padding token, not the eos it used to be replaced by
    pad = json.loads((tmp_path / "out" / "generation_config.json").read_text())["pad_token_id"]
    assert pad == tokenizer.token_to_id("<pad>")
    assert {"<|im_start|>", "<|im_end|>"} <= set(theirs.all_special_tokens)
    ids = theirs("<|im_start|>add a b<|im_end|>")["input_ids"]
    assert ids[:2] == [1, tokenizer.token_to_id("<|im_start|>")] and ids[-1] == tokenizer.token_to_id("<|im_end|>")
    assert theirs.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer_notes(tmp_path / "out", tokenizer) == ()


def test_a_tokenizer_transformers_would_rebuild_is_named_in_a_warning(tmp_path):
    """A llama with q, k, v biases exports as Qwen2, whose tokenizer transformers 5 rebuilds with Qwen's
    pre-tokenizer (digits one by one): a byte-level BPE of ember's own then gives other ids in AutoTokenizer."""
    tokenizer = train_bpe([TEXT] * 4, vocab_size=VOCAB, min_frequency=1)
    for qkv_bias, warned in ((False, False), (True, True)):
        fields = {"name": "llama", "n_layer": 1, "n_head": 2, "n_embd": 32, "qkv_bias": qkv_bias}
        section = MODEL_CONFIGS["llama"].model_validate(fields)
        model = build_model(section, DataSpec("lm", vocab_size=VOCAB, seq_len=T)).eval()
        out = tmp_path / f"qkv_bias_{qkv_bias}"
        write_checkpoint(out, model, section.model_dump(mode="json"), tokenizer, bos=0, eos=0)
        notes = tokenizer_notes(out, tokenizer)
        assert bool(notes) == warned, notes
    assert "Qwen2Tokenizer" in notes[0] and "PreTrainedTokenizerFast(tokenizer_file=" in notes[0]
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert theirs(TEXT)["input_ids"] == tokenizer.encode(TEXT).ids  # the way out the warning names works


def test_a_checkpoint_directory_given_as_the_tokenizer_names_its_tokenizer_json(tmp_path):
    hf_dir = llama_checkpoint(tmp_path / "hf")
    with pytest.raises(EmberError, match=r"is a directory; give the tokenizer.json file in it \(it has one\)"):
        load_tokenizer(hf_dir)
    assert load_tokenizer(hf_dir / "tokenizer.json").to_str() == llama_style_tokenizer().to_str()
