"""Checkpoint files: atomic, verified, newest-valid discovery, retention."""

import pytest
import torch

from ember.errors import EmberError
from ember.train.checkpoint import (
    latest_valid_checkpoint, list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
)


def state(v):
    return {"w": torch.full((64,), float(v)), "step": v}


def test_keeps_the_newest_k(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(state(step), tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.pt", "step_00000004.pt"]
    assert not (tmp_path / "step_00000001.json").exists()


def test_truncated_newest_is_skipped_with_a_warning(tmp_path):
    save_checkpoint(state(1), tmp_path, 1, keep=5)
    newest = save_checkpoint(state(2), tmp_path, 2, keep=5)
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match="step_00000002.pt.*truncated"):
        found = latest_valid_checkpoint(tmp_path)
    assert found.name == "step_00000001.pt"
    assert load_checkpoint(found)["step"] == 1


def test_bit_flip_is_detected_and_never_loaded(tmp_path):
    path = save_checkpoint(state(1), tmp_path, 1, keep=5)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EmberError, match="sha256"):
        load_checkpoint(path)


def test_interrupted_write_without_record_is_skipped(tmp_path):
    save_checkpoint(state(1), tmp_path, 1, keep=5)
    torch.save(state(2), tmp_path / "step_00000002.pt")  # as if the process died before the record
    with pytest.warns(UserWarning, match="integrity record"):
        assert latest_valid_checkpoint(tmp_path).name == "step_00000001.pt"


def test_rng_state_round_trip_reproduces_draws():
    saved = rng_state()
    a = torch.rand(3)
    set_rng_state(saved)
    assert torch.equal(a, torch.rand(3))
