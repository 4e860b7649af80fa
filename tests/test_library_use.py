"""ember used as a library, from a script or a notebook: ``ember.train`` called again and again in
one process leaves the caller's process as it found it (random generators, torch's switches and
threads, environment, signal handlers, logging, the collector), a module of the user's keeps
what they set (frozen parameters, submodules in eval mode), and the result says where things are."""

from __future__ import annotations

import gc
import os
import random
import signal

import numpy as np
import pytest
import torch

from conftest import tiny_recipe
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
