"""``ember export RUN --format onnx`` (issue 18): every classifier kind's graph gives PyTorch's outputs in
onnxruntime on two batch sizes (within 1e-4), a text's output does not depend on the padding beside it,
the preprocessing written down (or held in the graph) is ember's own, and the runs ONNX cannot hold are
refused with the fix."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import QUIET, tiny_recipe
from ember.config import recipe_from_dict
from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.interop.onnx import MaskedTextRNN, check_graph, export_onnx, onnx_graph
from ember.models.registry import build_model
from ember.runs import load_trained_model, read_model_info, save_trained_model, write_model_info

onnxruntime = pytest.importorskip("onnxruntime")

TEXT = DataSpec("classify", num_classes=3, vocab_size=60, input_shape=(12,), seq_len=12)
IMAGES = DataSpec("classify", num_classes=4, input_shape=(1, 8, 8))


def built_run(tmp_path, section: dict, spec: DataSpec, name: str = "run"):
    """A run directory holding a freshly built model (random weights, BatchNorm statistics drawn too)."""
    recipe = recipe_from_dict({"model": section})
    torch.manual_seed(0)
    model = build_model(recipe.model, spec)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # not the identity it starts as
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    run = tmp_path / name
    run.mkdir()
    save_trained_model(run, model, recipe, spec, {})
    return run


def onnx_outputs(out_dir, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def texts(n: int, length: int, seed: int, vocab: int = 60) -> torch.Tensor:
    """``n`` rows of token ids 1 .. vocab-1, each a text of random length (the first fills its row), 0 after."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    ends = torch.randint(1, length + 1, (n,), generator=gen)
    ends[0] = length
    return ids.masked_fill(torch.arange(length) >= ends[:, None], 0)


def assert_onnx_is_pytorch(run, out, batches, reference=None) -> float:
    """onnxruntime on each batch equals the run's PyTorch model (or ``reference``) within 1e-4."""
    model, _ = load_trained_model(run)
    worst = 0.0
    for x in batches:
        with torch.no_grad():
            want = (reference or model)(x).numpy()
        got = onnx_outputs(out, x)
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 1e-4
    return worst


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_the_masked_text_rnn_is_the_packed_rnn(kind):
    spec = TEXT
    section = {"name": "rnn", "kind": kind, "embd": 8, "hidden_size": 8, "bidirectional": True, "num_layers": 2}
    torch.manual_seed(0)
    model = build_model(recipe_from_dict({"model": section}).model, spec).eval()
    x = texts(6, 12, seed=1)
    x[5] = 0  # a row with no text at all: packed as one pad step, like the model does
    with torch.no_grad():
        torch.testing.assert_close(MaskedTextRNN(model, 0)(x), model(x), rtol=0, atol=1e-6)
        one_way = build_model(recipe_from_dict({"model": {**section, "bidirectional": False}}).model, spec).eval()
        torch.testing.assert_close(MaskedTextRNN(one_way, 0)(x), one_way(x), rtol=0, atol=1e-6)


def test_a_table_mlp_with_index_columns_exports_exactly_on_any_batch_size(tmp_path):
    spec = DataSpec("classify", num_classes=3, input_shape=(6,), embeddings=((2, 5),), class_names=("a", "b", "c"))
    run = built_run(tmp_path, {"name": "mlp", "width": 16, "norm": "batch"}, spec)
    result = export_onnx(run, tmp_path / "out")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.files == ("model.onnx", "model.onnx.json")
    batches = [torch.randn(n, 6) for n in (3, 1, 7)]
    for x in batches:  # codes in range, missing (0), and beyond the embedding (unseen: 0)
        x[:, 2] = torch.arange(len(x)).float() % 7
    assert_onnx_is_pytorch(run, tmp_path / "out", batches)
    meta = json.loads((tmp_path / "out" / "model.onnx.json").read_text())
    assert meta["input"] == {"name": "features", "dtype": "float32", "shape": ["batch", 6]}
    model, info = load_trained_model(run)
    graph = onnx_graph(model, info, run)
    for off in (1e-3, float("nan")):  # a graph that is not PyTorch's is named, never passed
        graph.reference = lambda x, off=off: model(x) + off
        with pytest.raises(EmberError, match="differ from PyTorch's by up to"):
            check_graph(tmp_path / "out" / "model.onnx", graph)
    assert meta["output"]["class_names"] == ["a", "b", "c"] and meta["check"]["max_abs_diff"] == result.max_abs_diff


def test_runs_onnx_cannot_hold_are_refused_with_the_fix(tmp_path, monkeypatch, capsys):
    gpt = {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8}
    lm = built_run(tmp_path, gpt, DataSpec("lm", vocab_size=40, seq_len=8), "lm")
    with pytest.raises(EmberError, match="classifiers .* use --format hf for a gpt"):
        export_onnx(lm, tmp_path / "out")
    from ember.cli import main

    assert main(["export", str(lm), "--format", "onnx", "--out", str(tmp_path / "out")]) == 2
    assert "use --format hf" in capsys.readouterr().err
    table = built_run(tmp_path, {"name": "mlp", "width": 8}, DataSpec("regress", input_shape=(3,)), "table")
    with pytest.raises(EmberError, match="none .*Leave out --merge"):
        export_onnx(table, tmp_path / "out", merge=True)
    write_model_info(table, {**read_model_info(table), "quantization": {"method": "int8-dynamic", "layers": ["net.0"]}})
    with pytest.raises(EmberError, match="quantised .*Export the float run"):
        export_onnx(table, tmp_path / "out")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    with pytest.raises(EmberError, match=r"onnxscript is not installed.*pip install 'ember\[onnx\]'"):
        export_onnx(table, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_without_onnxruntime_the_export_is_written_and_said_to_be_unchecked(tmp_path, monkeypatch):
    run = built_run(tmp_path, {"name": "mlp", "width": 8}, DataSpec("regress", input_shape=(3,)))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = export_onnx(run, tmp_path / "out")
    assert result.max_abs_diff is None and any("unchecked" in n and "ember[onnx]" in n for n in result.notes)
    monkeypatch.undo()
    assert_onnx_is_pytorch(run, tmp_path / "out", [torch.randn(3, 3), torch.randn(4, 3)])  # [B, 1]: the value


@pytest.mark.slow
def test_a_lora_run_exports_merged_and_equals_the_run_as_trained(tmp_path):
    from ember.training.low_rank import adapted_layers, attach_adapters

    section = {"name": "vit", "n_layer": 1, "n_embd": 16, "n_head": 2, "patch_size": 2}
    recipe = recipe_from_dict({"model": section})
    torch.manual_seed(0)
    model = build_model(recipe.model, IMAGES)
    attach_adapters(model, 2, 4.0, 0.0, ["q", "v"])
    for _, layer in adapted_layers(model):  # trained adapters: not the zeros they start as
        nn.init.normal_(layer.lora_B, std=5.0)
    run = tmp_path / "run"
    run.mkdir()
    lora = {"name": "lora", "rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["q", "v"], "train_also": []}
    save_trained_model(run, model, recipe, IMAGES, {"lora": lora})
    with pytest.raises(EmberError, match="LoRA adapters.*--merge"):
        export_onnx(run, tmp_path / "out")
    result = export_onnx(run, tmp_path / "out", merge=True)
    assert result.max_abs_diff <= 1e-4
    x = torch.randn(4, *IMAGES.input_shape)
    with_adapters, _ = load_trained_model(run)  # the adapters as hooks, unmerged
    assert_onnx_is_pytorch(run, tmp_path / "out", [x, x[:2]], reference=with_adapters)
    for _, layer in adapted_layers(with_adapters):
        layer.lora_B.data.zero_()
    with torch.no_grad():  # the adapters change the outputs, so the graph holds them
        assert np.abs(onnx_outputs(tmp_path / "out", x) - with_adapters(x).numpy()).max() > 1e-3


BUILT = {
    "cnn-text": ({"name": "cnn", "width": 8, "depth": 1, "stages": 2}, TEXT),
    "encoder-text": ({"name": "encoder", "n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 12}, TEXT),
    "rnn-text-lstm": ({"name": "rnn", "embd": 8, "hidden_size": 8}, TEXT),
    "rnn-text-bigru-2": (
        {"name": "rnn", "kind": "gru", "embd": 8, "hidden_size": 8, "bidirectional": True, "num_layers": 2},
        TEXT,
    ),
    "vit": ({"name": "vit", "n_layer": 1, "n_embd": 16, "n_head": 2, "patch_size": 2}, IMAGES),
    "cnn": ({"name": "cnn", "width": 8, "depth": 1, "stages": 2}, IMAGES),
    "rnn-rows": (
        {"name": "rnn", "hidden_size": 8, "bidirectional": True},
        DataSpec("classify", num_classes=5, input_shape=(8, 8)),
    ),
    "mlp-regress": ({"name": "mlp", "width": 8, "norm": "batch"}, DataSpec("regress", input_shape=(5,))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILT))
def test_each_classifier_kind_gives_pytorchs_outputs_in_onnxruntime(tmp_path, name):
    section, spec = BUILT[name]
    run = built_run(tmp_path, section, spec)
    result = export_onnx(run, tmp_path / "out")
    assert result.max_abs_diff <= 1e-4
    if not spec.reads_tokens:  # a run without its data: the graph takes normalised inputs, and says so
        assert any("takes normalised inputs" in note for note in result.notes)
    if spec.reads_tokens:  # two batch sizes at two lengths: both axes are dynamic
        assert_onnx_is_pytorch(run, tmp_path / "out", [texts(3, 12, seed=2), texts(5, 7, seed=3)])
    else:
        assert_onnx_is_pytorch(
            run, tmp_path / "out", [torch.randn(3, *spec.input_shape), torch.randn(6, *spec.input_shape)]
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rnn-text-lstm", "rnn-text-bigru-2", "cnn-text", "encoder-text"])
def test_a_texts_onnx_output_does_not_depend_on_the_padding_beside_it(tmp_path, name):
    run = built_run(tmp_path, *BUILT[name])
    export_onnx(run, tmp_path / "out")
    batch = texts(4, 12, seed=4)
    alone = np.concatenate([onnx_outputs(tmp_path / "out", row[row != 0][None]) for row in batch])
    np.testing.assert_allclose(onnx_outputs(tmp_path / "out", batch), alone, rtol=0, atol=1e-5)
    model, _ = load_trained_model(run)
    with torch.no_grad():
        np.testing.assert_allclose(alone, model(batch).numpy(), rtol=0, atol=1e-4)


def _val_batch(recipe, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` raw validation samples of a recipe's data, and the model inputs ember's own transform makes."""
    from ember.data.build import build_sets

    sets = build_sets(recipe.data)
    raw = sets.val.get(torch.arange(n))["x"]
    return raw, sets.val_transform({"x": raw})["x"]


@pytest.mark.slow
def test_ember_export_of_a_trained_digits_cnn_normalises_raw_pixels_in_the_graph(tmp_path, capsys):
    from ember.cli import main
    from ember.training.loop import train

    recipe = tiny_recipe("cnn")
    run = train(recipe, tmp_path / "run").run_dir
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "out")]) == 0
    assert "checked: onnxruntime" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "model.onnx.json").read_text())
    assert meta["input"] == {"name": "pixels", "dtype": "uint8", "shape": ["batch", 1, 8, 8]}
    raw, normalised = _val_batch(recipe)
    model, _ = load_trained_model(run)
    with torch.no_grad():
        want = model(normalised).numpy()
    np.testing.assert_allclose(onnx_outputs(tmp_path / "out", raw), want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(onnx_outputs(tmp_path / "out", raw[:5]), want[:5], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_trained_digits_rows_rnn_takes_raw_pixel_rows(tmp_path):
    from ember.training.loop import train

    recipe = tiny_recipe("rnn")
    run = train(recipe, tmp_path / "run").run_dir
    export_onnx(run, tmp_path / "out")
    raw, normalised = _val_batch(recipe)  # [B, 1, 8, 8] uint8 images, read as [B, 8, 8] rows
    model, _ = load_trained_model(run)
    with torch.no_grad():
        want = model(normalised).numpy()
    np.testing.assert_allclose(onnx_outputs(tmp_path / "out", raw[:, 0]), want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(onnx_outputs(tmp_path / "out", raw[:3, 0]), want[:3], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_trained_labelled_text_rnn_exports_with_its_tokenizer(tmp_path):
    from ember.data.prepare import prepare
    from ember.data.tokenizer import codec_from_json
    from ember.training.loop import train
    from test_labelled_text import cfg, rows, write_jsonl

    prepare([write_jsonl(tmp_path / "t.jsonl", rows())], tmp_path / "data", cfg(), progress=False)
    raw = {
        "data": {"name": "prepared", "path": str(tmp_path / "data")},
        "model": {"name": "rnn", "embd": 8, "hidden_size": 8, "bidirectional": True},
        "train": {**QUIET["train"], "max_steps": 3},
    }
    run = train(recipe_from_dict(raw), tmp_path / "run").run_dir
    result = export_onnx(run, tmp_path / "out")
    assert "tokenizer.json" in result.files
    codec = codec_from_json((tmp_path / "out" / "tokenizer.json").read_text())
    ids = [codec.encode(t)[:16] for t in ("rocket orbit launch", "soup", "drum beat rhythm guitar chord song")]
    pad = json.loads((tmp_path / "out" / "model.onnx.json").read_text())["input"]["pad_id"]
    assert pad == read_model_info(run)["data"].get("pad_id", 0)
    batch = torch.full((len(ids), 16), pad, dtype=torch.long)
    for row, text in enumerate(ids):
        batch[row, : len(text)] = torch.tensor(text)
    model, _ = load_trained_model(run)
    with torch.no_grad():
        np.testing.assert_allclose(onnx_outputs(tmp_path / "out", batch), model(batch).numpy(), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_trained_table_regressor_encoded_by_the_written_column_recipes_answers_as_ember_generate(tmp_path):
    from ember.config import DataConfig
    from ember.data import tables
    from ember.data.prepare import prepare
    from ember.generation import predict_row
    from ember.training.loop import train
    from test_prepare_tables import write_csv

    rng = np.random.default_rng(0)
    cells = [
        [f"{rng.normal():.3f}", ["red", "green", "blue"][i % 3], f"city{i % 40}", f"{i % 40 + rng.normal():.3f}"]
        for i in range(240)
    ]  # 40 cities: more than one_hot_max, so an index column the mlp embeds
    path = write_csv(tmp_path / "t.csv", ["noise", "colour", "city", "y"], cells)
    prepare([path], tmp_path / "data", DataConfig(label="y", target="values", val_fraction=0.2), progress=False)
    raw = {
        "data": {"name": "prepared", "path": str(tmp_path / "data")},
        "model": {"name": "mlp", "width": 16},
        "train": {**QUIET["train"], "max_steps": 3},
    }
    run = train(recipe_from_dict(raw), tmp_path / "run").run_dir
    result = export_onnx(run, tmp_path / "out")
    assert result.notes == () and result.max_abs_diff <= 1e-4
    meta = json.loads((tmp_path / "out" / "model.onnx.json").read_text())
    columns = meta["columns"]
    assert [c["name"] for c in columns] == ["noise", "colour", "city"] and columns[2]["encoding"] == "index"
    model, info = load_trained_model(run)
    for row in ({"noise": "0.5", "colour": "red", "city": "city7"}, {"colour": "mauve"}, {"city": "atlantis"}):
        x = torch.from_numpy(tables.encode(columns, {c["name"]: [row.get(c["name"])] for c in columns}))
        got = float(onnx_outputs(tmp_path / "out", x)[0, 0])
        assert got == pytest.approx(float(predict_row(model, info, run, json.dumps(row), "cpu")), rel=1e-5, abs=1e-5)
