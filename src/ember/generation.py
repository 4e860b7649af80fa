"""Sampling from a trained language-model run, and answering with a seq2seq run.

Example::

    print(generate("runs/demo", prompt="def ", max_new_tokens=100, temperature=0.8, top_k=40))
    print(generate("runs/addition", prompt="123+456"))  # greedy decoding: 579
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ember.errors import EmberError
from ember.runs import load_trained_model


@torch.no_grad()
def sample_tokens(
    model: torch.nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    context: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``ids`` (Long[1,T]) by sampling one token at a time from the model's last logits."""
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])[:, -1, :].float()
        if temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, src: torch.Tensor, bos: int, eos: int, max_len: int) -> list[int]:
    """Decode one source (Long[1,S]) token by token, taking the likeliest token, until eos."""
    memory, mask = model.encode(src)
    out = torch.tensor([[bos]], dtype=torch.long, device=src.device)
    for _ in range(max_len):
        next_id = model.decode(out, memory, mask)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, next_id], dim=1)
        if next_id.item() == eos:
            break
    return out[0, 1:].tolist()


def _answer(model: torch.nn.Module, info: dict, run_dir: str | Path, problem: str, device: str) -> str:
    """The answer a trained addition seq2seq model gives to ``problem`` ("123+456")."""
    from ember.config import load_recipe
    from ember.data import addition

    data_cfg = load_recipe(Path(run_dir) / "recipe.yaml").data.model_dump()
    if info["data"]["task"] != "seq2seq" or data_cfg["name"] != "addition":
        raise EmberError(f"{run_dir} is not a seq2seq run on the addition data; `--prompt` for it is a sum like 12+34.")
    src = torch.tensor([addition.problem_ids(problem, data_cfg["max_digits"])], device=device)
    spec = info["data"]
    return addition.decode_tgt(greedy_decode(model, src, spec["bos_id"], spec["eos_id"], spec["seq_len"]))


def generate(
    run_dir: str | Path,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    """Continue ``prompt`` with text sampled from the language model in ``run_dir``."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise EmberError(f"--temperature must be a number >= 0 (0 = greedy), got {temperature}.")
    if top_k is not None and top_k < 0:
        raise EmberError(f"--top-k must be >= 0 (0 = sample among all tokens), got {top_k}.")
    if max_new_tokens < 0:
        raise EmberError(f"--max-new-tokens must be >= 0, got {max_new_tokens}.")
    model, info = load_trained_model(run_dir, device)
    if info["data"]["task"] == "seq2seq":
        return _answer(model, info, run_dir, prompt, device)
    if info["data"]["task"] != "lm":
        raise EmberError(
            f"{run_dir} holds a {info['data']['task']} model; `ember generate` samples from language-model and seq2seq runs."
        )
    codec = run_codec(run_dir)
    ids = codec.encode(prompt) or [0]  # an empty prompt starts at a document separator (id 0)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = sample_tokens(model, x, max_new_tokens, info["data"]["seq_len"], temperature, top_k, generator)
    start = 0 if prompt else 1  # drop the separator standing in for an empty prompt
    return codec.decode(out[0, start:].tolist())


def run_codec(run_dir: str | Path):
    """The tokenizer a language-model run was trained with (RUN/tokenizer.json; bytes if absent)."""
    from ember.atomic import read_json
    from ember.data.tokenizer import TextCodec, codec_from_json

    path = Path(run_dir) / "tokenizer.json"
    if not path.is_file():
        return TextCodec(None)
    fix = f"Copy the tokenizer.json of the data {run_dir} was trained on there, or re-run its training."
    read_json(path, fix)  # JSON or a message; tokenizers' own parser would only say "expected value"
    try:
        return codec_from_json(path.read_text(encoding="utf-8"))
    except Exception as err:  # tokenizers raises a bare Exception on a file it cannot read
        raise EmberError(
            f"{path} is not a tokenizer ember or tokenizers wrote ({str(err).splitlines()[0]:.200}). {fix}"
        ) from None
