"""Hugging Face ``config.json`` ↔ ember's model section, for the families ember can hold exactly.

=================  ===========================  ============================================
model_type         architectures                ember model
=================  ===========================  ============================================
gpt2               GPT2LMHeadModel              ``gpt`` (bias, ``activation: gelu_tanh``)
llama              LlamaForCausalLM             ``llama``
mistral            MistralForCausalLM           ``llama`` with ``sliding_window``
qwen2              Qwen2ForCausalLM             ``llama`` with ``qkv_bias``
=================  ===========================  ============================================

``model_section(hf)`` turns a parsed config.json into a full model section (every field of
the ember config, normalised by it); a feature ember's model would compute differently
(another activation, rope type, biases it has not) is refused, never approximated.
``resolve_model_section(given, hf_dir)`` fills a recipe's model section from the directory and
refuses a stated field that contradicts it (``dropout`` is free). ``hf_config(section, ...)``
is the way back, for ``ember export --format hf``. Plain JSON: no ``transformers`` needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ember.atomic import read_json
from ember.errors import EmberError

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
FREE_FIELDS = ("dropout",)  # what a recipe may set whatever config.json says
GELU = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def read_hf_config(hf_dir: str | Path) -> dict:
    """The parsed ``config.json`` of a Hugging Face checkpoint directory, or EmberError."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise EmberError(
            f"init.from_hf: {hf_dir} has no config.json. Point it at a Hugging Face checkpoint directory "
            f"(what save_pretrained writes: config.json, model.safetensors or its shards, tokenizer.json)."
        )
    hf = read_json(path, "Re-save the checkpoint with save_pretrained.")
    return hf


def _refuse(hf: dict, problem: str) -> EmberError:
    kind = hf.get("model_type", "?")
    return EmberError(
        f"init.from_hf: this {kind} checkpoint {problem}, which ember's model does not compute, so its logits "
        f"would not be the checkpoint's. ember imports GPT-2, Llama, Mistral and Qwen2 checkpoints as they are "
        f"defined by transformers; pick a checkpoint without it."
    )


def _need(hf: dict, key: str) -> Any:
    if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool):
        raise EmberError(
            f"init.from_hf: config.json has no integer {key!r} (given {hf.get(key)!r}); it is not a complete "
            f"{hf.get('model_type')} config. Re-save the checkpoint with save_pretrained."
        )
    return hf[key]


def model_section(hf: dict) -> dict:
    """The ember model section (all fields, normalised) for a parsed config.json."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise EmberError(
            f"init.from_hf: config.json's model_type is {kind!r}; ember imports {', '.join(ARCHITECTURES)} "
            f"checkpoints (into its gpt and llama models). Pick a checkpoint of one of those families."
        )
    archs = hf.get("architectures") or [ARCHITECTURES[kind]]
    if ARCHITECTURES[kind] not in archs:
        raise EmberError(
            f"init.from_hf: config.json names the architectures {archs}; ember imports the causal LM "
            f"{ARCHITECTURES[kind]} of model_type {kind}. Pick a causal language-model checkpoint."
        )
    section = _gpt2_section(hf) if kind == "gpt2" else _llama_section(hf)
    return _normalised(section)


def _normalised(section: dict) -> dict:
    from pydantic import ValidationError

    from ember.models.registry import MODEL_CONFIGS

    if section["name"] not in MODEL_CONFIGS:
        raise EmberError(f"init.from_hf: this ember has no {section['name']} model to import the checkpoint into.")
    try:
        return MODEL_CONFIGS[section["name"]].model_validate(section).model_dump(mode="json")
    except ValidationError as err:
        first = err.errors()[0]
        raise EmberError(
            f"init.from_hf: config.json gives model.{'.'.join(map(str, first['loc']))} a value ember's "
            f"{section['name']} refuses ({first['msg']})."
        ) from None


def _gpt2_section(hf: dict) -> dict:
    n_embd = _need(hf, "n_embd")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise _refuse(hf, f"has an MLP {hf['n_inner']} wide (n_inner) where ember's is 4 x n_embd = {4 * n_embd}")
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU:
        raise _refuse(hf, f"uses the activation {act!r} (ember's gpt has gelu and gelu_new)")
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise _refuse(hf, f"has layer_norm_epsilon={hf['layer_norm_epsilon']} (ember's LayerNorm uses 1e-5)")
    for key, want in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if hf.get(key, want) != want:
            raise _refuse(hf, f"sets {key}={hf[key]}")
    return {
        "name": "gpt",
        "n_layer": _need(hf, "n_layer"),
        "n_head": _need(hf, "n_head"),
        "n_embd": n_embd,
        "block_size": hf.get("n_positions", 1024),
        "bias": True,  # GPT-2 has biases on every Linear and LayerNorm
        "tie_weights": hf.get("tie_word_embeddings", True),
        "activation": GELU[act],
        "vocab_size": _need(hf, "vocab_size"),
    }


def _llama_section(hf: dict) -> dict:
    kind = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(hf, f"uses the activation {hf['hidden_act']!r} (ember's llama has SwiGLU: silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise _refuse(hf, "has biases on its attention output or MLP (attention_bias / mlp_bias)")
    layer_types = set(hf.get("layer_types") or [])
    if kind == "qwen2" and (hf.get("use_sliding_window") or "sliding_attention" in layer_types):
        raise _refuse(hf, "uses a sliding window on some layers only (use_sliding_window)")
    window = hf.get("sliding_window") if kind == "mistral" else None
    heads = _need(hf, "num_attention_heads")
    hidden = _need(hf, "hidden_size")
    theta, scaling = _rope(hf)
    return {
        "name": "llama",
        "n_layer": _need(hf, "num_hidden_layers"),
        "n_head": heads,
        "n_embd": hidden,
        "n_kv_head": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hidden // heads,
        "ffn_hidden": _need(hf, "intermediate_size"),
        "block_size": _need(hf, "max_position_embeddings"),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "qkv_bias": kind == "qwen2",  # Qwen2 always has q, k, v biases
        "tie_weights": hf.get("tie_word_embeddings", False),
        "sliding_window": window or 0,
        "vocab_size": _need(hf, "vocab_size"),
    }


def _rope(hf: dict) -> tuple[float, dict | None]:
    """RoPE's base and scaling, from transformers 5's ``rope_parameters`` or the older ``rope_theta`` +
    ``rope_scaling``."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise _refuse(hf, f"scales RoPE by {kind!r} (ember's llama has linear and llama3)")
    keys = ("factor",) if kind == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"
    )  # fmt: skip
    missing = [k for k in keys if k not in params]
    if missing:
        raise _refuse(hf, f"gives {kind} rope scaling without {missing}")
    return theta, {"type": kind, **{k: params[k] for k in keys}}


def resolve_model_section(given: Any, hf_dir: str | Path) -> dict:
    """The recipe's model section with ``init.from_hf``: config.json's, with the fields the recipe states
    kept when they agree with it; a contradiction is an EmberError naming the fields (FREE_FIELDS
    excepted)."""
    derived = model_section(read_hf_config(hf_dir))
    if given is None or given == {}:
        return derived
    if not isinstance(given, dict):
        raise EmberError(f"init.from_hf: the model section must be a mapping, got {given!r}.")
    if given.get("name", derived["name"]) != derived["name"]:
        raise EmberError(
            f"init.from_hf: {hf_dir} holds a {derived['name']} model (config.json), but the recipe says "
            f"model.name={given['name']}. Set model.name={derived['name']} or leave the model section out."
        )
    merged = _normalised({**derived, **given})
    differ = [k for k in derived if k not in FREE_FIELDS and merged[k] != derived[k]]
    if differ:
        shown = ", ".join(f"model.{k}: recipe {merged[k]!r}, config.json {derived[k]!r}" for k in differ)
        raise EmberError(
            f"init.from_hf: the recipe's model section contradicts {hf_dir}/config.json ({shown}); the "
            f"checkpoint's weights only fit its own shape. Leave these fields out (they are read from "
            f"config.json); only {', '.join(FREE_FIELDS)} may be set freely."
        )
    return merged


def hf_config(section: dict, vocab_size: int, bos_id: int, eos_id: int) -> dict:
    """config.json for an ember gpt or llama model section (``vocab_size``: its embedding rows); the
    family a llama is written as: Qwen2 when it has q, k, v biases, Mistral with a sliding window, else
    Llama."""
    common = {"vocab_size": vocab_size, "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32"}
    if section["name"] == "gpt":
        return {"architectures": [ARCHITECTURES["gpt2"]], "model_type": "gpt2", **common, **_gpt2_fields(section)}
    if section["name"] != "llama":
        raise EmberError(f"ember export --format hf writes gpt and llama models, not {section['name']}.")
    if section["qkv_bias"] and section["sliding_window"]:
        raise EmberError(
            "ember export --format hf: this llama has both q, k, v biases (Qwen2's) and a sliding window "
            "(Mistral's); no transformers family computes that pair the same way. Export a model with one of them."
        )
    kind = "qwen2" if section["qkv_bias"] else "mistral" if section["sliding_window"] else "llama"
    fields = {
        "hidden_size": section["n_embd"],
        "num_hidden_layers": section["n_layer"],
        "num_attention_heads": section["n_head"],
        "num_key_value_heads": section["n_kv_head"] or section["n_head"],
        "head_dim": section["head_dim"] or section["n_embd"] // section["n_head"],
        "intermediate_size": _ffn_width(section),
        "max_position_embeddings": section["block_size"],
        "hidden_act": "silu",
        "rms_norm_eps": section["norm_eps"],
        "rope_theta": section["rope_theta"],
        "rope_scaling": _rope_scaling_out(section["rope_scaling"]),
        "tie_word_embeddings": section["tie_weights"],
        "attention_dropout": section["dropout"],
    }
    if kind == "llama":
        fields.update(attention_bias=False, mlp_bias=False)
    if kind == "mistral":
        fields["sliding_window"] = section["sliding_window"]
    if kind == "qwen2":
        fields.update(use_sliding_window=False, sliding_window=None)
    return {"architectures": [ARCHITECTURES[kind]], "model_type": kind, **common, **fields}


def _gpt2_fields(section: dict) -> dict:
    p = section["dropout"]
    return {
        "n_embd": section["n_embd"],
        "n_layer": section["n_layer"],
        "n_head": section["n_head"],
        "n_positions": section["block_size"],
        "n_inner": None,
        "activation_function": "gelu_new" if section["activation"] == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": p,
        "embd_pdrop": p,
        "attn_pdrop": p,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": section["tie_weights"],
    }


def _ffn_width(section: dict) -> int:
    from ember.models.registry import MODEL_CONFIGS

    return MODEL_CONFIGS["llama"].model_validate(section).ffn_width


def _rope_scaling_out(scaling: dict | None) -> dict | None:
    if scaling is None:
        return None
    keys = ("factor",) if scaling["type"] == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"
    )  # fmt: skip
    return {"rope_type": scaling["type"], **{k: scaling[k] for k in keys}}
