"""Hugging Face checkpoints into ember, exactly (DESIGN invariant 11): ``init.from_hf: DIR``.

``ember.runs.starting_model`` builds ember's ``gpt`` or ``llama`` from the model section DIR's
config.json gives (``ember.interop.hf_config``, resolved when the recipe is read), loads DIR's
safetensors weights into it (``ember.interop.hf_weights`` maps the names) and checks that the
data was tokenised with DIR's tokenizer.json; ``source_ids`` keeps the checkpoint's own special-token
ids and generation settings for the run's model.json, so that ``ember export`` writes them back. No
``transformers`` needed.

Example::

    model = load_hf_weights(build_model(cfg, spec), Path("hf/llama-tiny"), cfg.model_dump())
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ember.atomic import read_json
from ember.errors import EmberError
from ember.interop.hf_weights import gpt_from_hf, llama_from_hf, read_safetensors
from ember.models.stored import dtype_fits


def load_hf_weights(model: nn.Module, hf_dir: Path, section: dict) -> nn.Module:
    """Copy the checkpoint in ``hf_dir`` into ``model`` (built from ``section``, the model section
    config.json resolved to); bf16 or fp16 tensors are cast to the model's dtype. Every parameter must
    come from the checkpoint and every tensor of it must find a place, or EmberError."""
    tensors = read_safetensors(hf_dir)
    map_in = gpt_from_hf if section["name"] == "gpt" else llama_from_hf
    mapped = map_in(tensors, section["n_layer"])
    unknown = sorted(k.removeprefix("unknown:") for k in mapped if k.startswith("unknown:"))
    if unknown:
        raise EmberError(
            f"init.from_hf: {hf_dir}'s weights hold tensors ember's {section['name']} has no place for "
            f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); the checkpoint is not the plain "
            f"architecture its config.json names. Pick a checkpoint without them."
        )
    _tie(mapped, section, hf_dir)
    state = model.state_dict()
    wanted = {k for k in state if not (section["tie_weights"] and k == "lm_head.weight")}
    missing = sorted(wanted - set(mapped))
    wrong = [
        f"{k} {str(v.dtype).removeprefix('torch.')} {list(v.shape)} (model {list(state[k].shape)})"
        for k, v in mapped.items()
        if v.shape != state[k].shape or not dtype_fits(state[k].dtype, v.dtype)
    ]
    if missing or wrong:
        raise EmberError(
            f"init.from_hf: {hf_dir}'s weights do not fit its config.json (missing {missing[:5]}, other shapes or "
            f"dtypes {wrong[:3]}); the download is incomplete or the files belong to different models."
        )
    with torch.no_grad():
        for name, value in mapped.items():
            state[name].copy_(value)  # the state dict's tensors are the parameters' storage; casts to fp32
    return model


ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
SKIPPED_GENERATION = ("transformers_version", "_from_model_config")


def source_ids(hf_dir: Path) -> dict:
    """The checkpoint's own special-token ids (config.json's bos/eos/pad, e.g. Llama 3's list of eos ids)
    and generation_config.json's settings, as the run's model.json keeps them (``hf_source``): an export
    writes the user's values back instead of the one eos id ember ends documents with."""
    from ember.interop.hf_config import read_hf_config

    config = read_hf_config(hf_dir)
    ids = {k: config[k] for k in ID_FIELDS if _is_id(config.get(k))}
    generation = {}
    path = hf_dir / "generation_config.json"
    if path.is_file():
        loaded = read_json(path, "Re-save the checkpoint with save_pretrained.", kind=object)
        if isinstance(loaded, dict):
            generation = {k: v for k, v in loaded.items() if k not in SKIPPED_GENERATION}
    return {"hf_source": {"ids": ids, "generation_config": generation}} if ids or generation else {}


def _is_id(value) -> bool:
    def one(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    return one(value) or (isinstance(value, list) and bool(value) and all(map(one, value)))


def _tie(mapped: dict, section: dict, hf_dir: Path) -> None:
    """A tied checkpoint may store the LM head anyway (it must then equal the embedding); an untied one must."""
    head = mapped.get("lm_head.weight")
    if not section["tie_weights"]:
        if head is None:
            raise EmberError(
                f"init.from_hf: {hf_dir}/config.json says tie_word_embeddings=false but the weights have no "
                f"lm_head.weight; the checkpoint is inconsistent. Re-save it with save_pretrained."
            )
        return
    if head is not None and not torch.equal(mapped.pop("lm_head.weight"), mapped["tok_emb.weight"]):
        raise EmberError(
            f"init.from_hf: {hf_dir}/config.json says tie_word_embeddings=true but lm_head.weight differs from "
            f"the token embedding; tying would drop one of them. Set tie_word_embeddings to false in config.json "
            f"if the head is meant to be its own."
        )


def check_hf_tokenizer(hf_dir: Path, codec_json: str) -> None:
    """EmberError unless the data was tokenised with ``hf_dir``'s tokenizer.json (same vocabulary)."""
    path = hf_dir / "tokenizer.json"
    fix = f"Prepare the data with it: ember data prepare SRC --tokenizer {path}."
    if not path.is_file():
        raise EmberError(
            f"init.from_hf: {hf_dir} has no tokenizer.json, so ember cannot check that the data's token ids "
            f"mean what the weights learned. Save the fast tokenizer there (AutoTokenizer.from_pretrained(DIR)"
            f".save_pretrained(DIR) writes it), then {fix[0].lower()}{fix[1:]}"
        )
    if not codec_json:
        return
    if _vocabulary(path.read_text(encoding="utf-8")) != _vocabulary(codec_json):
        raise EmberError(
            f"init.from_hf: the data was tokenised with another tokenizer than {path}, so each token id "
            f"would mean another piece of text to the checkpoint's weights. {fix}"
        )


def _vocabulary(text: str) -> dict | None:
    from tokenizers import Tokenizer

    try:
        if json.loads(text).get("codec") == "bytes":
            return None
        return Tokenizer.from_str(text).get_vocab(with_added_tokens=True)
    except Exception as err:  # tokenizers raises a bare Exception on a file it cannot read
        raise EmberError(f"init.from_hf: a tokenizer.json cannot be read ({str(err)[:200]}).") from None
