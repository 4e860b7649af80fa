"""``--nproc``: when one rank fails, the job ends with one paragraph naming the rank that
failed first and its own error — not torchrun's ChildFailedError or rank 0's gloo
"Connection reset by peer"."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import tiny_recipe
from ember.training.launcher import RankFailure, first_failure, format_failure

BREAK_HOOK = """
    import os
    if os.environ.get("RANK") == "1" and os.environ.get("EMBER_TEST_BREAK"):
        from ember.training.layouts import Layout
        from ember.errors import EmberError
        real, calls = Layout.forward_backward, []
        def broken(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                kind = EmberError if os.environ["EMBER_TEST_BREAK"] == "user" else RuntimeError
                raise kind("rank 1 broke on purpose; fix it by not breaking it")
            return real(*args, **kwargs)
        Layout.forward_backward = broken
"""


def launch_broken(tmp_path: Path, how: str) -> tuple[subprocess.CompletedProcess, float]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(BREAK_HOOK))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe("gpt", "train.max_steps=50", "parallel.timeout_s=30").to_yaml())
    env = {**os.environ, "EMBER_TEST_BREAK": how, "PYTHONPATH": os.pathsep.join([str(hook), *sys.path])}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "ember", "train", str(recipe), "--run-dir", str(tmp_path / "run"), "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    return proc, time.time() - start


def test_a_user_error_on_one_rank_is_one_paragraph_naming_that_rank(tmp_path):
    proc, elapsed = launch_broken(tmp_path, "user")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    paragraph = err[err.index("ember: error: rank") :]  # what the ranks logged before it stays above
    assert paragraph.startswith("ember: error: rank 1 of 2 failed first: rank 1 broke on purpose"), err[-3000:]
    assert "\n" not in paragraph, err[-3000:]  # one paragraph: no agent log, no traceback, no rank 0 noise
    assert "Traceback" not in err and "ChildFailedError" not in err
    assert elapsed < 90, elapsed


@pytest.mark.slow
def test_a_bug_on_one_rank_keeps_its_traceback_and_names_the_rank(tmp_path):
    proc, elapsed = launch_broken(tmp_path, "bug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ChildFailedError" not in proc.stderr
    assert "ember: rank 1 of 2 failed first with RuntimeError: rank 1 broke on purpose" in proc.stderr
    assert elapsed < 90, elapsed


def test_the_first_failure_is_the_cause_not_the_peer_that_lost_its_connection():
    gone = RankFailure(0, 100.0, "DistBackendError", "[../gloo/transport/tcp/pair.cc] Connection reset by peer")
    cause = RankFailure(1, 100.5, "EmberError", "the loss is NaN at step 3; lower optim.lr", user_error=True)
    assert first_failure([gone, cause]) == cause  # rank 0 noticed first, but only that rank 1 was gone
    killed = RankFailure(1, 101.0, "signal", "killed by SIGKILL")
    assert first_failure([gone, killed]) == killed
    early, late = RankFailure(0, 1.0, "ValueError", "a"), RankFailure(1, 2.0, "KeyError", "b")
    assert first_failure([late, early]) == early
    # The agent stamps a killed rank in whole seconds: 100 is not before a record written at 100.7.
    terminated = RankFailure(0, 100.0, "signal", "killed by SIGTERM")
    own = RankFailure(1, 100.7, "EmberError", "rank 1 broke", user_error=True)
    assert first_failure([terminated, own]) == own
    text = format_failure([gone, cause], 2)
    assert text.startswith("ember: error: rank 1 of 2 failed first: the loss is NaN at step 3; lower optim.lr")
    assert "rank 0: DistBackendError: [../gloo/transport/tcp/pair.cc] Connection reset by peer" in text


def test_no_memory_check_flag_reaches_the_check(monkeypatch, tmp_path):
    """`--no-memory-check` sets what the memory check reads (and --nproc ranks inherit)."""
    from ember import cli

    seen = {}
    monkeypatch.setenv("EMBER_SKIP_MEMORY_CHECK", "")  # recorded, so the test's setting is undone after it
    monkeypatch.delenv("EMBER_SKIP_MEMORY_CHECK")
    monkeypatch.setattr(
        cli, "cmd_train", lambda args: seen.setdefault("skip", os.environ.get("EMBER_SKIP_MEMORY_CHECK")) and 0
    )
    parser = cli.build_parser()
    args = parser.parse_args(["train", "r.yaml", "--no-memory-check"])
    assert args.no_memory_check
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["train"].set_defaults(func=cli.cmd_train)
    assert cli.main(["train", "r.yaml", "--no-memory-check"]) == 0
    assert seen["skip"] == "1"


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_every_rank_and_exits_130(tmp_path):
    import signal

    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe("gpt", "train.max_steps=100000", "train.log_every=1").to_yaml())
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember", "train", str(recipe), "--run-dir", str(run), "--nproc", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, log = time.time() + 120, run / "metrics.jsonl"
    while not (log.is_file() and '"step"' in log.read_text()) and time.time() < deadline:
        time.sleep(0.5)  # until the ranks train (and so stop at a step boundary)
    proc.send_signal(signal.SIGTERM)  # a scheduler's preemption, to the launcher alone
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "ember: stopped by SIGTERM" in err and "Traceback" not in err and "api.py" not in err, err[-3000:]
    assert err.count("checkpoint saved in") == 1  # rank 0 says so for both
    assert any((run / "checkpoints").iterdir())
