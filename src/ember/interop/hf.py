"""Hugging Face checkpoints out of ember, exactly (DESIGN invariant 11); the way in is
``ember.interop.hf_import`` (``init.from_hf: DIR`` in a recipe).

``export_hf(run_dir, out)`` (``ember export RUN --format hf --out DIR``) writes what
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` read: config.json,
model.safetensors (Hugging Face names), generation_config.json, tokenizer.json,
tokenizer_config.json and special_tokens_map.json; then, when ``transformers`` is installed,
loads it back and compares its logits with ember's. ember's own code never imports
``transformers`` to read or write: config.json and safetensors are plain formats.

Example::

    result = export_hf(Path("runs/gpt-tiny"), Path("exports/gpt-tiny"))
    result.max_abs_diff  # e.g. 2.4e-07
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ember.atomic import atomic_path, write_json_atomic, write_text_atomic
from ember.errors import EmberError
from ember.interop.hf_config import hf_config
from ember.interop.hf_weights import gpt_to_hf, llama_to_hf
from ember.interop.result import ExportResult

CHECK_TOLERANCE = 1e-4  # largest logit difference the export's self-check accepts (fp32; typically ~1e-6)
CHECK_TOKENS = 8
CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


# --------------------------------------------------------------------------- export


def export_hf(run_dir: Path, out: Path, merge: bool = False) -> ExportResult:
    """Write the finished lm run ``run_dir`` (gpt or llama) as a transformers checkpoint directory ``out``;
    ``merge`` folds LoRA adapters into the weights first. Checked against transformers when installed."""
    from ember.models.registry import MODEL_CONFIGS
    from ember.runs import load_trained_model, read_model_info

    _check_exportable(read_model_info(run_dir), run_dir, merge)
    model, info = load_trained_model(run_dir, "cpu")
    if "lora" in info:
        model = _merged(model)
    section = MODEL_CONFIGS[info["model"]["name"]].model_validate(info["model"]).model_dump(mode="json")
    eos = int(info["data"].get("eos_id", 0))
    bos = int(info["data"].get("bos_id", eos))
    tokenizer = run_tokenizer(run_dir)
    files = write_checkpoint(out, model, section, tokenizer, bos, eos, info.get("hf_source"))
    check, diff, notes = self_check(out, model, int(info["data"]["vocab_size"]), section["block_size"], tokenizer)
    return ExportResult("hf", out, files, check, diff, notes)


def write_checkpoint(
    out: Path, model: nn.Module, section: dict, tokenizer, bos: int, eos: int, source: dict | None = None
) -> tuple[str, ...]:
    """Write ``model`` (an ember gpt or llama built from the model section ``section``) and ``tokenizer``
    (a ``tokenizers.Tokenizer``) into ``out`` as a transformers checkpoint directory; returns the files.
    ``source``: the ids and generation settings of the checkpoint a run was imported from (model.json's
    ``hf_source``), written back as they were; else ``bos``/``eos``, the data's."""
    ids = {"bos_token_id": bos, "eos_token_id": eos, **(source or {}).get("ids", {})}
    config = hf_config(section, model.tok_emb.num_embeddings, ids["bos_token_id"], ids["eos_token_id"])
    if "pad_token_id" in ids:
        config["pad_token_id"] = ids["pad_token_id"]
    foreign = sorted(p.name for p in out.iterdir() if p.name not in CHECKPOINT_FILES) if out.is_dir() else []
    if foreign:  # e.g. another model's shards, which transformers could read instead of or beside ours
        raise EmberError(
            f"{out} already holds other files ({', '.join(foreign[:5])}); a checkpoint directory must hold one "
            f"model. Export into a new or empty directory (files of an earlier export there are replaced)."
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", config)
    tied = model.lm_head.weight is model.tok_emb.weight
    _write_weights(out / "model.safetensors", _hf_tensors(model, section, tied))
    generation = {**ids, **(source or {}).get("generation_config", {})}  # its own ids may differ from config's
    pad = _pad_id(tokenizer, eos)
    generation.setdefault("pad_token_id", pad)
    write_json_atomic(out / "generation_config.json", generation)
    _write_tokenizer(tokenizer, out, bos, eos, pad, section["block_size"])
    return CHECKPOINT_FILES


def _check_exportable(info: dict, run_dir: Path, merge: bool) -> None:
    name, task = info["model"]["name"], info["data"].get("task")
    if name not in ("gpt", "llama") or task != "lm":
        raise EmberError(
            f"ember export --format hf writes language models (gpt, llama) as transformers checkpoints; "
            f"{run_dir} holds a {name} model of task {task}. A classifier exports with --format onnx."
        )
    if "quantization" in info:
        raise EmberError(
            f"{run_dir} is quantised ({info['quantization'].get('method')}); transformers would not read its "
            f"int8 tensors as ember does. Export the float run it was quantised from."
        )
    if info.get("pruning", {}).get("structured"):
        raise EmberError(
            f"{run_dir} was pruned structurally: its layers are narrower than its model section says, and a "
            f"transformers config.json has one width for all of them. Export the run before structured "
            f"pruning, or prune unstructured (masks keep the shapes)."
        )
    if "lora" in info and not merge:
        raise EmberError(
            f"{run_dir} was trained with LoRA adapters; a transformers checkpoint holds full weights. Pass "
            f"--merge (merge=True) to fold the adapters into them."
        )


def _merged(model: nn.Module) -> nn.Module:
    from ember.plugins.lora import merge_adapters

    return merge_adapters(model)  # W += alpha/r B A in every adapted layer; the plain layers stay


def _hf_tensors(model: nn.Module, section: dict, tied: bool) -> dict[str, torch.Tensor]:
    state = {k: v.float() for k, v in model.state_dict().items()}
    if section["name"] == "gpt":
        return gpt_to_hf(state, section["n_layer"], section["n_embd"], tied)
    return llama_to_hf(state, section["n_layer"], tied)


def _write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})


def run_tokenizer(run_dir: Path):
    """The ``tokenizers.Tokenizer`` a run's data was prepared with (RUN/tokenizer.json); for a ``bytes`` run
    (or one from before runs kept it) an equivalent byte-level one."""
    from tokenizers import Tokenizer

    path = run_dir / "tokenizer.json"
    text = path.read_text(encoding="utf-8") if path.is_file() else json.dumps({"codec": "bytes"})
    try:
        return bytes_tokenizer() if json.loads(text).get("codec") == "bytes" else Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception on a file it cannot read
        raise EmberError(
            f"{path} is not a tokenizer tokenizers can read ({str(err)[:200]}); copy the tokenizer.json the "
            f"run's data was prepared with into {run_dir}."
        ) from None


def _pad_id(tokenizer, eos: int) -> int:
    """The tokenizer's own padding token (``<pad>``, Llama 3's ``<|finetune_right_pad_id|>``...: what
    ``ember data prepare`` pads labelled text with), else ``eos``."""
    from ember.data.tokenizer import token_roles

    eos_token = tokenizer.id_to_token(eos)
    return token_roles(tokenizer, eos_token).pad_id if eos_token is not None else eos


def _write_tokenizer(tokenizer, out: Path, bos: int, eos: int, pad: int, context: int) -> None:
    """tokenizer.json and the two files that make ``AutoTokenizer`` read it as a
    ``PreTrainedTokenizerFast`` with the run's special tokens."""
    write_text_atomic(out / "tokenizer.json", tokenizer.to_str())
    special = {"bos_token": tokenizer.id_to_token(bos), "eos_token": tokenizer.id_to_token(eos)}
    special["pad_token"] = tokenizer.id_to_token(pad)
    if None in special.values():
        raise EmberError(
            f"The tokenizer has no token for the data's bos or eos id ({bos}, {eos}); the run's "
            f"tokenizer.json is not the one its data was prepared with. Copy that one into the run."
        )
    special.update(_own_specials(tokenizer, set(special.values())))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
    }
    write_json_atomic(out / "tokenizer_config.json", config)
    write_json_atomic(out / "special_tokens_map.json", special)


def _own_specials(tokenizer, named: set[str]) -> dict:
    """The tokenizer's other special tokens, as transformers names them: its model's unknown token
    (``unk_token``) and every other added special token (``additional_special_tokens``: a chat's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``), which ``AutoTokenizer`` would not know as special otherwise."""
    model = json.loads(tokenizer.to_str()).get("model", {})
    unk = model.get("unk_token")
    if unk is None and isinstance(model.get("unk_id"), int):  # Unigram names it by id
        unk = tokenizer.id_to_token(model["unk_id"])
    out = {"unk_token": unk} if isinstance(unk, str) and tokenizer.token_to_id(unk) is not None else {}
    added = sorted(tokenizer.get_added_tokens_decoder().items())
    extra = [t.content for _, t in added if t.special and t.content not in named | set(out.values())]
    return {**out, "additional_special_tokens": extra} if extra else out


def bytes_tokenizer():
    """A ``tokenizers.Tokenizer`` that encodes as ember's bytes codec does: each UTF-8 byte b is id b
    (a byte-level BPE of the 256 bytes and no merges), so a bytes run exports with a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _byte_chars().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte → printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(chars.items()))


@torch.no_grad()
def self_check(
    out: Path, model: nn.Module, vocab: int, context: int, tokenizer=None
) -> tuple[str, float | None, tuple[str, ...]]:
    """Load ``out`` with transformers (when installed) and compare its logits with ``model``'s on a few
    tokens: (what was checked, the largest absolute difference, notes). A difference above
    CHECK_TOLERANCE is an EmberError: the export is not the model. With ``tokenizer`` (the run's), also
    whether ``AutoTokenizer`` reads the written one into the same ids (a note says when it does not)."""
    if importlib.util.find_spec("transformers") is None:
        return "", None, ("not checked: transformers is not installed (pip install 'ember[hf]' to check exports)",)
    import transformers
    from transformers import AutoModelForCausalLM

    bars = transformers.utils.logging
    shown = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # the summary says what was checked; no loading bar on stderr
    try:
        theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    except Exception as err:  # whatever this transformers version raises on a directory it cannot read
        raise EmberError(
            f"transformers {transformers.__version__} could not load the export in {out} to check it "
            f"({type(err).__name__}: {str(err)[:300]}). ember writes checkpoints for transformers 4.56 and later; "
            f"update transformers, or report this with the run's model.json."
        ) from None
    finally:
        if shown:  # a program embedding ember keeps its own setting
            bars.enable_progress_bar()
    n = min(CHECK_TOKENS, context)
    ids = (torch.arange(n) * 7919 + 13).remainder(vocab).unsqueeze(0)  # spread over the data's vocabulary
    diff = (theirs(ids).logits - model.eval()(ids).float()).abs().max().item()
    what = f"transformers' {type(theirs).__name__} logits on {n} tokens against ember's"
    if not diff <= CHECK_TOLERANCE:
        raise EmberError(
            f"The export in {out} does not compute what the run does: {what} differ by up to {diff:.3g} "
            f"(> {CHECK_TOLERANCE}). This is a bug in ember's export; please report it with the run's model.json."
        )
    return what, diff, () if tokenizer is None else tokenizer_notes(out, tokenizer)


TOKENIZER_PROBE = "def f(x):\n    return x + 12345  # héllo,  wörld ✓\n\n\tEnd. It's 3.14!"


def tokenizer_notes(out: Path, tokenizer) -> tuple[str, ...]:
    """() when ``AutoTokenizer.from_pretrained(out)`` encodes a probe text as ``tokenizer`` (the run's) does;
    else a note naming the difference and how to load the tokenizer the model was trained with. transformers 5
    rebuilds some model types' tokenizers from tokenizer.json's vocabulary with its own pre-tokenizer
    (qwen2: Qwen2Tokenizer), which a run's own tokenizer need not share."""
    from transformers import AutoTokenizer

    fix = f"load it as PreTrainedTokenizerFast(tokenizer_file='{out / 'tokenizer.json'}') to get the ids it was trained on"
    try:
        theirs = AutoTokenizer.from_pretrained(str(out))
        got = list(theirs(TOKENIZER_PROBE)["input_ids"])
    except Exception as err:  # whatever this transformers version raises on a tokenizer it cannot read
        return (
            f"tokenizer not checked: AutoTokenizer could not load it ({type(err).__name__}: {str(err)[:200]}); {fix}",
        )
    want = tokenizer.encode(TOKENIZER_PROBE).ids
    if got == want:
        return ()
    return (
        f"WARNING: transformers' AutoTokenizer reads {out / 'tokenizer.json'} as {type(theirs).__name__}, which "
        f"encodes text into other ids than the run's tokenizer ({TOKENIZER_PROBE!r}: {got[:12]} against "
        f"{want[:12]}); the model would see text cut otherwise than in training. Do not use AutoTokenizer for "
        f"this checkpoint: {fix}.",
    )
