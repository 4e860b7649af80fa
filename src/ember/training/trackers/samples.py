"""A short text sampled from a language model while it trains, for the trackers' text panels.

Cheap and side-effect free: 48 tokens from an empty prompt (a new document, as ``ember
generate`` starts one), temperature 0.8, top-k 50, drawn with a generator of its own (fixed
seed) so the run's random streams, and so exact resume, are untouched; the model is put in
eval mode for it and back. Only for one process, uncompiled (a sharded or pipelined model
would need every rank; a compiled one would recompile for each new length).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from ember.data.spec import DataSpec
from ember.models.modes import evaluating

SAMPLE_TOKENS = 48


def lm_sampler(
    model: nn.Module, spec: DataSpec, codec_json: str, device: torch.device, objective: str
) -> Callable[[], str] | None:
    """``sample()`` -> text for a causal language model (task lm, objective auto); None for other runs."""
    if spec.task != "lm" or objective != "auto":
        return None
    from ember.data.tokenizer import TextCodec, codec_from_json
    from ember.generation import lm_prompt, sample_tokens

    codec = codec_from_json(codec_json) if codec_json else TextCodec(None)

    def sample() -> str:
        head, body, stop = lm_prompt(codec, asdict(spec), "")
        ids = torch.tensor([head + body], dtype=torch.long, device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        with evaluating(model):
            out = sample_tokens(model, ids, SAMPLE_TOKENS, spec.seq_len, 0.8, 50, generator, stop, codec.vocab_size)
        return codec.decode(out[0, len(head) :].tolist())

    return sample
