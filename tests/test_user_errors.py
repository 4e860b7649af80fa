"""Mistakes and mishaps a user can fix — a run dir that is a file, a read-only directory, a
full disk while writing a checkpoint or the model, negative counts on the command line — are
one paragraph naming the cause and the fix, exit status 2, and nothing already saved is lost."""

from __future__ import annotations

import errno

import pytest
import safetensors.torch

from conftest import tiny_recipe
from ember import cli
from ember.errors import EmberError
from ember.training.checkpoint import list_checkpoints, verify_checkpoint
from ember.training.loop import train


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err.strip()


def assert_one_paragraph(err: str) -> None:
    assert err.startswith("ember: error: ") and "\n" not in err and "Traceback" not in err, err


def test_run_dir_that_is_a_file_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe("gpt", "train.max_steps=1").to_yaml())
    (tmp_path / "taken").write_text("notes")
    code, err = run_cli(capsys, "train", str(recipe), "--run-dir", str(tmp_path / "taken"))
    assert code == 2
    assert_one_paragraph(err)
    assert "is an existing file" in err
    assert (tmp_path / "taken").read_text() == "notes"


@pytest.mark.parametrize("flag,value", [("--batch-size", "-4"), ("--max-batches", "-1"), ("--max-batches", "two")])
def test_negative_or_malformed_counts_are_refused(tmp_path, capsys, flag, value):
    code = cli.main(["eval", str(tmp_path), flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert_one_paragraph(err)
    assert flag in err and value in err


def test_evaluate_refuses_negative_counts_as_a_library_call(tmp_path):
    from ember.eval.evaluate import evaluate

    with pytest.raises(EmberError, match="must be 0 or more"):
        evaluate(tmp_path, batch_size=-4)


def test_a_read_only_run_dir_is_one_paragraph(tmp_path, monkeypatch, capsys):
    """Root ignores permission bits, so the refusal the file system would give is injected."""
    import ember.atomic

    def refused(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(tmp_path / "run"))

    monkeypatch.setattr(ember.atomic.tempfile, "mkstemp", refused)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe("gpt", "train.max_steps=1").to_yaml())
    code, err = run_cli(capsys, "train", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert code == 2
    assert_one_paragraph(err)
    assert "Cannot write the run directory" in err and "Read-only file system" in err


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The second checkpoint's state file write fails with ENOSPC: the message names the
    checkpoint, the space needed and free, and the intact previous one; resume then finishes."""
    import ember.training.checkpoint as checkpoint

    sealed, real_seal, real_write = [], checkpoint._seal, checkpoint.write_state
    disk = {"full": False}

    def seal(*args, **kwargs):
        real_seal(*args, **kwargs)
        sealed.append(1)
        disk["full"] = len(sealed) == 1  # after the first checkpoint, until "freed" below

    def write_state(*args, **kwargs):
        if disk["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_seal", seal)
    monkeypatch.setattr(checkpoint, "write_state", write_state)
    recipe = tiny_recipe("gpt", "train.max_steps=4", "train.checkpoint_every=2", "train.deterministic=true")
    run = tmp_path / "run"
    with pytest.raises(EmberError) as err:
        train(recipe, run)
    text = str(err.value)
    assert "The disk is full" in text and "the checkpoint of step 4" in text and "bytes are free there" in text, text
    assert "step_00000002 is intact" in text, text
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    assert verify_checkpoint(run / "checkpoints" / "step_00000002") is None
    assert not (run / "checkpoints" / "step_00000004.partial").exists()  # its space is given back
    disk["full"] = False
    assert train(recipe, run, resume="auto").step == 4


def test_a_full_disk_while_writing_the_model_says_the_checkpoints_are_intact(tmp_path, monkeypatch):
    import ember.runs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real = safetensors.torch.save_model
    monkeypatch.setattr(ember.runs.safetensors.torch, "save_model", full)
    run = tmp_path / "run"
    with pytest.raises(EmberError, match="writing the final model .* checkpoints are intact"):
        train(tiny_recipe("gpt", "train.max_steps=2"), run)
    monkeypatch.setattr(ember.runs.safetensors.torch, "save_model", real)
    assert train(tiny_recipe("gpt", "train.max_steps=2"), run, resume="auto").step == 2
    assert (run / "model.safetensors").is_file()
