"""Labelled text, as a user with a JSONL of texts and labels would go: prepare → train → eval → generate
(the classes of a new text) → cv → ensemble → prune → quantize → distill → report, every step through the command line (issue 17's
"each kind's full chain is one CLI test")."""

from __future__ import annotations

import json

from ember.cli import main
from ember.data.samples import stdlib_functions


def test_labelled_text_goes_from_prepare_to_report_on_the_command_line(tmp_path, capsys):
    picked = {"email": 0, "logging": 0, "unittest": 0}
    source = tmp_path / "functions.jsonl"
    with open(source, "w") as f:
        for row in stdlib_functions():
            if row["package"] in picked and picked[row["package"]] < 150:
                picked[row["package"]] += 1
                f.write(json.dumps(row) + "\n")
    prepared, run = tmp_path / "data", tmp_path / "runs" / "rnn"
    flags = ["--label", "package", "--out", str(prepared), "--test-fraction", "0.1", "--vocab-size", "512"]
    assert main(["data", "prepare", str(source), *flags, "--set", "seq_len=64"]) == 0
    assert "labelled text: 3 classes of 'package': email, logging, unittest" in capsys.readouterr().out
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data: {{name: prepared, path: {prepared}, test_fraction: 0.1}}\n"
        "model: {name: rnn, kind: gru, embd: 32, hidden_size: 32, bidirectional: true}\noptim: {lr: 0.01}\n"
        "train: {max_steps: 100, batch_size: 32, eval_every: 0, progress: false}\neval: {metric: accuracy}\n"
        "plugins: [{name: class_weights}]\n"
    )
    assert main(["train", str(recipe), "--run-dir", str(run)]) == 0
    assert main(["eval", str(run), "--split", "test"]) == 0
    shown = capsys.readouterr().out
    assert "logging" in shown and "unittest" in shown  # classes by name
    assert json.loads((run / "eval.json").read_text())["metrics"]["accuracy"] > 0.6  # chance: 1/3
    assert main(["generate", str(run), "--prompt", "def test_it(self):\n    self.assertEqual(f(), 1)"]) == 0
    ranked = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    probs = [float(p) for _, p in ranked]
    assert {name for name, _ in ranked} == set(picked) and probs == sorted(probs, reverse=True)
    assert abs(sum(probs) - 1) < 0.01  # every class, by name, likeliest first
    cv = tmp_path / "cv"
    assert main(["cv", str(recipe), "--folds", "2", "--run-dir", str(cv), "--set", "train.max_steps=20"]) == 0
    assert main(["ensemble", *map(str, sorted(cv.glob("fold_*"))), "--split", "test"]) == 0
    assert main(["prune", str(run), "--amount", "0.5", "--out", str(tmp_path / "pruned")]) == 0
    assert main(["quantize", str(run), "--out", str(tmp_path / "int8")]) == 0
    student = ["--set", "model.hidden_size=16", "--set", "train.max_steps=20", "--set", "plugins=[]"]
    assert (
        main(["distill", "--teacher", str(run), "--student", str(recipe), *student, "--run-dir", str(tmp_path / "s")])
        == 0
    )
    assert main(["report", str(run), "--no-eval"]) == 0
    assert "unittest" in (run / "report.html").read_text()
