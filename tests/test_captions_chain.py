"""Image–text pairs, as a user with an image folder and a captions file would go: prepare → train →
eval (zero-shot, classes by name) → probe → cv → ensemble → distill → prune → quantize → report, every step
through the command line (issue 17's "each kind's full chain is one CLI test"); and a flat folder
(no classes), validated by in-batch retrieval."""

from __future__ import annotations

import json
import shutil

from ember.cli import main
from ember.data.caption_prepare import write_sample

TINY_CLIP = (
    "model: {name: clip, image: {name: cnn, width: 8, depth: 1, stages: 2}, text_layers: 1, text_heads: 2, "
    "text_embd: 32, embed_dim: 32}\noptim: {name: adamw, lr: 0.003}\nschedule: {warmup_steps: 5}\n"
)


def test_an_image_folder_with_captions_goes_from_prepare_to_report(tmp_path, capsys):
    mapping = write_sample(tmp_path / "sample")
    prepared, run = tmp_path / "data", tmp_path / "runs" / "clip"
    argv = ["data", "prepare", str(tmp_path / "sample" / "images"), "--captions", str(mapping)]
    assert main([*argv, "--out", str(prepared), "--test-fraction", "0.1"]) == 0
    assert "captions: 1,797 pairs of (1, 8, 8) images, 10 classes" in capsys.readouterr().out
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data: {{name: prepared, path: {prepared}, prompt: 'a picture of the number {{}}'}}\n{TINY_CLIP}"
        "train: {max_steps: 50, batch_size: 64, eval_every: 0, progress: false}\neval: {metric: accuracy}\n"
    )
    assert main(["train", str(recipe), "--run-dir", str(run)]) == 0
    assert (run / "tokenizer.json").is_file()  # the captions' BPE travels with the run
    assert main(["eval", str(run), "--split", "test"]) == 0
    shown = capsys.readouterr().out
    assert "seven" in shown and "f1_macro" in shown  # zero-shot P/R/F1 per named class
    report = json.loads((run / "eval.json").read_text())
    assert report["task"] == "clip" and report["samples"] == 180
    assert report["metrics"]["accuracy"] > 0.5  # ten prompts: chance is 0.1 (0.78 on val at 50 steps)
    assert main(["probe", str(run), "--no-baseline"]) == 0
    assert json.loads((run / "probe.json").read_text())["trained"]["accuracy"] > 0.8
    cv = ["cv", str(recipe), "--folds", "2", "--run-dir", str(tmp_path / "cv"), "--set", "train.max_steps=10"]
    assert main(cv) == 0
    folds = [str(tmp_path / "cv" / f"fold_{i}") for i in range(2)]
    assert main(["ensemble", *folds, "--split", "test"]) == 0
    student = ["--student", str(recipe), "--run-dir", str(tmp_path / "student"), "--set", "train.max_steps=6"]
    assert main(["distill", "--teacher", str(run), *student]) == 0  # the teacher's batch score matrix as soft targets
    assert main(["prune", str(run), "--amount", "0.5", "--out", str(tmp_path / "pruned")]) == 0
    assert main(["quantize", str(run), "--out", str(tmp_path / "int8")]) == 0
    assert main(["report", str(run), "--no-eval"]) == 0
    assert "seven" in (run / "report.html").read_text()


def test_a_flat_folder_of_captioned_images_validates_by_retrieval(tmp_path):
    write_sample(tmp_path / "sample")
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = []
    for i, line in enumerate((tmp_path / "sample" / "captions.jsonl").read_text().splitlines()[:400]):
        row = json.loads(line)
        shutil.copy(tmp_path / "sample" / row["file"], flat / f"{i:04d}.png")
        lines.append(json.dumps({"image": f"{i:04d}.png", "text": row["caption"]}))
    (flat / "captions.jsonl").write_text("\n".join(lines) + "\n")
    prepared, run = tmp_path / "data", tmp_path / "run"
    argv = ["data", "prepare", str(flat), "--captions", str(flat / "captions.jsonl"), "--tokenizer", "bytes"]
    assert main([*argv, "--out", str(prepared)]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data: {{name: prepared, path: {prepared}}}\n{TINY_CLIP}"
        "train: {max_steps: 10, batch_size: 32, eval_every: 0, progress: false}\neval: {metric: accuracy}\n"
    )
    assert main(["train", str(recipe), "--run-dir", str(run)]) == 0
    assert main(["eval", str(run)]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["samples"] == 40 and "per_class" not in report  # no classes: retrieval, not zero-shot
    assert 0.0 < report["metrics"]["accuracy"] <= 1.0
