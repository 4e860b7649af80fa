"""Hugging Face checkpoint tensors ↔ ember's parameter names, exactly (no value is changed on the way).

GPT-2 keeps q, k and v in one ``c_attn`` and stores its Linear layers as ``Conv1D``
(weights transposed: [in, out]); ember's ``gpt`` has separate ``q``/``k``/``v`` ``nn.Linear``
([out, in]). The Llama family (Llama, Mistral, Qwen2) differs from ember's ``llama`` only
by names. ``read_safetensors(dir)`` reads ``model.safetensors`` or the shards its index
names; a pickled ``pytorch_model.bin`` is refused (never unpickled).
"""

from __future__ import annotations

from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ember.atomic import read_json
from ember.errors import EmberError

# ember llama name (after "blocks.i.") -> Hugging Face name (after "model.layers.i.")
LLAMA_BLOCK = {
    "norm_1.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.q.bias": "self_attn.q_proj.bias",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.k.bias": "self_attn.k_proj.bias",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.v.bias": "self_attn.v_proj.bias",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "norm_2.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}
LLAMA_TOP = {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
GPT2_TOP = {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_emb.weight": "transformer.wpe.weight",
    "ln_f.weight": "transformer.ln_f.weight",
    "ln_f.bias": "transformer.ln_f.bias",
}
GPT2_COPIED = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")  # same layout in both
GPT2_TRANSPOSED = {"attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``hf_dir``: model.safetensors, or the shards
    model.safetensors.index.json maps the names to."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return _load(single)
    if index.is_file():
        return _load_sharded(hf_dir, index)
    if any((hf_dir / name).exists() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise EmberError(
            f"init.from_hf: {hf_dir} holds its weights as pytorch_model.bin, a pickle, which ember never loads "
            f"(unpickling runs code). Convert it once where you trust it: AutoModelForCausalLM.from_pretrained"
            f"(DIR).save_pretrained(DIR) writes model.safetensors."
        )
    raise EmberError(
        f"init.from_hf: {hf_dir} has neither model.safetensors nor model.safetensors.index.json. Point it at "
        f"the directory save_pretrained wrote."
    )


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError) as err:
        raise EmberError(f"init.from_hf: {path} is not a readable safetensors file ({err}); re-download it.") from None


def _load_sharded(hf_dir: Path, index: Path) -> dict[str, torch.Tensor]:
    weight_map = read_json(index, "init.from_hf needs the index save_pretrained wrote; re-download it.").get(
        "weight_map"
    )
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise EmberError(f"init.from_hf: {index} is not a safetensors index (no weight_map of names); re-download it.")
    files = sorted(set(weight_map.values()))
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or not (hf_dir / name).is_file():
            raise EmberError(
                f"init.from_hf: {index} names the shard {name!r}, which is not a file in {hf_dir}; "
                f"the download is incomplete or the index altered."
            )
        tensors.update(_load(hf_dir / name))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise EmberError(f"init.from_hf: the shards of {hf_dir} lack {absent[:5]} that the index names; re-download.")
    return tensors


def gpt_from_hf(hf: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """ember ``gpt`` state from GPT-2 tensors (names with or without the ``transformer.`` prefix)."""
    hf = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in hf.items()}
    out = {ours: hf.pop(theirs) for ours, theirs in GPT2_TOP.items() if theirs in hf}
    for i in range(n_layer):
        pre = f"transformer.h.{i}."
        for name in GPT2_COPIED:
            if pre + name in hf:
                out[f"blocks.{i}.{name}"] = hf.pop(pre + name)
        if pre + "attn.c_attn.weight" in hf:
            for part, w in zip("qkv", hf.pop(pre + "attn.c_attn.weight").t().chunk(3, dim=0)):
                out[f"blocks.{i}.attn.{part}.weight"] = w.contiguous()
        if pre + "attn.c_attn.bias" in hf:
            for part, b in zip("qkv", hf.pop(pre + "attn.c_attn.bias").chunk(3)):
                out[f"blocks.{i}.attn.{part}.bias"] = b.contiguous()
        for ours, theirs in GPT2_TRANSPOSED.items():
            if pre + theirs + ".weight" in hf:
                out[f"blocks.{i}.{ours}.weight"] = hf.pop(pre + theirs + ".weight").t().contiguous()
            if pre + theirs + ".bias" in hf:
                out[f"blocks.{i}.{ours}.bias"] = hf.pop(pre + theirs + ".bias")
        for buffer in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of old checkpoints
            hf.pop(pre + buffer, None)
    if "lm_head.weight" in hf:
        out["lm_head.weight"] = hf.pop("lm_head.weight")
    return {**out, **{f"unknown:{k}": v for k, v in hf.items()}}


def gpt_to_hf(state: dict[str, torch.Tensor], n_layer: int, n_embd: int, tied: bool) -> dict[str, torch.Tensor]:
    """GPT-2 tensors from an ember ``gpt`` state; absent biases (``bias: false``) are written as zeros."""

    def bias(name: str, size: int) -> torch.Tensor:
        return state[name] if name in state else torch.zeros(size, dtype=state["tok_emb.weight"].dtype)

    out = {theirs: state[ours] if ours in state else bias(ours, n_embd) for ours, theirs in GPT2_TOP.items()}
    for i in range(n_layer):
        pre, ours = f"transformer.h.{i}.", f"blocks.{i}."
        for name in GPT2_COPIED:
            out[pre + name] = bias(ours + name, n_embd)
        out[pre + "attn.c_attn.weight"] = torch.cat([state[f"{ours}attn.{p}.weight"] for p in "qkv"]).t()
        out[pre + "attn.c_attn.bias"] = torch.cat([bias(f"{ours}attn.{p}.bias", n_embd) for p in "qkv"])
        for mine, theirs in GPT2_TRANSPOSED.items():
            weight = state[f"{ours}{mine}.weight"]
            out[f"{pre}{theirs}.weight"] = weight.t()
            out[f"{pre}{theirs}.bias"] = bias(f"{ours}{mine}.bias", weight.size(0))
    if not tied:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def llama_from_hf(hf: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """ember ``llama`` state from Llama / Mistral / Qwen2 tensors."""
    hf = dict(hf)
    out = {ours: hf.pop(theirs) for ours, theirs in LLAMA_TOP.items() if theirs in hf}
    for i in range(n_layer):
        for ours, theirs in LLAMA_BLOCK.items():
            if f"model.layers.{i}.{theirs}" in hf:
                out[f"blocks.{i}.{ours}"] = hf.pop(f"model.layers.{i}.{theirs}")
        hf.pop(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", None)  # a buffer older checkpoints kept
    if "lm_head.weight" in hf:
        out["lm_head.weight"] = hf.pop("lm_head.weight")
    return {**out, **{f"unknown:{k}": v for k, v in hf.items()}}


def llama_to_hf(state: dict[str, torch.Tensor], n_layer: int, tied: bool) -> dict[str, torch.Tensor]:
    """Llama-family tensors from an ember ``llama`` state."""
    out = {theirs: state[ours] for ours, theirs in LLAMA_TOP.items()}
    for i in range(n_layer):
        for ours, theirs in LLAMA_BLOCK.items():
            if f"blocks.{i}.{ours}" in state:
                out[f"model.layers.{i}.{theirs}"] = state[f"blocks.{i}.{ours}"]
    if not tied:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}
