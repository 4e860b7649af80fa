"""train.profile: a torch.profiler trace of the named optimiser steps (real, on the CPU), resumed
windows, the profiler off outside its window, CUDA out-of-memory snapshots (torch.cuda faked:
no GPU here), and the report's links to all of them."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from ember.config import ProfileConfig
from ember.errors import EmberError
from ember.reporting import report
from ember.training.loop import train
from ember.training.profiling import Profiler, trace_path


def _events(path: Path) -> list[dict]:
    return json.loads(path.read_text())["traceEvents"]


def _steps(events: list[dict]) -> list[str]:
    return sorted({e["name"] for e in events if e["name"].startswith("ProfilerStep#")})


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_run_traces_the_steps_it_names_and_the_report_links_them(tmp_path, capfd):
    run = train(
        tiny_recipe("gpt", "train.max_steps=5", "train.profile.start=2", "train.profile.steps=2"), tmp_path / "r"
    )
    assert "profiler_start" not in capfd.readouterr().err  # PyTorch's Kineto lines stay out of ember's output
    files = sorted(p.name for p in (run.run_dir / "profile").iterdir())
    assert files == ["rank0.2.pt.trace.json"]
    events = _events(trace_path(run.run_dir, 0, 2))
    assert _steps(events) == ["ProfilerStep#2", "ProfilerStep#3"]  # steps 1, 4 and 5 ran untraced
    ops = {e["name"] for e in events if e.get("cat") == "cpu_op"}
    assert {"aten::mm", "aten::addmm"} & ops and "aten::scaled_dot_product_attention" in ops
    assert any(e["name"].startswith("Optimizer.step") for e in events)  # the whole step: optimiser too
    # The page links the trace relative to itself, and a snapshot by name only: a planted pickle never runs.
    marker = tmp_path / "PWNED"
    (run.run_dir / "profile" / "oom_memory_rank0.pickle").write_bytes(pickle.dumps(_Planted(marker)))
    page = report([run.run_dir], out=tmp_path / "page.html", evaluate=False).read_text()
    assert not marker.exists()
    links = re.findall(r'<a href="([^"]+)">', page)
    assert links == ["r/profile/oom_memory_rank0.pickle", "r/profile/rank0.2.pt.trace.json"]
    assert "trace of rank0 from step 2" in page and "memory snapshot at out-of-memory" in page
    assert 'href="profile/rank0.2.pt.trace.json"' in report([run.run_dir], evaluate=False).read_text()


def test_a_resumed_run_traces_what_remains_of_its_window(tmp_path):
    first = tiny_recipe("gpt", "train.max_steps=2", "train.checkpoint_every=2")
    train(first, tmp_path / "r")
    again = tiny_recipe("gpt", "train.max_steps=4", "train.profile.start=2", "train.profile.steps=2")
    train(again, tmp_path / "r", resume="auto")  # profile keys may change on resume
    assert _steps(_events(trace_path(tmp_path / "r", 0, 3))) == ["ProfilerStep#3"]
    past = tiny_recipe("gpt", "train.max_steps=6", "train.profile.start=1", "train.profile.steps=2")
    train(past, tmp_path / "r", resume="auto")
    assert sorted(p.name for p in (tmp_path / "r" / "profile").iterdir()) == ["rank0.3.pt.trace.json"]


def test_a_window_the_run_never_reaches_is_refused():
    with pytest.raises(EmberError, match=r"train.profile.start \(9\) is past train.max_steps \(4\)"):
        tiny_recipe("gpt", "train.profile.start=9")
    with pytest.raises(EmberError, match="train.profile.steps"):
        tiny_recipe("gpt", "train.profile.start=1", "train.profile.steps=0")


def test_the_profiler_runs_only_inside_its_window(tmp_path):
    cfg = ProfileConfig(start=3, steps=2)
    running = []
    with Profiler(cfg, tmp_path, torch.device("cpu"), rank=1, start_step=0, max_steps=6) as profiler:
        for step in range(1, 7):
            running.append(torch.autograd.profiler._is_profiler_enabled)
            torch.ones(4, 4) @ torch.ones(4, 4)
            profiler.step(step)
    assert running == [False, False, True, True, False, False]
    assert _steps(_events(trace_path(tmp_path, 1, 3))) == ["ProfilerStep#3", "ProfilerStep#4"]  # rank 1's file
    with Profiler(ProfileConfig(), tmp_path / "off", torch.device("cpu"), 0, 0, 6) as profiler:  # start 0: off
        profiler.step(1)
        assert not torch.autograd.profiler._is_profiler_enabled
    assert not (tmp_path / "off").exists()


def test_memory_history_on_the_cpu_is_said_to_do_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ember.training.profiling"):
        Profiler(ProfileConfig(memory=True), tmp_path, torch.device("cpu"), rank=0, start_step=0, max_steps=6)
        Profiler(ProfileConfig(memory=True), tmp_path, torch.device("cpu"), rank=1, start_step=0, max_steps=6)
        Profiler(ProfileConfig(), tmp_path, torch.device("cpu"), rank=0, start_step=0, max_steps=6)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "this run is on cpu, so no memory snapshot is written" in said[0]  # rank 0, once


def test_a_window_past_the_last_step_ends_with_the_run(tmp_path):
    with Profiler(ProfileConfig(start=2, steps=10), tmp_path, torch.device("cpu"), 0, 0, max_steps=3) as profiler:
        for step in (1, 2, 3):
            torch.ones(2) + 1
            profiler.step(step)
            assert torch.autograd.profiler._is_profiler_enabled is (step < 3)  # on for the next step
    assert _steps(_events(trace_path(tmp_path, 0, 2))) == ["ProfilerStep#2", "ProfilerStep#3"]


@pytest.fixture
def fake_cuda_memory(monkeypatch):
    """torch.cuda.memory's history and snapshot calls, recorded instead of run (no GPU here)."""
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: calls.append(("history", a, k)))

    def dump(path):
        Path(path).write_bytes(b"snapshot")
        calls.append(("dump", Path(path).name))

    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump)
    return calls


@pytest.mark.parametrize("memory", [False, True])
def test_cuda_out_of_memory_writes_a_snapshot_and_says_what_to_do(tmp_path, fake_cuda_memory, memory):
    cfg = ProfileConfig(memory=memory)
    with pytest.raises(EmberError) as caught:
        with Profiler(cfg, tmp_path, torch.device("cuda", 0), rank=0, start_step=6, max_steps=9) as profiler:
            profiler.step(7)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1 GiB free.")
    text = str(caught.value)
    assert "CUDA ran out of memory at step 8 (CUDA out of memory)" in text and "train.batch_size" in text
    snapshot = tmp_path / "profile" / "oom_memory_rank0.pickle"
    assert str(snapshot) in text and "pytorch.org/memory_viz" in text and snapshot.read_bytes() == b"snapshot"
    assert ("train.profile.memory=true" in text) is not memory  # suggested only when it was off
    history = [c for c in fake_cuda_memory if c[0] == "history"]
    if memory:  # recorded from the start, switched off at the end
        assert history[0][2] == {"max_entries": 100_000} and history[1][2] == {"enabled": None}
    else:
        assert history == []
    assert fake_cuda_memory[-1 if not memory else -2] == ("dump", "oom_memory_rank0.pickle")


def test_other_errors_pass_through_and_the_cpu_writes_no_snapshot(tmp_path, fake_cuda_memory):
    with pytest.raises(ValueError):
        with Profiler(ProfileConfig(memory=True), tmp_path, torch.device("cuda"), 0, 0, 9):
            raise ValueError("not memory")
    with pytest.raises(torch.OutOfMemoryError):  # not a CUDA run: not ember's to explain
        with Profiler(ProfileConfig(memory=True), tmp_path, torch.device("cpu"), 0, 0, 9):
            raise torch.OutOfMemoryError("out of memory")
    assert [c[0] for c in fake_cuda_memory] == ["history", "history"]  # CUDA run only: on, then off
