"""Shell completion (`ember completion bash|zsh`): the generated script, run by the real shell,
completes commands, flags and `--set` recipe keys; nothing of it loads with `ember --help`."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ember.cli import build_parser, main
from ember.completion import completion_script, recipe_keys

# Each case: the words typed (the last one being completed) -> what bash offers.
BASH_CASES = [
    (["ember", "tr"], ["train"]),
    (["ember", "recipe", ""], ["show", "explain", "schema"]),
    (["ember", "completion", ""], ["bash", "zsh"]),
    (["ember", "train", "r.yaml", "--set", "train.max_"], ["train.max_steps="]),
    (["ember", "plan", "r.yaml", "--set", "optim.l"], ["optim.lr="]),
    (["ember", "tune", "r.yaml", "--set", "plugins.ema.d"], ["plugins.ema.decay="]),
    (["ember", "data", "prepare", "src", "--set", "clean.min_c"], ["clean.min_chars="]),  # data keys, no data.
    (["ember", "train", "--run"], ["--run-dir"]),
    (["ember", "recipe", "explain", "optim.weight"], ["optim.weight_decay"]),  # keys, without "="
]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_commands_flags_and_recipe_keys(tmp_path):
    script = tmp_path / "ember.bash"
    script.write_text(completion_script(build_parser(), "bash"))
    calls = "\n".join(
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; COMPREPLY=(); "
        f'_ember_complete ember; echo "${{COMPREPLY[*]}}"'
        for words, _ in BASH_CASES
    )
    out = subprocess.run(
        ["bash", "--norc", "-c", f"source {script}\n{calls}"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [" ".join(expected) for _, expected in BASH_CASES]


def _type_in_zsh(fpath: str, typed: bytes, expect: bytes, timeout: float = 20) -> bytes:
    """What an interactive zsh (completion from ``fpath``) shows after ``typed``, once ``expect`` appears."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: a bare interactive zsh
        os.execvpe("zsh", ["zsh", "-f", "-i"], {"PATH": os.environ["PATH"], "TERM": "dumb", "HOME": fpath})
    out, end = b"", time.time() + timeout
    try:
        os.write(
            fd, f"fpath=({fpath} $fpath); autoload -Uz compinit && compinit -u -d {fpath}/.zcd; echo READY\n".encode()
        )
        sent = False
        while time.time() < end and expect not in out.rpartition(b"READY")[2]:
            if b"READY\r\n" in out and not sent:
                os.write(fd, typed)
                sent = True
            if select.select([fd], [], [], 0.1)[0]:
                out += os.read(fd, 1 << 16)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return out.rpartition(b"READY")[2]


@pytest.mark.skipif(shutil.which("zsh") is None or sys.platform == "win32", reason="needs zsh")
def test_zsh_completes_a_recipe_key(tmp_path):
    script = completion_script(build_parser(), "zsh")
    (tmp_path / "_ember").write_text(script)
    assert subprocess.run(["zsh", "-n", str(tmp_path / "_ember")], capture_output=True).returncode == 0
    shown = _type_in_zsh(str(tmp_path), b"ember train r.yaml --set train.max_\t", b"train.max_steps=")
    assert b"ember train r.yaml --set train.max_steps=" in shown


def test_scripts_name_the_commands_and_keys(capsys):
    assert main(["completion", "zsh"]) == 0
    zsh = capsys.readouterr().out
    assert zsh.startswith("#compdef ember")
    for word in (
        "train",
        "recipe",
        "completion",
        "--run-dir",
        "train.max_steps=",
        "model.n_layer=",
        "plugins.ema.decay=",
    ):
        assert word in zsh
    keys = recipe_keys()
    assert "train.max_steps" in keys and "data.clean.min_chars" in keys and len(keys) == len(set(keys)) > 200
    assert recipe_keys("data")[:2] == ["name", "path"]


def test_help_and_import_load_no_completion_code():
    code = (
        "import sys, ember, ember.cli; ember.cli.build_parser()\n"
        "assert not {'shtab', 'ember.completion', 'ember.recipe_tools'} & set(sys.modules), sys.modules.keys()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
