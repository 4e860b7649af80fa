"""The README's shell examples are run, in order, so the manual cannot drift from the program.

Every fenced block tagged ``sh``, ``bash``, ``shell`` or ``console`` in README.md is a list of
commands that must work as written, one after another, in one fresh directory (with recipes/
beside it, as in a checkout). Two HTML comments, on the line just above a fence, change that:

    <!-- not run: REASON -->    the block is shown, not run; say why (it installs packages, needs
                                the network, a GPU, a cluster or files of your own). Use sparingly.
    <!-- file: PATH -->         the block (of any language) is written to PATH when the run reaches
                                it, e.g. the search space a later `ember tune --space PATH` reads.

The fast test checks the chain without running it: every command of a run block is `ember ...` (after any NAME=value)
and parses with ember's own parser, every recipe loads with its --set keys, and every run or
file a command reads was made by an earlier command (--out, --run-dir) or a file block or ships
in the checkout. The slow test runs it, with EMBER_MAX_STEPS capping every training run at a few
steps (ember prints that it did), and checks that each command exits 0.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember.cli import build_parser
from ember.config import load_recipe
from ember.errors import EmberError

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHELL = {"sh", "bash", "shell", "console"}
FENCE = re.compile(r"^```(\w*)\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
MARKER = re.compile(r"^<!--\s*(not run|file):\s*(.*?)\s*-->\s*$")
STEPS = 4  # EMBER_MAX_STEPS for the slow run


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None = None  # the reason given by <!-- not run: ... -->
    file: str | None = None  # <!-- file: PATH -->

    def commands(self) -> list[str]:
        """The block's command lines: continuations joined, blank lines and comment lines dropped,
        a console block's ``$ `` prompt taken off."""
        joined = re.sub(r"\s*\\\n\s*", " ", self.text)
        lines = [ln.strip().removeprefix("$ ") for ln in joined.splitlines()]
        return [ln for ln in lines if ln and not ln.startswith("#")]


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` with the marker (if any) on the line above each."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
        block = Block(i + 1, m.group(1), "\n".join(lines[i + 1 : end]) + "\n")
        marker = MARKER.match(lines[i - 1]) if i else None
        if marker and marker.group(1) == "not run":
            assert marker.group(2), f"README.md:{i + 1}: <!-- not run: --> needs a reason"
            block.skip = marker.group(2)
        elif marker:
            block.file = marker.group(2)
        blocks.append(block)
        i = end + 1
    return blocks


def run_blocks() -> list[Block]:
    return [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b.file or (b.lang in SHELL and not b.skip)]


def pipeline(command: str) -> list[list[str]]:
    """The simple commands of one line (split at && ; |), each as argv; a trailing # remark dropped."""
    words = shlex.split(command, comments=True)
    out, current = [], []
    for w in words:
        if re.fullmatch(r"\d?>>?|<", w):  # a redirection: the next word is its file, not an argument
            current.append(None)
        elif current and current[-1] is None:
            current.pop()
        elif w in {"&&", ";", "|", "||"}:
            out.append(current)
            current = []
        else:
            current.append(w)
    out = [list(itertools.dropwhile(ENV_ASSIGNMENT.match, c)) for c in out + [current]]  # NAME=value ember ...
    return [c for c in out if c]


# --- the fast check ----------------------------------------------------------------------------

READS = ("run", "runs", "teacher", "dir", "sources", "recipe", "student", "space", "data", "captions")
MAKES = ("out", "run_dir")


def _paths(value) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str) and ("/" in v or "." in v)]


def _made(path: str, made: set[str]) -> bool:
    """Whether ``path`` (a glob cut at its first wildcard) lies in the checkout or in what an earlier command made."""
    plain = re.split(r"[*?\[]", path)[0]
    if (ROOT / plain).exists() and plain:
        return True
    return any(plain == m or plain.startswith(m.rstrip("/") + "/") for m in made)


def _check_recipe(ns, recipes: dict[str, tuple[str, list[str]]], where: str) -> None:
    """Load the recipe a training command uses, with its --set keys (for --resume: the run's own)."""
    sets = list(getattr(ns, "set", None) or [])
    path = getattr(ns, "recipe", None) or getattr(ns, "student", None)
    if ns.command == "train" and path is None:
        assert ns.run_dir in recipes, f"{where}: --resume of {ns.run_dir}, which no earlier command trained"
        path, earlier = recipes[ns.run_dir]
        sets = earlier + sets
    if path is None or ns.command in {"data", "continue", "prune"}:
        return
    if (ROOT / path).is_file():
        try:  # an unknown key or a bad value fails here, as it would in the run
            load_recipe(ROOT / path, sets)
        except EmberError as err:
            pytest.fail(f"{where}: {err}")
    if getattr(ns, "run_dir", None):
        recipes[ns.run_dir] = (path, sets)


def test_readme_commands_parse_and_chain(tmp_path):
    parser = build_parser()
    made: set[str] = set()
    recipes: dict[str, tuple[str, list[str]]] = {}
    blocks = run_blocks()
    assert len(blocks) >= 4, "the README's examples are no longer found"
    for block in blocks:
        if block.file:
            made.add(block.file)
            continue
        for line in block.commands():
            for argv in pipeline(line):
                where = f"README.md:{block.line} `{line}`"
                assert argv[0] == "ember", (
                    f"{where}: a run block holds only ember commands; mark the block <!-- not run: REASON --> "
                    f"if it must not run"
                )
                try:
                    ns = parser.parse_args(argv[1:])
                except SystemExit:
                    pytest.fail(f"{where}: ember's parser refuses it")
                for attr in READS:
                    for path in _paths(getattr(ns, attr, None)):
                        assert _made(path, made), (
                            f"{where}: reads {path}, which no earlier command makes (--out, --run-dir) and the "
                            f"checkout does not hold"
                        )
                if getattr(ns, "resume", None) == "auto" and ns.command == "train":
                    assert _made(ns.run_dir, made), f"{where}: --resume auto of {ns.run_dir}, never trained before"
                _check_recipe(ns, recipes, where)
                made.update(p for attr in MAKES for p in _paths(getattr(ns, attr, None)))


def test_blocks_and_markers_are_read(tmp_path):
    text = (
        "<!-- not run: needs a GPU -->\n```sh\nember train x.yaml\n```\n\n"
        "<!-- file: space.yaml -->\n```yaml\na: 1\n```\n"
        "```console\n$ ember eval runs/a \\\n    --split test   # remark\n# a comment\n```\n"
    )
    blocks = readme_blocks(text)
    assert [(b.line, b.lang, b.skip, b.file) for b in blocks] == [
        (2, "sh", "needs a GPU", None),
        (7, "yaml", None, "space.yaml"),
        (10, "console", None, None),
    ]
    assert blocks[2].commands() == ["ember eval runs/a --split test   # remark"]
    assert pipeline("EMBER_SKIP_MEMORY_CHECK=1 ember plan a.yaml") == [["ember", "plan", "a.yaml"]]
    assert pipeline("ember train a.yaml --run-dir r && ember generate r --prompt '1+2'  # 3") == [
        ["ember", "train", "a.yaml", "--run-dir", "r"],
        ["ember", "generate", "r", "--prompt", "1+2"],
    ]


# --- the slow run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    """Each run block's commands in a fresh directory holding recipes/; `ember` is this checkout's."""
    work = tmp_path / "readme"
    work.mkdir()
    (work / "recipes").symlink_to(ROOT / "recipes")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ember").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ember "$@"\n')
    (bin_dir / "ember").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "EMBER_MAX_STEPS": str(STEPS),
        "OMP_NUM_THREADS": "1",
    }
    timings = []
    for block in run_blocks():
        if block.file:
            (work / block.file).parent.mkdir(parents=True, exist_ok=True)
            (work / block.file).write_text(block.text)
            continue
        for line in block.commands():
            started = time.perf_counter()
            proc = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=900)
            timings.append(f"{time.perf_counter() - started:6.1f} s  {line}")
            assert proc.returncode == 0, (
                f"README.md:{block.line} `{line}` exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
            if re.search(r"ember train recipes/", line):  # a user's values are never changed silently
                assert f"EMBER_MAX_STEPS={STEPS}" in proc.stderr or "already finished" in proc.stderr
    print("\n".join(timings))
    assert (work / "runs" / "cnn" / "eval.json").is_file()  # what `ember eval runs/cnn` writes
