"""ember quantize and ember compare: int8 runs are smaller on disk and close in quality, load
like any run, and land in the trade-off table."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import safetensors.torch
import torch

import ember
from conftest import QUIET, tiny_recipe
from ember.cli import main
from ember.compress.compare import compare
from ember.compress.measure import TradeoffRow, format_table, measure, read_row
from ember.compress.quantize import quantize, quantize_model
from ember.config import apply_overrides, recipe_from_dict
from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.eval.evaluate import evaluate
from ember.models.cnn import CNNConfig
from ember.models.registry import build_model
from ember.runs import load_trained_model
from ember.training.loop import train

ROW_FIELDS = {
    "name",
    "run",
    "method",
    "params",
    "bytes",
    "ms_per_batch",
    "batch_size",
    "threads",
    "metric",
    "quality",
    "split",
    "round_ms",
    "timed_with",
}
FAST = ("train.log_every=1000",)  # logging every step costs more than these tiny steps


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gpt") / "gpt"
    train(tiny_recipe("gpt", "train.max_steps=30", "eval.batch_size=64", *FAST), run)
    return run


@pytest.fixture(scope="module")
def gpt_int8(gpt_run):
    """``ember quantize`` of the GPT run: the new run directory and what the command printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["quantize", str(gpt_run), "--max-batches", "20"]) == 0
    return gpt_run.parent / "gpt-int8-dynamic", out.getvalue()


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A digits ViT: its Linear layers (attention, MLP, head) hold most of its weights; about 85 % right."""
    raw = {
        "data": {"name": "digits"},
        "model": {"name": "vit", "n_layer": 1, "n_head": 2, "n_embd": 32, "patch_size": 4},
        **{section: dict(values) for section, values in QUIET.items()},
    }
    run = tmp_path_factory.mktemp("vit") / "vit"
    train(
        recipe_from_dict(apply_overrides(raw, ["train.max_steps=60", "train.batch_size=64", "optim.lr=1e-2", *FAST])),
        run,
    )
    return run


def test_quantize_cli_writes_a_smaller_gpt_run_within_2_percent_loss(gpt_run, gpt_int8):
    qrun, out = gpt_int8
    assert "int8-dynamic" in out and str(qrun) in out
    before, after = (json.loads((run / "compress.json").read_text()) for run in (gpt_run, qrun))
    assert ROW_FIELDS <= set(before) and ROW_FIELDS <= set(after)
    assert after["bytes"] < 0.75 * before["bytes"]  # float embeddings stay; the blocks shrink 4x
    assert after["params"] == before["params"] and after["metric"] == "loss"
    assert after["quality"] == pytest.approx(before["quality"], rel=0.02)
    info = json.loads((qrun / "model.json").read_text())["quantization"]
    assert info["method"] == "int8-dynamic" and info["library"] == "torchao" and info["version"]
    assert set(info["layers"]) == {
        f"blocks.0.{m}" for m in ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc", "mlp.proj")
    }
    stored = safetensors.torch.load_file(qrun / "model.safetensors")
    assert stored["blocks.0.mlp.fc.weight.qdata"].dtype == torch.int8 and "blocks.0.mlp.fc.weight" not in stored
    assert stored["blocks.0.mlp.fc.weight.scale"].dtype == torch.float32


def test_a_quantized_run_loads_evaluates_and_generates(gpt_int8):
    qrun = gpt_int8[0]
    model, info = load_trained_model(qrun)
    assert type(model.blocks[0].mlp.fc.weight).__name__ == "Int8Tensor"
    assert model.lm_head.weight is model.tok_emb.weight  # the tied head stays float and tied
    report = evaluate(qrun, max_batches=20)
    assert report.metrics["loss"] == pytest.approx(json.loads((qrun / "compress.json").read_text())["quality"])
    assert ember.generate(qrun, prompt="def ", max_new_tokens=8).startswith("def ")


@pytest.mark.parametrize("method", ["int8-dynamic", "int8-weight-only"])
def test_a_quantized_digits_vit_is_smaller_and_within_2_points(vit_run, tmp_path, method):
    report = ember.quantize(vit_run, method=method, out=tmp_path / method)
    before, after = report.rows
    assert after.bytes < 0.5 * before.bytes
    assert before.quality > 0.6  # a model worth comparing
    assert abs(after.quality - before.quality) <= 0.02
    assert after.method == method and report.run == str(tmp_path / method)
    assert load_trained_model(tmp_path / method)[1]["quantization"]["method"] == method


def test_dynamic_int8_covers_linear_layers_only():
    """A CNN's convolutions stay float: only its classifier head is quantised."""
    spec = DataSpec(task="classify", num_classes=10, input_shape=(1, 8, 8))
    model = build_model(CNNConfig(width=8, depth=1, stages=2), spec)
    linear = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    entry = quantize_model(model, "int8-dynamic")
    assert entry["layers"] == linear and len(linear) == 1
    assert all(type(m.weight) is torch.nn.Parameter for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_compare_prints_the_table_from_fresh_compress_json(vit_run, tmp_path, capsys, monkeypatch):
    qrun = tmp_path / "vit-int8"
    quantize(vit_run, out=qrun)
    monkeypatch.setattr("ember.compress.compare.quality_row", lambda *a, **k: pytest.fail("compress.json was fresh"))
    assert main(["compare", str(vit_run), str(qrun)]) == 0
    out = capsys.readouterr().out
    assert "vit-int8" in out and "int8-dynamic" in out and "1.00x" in out and "accuracy" in out
    assert "speed [range]" in out and "9 rounds" in out
    rows = compare([vit_run, qrun], rounds=4, passes=1)
    # The latencies are timed anew on every call, both runs together: the same rounds, one session id.
    assert [len(r.round_ms) for r in rows] == [4, 4] and rows[0].timed_with == rows[1].timed_with != ""
    assert all(min(r.round_ms) <= r.ms_per_batch <= max(r.round_ms) for r in rows)
    assert [line.split()[:5] for line in format_table(rows).splitlines()[1:3]] == [
        line.split()[:5] for line in out.splitlines()[-3:-1]
    ]


def test_measure_again_after_new_weights(vit_run, tmp_path):
    qrun = tmp_path / "q"
    quantize(vit_run, out=qrun)
    (qrun / "model.safetensors").touch()  # newer than compress.json: measured again
    row = compare([qrun])[0]
    assert row.to_dict() == json.loads((qrun / "compress.json").read_text()) and row.method == "int8-dynamic"
    alone = measure(qrun, rounds=2, passes=1)
    assert alone.ms_per_batch > 0 and len(alone.round_ms) == 2 and alone.timed_with != row.timed_with


def test_a_compress_json_of_an_older_ember_still_reads(vit_run, tmp_path, monkeypatch):
    """Rows written before interleaved timing (no round_ms, no timed_with) are read back for their
    quality, and compare times them anew."""
    qrun = tmp_path / "q"
    quantize(vit_run, out=qrun)
    path = qrun / "compress.json"
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("round_ms", "timed_with")}
    path.write_text(json.dumps(old))
    assert read_row(qrun) == TradeoffRow(**{**old, "round_ms": (), "timed_with": ""})
    monkeypatch.setattr("ember.compress.compare.quality_row", lambda *a, **k: pytest.fail("the old row was fresh"))
    row = compare([qrun], rounds=3, passes=1)[0]
    assert row.quality == old["quality"] and len(row.round_ms) == 3
    assert json.loads(path.read_text())["round_ms"] == list(row.round_ms)


def test_mistakes_are_one_paragraph_messages(gpt_run, gpt_int8, tmp_path, capsys):
    qrun = gpt_int8[0]
    cases = [
        (lambda: quantize(tmp_path), "not a finished run directory"),
        (lambda: quantize(gpt_run, method="int4"), "Unknown quantisation method 'int4'"),
        (lambda: quantize(gpt_run, calibration_batches=8), "needs no calibration"),
        (lambda: quantize(qrun), "already quantised"),
        (lambda: quantize(gpt_run, out=gpt_run), "not a quantised one"),
        (lambda: compare([gpt_run, tmp_path]), "not a finished run directory"),
    ]
    for call, words in cases:
        with pytest.raises(EmberError, match=words) as err:
            call()
        assert "\n" not in str(err.value)
    assert main(["quantize", str(gpt_run), "--method", "fp4"]) == 2
    assert "int8-dynamic, int8-weight-only" in capsys.readouterr().err


def test_a_weights_file_that_does_not_match_is_refused(gpt_int8, tmp_path):
    qrun = shutil.copytree(gpt_int8[0], tmp_path / "q")
    stored = safetensors.torch.load_file(qrun / "model.safetensors")
    del stored["blocks.0.mlp.fc.weight.scale"]
    safetensors.torch.save_file(stored, qrun / "model.safetensors")
    with pytest.raises(EmberError, match="bytes but was written as|does not match the sha256 recorded"):
        load_trained_model(qrun)
    from ember.runs import read_model_info, write_model_info

    write_model_info(qrun, read_model_info(qrun))  # a record that matches: the tensors themselves are checked
    with pytest.raises(EmberError, match="inconsistent"):
        load_trained_model(qrun)
