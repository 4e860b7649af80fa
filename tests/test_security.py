"""A crafted run directory never runs code (invariant 9) and a damaged one is one message.

Two tiny finished runs are trained once (a digits CNN, a byte-level GPT). Each test copies
one, plants in one file a pickle whose ``__reduce__`` would create a marker file — the way
an attacker who hands out a run directory would — and runs an ember command on it
in-process. Whatever the file, the marker must never appear, and the command must end
with exit status 2 and a single paragraph on stderr, no traceback. Where a checksum
record covers the file (a checkpoint's record.json, model.json's weights entry) the
attacker rewrites it to match, so that the reader itself is what stops the pickle.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY
from ember.atomic import sha256_file
from ember.cli import main
from test_checkpoint import rewrite_as_dcp

QUIET = {"progress": False, "peak_flops": 1e12, "batch_size": 4, "log_every": 1, "eval_every": 0}


class Payload:
    """Unpickled by an unrestricted unpickler, it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def recipe_file(directory: Path, kind: str, **train) -> Path:
    path = directory / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(dict(TINY[kind], train={**QUIET, **train}, eval={"max_batches": 1})))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """A finished CNN and GPT run, each with one checkpoint at step 2, and a student recipe."""
    root = tmp_path_factory.mktemp("security")
    runs = {}
    for kind in ("cnn", "gpt"):
        runs[kind] = root / f"run-{kind}"
        assert (
            main(["train", str(recipe_file(root, kind, max_steps=2, checkpoint_every=2)), "--run-dir", str(runs[kind])])
            == 0
        )
    runs["student"] = recipe_file(root, "cnn", max_steps=1)
    (root / "new-data.yaml").write_text(yaml.safe_dump({"data": {"name": "digits", "classes": [5, 6, 7, 8, 9]}}))
    runs["new-data"] = root / "new-data.yaml"
    return runs


def reseal_checkpoint(checkpoint: Path) -> None:
    """Rewrite record.json to match the files as they are now: what an attacker would do."""
    record = json.loads((checkpoint / "record.json").read_text())
    record["files"] = {
        f: {"bytes": (checkpoint / f).stat().st_size, "sha256": sha256_file(checkpoint / f)} for f in record["files"]
    }
    (checkpoint / "record.json").write_text(json.dumps(record))


def reseal_weights(run: Path) -> None:
    info = json.loads((run / "model.json").read_text())
    weights = run / "model.safetensors"
    info["weights"] = {"file": weights.name, "bytes": weights.stat().st_size, "sha256": sha256_file(weights)}
    (run / "model.json").write_text(json.dumps(info))


def poison_shard_entry(checkpoint: Path, payload: bytes) -> None:
    """Point the optimiser's non-tensor entries (param_groups) at ``payload`` appended to the shard,
    with a well-formed index: DCP's default planner reads such entries with weights_only=False."""
    index = pickle.loads((checkpoint / ".metadata").read_bytes())  # written by this module's own fixture
    shard = checkpoint / "__0_0.distcp"
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    for key, info in index.storage_data.items():
        if "param_groups" in key.fqn:
            info.offset, info.length = offset, len(payload)
    with open(checkpoint / ".metadata", "wb") as f:
        pickle.dump(index, f)


def plant(run: Path, target: str, marker: Path) -> None:
    """Replace ``target`` (a file of ``run``) by, or fill it with, a pickle that would create ``marker``."""
    evil = pickle.dumps(Payload(marker))
    saved = io.BytesIO()
    torch.save(Payload(marker), saved)  # how torch.save would write it: what torch.load(weights_only=False) runs
    checkpoint = run / "checkpoints" / "step_00000002"
    if target in (".metadata", "__0_0.distcp"):  # one process now writes a state file: DCP's is the older format
        rewrite_as_dcp(checkpoint)
    if target == "__0_0.distcp":
        poison_shard_entry(checkpoint, saved.getvalue())
    elif target in ("trainer.pt", "state.safetensors"):
        (checkpoint / target).write_bytes(saved.getvalue())
    elif target in (".metadata", "record.json"):
        (checkpoint / target).write_bytes(evil)
    else:
        (run / target).write_bytes(evil)
    if target in (".metadata", "__0_0.distcp", "trainer.pt", "state.safetensors"):
        reseal_checkpoint(checkpoint)
    if target == "model.safetensors":
        reseal_weights(run)


CHECKPOINT_FILES = ["state.safetensors", ".metadata", "__0_0.distcp", "trainer.pt", "record.json"]
MODEL_FILES = ["model.safetensors", "model.json"]


def command(name: str, run: Path, finished: dict, tmp: Path) -> list[str]:
    return {
        "train": ["train", "--run-dir", str(run), "--resume", "auto", "--set", "train.max_steps=3"],
        "eval": ["eval", str(run), "--max-batches", "1"],
        "generate": ["generate", str(run), "--prompt", "def ", "--max-new-tokens", "2"],
        "continue": [
            "continue",
            str(run),
            "--data",
            str(finished["new-data"]),
            "--run-dir",
            str(tmp / "cont"),
            "--set",
            "train.max_steps=1",
        ],
        "prune": ["prune", str(run), "--amount", "0.5", "--out", str(tmp / "pruned")],
        "quantize": ["quantize", str(run), "--out", str(tmp / "int8"), "--max-batches", "1"],
        "distill": [
            "distill",
            "--teacher",
            str(run),
            "--student",
            str(finished["student"]),
            "--run-dir",
            str(tmp / "student"),
        ],
        "ensemble": ["ensemble", str(run), str(finished["cnn"]), "--max-batches", "1", "--out", str(tmp / "ens.json")],
        "soup": ["ensemble", str(run), str(finished["cnn"]), "--method", "soup", "--out", str(tmp / "soup.json")],
        "report": ["report", str(run), "--out", str(tmp / "report.html")],
    }[name]


CASES = (
    [(f, "train", "cnn") for f in CHECKPOINT_FILES]
    + [(f, "train", "gpt") for f in ("state.safetensors", ".metadata", "__0_0.distcp")]
    + [
        (f, c, "cnn")
        for f in MODEL_FILES
        for c in ("eval", "continue", "prune", "quantize", "distill", "ensemble", "soup")
    ]
    + [(f, "generate", "gpt") for f in (*MODEL_FILES, "tokenizer.json")]
    + [("recipe.yaml", c, "cnn") for c in ("train", "eval")]
)


@pytest.mark.parametrize("target,name,kind", CASES, ids=[f"{c}-{k}-{f}" for f, c, k in CASES])
def test_a_planted_pickle_never_runs_and_is_one_message(target, name, kind, finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished[kind], run)
    if not (run / target).exists() and target not in CHECKPOINT_FILES:
        pytest.skip(f"the {kind} run has no {target}")
    marker = tmp_path / "PWNED"
    plant(run, target, marker)
    try:
        code = main(command(name, run, finished, tmp_path))
    except BaseException as crash:  # a traceback fails too, but whether the pickle ran is checked first
        code = repr(crash)
    err = capsys.readouterr().err
    assert not marker.exists(), f"{name} ran the pickle planted in {target}"
    assert code == 2, (code, err)
    assert "Traceback" not in err and err.strip() and "\n\n" not in err.strip(), err
    assert target in err or "checkpoint" in err.lower(), err  # names the file, or the checkpoint holding it


@pytest.mark.parametrize("target", ["metrics.jsonl", "eval.json", "model.json", "model.safetensors"])
def test_report_refuses_a_poisoned_file_and_runs_nothing(target, finished, tmp_path, capsys):
    """A run file that exists but is damaged or foreign is named in one paragraph (exit 2), as in
    every other command; a file the run simply lacks is only left off the page."""
    run = tmp_path / "run"
    shutil.copytree(finished["cnn"], run)
    (run / "eval.json").write_text("{}")
    marker = tmp_path / "PWNED"
    plant(run, target, marker)
    code = main(["report", str(run), "--out", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert code == 2 and "Traceback" not in err and "\n" not in err.strip(), err
    assert target in err, err


def test_a_flipped_bit_in_the_weights_is_named(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished["cnn"], run)
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    assert main(["eval", str(run), "--max-batches", "1"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors does not match the sha256 recorded when it was written" in err


@pytest.mark.parametrize("cut", ["model.safetensors", "model.json"])
def test_a_truncated_model_file_is_one_message(cut, finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished["cnn"], run)
    (run / cut).write_bytes((run / cut).read_bytes()[:40])
    assert main(["eval", str(run), "--max-batches", "1"]) == 2
    err = capsys.readouterr().err
    assert cut in err and "Traceback" not in err


def test_older_runs_without_a_weights_record_still_load(finished, tmp_path):
    from ember.runs import load_trained_model

    run = tmp_path / "run"
    shutil.copytree(finished["cnn"], run)
    info = json.loads((run / "model.json").read_text())
    del info["weights"]
    (run / "model.json").write_text(json.dumps(info))
    model, _ = load_trained_model(run)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("junk", ["corrupt-record", "junk-dir", "plain-file"])
def test_resume_auto_refuses_when_every_checkpoint_is_invalid(junk, finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished["cnn"], run)
    checkpoints = run / "checkpoints"
    if junk == "corrupt-record":
        (checkpoints / "step_00000002" / "record.json").write_text("{not json")
    else:
        shutil.rmtree(checkpoints / "step_00000002")
        if junk == "junk-dir":
            (checkpoints / "step_00000010").mkdir()
        else:
            (checkpoints / "step_00000010").write_text("not a checkpoint")
    (checkpoints / "step_00000020.partial").mkdir()  # an interrupted write: not an entry
    before = (run / "model.safetensors").read_bytes()
    assert main(["train", "--run-dir", str(run), "--resume", "auto", "--set", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "no valid checkpoint" in err and "step_000000" in err and "partial" not in err
    assert (run / "model.safetensors").read_bytes() == before  # the run was not trained over


def test_resume_auto_with_only_interrupted_writes_starts_fresh(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished["cnn"], run)
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    (run / "checkpoints" / "step_00000002.partial").mkdir()
    assert main(["train", "--run-dir", str(run), "--resume", "auto", "--set", "train.max_steps=1"]) == 0


def test_the_restricted_index_reader_loads_a_real_checkpoint(tmp_path):
    """Every class a real index holds is allowed: a checkpoint round-trips through the safe reader."""
    from ember.training.checkpoint import load_model_and_optimizer, save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(18, 3)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    model(torch.randn(2, 1, 5, 5)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, 1, model, optimizer, {"step": 1})
    other = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(18, 3)
    )
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.5)
    load_model_and_optimizer(path, other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert other_opt.param_groups[0]["lr"] == 0.01 and other_opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_report_skips_only_a_last_metrics_line_cut_short_by_a_crash(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished["cnn"], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "loss": 1.')  # killed mid-write
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--no-eval"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--no-eval"]) == 2
    assert "metrics.jsonl line 2 is not a JSON record" in capsys.readouterr().err


def test_a_planted_study_database_is_one_message(tmp_path, capsys):
    """ember tune resumes from TUNE/study.db (SQLite): a pickle there is no database, named as such."""
    marker = tmp_path / "PWNED"
    run = tmp_path / "tune"
    run.mkdir()
    (run / "study.db").write_bytes(pickle.dumps(Payload(marker)))
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    code = main(
        [
            "tune",
            str(recipe_file(tmp_path, "gpt", max_steps=1)),
            "--space",
            str(space),
            "--trials",
            "1",
            "--run-dir",
            str(run),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert code == 2 and "\n" not in err and "study.db cannot be opened as an Optuna study database" in err, err
