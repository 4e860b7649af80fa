"""Any tokenizers ``tokenizer.json`` works: GPT-2's layout (byte-level BPE, <|endoftext|> the last id),
Llama's (<unk> <s> </s> first, a template that starts each text with <s>), BERT's WordPiece ([CLS] text
[SEP], [PAD] = 0) and T5's Unigram (<pad> </s> <unk>). Each is built here offline with ``tokenizers``, in
the layout those models ship; prepare finds the end-of-text, start and padding ids, records them, and
language-model, labelled-text, training and generation use them instead of ember's id 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ember.cli import main
from ember.data.build import build_sets
from ember.data.config import DataConfig
from ember.data.prepare import prepare
from ember.data.tokenizer import TextCodec, token_roles
from ember.errors import EmberError

CORPUS = [
    f"def function_{i}(value):\n    return value * {i} + {i % 7}  # the {i}th helper of many\n" for i in range(300)
]


def gpt2_like() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(["<|endoftext|>"])  # after training: the last id, as GPT-2's 50256
    return tok


def llama_like() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def bert_like() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


def t5_like() -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS, trainer)
    return tok


# name: (builder, kind ember reports, eos, bos, pad, template prefix, template suffix) by token text
TOKENIZERS = {
    "gpt2": (gpt2_like, "byte-level bpe", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", [], []),
    "llama": (llama_like, "bpe", "</s>", "<s>", "</s>", ["<s>"], []),
    "bert": (bert_like, "wordpiece", "[SEP]", "[CLS]", "[PAD]", ["[CLS]"], ["[SEP]"]),
    "t5": (t5_like, "unigram", "</s>", "</s>", "<pad>", [], []),
}


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    paths = {}
    for name, (build, *_) in TOKENIZERS.items():
        paths[name] = root / f"{name}.json"
        build().save(str(paths[name]))
    return paths


def write_corpus(path):
    path.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(CORPUS[:120]):
        (path / f"doc{i}.py").write_text(text + f"print({i})\n" * (i % 4))
    return path


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_roles_are_the_tokenizers_own(name, tokenizer_files):
    _, _, eos, bos, pad, prefix, suffix = TOKENIZERS[name]
    tok = Tokenizer.from_file(str(tokenizer_files[name]))
    roles = token_roles(tok)
    ids = tok.token_to_id
    assert (roles.eos_id, roles.bos_id, roles.pad_id) == (ids(eos), ids(bos), ids(pad))
    assert (list(roles.prefix), list(roles.suffix)) == ([ids(t) for t in prefix], [ids(t) for t in suffix])
    codec = TextCodec(tok)
    text = "def function_7(value):"
    plain = codec.encode(text)
    assert plain == tok.encode(text, add_special_tokens=False).ids  # no template ids in a text's own ids
    [doc] = codec.documents([text], roles.eos_id)
    assert doc[: len(prefix)] == list(roles.prefix) and doc[-1] == roles.eos_id
    assert doc.count(roles.eos_id) == 1  # BERT's [SEP] is both the template's end and the document's


def test_a_tokenizer_without_an_end_token_is_refused_unless_named(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2, "<end>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<end>"])
    with pytest.raises(EmberError, match=r"no end-of-text token .* <end>.*--eos-token"):
        token_roles(tok)
    assert token_roles(tok, "<end>").eos_id == 3
    with pytest.raises(EmberError, match="no '<stop>' in its vocabulary"):
        token_roles(tok, "<stop>")


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_language_model_stream_ends_each_document_with_the_tokenizers_end(name, tokenizer_files, tmp_path):
    _, kind, eos, bos, *_ = TOKENIZERS[name]
    tok = Tokenizer.from_file(str(tokenizer_files[name]))
    cfg = DataConfig(tokenizer=str(tokenizer_files[name]), val_fraction=0.1)
    result = prepare([str(write_corpus(tmp_path / "src"))], tmp_path / "out", cfg, progress=False)
    m = result.manifest
    assert m["eot_id"] == tok.token_to_id(eos) and m["bos_id"] == tok.token_to_id(bos)
    assert m["tokenizer"]["kind"] == kind and m["tokenizer"]["eos_token"] == eos
    train = build_sets(DataConfig(name="prepared", path=str(tmp_path / "out"), seq_len=16)).train
    stream = train.read(0, train.rows)
    assert int((stream == m["eot_id"]).sum()) == m["splits"]["train"]["documents"]  # one end each, none inside
    assert stream[-1] == m["eot_id"]
    first = stream[: int(np.flatnonzero(stream == m["eot_id"])[0])].tolist()
    assert "return value" in TextCodec(tok).decode(first)


def test_gpt2_layout_trains_and_generates_from_its_end_token(tokenizer_files, tmp_path, capsys):
    """id 0 is an ordinary token there: the stream, the empty prompt and the sample use 400, its end."""
    data = tmp_path / "data"
    flags = ["--tokenizer", str(tokenizer_files["gpt2"]), "--out", str(data), "--val-fraction", "0.1"]
    assert main(["data", "prepare", str(write_corpus(tmp_path / "src")), *flags]) == 0
    assert json.loads((data / "manifest.json").read_text())["eot_id"] == 400
    capsys.readouterr()
    assert main(["data", "inspect", str(data)]) == 0
    assert "byte-level bpe" in capsys.readouterr().out
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data: {{name: prepared, path: {data}, seq_len: 32}}\n"
        "model: {name: gpt, n_layer: 1, n_head: 2, n_embd: 32, block_size: 32}\noptim: {lr: 0.01}\n"
        "schedule: {warmup_steps: 0}\ntrain: {max_steps: 30, batch_size: 8, eval_every: 0, progress: false}\n"
    )
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run)]) == 0
    model_json = json.loads((run / "model.json").read_text())
    assert model_json["data"]["eos_id"] == 400 and model_json["data"]["bos_id"] == 400
    capsys.readouterr()
    assert (
        main(["generate", str(run), "--prompt", "def function_", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    )
    assert capsys.readouterr().out.startswith("def function_")
    assert main(["generate", str(run), "--max-new-tokens", "12", "--seed", "1"]) == 0


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_labelled_text_pads_with_the_tokenizers_padding(name, tokenizer_files, tmp_path):
    _, _, eos, _, pad, *_ = TOKENIZERS[name]
    rows = tmp_path / "rows.jsonl"
    with open(rows, "w") as f:
        for i, text in enumerate(CORPUS[:90]):
            f.write(json.dumps({"text": "!" * (i % 3) + text[: 20 + i % 40], "label": ["a", "b", "c"][i % 3]}) + "\n")
    cfg = DataConfig(tokenizer=str(tokenizer_files[name]), label="label", seq_len=48)
    m = prepare([str(rows)], tmp_path / "out", cfg, progress=False).manifest
    tok = Tokenizer.from_file(str(tokenizer_files[name]))
    assert m["pad_id"] == tok.token_to_id(pad)
    sets = build_sets(DataConfig(name="prepared", path=str(tmp_path / "out"), seq_len=48))
    assert sets.spec.pad_id == m["pad_id"]
    batch = sets.train.get(torch.arange(len(sets.train)))
    x = batch["x"].numpy()
    lengths = (x != m["pad_id"]).sum(1)
    assert (lengths > 0).all()
    assert ((x != m["pad_id"]) == (np.arange(x.shape[1]) < lengths[:, None])).all()  # text, then padding only
    from ember.data.inspect import describe

    assert pad not in describe(tmp_path / "out")  # inspect's first text leaves the padding out


def test_captions_pad_with_the_tokenizers_padding(tokenizer_files, tmp_path):
    from ember.data.caption_prepare import write_sample

    mapping = write_sample(tmp_path / "src", 0)
    cfg = DataConfig(tokenizer=str(tokenizer_files["gpt2"]), captions=str(mapping), val_fraction=0.2)
    m = prepare([str(tmp_path / "src" / "images")], tmp_path / "out", cfg, progress=False).manifest
    assert m["pad_id"] == 400 and m["eot_id"] == 400  # GPT-2's layout: id 0 is an ordinary token
    sets = build_sets(DataConfig(name="prepared", path=str(tmp_path / "out")))
    assert sets.spec.pad_id == 400
    text = sets.train.get(torch.arange(16))["text"]
    lengths = (text != 400).sum(1)
    assert (lengths > 0).all() and ((text != 400) == (torch.arange(text.shape[1]) < lengths[:, None])).all()
