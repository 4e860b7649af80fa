"""A small Llama-family checkpoint in Hugging Face's format, written offline (``ember data sample
hf-llama --out DIR``): what ``init.from_hf`` reads, for trying import, LoRA fine-tuning and export on a
machine that cannot reach the hub.

The tokenizer is a Llama-style BPE (``<unk>`` ``<s>`` ``</s>`` as ids 0-2, a template that starts each
text with ``<s>``, sentencepiece-style spaces) trained on the standard library's functions; the model is
an ember ``llama`` (grouped-query attention, RoPE, SwiGLU) with random weights drawn from ``seed``,
written by the exporter's own writer, so that ``transformers`` loads it as a ``LlamaForCausalLM``.

Example::

    write_llama_sample(Path("samples/tiny-llama"), texts)  # config.json, model.safetensors, tokenizer.json, ...
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ("<unk>", "<s>", "</s>")
SECTION = {
    "name": "llama",
    "n_layer": 2,
    "n_head": 4,
    "n_kv_head": 2,
    "n_embd": 128,
    "block_size": 512,
    "tie_weights": False,
}


def llama_tokenizer(texts: list[str], vocab_size: int = 2048):
    """A Llama-style BPE ``tokenizers.Tokenizer`` trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def write_llama_sample(out: Path, texts: list[str], seed: int = 0) -> list[str]:
    """Write the sample checkpoint directory ``out``, its tokenizer trained on ``texts``; returns [out]
    (what init.from_hf names)."""
    from ember.data.spec import DataSpec
    from ember.interop.hf import write_checkpoint
    from ember.models.registry import MODEL_CONFIGS, build_model

    tokenizer = llama_tokenizer(texts)
    section = MODEL_CONFIGS["llama"].model_validate(SECTION)
    torch.manual_seed(seed)
    model = build_model(section, DataSpec("lm", vocab_size=tokenizer.get_vocab_size(), seq_len=256))
    write_checkpoint(Path(out), model.eval(), section.model_dump(mode="json"), tokenizer, bos=1, eos=2)
    return [str(out)]
