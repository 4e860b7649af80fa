"""A table, as a user with a CSV would go: prepare → train → eval → cv → prune → quantize → report,
every step through the command line (issue 17's "each kind's full chain is one CLI test")."""

from __future__ import annotations

import csv
import json

from sklearn.datasets import load_breast_cancer

from ember.cli import main


def test_a_csv_goes_from_prepare_to_report_on_the_command_line(tmp_path, capsys):
    data = load_breast_cancer()
    source = tmp_path / "cancer.csv"
    with open(source, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*data.feature_names, "diagnosis"])
        writer.writerows([*row, data.target_names[label]] for row, label in zip(data.data, data.target))
    prepared, run = tmp_path / "data", tmp_path / "runs" / "mlp"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data: {{name: prepared, path: {prepared}, test_fraction: 0.1}}\n"
        "model: {name: mlp, depth: 2, width: 32}\noptim: {lr: 0.003}\n"
        "train: {max_steps: 120, batch_size: 32, eval_every: 0, progress: false}\neval: {metric: accuracy}\n"
    )
    assert (
        main(["data", "prepare", str(source), "--label", "diagnosis", "--out", str(prepared), "--test-fraction", "0.1"])
        == 0
    )
    assert main(["train", str(recipe), "--run-dir", str(run)]) == 0
    assert main(["eval", str(run), "--split", "test"]) == 0
    shown = capsys.readouterr().out
    assert "benign" in shown and "malignant" in shown  # classes by name
    assert json.loads((run / "eval.json").read_text())["metrics"]["accuracy"] > 0.85
    row = ",".join(f"{name}={value}" for name, value in zip(data.feature_names, data.data[0]))  # a malignant row
    assert main(["generate", str(run), "--prompt", row]) == 0
    ranked = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    assert ranked[0][0] == "malignant" and float(ranked[0][1]) > 0.5 and ranked[1][0] == "benign"
    assert (
        main(["cv", str(recipe), "--folds", "2", "--run-dir", str(tmp_path / "cv"), "--set", "train.max_steps=30"]) == 0
    )
    assert main(["prune", str(run), "--amount", "0.5", "--out", str(tmp_path / "pruned")]) == 0
    assert main(["quantize", str(run), "--out", str(tmp_path / "int8")]) == 0
    assert main(["report", str(run), "--no-eval"]) == 0
    assert "malignant" in (run / "report.html").read_text()
