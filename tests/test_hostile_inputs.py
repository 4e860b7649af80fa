"""Crafted and damaged files beyond pickles are one message, never a traceback, a hang or a blow-up.

test_security.py plants pickles; here each attack is a file a user could be handed or left with
after a crash: safetensors headers that lie (a terabyte header, overlapping offsets, an unknown
dtype, a shape whose product overflows, tensors missing or extra), JSON an ember run or data
directory holds with wrong types, NaN, duplicate keys, a 100,000-deep nesting bomb or a 2 GB size,
npz data sources holding objects or claiming a terabyte, YAML recipes that are bombs or not
mappings, and paths that point outside a run. Each goes through the command a user would run,
in-process; each must end with exit status 2 and one paragraph naming the file, within seconds,
and no file an attacker's payload would create may appear.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

from conftest import TINY
from ember.cli import main
from test_security import Payload, reseal_checkpoint, reseal_weights

QUIET = {"progress": False, "peak_flops": 1e12, "batch_size": 4, "log_every": 1, "eval_every": 0}
SRC = Path(__file__).resolve().parents[1] / "src" / "ember"
BOMB = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """A finished CNN and GPT run (a checkpoint at step 2 each) and a prepared token directory."""
    root = tmp_path_factory.mktemp("hostile")
    runs = {}
    for kind in ("cnn", "gpt"):
        recipe = root / f"{kind}.yaml"
        train = {**QUIET, "max_steps": 2, "checkpoint_every": 2}
        recipe.write_text(yaml.safe_dump(dict(TINY[kind], train=train, eval={"max_batches": 1})))
        runs[kind] = root / f"run-{kind}"
        assert main(["train", str(recipe), "--run-dir", str(runs[kind])]) == 0
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"d{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + sum(range({i}))\n")
    runs["data"] = root / "data"
    assert main(["data", "prepare", str(corpus), "--out", str(runs["data"]), "--tokenizer", "bytes"]) == 0
    return runs


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: int):
    def ring(*_):
        raise _Hang(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(argv: list[str], capsys, names: str, marker: Path | None = None, limit: float = 5.0) -> str:
    """Run ``ember ARGV``; assert exit 2, one paragraph on stderr naming ``names``, no traceback, under
    ``limit`` seconds, and no ``marker``. The message is returned."""
    capsys.readouterr()
    start = time.monotonic()
    try:
        with _deadline(int(limit * 4)):
            code = main(argv)
    except BaseException as crash:  # noqa: BLE001 - a traceback, a hang or MemoryError fails the test too
        code = f"{type(crash).__name__}: {str(crash)[:300]}"
    seconds = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert marker is None or not marker.exists(), "the attacker's payload ran"
    assert code == 2, (code, err)
    assert err and "Traceback" not in err and "\n\n" not in err, err
    assert names in err, err
    assert seconds < limit, f"took {seconds:.1f}s"
    return err


def plant(path: Path, text: str | None) -> None:
    """Write ``text`` over ``path``; None: make it a sparse 2 GB file (its first bytes kept)."""
    if text is None:
        with open(path, "r+b") as f:
            f.truncate(2 << 30)
    else:
        path.write_text(text)


def copy_run(finished: dict, kind: str, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished[kind], run)
    return run


def craft_safetensors(header: dict | bytes, data: bytes = b"\0" * 64, claimed: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


F32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
HEADERS = {
    "terabyte-header": craft_safetensors({}, claimed=1 << 40),
    "not-json": craft_safetensors(b"not json at all!"),
    "json-bomb": craft_safetensors(BOMB.encode()),
    "overlapping-offsets": craft_safetensors({"a": F32, "b": {**F32, "data_offsets": [8, 24]}}),
    "offsets-past-end": craft_safetensors({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}),
    "unknown-dtype": craft_safetensors({"a": {**F32, "dtype": "Q7"}}),
    "unsupported-dtype": craft_safetensors(
        {"a": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, b"\1" * 3
    ),
    "overflowing-shape": craft_safetensors({"a": {**F32, "shape": [1 << 62, 1 << 62]}}),
    "negative-shape": craft_safetensors({"a": {**F32, "shape": [-4]}}),
    "empty": b"",
}


def tamper_tensors(path: Path, how: str) -> None:
    """Rewrite a real safetensors file with one tensor missing, extra, reshaped or of a foreign dtype."""
    tensors = safetensors.torch.load_file(str(path))
    name = max(tensors, key=lambda k: tensors[k].numel())  # a weight matrix
    if how == "missing-tensor":
        del tensors[name]
    elif how == "extra-tensor":
        tensors["evil.weight"] = torch.zeros(3)
    elif how == "wrong-shape":
        tensors[name] = torch.zeros(tensors[name].numel() + 1)
    elif how == "complex-dtype":
        tensors[name] = tensors[name].to(torch.complex64)
    elif how == "int-dtype":
        tensors[name] = tensors[name].to(torch.int64)
    meta = safetensors.safe_open(str(path), "pt").metadata()
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


TAMPERED = ["missing-tensor", "extra-tensor", "wrong-shape", "complex-dtype", "int-dtype"]


@pytest.mark.parametrize("attack", [*HEADERS, *TAMPERED])
def test_a_crafted_model_safetensors_is_one_message(attack, finished, tmp_path, capsys):
    """The attacker reseals model.json, so the sha256 check passes and the reader itself must refuse."""
    run = copy_run(finished, "cnn", tmp_path)
    weights = run / "model.safetensors"
    if attack in HEADERS:
        weights.write_bytes(HEADERS[attack])
    else:
        tamper_tensors(weights, attack)
    reseal_weights(run)
    refused(["eval", str(run), "--max-batches", "1"], capsys, "model.safetensors")


def tamper_index(path: Path, how: str) -> None:
    """Rewrite a checkpoint state file's index (and tensors) with an entry placed where ember writes none,
    or an optimiser moment taken away: what a file altered by hand, or from another optimiser, holds."""
    tensors = safetensors.torch.load_file(str(path))
    meta = safetensors.safe_open(str(path), "pt").metadata()
    skeleton = json.loads(meta["ember_state"])
    first = next(iter(skeleton["optimizer"]["state"].values()))
    if how == "extra-optimizer-entry":  # a tensor in a parameter's optimiser state that AdamW never keeps
        first["evil"], tensors["evil"] = {"$tensor": "evil"}, torch.zeros(3)
    elif how == "extra-top-entry":
        skeleton["evil"], tensors["evil"] = {"$tensor": "evil"}, torch.zeros(3)
    elif how == "missing-optimizer-entry":
        del tensors[first.pop("exp_avg")["$tensor"]]
    safetensors.torch.save_file(tensors, str(path), metadata={**meta, "ember_state": json.dumps(skeleton)})


INDEX_ATTACKS = ["extra-optimizer-entry", "extra-top-entry", "missing-optimizer-entry"]
STATE_ATTACKS = [*HEADERS, *TAMPERED, *INDEX_ATTACKS]


@pytest.mark.parametrize("attack", STATE_ATTACKS)
def test_a_crafted_checkpoint_state_file_is_one_message(attack, finished, tmp_path, capsys):
    run = copy_run(finished, "cnn", tmp_path)
    checkpoint = run / "checkpoints" / "step_00000002"
    state = checkpoint / "state.safetensors"
    if attack in HEADERS:
        state.write_bytes(HEADERS[attack])
    elif attack in INDEX_ATTACKS:
        tamper_index(state, attack)
    else:
        tamper_tensors(state, attack)
    reseal_checkpoint(checkpoint)
    before = (run / "model.safetensors").read_bytes()
    argv = ["train", "--run-dir", str(run), "--resume", str(checkpoint), "--set", "train.max_steps=3"]
    message = refused(argv, capsys, "state.safetensors")
    if "extra" in attack:  # the unexpected entry is named
        assert "evil" in message and "altered" in message, message
    assert (run / "model.safetensors").read_bytes() == before


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from test_hf_interop import hf_checkpoint

    return hf_checkpoint(tmp_path_factory.mktemp("hf"), "gpt2", sharded=True)[0]


def _hf_start(hf: Path):
    from ember.config import recipe_from_dict
    from ember.data.spec import DataSpec
    from ember.runs import starting_model
    from test_hf_interop import VOCAB, T

    recipe = recipe_from_dict({"data": {"name": "stdlib", "seq_len": T}, "init": {"from_hf": str(hf)}})
    return starting_model(recipe, DataSpec("lm", vocab_size=VOCAB, seq_len=T))


HF_ATTACKS = [*HEADERS, *TAMPERED, "index-bomb", "index-list", "index-traversal", "config-bomb", "config-list"]


@pytest.mark.parametrize("attack", HF_ATTACKS)
def test_a_crafted_hugging_face_directory_is_one_message(attack, hf_dir, tmp_path):
    from ember.errors import EmberError

    hf = tmp_path / "hf"
    shutil.copytree(hf_dir, hf)
    index = hf / "model.safetensors.index.json"
    shard = hf / sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    if attack in HEADERS:
        shard.write_bytes(HEADERS[attack])
    elif attack in TAMPERED:
        tamper_tensors(shard, attack)
        if attack in ("missing-tensor", "extra-tensor"):  # the index lists what the shards hold
            names = safetensors.safe_open(str(shard), "pt").keys()
            weight_map = {k: v for k, v in json.loads(index.read_text())["weight_map"].items() if v != shard.name}
            index.write_text(json.dumps({"weight_map": {**weight_map, **dict.fromkeys(names, shard.name)}}))
    elif attack == "index-bomb":
        index.write_text(BOMB)
    elif attack == "index-list":
        index.write_text('{"weight_map": []}')
    elif attack == "index-traversal":
        index.write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    elif attack == "config-bomb":
        (hf / "config.json").write_text(BOMB)
    else:
        (hf / "config.json").write_text("[1, 2]")
    start = time.monotonic()
    with _deadline(20), pytest.raises(EmberError) as raised:
        _hf_start(hf)
    assert time.monotonic() - start < 5
    message = str(raised.value)
    assert "\n\n" not in message and str(hf) in message, message


def model_json_attack(info: dict, attack: str) -> str:
    """model.json's text after ``attack``: wrong types, NaN, duplicate keys, a bomb."""
    info = json.loads(json.dumps(info))
    model = info["model"]
    if attack == "bomb":
        return BOMB
    if attack == "duplicate-keys":  # the second "model" section silently wins in plain JSON
        text = json.dumps(info)
        return text.replace('"model": {', '"model": {"name": "mlp"}, "model": {', 1)
    changes = {
        "string-for-number": lambda: model.update(width="eight"),
        "negative-width": lambda: model.update(width=-8),
        "nan-width": lambda: model.update(width=float("nan")),
        "infinite-width": lambda: model.update(width=float("inf")),
        "list-for-model": lambda: info.update(model=[model]),
        "list-for-data": lambda: info.update(data=[]),
        "string-for-pruning": lambda: info.update(pruning="yes"),
        "list-for-quantization": lambda: info.update(quantization=[]),
        "string-for-lora": lambda: info.update(lora="r=4"),
        "list-for-weights": lambda: info.update(weights=[]),
        "string-for-weight-bytes": lambda: info["weights"].update(bytes="many"),
        "list-for-objective": lambda: info.update(objective=[]),
        "number-for-data-task": lambda: info["data"].update(task=5),
        "negative-classes": lambda: info["data"].update(num_classes=-3),
    }
    changes[attack]()
    return json.dumps(info)


MODEL_JSON = [
    "bomb",
    "duplicate-keys",
    "string-for-number",
    "negative-width",
    "nan-width",
    "infinite-width",
    "list-for-model",
    "list-for-data",
    "string-for-pruning",
    "list-for-quantization",
    "string-for-lora",
    "list-for-weights",
    "string-for-weight-bytes",
    "list-for-objective",
    "number-for-data-task",
    "negative-classes",
]


@pytest.mark.parametrize("attack", MODEL_JSON)
def test_a_malformed_model_json_is_one_message(attack, finished, tmp_path, capsys):
    run = copy_run(finished, "cnn", tmp_path)
    info = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(model_json_attack(info, attack))
    refused(["eval", str(run), "--max-batches", "1"], capsys, "model.json")


def test_a_two_gigabyte_json_file_is_refused_before_it_is_read(finished, tmp_path, capsys):
    """A sparse 2 GB model.json (one write of a byte): refused by its size, not read into memory."""
    run = copy_run(finished, "cnn", tmp_path)
    with open(run / "model.json", "r+b") as f:
        f.truncate(2 << 30)
    refused(["eval", str(run), "--max-batches", "1"], capsys, "model.json", limit=3)


RECORD = ["bomb", "list", "files-list", "string-bytes", "nan-bytes", "duplicate-keys", "traversal", "huge"]


@pytest.mark.parametrize("attack", RECORD)
def test_a_malformed_checkpoint_record_is_one_message(attack, finished, tmp_path, capsys):
    run = copy_run(finished, "cnn", tmp_path)
    checkpoint = run / "checkpoints" / "step_00000002"
    path = checkpoint / "record.json"
    record = json.loads(path.read_text())
    first = next(iter(record["files"]))
    text = {
        "bomb": BOMB,
        "list": "[]",
        "files-list": json.dumps({**record, "files": list(record["files"])}),
        "string-bytes": json.dumps({**record, "files": {**record["files"], first: {"bytes": "x", "sha256": 5}}}),
        "nan-bytes": json.dumps({**record, "files": {**record["files"], first: {"bytes": float("nan")}}}),
        "duplicate-keys": json.dumps(record).replace('"files": {', '"files": {}, "files": {', 1),
        "traversal": json.dumps({**record, "files": {**record["files"], "../../model.json": {"bytes": 1}}}),
        "huge": None,
    }[attack]
    plant(path, text)
    argv = ["train", "--run-dir", str(run), "--resume", str(checkpoint), "--set", "train.max_steps=3"]
    refused(argv, capsys, "step_00000002", limit=3)


def manifest_attack(manifest: dict, attack: str, data: Path) -> str:
    m = json.loads(json.dumps(manifest))
    shard = m["splits"]["train"]["shards"][0]
    entry = shard["files"]["tokens"]
    if attack == "bomb":
        return BOMB
    if attack == "duplicate-keys":
        return json.dumps(m).replace('"splits": {', '"splits": {}, "splits": {', 1)
    if attack == "traversal":  # a file outside the directory, its size and sha256 in the record: still refused
        outside = data.parent / "outside.bin"
        outside.write_bytes(b"\1\0" * 100)
        entry.update(
            file="../outside.bin", bytes=200, sha256=__import__("hashlib").sha256(outside.read_bytes()).hexdigest()
        )
        shard["count"] = 100
        return json.dumps(m)
    changes = {
        "string-count": lambda: shard.update(count="2454"),
        "negative-count": lambda: shard.update(count=-1),
        "nan-count": lambda: shard.update(count=float("nan")),
        "huge-count": lambda: shard.update(count=1 << 62),
        "negative-shard-size": lambda: m.update(shard_size=-5),
        "list-splits": lambda: m.update(splits=[]),
        "dict-shards": lambda: m["splits"]["train"].update(shards={}),
        "list-files": lambda: shard.update(files=[entry]),
        "number-file": lambda: entry.update(file=7),
        "object-dtype": lambda: m.update(dtype="object"),
        "unknown-dtype": lambda: m.update(dtype="float1024"),
        "string-vocab": lambda: m.update(vocab_size="256"),
        "negative-vocab": lambda: m.update(vocab_size=-1),
        "nan-eot": lambda: m.update(eot_id=float("nan")),
        "list-tokenizer": lambda: m.update(tokenizer=[]),
        "unknown-kind": lambda: m.update(kind="movies"),
        "list-kind": lambda: m.update(kind=["tokens"]),
        "null-splits": lambda: m.update(splits=None),
    }
    changes[attack]()
    return json.dumps(m)


MANIFEST = [
    "bomb",
    "duplicate-keys",
    "traversal",
    "string-count",
    "negative-count",
    "nan-count",
    "huge-count",
    "negative-shard-size",
    "list-splits",
    "dict-shards",
    "list-files",
    "number-file",
    "object-dtype",
    "unknown-dtype",
    "string-vocab",
    "negative-vocab",
    "nan-eot",
    "list-tokenizer",
    "unknown-kind",
    "list-kind",
    "null-splits",
]


@pytest.mark.parametrize("command", ["verify", "inspect", "train"])
@pytest.mark.parametrize("attack", MANIFEST)
def test_a_malformed_manifest_is_one_message(attack, command, finished, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(finished["data"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(manifest_attack(manifest, attack, data))
    if command == "train":
        recipe = tmp_path / "r.yaml"
        model = TINY["gpt"]["model"]
        train = {**QUIET, "max_steps": 1}
        recipe.write_text(
            yaml.safe_dump(
                {"data": {"name": "prepared", "path": str(data), "seq_len": 32}, "model": model, "train": train}
            )
        )
        argv = ["train", str(recipe), "--run-dir", str(tmp_path / "run")]
    else:
        argv = ["data", command, str(data)]
    refused(argv, capsys, "manifest.json")
    assert not (tmp_path / "run" / "model.safetensors").exists()


TOKENIZER = ["bomb", "list", "codec-number", "hf-garbage", "hf-model-number", "huge"]


@pytest.mark.parametrize("attack", TOKENIZER)
def test_a_malformed_run_tokenizer_is_one_message(attack, finished, tmp_path, capsys):
    run = copy_run(finished, "gpt", tmp_path)
    path = run / "tokenizer.json"
    text = {
        "bomb": BOMB,
        "list": "[]",
        "codec-number": '{"codec": 5}',
        "hf-garbage": '{"version": "1.0", "model": {"type": "BPE", "vocab": 5}}',
        "hf-model-number": '{"model": 5}',
        "huge": None,
    }[attack]
    plant(path, text)
    refused(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "2"], capsys, "tokenizer.json")


def write_npz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in members.items():
            z.writestr(name, raw)
    return path


def npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=True)
    return buf.getvalue()


def npy_claiming(shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    """An .npy member whose header claims ``shape`` but holds 64 bytes: a terabyte on paper."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 64


@pytest.mark.parametrize(
    "attack", ["object-images", "object-labels", "string-images", "complex-images", "flat-images", "terabyte-claim"]
)
def test_a_hostile_npz_source_is_one_message(attack, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    images, labels = np.zeros((20, 8, 8), np.uint8), np.arange(20) % 2
    if attack == "object-images":
        images = np.array([Payload(marker)] * 20, dtype=object)
    elif attack == "object-labels":
        labels = np.array([Payload(marker)] * 20, dtype=object)
    elif attack == "string-images":
        images = np.array(["x"] * 20)
    elif attack == "complex-images":
        images = images.astype(np.complex64)
    elif attack == "flat-images":
        images = np.zeros(20, np.uint8)
    members = {"x.npy": npy(images), "y.npy": npy(labels)}
    if attack == "terabyte-claim":
        members["x.npy"] = npy_claiming((1 << 20, 1 << 10, 1 << 10))
    source = write_npz(tmp_path / "digits.npz", members)
    refused(["data", "prepare", str(source), "--out", str(tmp_path / "out")], capsys, "digits.npz", marker)


def test_an_npz_member_named_with_dot_dots_writes_nothing_outside(tmp_path, capsys):
    """np.load never extracts members: a '../../x' name is only a key, and prepare ignores it."""
    images, labels = np.zeros((40, 8, 8), np.uint8), np.arange(40) % 2
    target = tmp_path / "escaped.npy"
    members = {"x.npy": npy(images), "y.npy": npy(labels), "../../escaped.npy": npy(labels)}
    (tmp_path / "deep" / "er").mkdir(parents=True)
    source = write_npz(tmp_path / "deep" / "er" / "digits.npz", members)
    assert main(["data", "prepare", str(source), "--out", str(tmp_path / "out")]) == 0
    assert not target.exists() and not (tmp_path / "deep" / "escaped.npy").exists()


YAML_ATTACKS = {
    "billion-laughs": "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)
    ),
    "python-tag": "data: !!python/object/apply:builtins.open ['{marker}', 'w']\n",
    "python-name": "data: !!python/name:os.system\n",
    "list": "- data\n- model\n",
    "scalar": "just a string\n",
    "int-key": "1: x\ndata: {name: digits}\n",
    "null-key": "null: y\ndata: {name: digits}\n",
    "int-section-key": "data: {name: digits, 5: 3}\n",
    "list-key": "? [a, b]\n: c\n",
    "deep": "a: " + "[" * 5000 + "]" * 5000 + "\n",
    "self-base": "base: {name}\n",
    "dev-zero-base": "base: /dev/zero\n",
    "directory-base": "base: .\n",
    "number-base": "base: 5\n",
    "huge": None,
}


@pytest.mark.parametrize("attack", sorted(YAML_ATTACKS))
def test_a_hostile_recipe_is_one_message(attack, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "recipe.yaml"
    if attack == "huge":  # a 100 MB recipe, sparse: refused by its size
        recipe.write_text("data: {name: digits}\n")
        with open(recipe, "r+b") as f:
            f.truncate(100 << 20)
    else:
        recipe.write_text(YAML_ATTACKS[attack].replace("{marker}", str(marker)).replace("{name}", recipe.name))
    refused(["recipe", "show", str(recipe)], capsys, "recipe.yaml", marker)


@pytest.mark.parametrize("where", ["dev-zero", "directory", "fifo"])
def test_a_recipe_path_that_is_no_file_is_one_message(where, tmp_path, capsys):
    path = {"dev-zero": Path("/dev/zero"), "directory": tmp_path, "fifo": tmp_path / "pipe.yaml"}[where]
    if where == "fifo":
        os.mkfifo(path)  # opening it for reading would block forever
    refused(["recipe", "show", str(path)], capsys, str(path))


def test_a_base_cycle_between_two_recipes_is_one_message(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    refused(["recipe", "show", str(tmp_path / "a.yaml")], capsys, "a.yaml")


@pytest.mark.parametrize("target", ["model.safetensors", "model.json", "tokenizer.json"])
def test_a_run_file_linked_outside_the_run_is_one_message(target, finished, tmp_path, capsys):
    """model.safetensors -> /etc/passwd (resealed, so its sha256 matches): the reader refuses it."""
    run = copy_run(finished, "gpt", tmp_path)
    (run / target).unlink()
    (run / target).symlink_to("/etc/passwd")
    if target == "model.safetensors":
        reseal_weights(run)
    refused(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "2"], capsys, target)


def test_a_run_directory_that_is_a_file_is_one_message(tmp_path, capsys):
    (tmp_path / "run").write_text("not a run")
    refused(["eval", str(tmp_path / "run"), "--max-batches", "1"], capsys, "run")


def _read_only_dir() -> Path:
    """/sys refuses new files even to root; skip where it does not."""
    try:
        (Path("/sys") / "ember-probe").mkdir()
    except OSError:
        return Path("/sys")
    pytest.skip("no directory here refuses writes")


@pytest.mark.parametrize("command", ["prune", "report", "prepare"])
def test_an_output_on_a_read_only_directory_is_one_message(command, finished, tmp_path, capsys):
    out = _read_only_dir() / "ember-out"
    argv = {
        "prune": ["prune", str(finished["cnn"]), "--amount", "0.5", "--out", str(out)],
        "report": ["report", str(finished["cnn"]), "--out", str(out) + ".html", "--no-eval"],
        "prepare": ["data", "prepare", str(finished["data"].parent / "corpus"), "--out", str(out)],
    }[command]
    refused(argv, capsys, "ember-out")


@pytest.mark.parametrize("command", ["prune", "quantize", "prepare", "train"])
def test_an_out_that_is_a_foreign_non_empty_directory_keeps_what_it_holds(command, finished, tmp_path, capsys):
    """ember writes its own files beside a user's (or refuses in one paragraph); it never deletes,
    empties or overwrites what was there."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    argv = {
        "prune": ["prune", str(finished["cnn"]), "--amount", "0.5", "--out", str(out)],
        "quantize": ["quantize", str(finished["cnn"]), "--out", str(out), "--max-batches", "1"],
        "prepare": ["data", "prepare", str(finished["data"].parent / "corpus"), "--out", str(out)],
        "train": ["train", str(finished["cnn"] / "recipe.yaml"), "--run-dir", str(out)],
    }[command]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code in (0, 2) and "Traceback" not in err, (code, err)
    assert code == 0 or (str(out) in err and "\n\n" not in err), err
    assert (out / "thesis.tex").read_text() == "years of work"


def _calls(pattern: str) -> list[str]:
    """Every ``pattern`` call in ember's source, as 'file:line: text' (the call's first three lines)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.search(pattern, line) and not line.lstrip().startswith("#") and "``" not in line:
                found.append(f"{path.relative_to(SRC)}:{i + 1}: " + " ".join(lines[i : i + 3]))
    return found


def test_every_numpy_load_refuses_pickles():
    calls = _calls(r"\bnp\.load\(|numpy\.load\(")
    assert calls and all("allow_pickle=False" in c for c in calls), [c for c in calls if "allow_pickle=False" not in c]


def test_every_yaml_read_is_safe_and_every_torch_load_weights_only():
    unsafe = _calls(r"yaml\.(load|unsafe_load|full_load|load_all)\(|yaml\.(Loader|FullLoader|UnsafeLoader)\b")
    assert unsafe == []
    loads = _calls(r"\btorch\.load\(")
    assert all("weights_only=True" in c for c in loads), loads
