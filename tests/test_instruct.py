"""Instruction data: prompt/response rows and chat messages become rows whose loss counts the answers only
(their tokens and the end-of-text id), exact under accumulation; a model learns the answers and `ember
generate` asks in the same template."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from ember.cli import main
from ember.config import apply_overrides, recipe_from_dict
from ember.data.build import build_sets
from ember.data.config import DataConfig
from ember.data.prepare import prepare, prepare_kind
from ember.data.spec import IGNORE_INDEX
from ember.data.tokenizer import TextCodec, load_tokenizer
from ember.errors import EmberError
from ember.training.loop import train

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()


def reverse_rows(n: int = 400) -> list[dict]:
    """Prompt: some words; response: the same words in reverse (learnable, checkable)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (3,), generator=g)]
        rows.append({"prompt": "reverse: " + " ".join(words), "response": " ".join(reversed(words))})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepared(tmp_path, rows, **settings):
    cfg = DataConfig(**{"vocab_size": 300, "val_fraction": 0.1, "seq_len": 64, **settings})
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert prepare_kind([str(source)], cfg) == "instruct"
    return prepare([str(source)], tmp_path / "data", cfg, progress=False).manifest


def test_only_the_answers_and_their_end_are_targets(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "alpha beta"},
                {"role": "assistant", "content": "beta alpha"},
                {"role": "user", "content": "gamma"},
                {"role": "assistant", "content": "gamma"},
            ]
        }
    ] * 30 + [{"messages": [{"role": "user", "content": "no answer"}]}, {"other": 1}]
    m = prepared(tmp_path, rows, seq_len=256)
    assert m["kind"] == "instruct" and m["stats"]["no_conversation"] == 2 and m["stats"]["truncated"] == 0
    sets = build_sets(DataConfig(name="prepared", path=str(tmp_path / "data"), seq_len=256))
    assert sets.spec.task == "lm" and sets.spec.template == m["chat_template"]
    batch = sets.train.get(torch.arange(2))
    codec = TextCodec(load_tokenizer(tmp_path / "data" / "tokenizer.json"))
    x, y = batch["x"][0], batch["y"][0]
    learnt = x.new_tensor([t for t in y.tolist() if t != IGNORE_INDEX])
    eos = m["eot_id"]
    assert (learnt == eos).sum() == 2  # each answer ends with the tokenizer's end-of-text id
    assert codec.decode([t for t in learnt.tolist() if t != eos]) == "beta alpha\ngamma\n"  # answers, not prompts
    assert torch.equal(y[:-1][y[:-1] != IGNORE_INDEX], x[1:][y[:-1] != IGNORE_INDEX])  # y is x shifted


def test_refused_rows_and_template(tmp_path):
    with pytest.raises(EmberError, match="No row holds a conversation"):
        prepared(tmp_path, [{"prompt": "a", "response": ""}] * 5)
    with pytest.raises(EmberError, match="chat_template must hold"):
        prepared(tmp_path, reverse_rows(20), chat_template="{role}: no content")


def recipe(data, *overrides):
    raw = {
        "data": {"name": "prepared", "path": str(data), "seq_len": 64},
        "model": {"name": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
        "optim": {"lr": 0.01},
        "schedule": {"warmup_steps": 0},
        "train": {"max_steps": 3, "batch_size": 8, "eval_every": 0, "progress": False, "checkpoint_every": 0},
    }
    return recipe_from_dict(apply_overrides(raw, list(overrides)))


def test_accumulation_equals_one_big_batch(tmp_path):
    """Rows hold different numbers of answer tokens: only normalising by the step's target count passes."""
    prepared(tmp_path, reverse_rows(120))
    sgd = ("optim.name=sgd", "optim.lr=0.5")
    small = recipe(tmp_path / "data", "train.batch_size=4", "train.grad_accum=3", *sgd)
    big = recipe(tmp_path / "data", "train.batch_size=12", "train.grad_accum=1", *sgd)
    a = safetensors.torch.load_file(str(train(small, tmp_path / "a").run_dir / "model.safetensors"))
    b = safetensors.torch.load_file(str(train(big, tmp_path / "b").run_dir / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_model_learns_the_answers_and_generate_asks_in_the_template(tmp_path, capsys):
    prepared(tmp_path, reverse_rows(2000))
    run = tmp_path / "run"
    result = train(recipe(tmp_path / "data", "train.max_steps=1000", "train.batch_size=32", "optim.lr=0.003"), run)
    assert result.metrics["loss"] < 0.3, result.metrics  # per answer token; the prompt's words are not learnt
    assert main(["generate", str(run), "--prompt", "reverse: alpha beta gamma", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("gamma beta alpha\n")
