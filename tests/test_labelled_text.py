"""Labelled text (issue 17): prepare rows with a text and a label into token rows; the rnn (packed),
encoder and cnn classify them with padding changing nothing; class weights; bad rows named."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import prepare_killed_in, shard_hashes
from ember.config import DataConfig
from ember.data.build import build_sets
from ember.data.prepare import prepare, prepare_kind
from ember.errors import EmberError
from ember.models.registry import MODEL_CONFIGS, build_model
from ember.plugins.class_weights import balanced_weights

TOPICS = {
    "space": ["rocket orbit launch", "moon lander crater", "planet star comet", "satellite orbit dish"],
    "food": ["bread butter toast", "apple pie oven", "soup pot spoon", "cheese grater pasta"],
    "music": ["guitar chord song", "drum beat rhythm", "piano keys melody", "violin bow string"],
}


def rows(n_per_class: int = 30) -> list[dict]:
    out = []
    for i in range(n_per_class):
        for topic, phrases in TOPICS.items():
            words = phrases[i % 4].split()
            out.append({"text": " ".join(words[j % 3] for j in range(i % 7 + 3)), "topic": topic})
    return out


def write_jsonl(path, items) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"label": "topic", "vocab_size": 300, "seq_len": 16, "val_fraction": 0.2, **kw})


def test_rows_with_a_text_field_and_a_label_are_labelled_text_and_tokenised_rows(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", rows())
    assert prepare_kind([src], cfg()) == "labelled-text"
    assert prepare_kind([src], cfg(columns=["text"])) == "table"  # named feature columns: a table
    m = prepare([src], tmp_path / "out", cfg(test_fraction=0.1), progress=False).manifest
    assert m["kind"] == "labelled-text" and m["classes"] == ["food", "music", "space"]
    assert [m["splits"][s]["samples"] for s in ("train", "val", "test")] == [63, 18, 9]
    assert m["stats"]["class_counts"]["val"] == [6, 6, 6]  # stratified
    from ember.data.inspect import describe

    shown = describe(tmp_path / "out")
    assert "labelled text: 3 classes" in shown and "first training text (" in shown and "63 texts" in shown
    sets = build_sets(DataConfig(name="prepared", path=str(tmp_path / "out")))
    assert sets.spec.reads_tokens and sets.spec.class_names == ("food", "music", "space")
    batch = sets.train.get(torch.arange(len(sets.train)))
    lengths = (batch["x"] != 0).sum(1)
    # every row: its tokens, then only zeros; the batch is cut to its longest row
    assert torch.equal(batch["x"] != 0, torch.arange(batch["x"].size(1)) < lengths[:, None])
    assert lengths.max() == batch["x"].size(1) <= 16


def test_csv_and_jsonl_prepare_the_same_rows_and_long_texts_are_cut_and_counted(tmp_path):
    items = rows()
    items[0] = {"text": " ".join(["rocket"] * 40), "topic": "space"}
    src = write_jsonl(tmp_path / "t.jsonl", items)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "topic"])
        writer.writeheader()
        writer.writerows(items)
    a = prepare([src], tmp_path / "a", cfg(tokenizer="bytes", seq_len=100), progress=False).manifest
    b = prepare([str(tmp_path / "t.csv")], tmp_path / "b", cfg(tokenizer="bytes", seq_len=100), progress=False).manifest
    assert [s["sha256"] for s in a["splits"]["train"]["shards"][0]["files"].values()] == [
        s["sha256"] for s in b["splits"]["train"]["shards"][0]["files"].values()
    ]
    assert a["seq_len"] == 100 and sum(a["stats"]["truncated"].values()) == 1  # the 40 rockets only
    assert a["stats"]["tokens_per_text"]["max"] == len(items[0]["text"])


def test_a_row_without_text_is_skipped_and_counted_or_refused_with_strict(tmp_path):
    items = rows()
    items[4]["text"] = ""
    items[7] = {"topic": "food"}
    src = write_jsonl(tmp_path / "t.jsonl", items)
    m = prepare([src], tmp_path / "out", cfg(), progress=False).manifest
    assert m["stats"]["read"]["skipped_rows"] == 2 and "row 5 of" in m["stats"]["read"]["skipped"][0]
    with pytest.raises(EmberError, match=r"row 5 of .*t.jsonl"):
        prepare([src], tmp_path / "strict", cfg(), progress=False, strict=True)


def test_a_missing_label_a_single_class_and_a_missing_text_field_are_named(tmp_path):
    items = rows()
    items[3]["topic"] = None
    with pytest.raises(EmberError, match="empty in row 4"):
        prepare([write_jsonl(tmp_path / "a.jsonl", items)], tmp_path / "a", cfg(), progress=False)
    one = [{"text": r["text"], "topic": "space"} for r in rows()]
    with pytest.raises(EmberError, match="one class"):
        prepare([write_jsonl(tmp_path / "b.jsonl", one)], tmp_path / "b", cfg(), progress=False)
    items = rows()
    items[9]["topic"] = ["space", "food"]
    with pytest.raises(EmberError, match="holds list .* row 10 of .*multi-label"):
        prepare([write_jsonl(tmp_path / "d.jsonl", items)], tmp_path / "d", cfg(), progress=False)
    src = write_jsonl(tmp_path / "c.jsonl", rows())
    with pytest.raises(EmberError, match="no text field 'body'"):
        prepare([src], tmp_path / "c", cfg(text_field="body", kind="labelled-text"), progress=False)


MODELS = {
    "rnn": {"name": "rnn", "embd": 16, "hidden_size": 16},
    "rnn-bi-gru": {"name": "rnn", "kind": "gru", "embd": 16, "hidden_size": 16, "bidirectional": True, "num_layers": 2},
    "encoder": {"name": "encoder", "n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16},
    "cnn": {"name": "cnn", "width": 16, "depth": 1, "stages": 2},
}


def model_config_from_dict(d: dict):
    return MODEL_CONFIGS[d["name"]](**d)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("pad_id", [0, 49])  # ember's tokenizers pad with 0; GPT-2's with its last id, 0 a text's
def test_padding_changes_no_text_classifier_output(name, pad_id):
    from ember.data.spec import DataSpec

    spec = DataSpec("classify", num_classes=3, vocab_size=50, input_shape=(16,), seq_len=16, pad_id=pad_id)
    torch.manual_seed(0)
    model = build_model(model_config_from_dict(MODELS[name]), spec).eval()
    texts = [torch.randint(1 if pad_id == 0 else 0, 49 if pad_id else 50, (n,)) for n in (3, 9, 16)]
    texts[1][0] = 0 if pad_id else 1  # id 0 inside a text when it is not the padding
    alone = torch.cat([model(t[None]) for t in texts])  # each text at its own length, no padding
    padded = torch.full((3, 16), pad_id, dtype=torch.long)
    for row, t in enumerate(texts):
        padded[row, : len(t)] = t
    torch.testing.assert_close(model(padded), alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_models_that_read_numbers_refuse_token_ids(name):
    from ember.data.spec import DataSpec

    spec = DataSpec("classify", num_classes=3, vocab_size=50, input_shape=(16,), seq_len=16)
    with pytest.raises(EmberError, match="labelled text"):
        build_model(model_config_from_dict({"name": name}), spec)


def test_balanced_weights_give_each_class_the_same_total():
    counts = np.array([90, 9, 1, 0])
    w = balanced_weights(counts)
    assert w[3] == 0 and np.allclose(w[:3] * counts[:3], 100 / 3)
    assert np.isclose((w * counts).sum(), counts.sum())  # the weights average 1 over the samples


def test_class_weights_plugin_weighs_each_targets_cross_entropy():
    from ember.data.spec import DataSpec
    from ember.plugins.class_weights import ClassWeightsConfig, build
    from ember.training.plugin import PluginContext

    spec = DataSpec("classify", num_classes=3, vocab_size=50, input_shape=(4,))
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    run = PluginContext(torch.nn.Linear(1, 1), spec, torch.device("cpu"), 0, 0.0, lambda: labels)
    plugin = build(ClassWeightsConfig(), run)
    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 0])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    w = torch.tensor([10 / 18, 10 / 9, 10 / 3])
    torch.testing.assert_close(plugin.loss({"y": y}, logits, ce.sum()), (w[y] * ce).sum())
    with pytest.raises(EmberError, match="one weight > 0 per class"):
        build(ClassWeightsConfig(weights=[1.0, 2.0]), run)


def test_text_augmentation_is_refused_on_images_and_image_augmentation_on_text(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", rows())
    prepare([src], tmp_path / "out", cfg(), progress=False)
    with pytest.raises(EmberError, match="data.augment transforms images"):
        build_sets(DataConfig(name="prepared", path=str(tmp_path / "out"), augment={"rotation": 10}))
    with pytest.raises(EmberError, match="data.text_augment"):
        build_sets(DataConfig(name="digits", text_augment={"dropout": 0.1}))


@pytest.mark.parametrize("kind", ["table", "labelled-text", "pairs", "captions", "instruct"])
def test_each_sample_is_recognised_as_its_kind_from_the_arguments_it_prints(tmp_path, kind):
    from ember.cli import data_config_for
    from ember.data.samples import SAMPLES, write_sample

    args = write_sample(kind, tmp_path / SAMPLES[kind][0])
    flags = dict(zip(args[1::2], args[2::2]))
    cfg = data_config_for(None, [], {"label": flags.get("--label"), "captions": flags.get("--captions")})
    assert prepare_kind(args[:1], cfg) == kind


def test_starting_from_a_run_needs_the_tokenizer_it_was_trained_with(tmp_path):
    from ember.config import recipe_from_dict
    from ember.training.loop import train

    src = write_jsonl(tmp_path / "a.jsonl", rows())
    other = write_jsonl(tmp_path / "b.jsonl", [{**r, "text": r["text"].upper()} for r in rows()])
    prepare([src], tmp_path / "a", cfg(), progress=False)
    prepare([other], tmp_path / "b", cfg(), progress=False)  # its own BPE: ids mean other text
    prepare([other], tmp_path / "c", cfg(tokenizer=str(tmp_path / "a" / "tokenizer.json")), progress=False)

    def recipe(data: str, start: str = ""):
        return recipe_from_dict(
            {
                "data": {"name": "prepared", "path": str(tmp_path / data)},
                "model": {"name": "cnn", "width": 8, "depth": 1, "stages": 1},
                "train": {"max_steps": 2, "batch_size": 8, "eval_every": 0, "progress": False},
                "init": {"from_run": start},
            }
        )

    first = train(recipe("a"), tmp_path / "run").run_dir
    with pytest.raises(EmberError, match="another tokenizer"):
        train(recipe("b", str(first)), tmp_path / "b-run")
    assert train(recipe("c", str(first)), tmp_path / "c-run").step == 2


def test_files_are_units_read_in_parallel_and_a_killed_prepare_resumes(tmp_path, monkeypatch):
    from ember.data import labelled_text

    items = rows()
    paths = [write_jsonl(tmp_path / f"part{i}.jsonl", items[i::3]) for i in range(3)]
    one = prepare(paths, tmp_path / "one", cfg(), progress=False).manifest
    two = prepare(paths, tmp_path / "two", cfg(), workers=2, progress=False).manifest
    files = shard_hashes
    assert (
        files(one) == files(two)
        and one["splits"]["train"]["samples"] == 72
        and one["kind"] in ("pairs", "labelled-text")
    )
    cut = lambda: prepare(paths, tmp_path / "cut", cfg(), progress=False)  # noqa: E731
    prepare_killed_in(labelled_text, "_tokenize_unit", monkeypatch, cut)  # as if killed while tokenising
    resumed = prepare(paths, tmp_path / "cut", cfg(), progress=False)
    assert resumed.reused_units == 3 and files(resumed.manifest) == files(one)  # every file read once


def test_the_manifest_and_inspect_name_the_tokenizers_real_kind_and_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from ember.data.inspect import describe

    texts = [r["text"] for r in rows()]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<|endoftext|>", "[UNK]"]
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    wordpiece.save(str(tmp_path / "wp.json"))
    src = write_jsonl(tmp_path / "t.jsonl", rows())
    m = prepare([src], tmp_path / "wp", cfg(tokenizer=str(tmp_path / "wp.json")), progress=False).manifest
    assert m["tokenizer"]["kind"] == "wordpiece" and m["tokenizer"]["special_tokens"] == {
        "<|endoftext|>": 0,
        "[UNK]": 1,
    }
    assert m["ordinary_ids"] == [2, m["vocab_size"]]  # text augmentation never inserts [UNK]
    bpe = prepare([src], tmp_path / "bpe", cfg(), progress=False).manifest
    assert bpe["tokenizer"]["kind"] == "byte-level bpe"
    stdlib = prepare(["stdlib"], tmp_path / "lm", DataConfig(max_bytes=20_000, vocab_size=300), progress=False)
    assert "tokenizer: byte-level bpe, vocab 300" in describe(stdlib.out_dir) and "<|endoftext|> = 0" in describe(
        stdlib.out_dir
    )
