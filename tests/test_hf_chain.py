"""Issue 18's chain, as a user without hub access goes, every step on the command line: a small Llama-family
Hugging Face checkpoint and instructions are written offline → the instructions are prepared with the
checkpoint's tokenizer → the shipped recipe LoRA-fine-tunes the imported model → `ember export --merge`
writes a transformers checkpoint → transformers loads it and gives ember's logits and greedy answer."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from ember.cli import main
from ember.data.instruct import prompt_ids
from ember.generation import run_codec, sample_tokens
from ember.recipe_header import header_commands
from ember.runs import load_trained_model

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "llama-lora-instruct.yaml")


@pytest.mark.slow
def test_import_lora_export_and_generate_in_transformers(tmp_path, capsys, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    for argv in header_commands(open(RECIPE).read()):  # the recipe's own header: sample, sample, prepare
        assert main(argv) == 0, argv
    run, out = tmp_path / "runs" / "lora", tmp_path / "exports" / "lora"
    short = ["--set", "train.max_steps=60", "--set", "train.eval_every=30", "--set", "train.progress=false"]
    assert main(["train", RECIPE, "--run-dir", str(run), *short]) == 0
    info = json.loads((run / "model.json").read_text())
    assert info["model"]["name"] == "llama" and info["model"]["n_kv_head"] == 2 and "lora" in info
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("split") == "val"]
    assert losses[-1] < 0.7 * math.log(info["data"]["vocab_size"]), losses  # below a random model's, ln(V)

    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--merge", "--out", str(out)]) == 0
    assert "checked: transformers' LlamaForCausalLM logits" in capsys.readouterr().out

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    ours, _ = load_trained_model(run)
    question = "Name the function that takes (self) and runs:\n        return self._name"
    ids = torch.tensor([prompt_ids(run_codec(run), question, info["data"]["template"])])
    assert ids[0, 0].item() == tokenizer.bos_token_id  # the prompt starts as the tokenizer starts a text
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-4)
        theirs = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id)
        greedy = ids
        for _ in range(8):  # 8 greedy tokens past any end-of-text, in transformers
            greedy = torch.cat([greedy, hf(greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(sample_tokens(ours, ids, 8, 256, temperature=0), greedy)  # and in ember
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", question, "--temperature", "0", "--max-new-tokens", "8"]) == 0
    answer = tokenizer.decode(theirs[0, ids.shape[1] :], skip_special_tokens=True)
    assert capsys.readouterr().out.strip() == answer.strip()  # the same answer, up to its end-of-text
