"""Checkpoint directories: atomic, verified, newest-valid discovery, retention, round trip, in
both formats (one process's state file; DCP's shards, which several ranks and older runs write)."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import ember.training.checkpoint as ckpt
from ember.atomic import sha256_file
from ember.errors import EmberError
from ember.training.checkpoint import (
    latest_valid_checkpoint,
    list_checkpoints,
    load_model_and_optimizer,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    saved_names,
    set_rng_state,
)
from ember.training.state_file import STATE, read_state


def save_dcp(directory: Path, step: int, model, optimizer, trainer: dict, keep: int = 5) -> Path:
    """A checkpoint in DCP's format, as one process wrote it before the state file (and as
    several ranks write it now): the old format that must still resume."""
    final = ckpt.checkpoint_path(directory, step)
    partial = final.with_name(final.name + ".partial")
    partial.mkdir(parents=True)
    ckpt._save_dcp(partial, dict(zip(("model", "optimizer"), ckpt._states(model, optimizer))))
    ckpt._seal(partial, step, trainer, {})
    ckpt._publish(partial, final, directory, keep)
    return final


def rewrite_as_dcp(checkpoint: Path) -> None:
    """Turn a one-process checkpoint (state file) into the same checkpoint in DCP's format."""
    import torch.distributed.checkpoint as dcp

    state = read_state(checkpoint / STATE)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=checkpoint, no_dist=True)
    (checkpoint / STATE).unlink()
    files = sorted(f.name for f in checkpoint.iterdir() if f.name != "record.json")
    record = json.loads((checkpoint / "record.json").read_text())
    record["files"] = {
        f: {"bytes": (checkpoint / f).stat().st_size, "sha256": sha256_file(checkpoint / f)} for f in files
    }
    (checkpoint / "record.json").write_text(json.dumps(record))


SAVERS = {"state-file": save_checkpoint, "dcp": lambda d, step, keep, m, o, t: save_dcp(d, step, m, o, t, keep)}


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(directory, step, keep=5, fmt="state-file"):
    model, optimizer = model_and_optimizer(step)
    return SAVERS[fmt](directory, step, keep, model, optimizer, {"step": step})


@pytest.mark.parametrize("fmt", SAVERS)
def test_round_trip_restores_weights_and_optimizer_state(tmp_path, fmt):
    model, optimizer = model_and_optimizer(1)
    path = SAVERS[fmt](tmp_path, 1, 5, model, optimizer, {"step": 1, "extra": torch.arange(3)})
    assert ((path / STATE).is_file(), (path / ".metadata").is_file()) == (fmt == "state-file", fmt == "dcp")
    other, other_opt = model_and_optimizer(2)
    load_model_and_optimizer(path, other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    for p, q in zip(model.parameters(), other.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], other_opt.state[q][key])
    assert other_opt.param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again, as the optimiser made it
    assert torch.equal(load_trainer_state(path)["extra"], torch.arange(3))


def test_the_state_file_is_sealed_as_written_and_holds_what_get_state_dict_names(tmp_path):
    """The sha256 taken while writing is the file's; names match DCP's (so either format's reader
    finds each tensor), a tied weight is stored once and comes back under both names."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from conftest import tiny_recipe
    from ember.models.registry import build_model
    from ember.training.memory import data_spec

    torch.manual_seed(0)
    recipe = tiny_recipe("gpt")
    model = build_model(recipe.model, data_spec(recipe), recipe.objective)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, 5, model, optimizer, {"step": 1})
    record = json.loads((path / "record.json").read_text())["files"]
    assert set(record) == {STATE, "trainer.pt"}
    assert all(record[f] == {"bytes": (path / f).stat().st_size, "sha256": sha256_file(path / f)} for f in record)
    model_state, optim_state = get_state_dict(model, optimizer)
    want = {f"model.{k}" for k in model_state} | {
        f"optimizer.state.{n}.{k}" for n, s in optim_state["state"].items() for k in s
    }
    assert saved_names(path) == want
    tied = [n for n in model_state if model_state[n].data_ptr() == model_state["tok_emb.weight"].data_ptr()]
    assert len(tied) == 2  # the tiny gpt ties its head to its embedding: stored once
    from safetensors import safe_open

    with safe_open(str(path / STATE), framework="pt") as f:
        assert len(f.keys()) == len(want) - 1
    saved = read_state(path / STATE)
    assert all(torch.equal(saved["model"][n], model_state[n]) for n in model_state)


def test_keeps_the_newest_k(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize("fmt", SAVERS)
def test_truncated_newest_is_skipped_with_a_warning(tmp_path, fmt):
    save(tmp_path, 1)
    newest = save(tmp_path, 2, fmt=fmt)
    shard = next(newest.glob("*.distcp" if fmt == "dcp" else STATE))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(UserWarning, match=f"step_00000002.*{shard.name}.*truncated"):
        found = latest_valid_checkpoint(tmp_path)
    assert found.name == "step_00000001"
    assert load_trainer_state(found)["step"] == 1


def test_bit_flip_is_detected_and_never_loaded(tmp_path):
    path = save(tmp_path, 1)
    trainer = path / "trainer.pt"
    data = bytearray(trainer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    trainer.write_bytes(bytes(data))
    with pytest.raises(EmberError, match="sha256 of trainer.pt"):
        load_trainer_state(path)


def test_interrupted_write_is_never_loaded_and_is_cleared_by_the_next_save(tmp_path):
    save(tmp_path, 1)
    second = save(tmp_path, 2)
    (second / "record.json").unlink()  # as if the process died before the record
    with pytest.warns(UserWarning, match="integrity record"):
        assert latest_valid_checkpoint(tmp_path).name == "step_00000001"
    shutil.copytree(second, tmp_path / "step_00000003.partial")  # a crash mid-write: never listed
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]
    save(tmp_path, 3)
    assert not (tmp_path / "step_00000003.partial").exists()
    assert latest_valid_checkpoint(tmp_path).name == "step_00000003"


def test_rng_state_round_trip_reproduces_draws():
    saved = rng_state()
    a = torch.rand(3)
    set_rng_state(saved)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize(
    "damage",
    ["not-safetensors", "unknown-tensor", "wrong-shape", "missing-tensor"],
)
def test_a_damaged_state_file_that_still_matches_its_record_is_one_message(tmp_path, damage):
    """Whoever alters the state file can reseal the record: the loader itself refuses it, by name."""
    from ember.training.state_file import write_state

    path = save(tmp_path, 1)
    state = read_state(path / STATE)
    if damage == "not-safetensors":
        (path / STATE).write_bytes(b"\x80\x04 a pickle, not safetensors" * 4)
    else:
        if damage == "unknown-tensor":
            state["model"]["0.weight"] = torch.zeros(0)  # then the reference below points nowhere
        elif damage == "wrong-shape":
            state["model"]["0.weight"] = torch.zeros(3, 3)
        else:
            del state["model"]["0.weight"]
        write_state(tmp_path / STATE, state)  # not over the file its tensors are mapped from
        shutil.move(tmp_path / STATE, path / STATE)
        if damage == "unknown-tensor":
            data = (path / STATE).read_bytes().replace(b'"$tensor": "model/0.weight"', b'"$tensor": "model/0.nope!"')
            (path / STATE).write_bytes(data)
    model, optimizer = model_and_optimizer(2)
    with pytest.raises(EmberError, match=f"{STATE}|trainable weights"):
        load_model_and_optimizer(path, model, optimizer)


def test_an_old_dcp_checkpoint_and_a_state_file_load_the_same(tmp_path):
    """A run that saved in DCP's format before (one process) resumes as before: the same tensors."""
    model, optimizer = model_and_optimizer(1)
    new = save_checkpoint(tmp_path / "new", 1, 5, model, optimizer, {"step": 1})
    shutil.copytree(new, tmp_path / "old" / new.name)
    old = tmp_path / "old" / new.name
    rewrite_as_dcp(old)
    assert ckpt.verify_checkpoint(old) is None and not (old / STATE).exists()
    loaded = []
    for path in (new, old):
        other, other_opt = model_and_optimizer(2)
        load_model_and_optimizer(path, other, other_opt)
        loaded.append((other.state_dict(), [other_opt.state[p]["exp_avg"] for p in other.parameters()]))
    (a, a_opt), (b, b_opt) = loaded
    assert all(torch.equal(a[n], b[n]) for n in a) and all(torch.equal(x, y) for x, y in zip(a_opt, b_opt))


def test_cuda_rng_state_is_this_devices_only_and_old_lists_restore_by_index(monkeypatch):
    """A checkpoint keeps the current GPU's generator (every visible GPU's would not restore where fewer are
    visible); one written with every GPU's list restores this rank's device entry."""
    from ember.training import checkpoint

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t: restored.append(int(t[0])))
    state = checkpoint.rng_state()
    assert "cuda" not in state and int(state["cuda_device"][0]) == 7
    checkpoint.set_rng_state(state)
    old = dict(state)
    del old["cuda_device"]
    old["cuda"] = [torch.tensor([3], dtype=torch.uint8), torch.tensor([5], dtype=torch.uint8)]
    checkpoint.set_rng_state(old)
    assert restored == [7, 5]


OPTIMISERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),  # no momentum: no state at all
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "rmsprop-centred": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "adafactor": lambda p: torch.optim.Adafactor(p, lr=0.01),  # factored moments for matrices, not vectors
}


def layered_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("name", OPTIMISERS)
def test_first_step_entries_are_what_a_real_first_step_creates_and_touch_nothing(name):
    """The probe's entries per parameter equal a real first step's, and the probe changes neither the
    optimiser (state, hooks, a scheduler's wrapper) nor the model."""
    from ember.training.optim_state import first_step_entries

    model = layered_model(0)
    optimizer = OPTIMISERS[name](model.parameters())
    steps = []
    optimizer.register_step_post_hook(lambda *args: steps.append(1))
    torch.optim.lr_scheduler.StepLR(optimizer, 1)  # wraps optimizer.step on the instance
    before = [p.detach().clone() for p in model.parameters()]
    state = {p: dict(s) for p, s in optimizer.state.items()}  # empty but for Adagrad's, made in __init__
    expected = first_step_entries(optimizer)
    assert expected is not None and steps == [] and {p: dict(s) for p, s in optimizer.state.items()} == state
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(before, model.parameters()))
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    assert expected == [set(optimizer.state.get(p, {})) for p in model.parameters()] and steps == [1]
    if name == "adafactor":  # the rule is per parameter: a matrix and a vector keep different moments
        assert expected[0] != expected[1]


@pytest.mark.parametrize("name", OPTIMISERS)
def test_a_checkpoint_of_any_optimiser_resumes_and_an_entry_it_never_keeps_is_refused(tmp_path, name):
    from ember.training.state_file import write_state

    model = layered_model(1)
    optimizer = OPTIMISERS[name](model.parameters())
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, 5, model, optimizer, {"step": 1})
    other = layered_model(2)
    other_opt = OPTIMISERS[name](other.parameters())
    load_model_and_optimizer(path, other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    for p, q in zip(model.parameters(), other.parameters()):
        assert optimizer.state[p].keys() == other_opt.state[q].keys()
        assert all(
            torch.equal(torch.as_tensor(v), torch.as_tensor(other_opt.state[q][k]))
            for k, v in optimizer.state[p].items()
        )
    state = read_state(path / STATE)
    state["optimizer"]["state"].setdefault("2.weight", {})["stolen"] = torch.zeros(2, 8)
    write_state(tmp_path / STATE, state)
    shutil.move(tmp_path / STATE, path / STATE)
    third = layered_model(3)
    with pytest.raises(EmberError, match=r"state\.safetensors.*'optimizer/state/2\.weight/stolen'.*altered"):
        load_model_and_optimizer(path, third, OPTIMISERS[name](third.parameters()))
