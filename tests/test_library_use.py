"""ember used as a library, from a script or a notebook: ``ember.train`` called again and again in
one process leaves the caller's process as it found it (random generators, torch's switches and
threads, environment, signal handlers, logging, the collector), a module of the user's keeps
what they set (frozen parameters, submodules in eval mode), and the result says where things are."""

from __future__ import annotations

import gc
import logging
import os
import random
import signal

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from conftest import QUIET, tiny_recipe
from ember.config import recipe_from_dict
from ember.errors import EmberError
from ember.training.checkpoint import list_checkpoints
from ember.training.loop import train


def _draws() -> tuple:
    """The next numbers the caller's own code would draw from each global generator."""
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _switches() -> tuple:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.get_num_threads(),
        torch.get_default_dtype(),
        torch.is_grad_enabled(),
    )


def test_train_and_resume_leave_the_callers_random_generators_where_they_were(tmp_path):
    """A notebook seeds its own code; a run in between (seeding torch; resuming, restoring numpy's and
    Python's generators from its checkpoint) does not move what the notebook draws next."""
    _seed_all(7)
    expected = _draws()
    cut = tiny_recipe("cnn", "train.max_steps=2", "train.checkpoint_every=2")
    train(cut, tmp_path / "run")
    _seed_all(7)
    train(tiny_recipe("cnn", "train.max_steps=3"), tmp_path / "run", resume="auto")
    assert _draws() == expected


def test_train_gives_back_torch_switches_threads_and_environment(tmp_path, monkeypatch):
    """train.deterministic, cuDNN's benchmark mode (set on by a non-deterministic run), the thread count
    the caller chose (also kept during the run), and KINETO_LOG_LEVEL (set for a trace only)."""
    monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before, environ = _switches(), dict(os.environ)
        seen = []
        recipe = tiny_recipe("cnn", "train.eval_every=2", "train.profile.start=3", "train.profile.steps=1")
        train(recipe, tmp_path / "a", on_eval=lambda step, m: seen.append(torch.get_num_threads()))
        train(tiny_recipe("cnn", "train.deterministic=true"), tmp_path / "b")
        assert (_switches(), dict(os.environ)) == (before, environ)
        assert seen == [1, 1] and (tmp_path / "a" / "profile").is_dir()  # the trace was taken, quietly
    finally:
        torch.set_num_threads(threads)


def test_a_run_that_raises_gives_back_the_process_too(tmp_path):
    """An error in the user's callback: the collector's frozen heap, signal handlers, generators and
    switches are the caller's again, and the next run in the same process trains normally."""

    def broken(step: int, metrics: dict) -> bool:
        raise ValueError("a bug in the user's callback")

    _seed_all(3)
    expected = _draws()
    _seed_all(3)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    freeze, switches = gc.get_freeze_count(), _switches()
    with pytest.raises(ValueError, match="user's callback"):
        train(tiny_recipe("cnn", "train.eval_every=2"), tmp_path / "a", on_eval=broken)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert (gc.get_freeze_count(), _switches(), _draws()) == (freeze, switches, expected)
    assert train(tiny_recipe("cnn"), tmp_path / "b").step == 4


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="needs SIGINT")
def test_ctrl_c_in_a_notebook_keeps_a_checkpoint_and_the_interpreters_handler(tmp_path):
    """Ctrl-C (SIGINT, here sent at a validation) stops at the step boundary with a checkpoint and
    raises KeyboardInterrupt; the interpreter's own handler is back, and resume="auto" finishes."""
    original = signal.getsignal(signal.SIGINT)
    recipe = tiny_recipe("cnn", "train.max_steps=8", "train.eval_every=2", "train.checkpoint_every=4")

    def ctrl_c(step: int, metrics: dict) -> bool:
        os.kill(os.getpid(), signal.SIGINT)
        return False

    with pytest.raises(KeyboardInterrupt, match=r"interrupted at step 2; checkpoint saved.*resume=\"auto\" in Python"):
        train(recipe, tmp_path / "run", on_eval=ctrl_c)
    assert signal.getsignal(signal.SIGINT) is original
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002"]
    result = train(recipe, tmp_path / "run", resume="auto")
    assert result.step == 8 and result.checkpoint == tmp_path / "run" / "checkpoints" / "step_00000008"


class FrozenBackbone(nn.Module):
    """A pretrained body the user froze (no gradients; batch norm in eval mode) under a new head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(16, 10))
        self.body.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _custom_digits(*overrides: str):
    raw = {
        "model": {"name": "custom", "task": "classify"},
        "data": {"name": "digits"},
        "train": {**QUIET["train"], "eval_every": 2},
        "eval": QUIET["eval"],
    }
    for item in overrides:
        key, value = item.split("=")
        raw["train"][key] = int(value)
    return recipe_from_dict(raw)


def test_a_frozen_backbone_stays_frozen_through_validation(tmp_path, caplog):
    """Frozen weights and the batch norm's running statistics are not touched (before, validation
    put every submodule back in train mode, so the frozen batch norm learnt statistics from step 3);
    the head trains; each submodule ends in the mode it was given in; the log counts what trains."""
    model = FrozenBackbone()
    body, head = {k: v.clone() for k, v in model.body.state_dict().items()}, model.head[1].weight.clone()
    modes = {name: m.training for name, m in model.named_modules()}
    caplog.set_level(logging.INFO, logger="ember")
    train(_custom_digits(), tmp_path / "run", model=model)
    assert all(torch.equal(v, body[k]) for k, v in model.body.state_dict().items())
    assert not torch.equal(model.head[1].weight, head)
    assert {name: m.training for name, m in model.named_modules()} == modes
    said = caplog.text
    assert "170 of 1,242 parameters trainable (1,072 frozen)" in said  # head 16*10+10; body 64*16+16 + 2*16
    assert "in eval mode as given, and trained so: body\n" in said


def test_a_module_left_in_eval_mode_is_trained_so_and_said(tmp_path, caplog):
    model = FrozenBackbone().requires_grad_(True).eval()
    with caplog.at_level(logging.WARNING, logger="ember"):
        train(_custom_digits(), tmp_path / "run", model=model)
    assert not model.training and "given in eval mode" in caplog.text


def test_the_result_says_where_the_weights_and_the_checkpoint_are(tmp_path):
    recipe = tiny_recipe("cnn", "train.checkpoint_every=2")
    result = train(recipe, tmp_path / "run")
    assert result.model_path == tmp_path / "run" / "model.safetensors" and result.model_path.is_file()
    assert result.checkpoint == list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert result.checkpoint.name == "step_00000004"
    again = train(recipe, tmp_path / "run", resume="auto")  # finished: answered from the run directory
    assert (again.step, again.checkpoint, again.metrics) == (4, result.checkpoint, result.metrics)


def test_a_module_with_nothing_to_train_is_one_paragraph(tmp_path):
    model = FrozenBackbone().requires_grad_(False)
    with pytest.raises(EmberError, match="no parameter with requires_grad=True"):
        train(_custom_digits(), tmp_path / "run", model=model)


def test_load_model_gives_back_the_trained_module(tmp_path):
    """train → load_model: the module ember built, with the run's final weights, in eval mode (loading
    and evaluate leave the caller's generator alone); a module of the user's is refused with the way
    to load it instead."""
    import ember

    result = ember.train(tiny_recipe("cnn"), tmp_path / "run")
    _seed_all(11)
    expected = _draws()
    _seed_all(11)
    model = ember.load_model(result.run_dir)
    scored = ember.evaluate(result.run_dir, max_batches=2).metrics  # as the run validated: eval.max_batches=2
    assert scored["loss"] == pytest.approx(result.metrics["loss"])
    assert _draws() == expected  # building the model to load into drew nothing of the caller's
    stored = safetensors.torch.load_file(str(result.model_path))
    assert not model.training and stored.keys() == model.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
    mine = ember.train(_custom_digits(), tmp_path / "mine", model=FrozenBackbone().train())
    with pytest.raises(EmberError, match="safetensors.torch.load_model"):
        ember.load_model(mine.run_dir)
