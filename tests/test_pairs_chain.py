"""Sequence pairs, as a user with a JSONL of source/target texts would go: prepare → train → eval (BLEU and
decoded exact match) → generate with beam search → report, every step through the command line
(issue 17's "each kind's full chain is one CLI test")."""

from __future__ import annotations

import json

from ember.cli import main
from ember.data.pairs import number_words, write_sample


def test_pairs_go_from_prepare_to_report_on_the_command_line(tmp_path, capsys):
    source = write_sample(tmp_path / "numbers.jsonl", seed=0, count=1500, high=1000)
    prepared, run = tmp_path / "data", tmp_path / "runs" / "s2s"
    assert (
        main(["data", "prepare", str(source), "--out", str(prepared), "--vocab-size", "512", "--test-fraction", "0.1"])
        == 0
    )
    shown = capsys.readouterr().out
    assert "train: 800 pairs" in shown and "truncated: 0 source(s), 0 target(s)" in shown  # the 1000 numbers < 1000
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data: {{name: prepared, path: {prepared}}}\n"
        "model: {name: seq2seq, n_encoder_layer: 1, n_decoder_layer: 1, n_head: 2, n_embd: 32, max_len: 8}\n"
        "optim: {lr: 0.003}\ntrain: {max_steps: 200, batch_size: 32, eval_every: 0, progress: false}\n"
        "eval: {metric: exact_match}\n"
    )
    assert main(["train", str(recipe), "--run-dir", str(run)]) == 0
    assert main(["eval", str(run), "--split", "test", "--decode-samples", "40"]) == 0
    shown = capsys.readouterr().out
    assert "bleu" in shown and "40 samples decoded, greedy" in shown
    report = json.loads((run / "eval.json").read_text())
    assert report["samples"] == 100 and report["decoding"] == {"samples": 40, "beam": 1}
    metrics = report["metrics"]
    assert metrics["accuracy"] > 0.5 and 0 <= metrics["decoded_exact_match"] <= 1 and 0.2 < metrics["bleu"] <= 1
    assert main(["generate", str(run), "--prompt", "4 2", "--beam", "3"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and set(answer.split()) <= {w for n in range(1000) for w in number_words(n).split()}
    assert main(["generate", str(run), "--prompt", "1 2 3 4"]) == 2  # the sources were at most 3 digits
    assert "--prompt has 4 tokens" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "4 2", "--beam", "0"]) == 2  # argparse: at least 1
    capsys.readouterr()
    assert main(["report", str(run), "--no-eval"]) == 0
    page = (run / "report.html").read_text()
    assert "bleu" in page and "decoded_exact_match" in page
