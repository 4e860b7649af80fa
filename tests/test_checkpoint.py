"""Checkpoint directories: atomic, verified, newest-valid discovery, retention, round trip."""

import shutil

import pytest
import torch

from ember.errors import EmberError
from ember.training.checkpoint import (
    latest_valid_checkpoint,
    list_checkpoints,
    load_model_and_optimizer,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(directory, step, keep=5):
    model, optimizer = model_and_optimizer(step)
    return save_checkpoint(directory, step, keep, model, optimizer, {"step": step})


def test_round_trip_restores_weights_and_optimizer_state(tmp_path):
    model, optimizer = model_and_optimizer(1)
    path = save_checkpoint(tmp_path, 1, 5, model, optimizer, {"step": 1, "extra": torch.arange(3)})
    other, other_opt = model_and_optimizer(2)
    load_model_and_optimizer(path, other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], other_opt.state[q]["exp_avg_sq"])
    assert torch.equal(load_trainer_state(path)["extra"], torch.arange(3))


def test_keeps_the_newest_k(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_truncated_newest_is_skipped_with_a_warning(tmp_path):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(UserWarning, match="step_00000002.*distcp.*truncated"):
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
