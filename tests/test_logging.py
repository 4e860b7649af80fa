"""ember's messages go through ``logging``: records on ``ember.*`` loggers, shown by the CLI's
handler (plain lines off a terminal, rich ones on it) at -q/-v levels, and under an embedding
program's control when the CLI is not involved."""

from __future__ import annotations

import logging

import pytest
import yaml

from conftest import QUIET, TINY, tiny_recipe
from ember.cli import main
from ember.log import configure_logging, progress_wanted
from ember.training.loop import train


@pytest.fixture
def ember_logger():
    """The "ember" logger as the test found it, restored afterwards (main() configures it)."""
    import ember.log

    logger = logging.getLogger("ember")
    level, handlers, installed = logger.level, list(logger.handlers), ember.log._handler
    logger.setLevel(logging.NOTSET)  # start clean: an earlier test's main() may have configured it
    logger.handlers[:], ember.log._handler = [], None
    yield logger
    logger.setLevel(level)
    logger.handlers[:], ember.log._handler = handlers, installed


@pytest.fixture
def rnn_recipe(tmp_path):
    raw = {section: dict(values) for section, values in TINY["rnn"].items()}
    for section, values in QUIET.items():
        raw.setdefault(section, {}).update(values)
    raw["train"].update(max_steps=2, eval_every=2)
    path = tmp_path / "rnn.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_run_says_its_header_steps_and_validation_as_log_records(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ember")
    train(tiny_recipe("rnn", "train.max_steps=2", "train.eval_every=2"), tmp_path / "run")
    assert all(r.name.startswith("ember.") for r in caplog.records)  # (the data's first preparation too)
    said = [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name == "ember.training.runlog"]
    assert said[0][2].startswith("ember rnn: ") and "parameters, cpu, fp32" in said[0][2]
    assert [m.split()[:2] for _, _, m in said[1:]] == [["step", "1"], ["step", "2"], ["step", "2"]]
    assert said[-1][2].startswith("step      2  val  ") and "accuracy" in said[-1][2]
    assert all(level == logging.INFO for _, level, _ in said)


def test_the_command_prints_plain_lines_off_a_terminal(rnn_recipe, tmp_path, capsys, ember_logger):
    assert main(["train", str(rnn_recipe), "--run-dir", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0].startswith("ember rnn: ") and lines[1].startswith("step      1  loss ")
    assert any(line.startswith("step      2  val  loss ") and "accuracy" in line for line in lines)
    assert "\x1b" not in err  # no colour codes in a file or a pipe
    assert out.startswith("done: step 2")  # the result stays on stdout


def test_quiet_shows_no_information_and_verbose_adds_debugging(rnn_recipe, tmp_path, capsys, ember_logger):
    assert main(["-q", "train", str(rnn_recipe), "--run-dir", str(tmp_path / "q")]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("done: step 2")
    assert main(["train", str(rnn_recipe), "--run-dir", str(tmp_path / "v"), "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "step      2  val  loss " in err
    assert f"step      2  checkpoint {tmp_path / 'v' / 'checkpoints' / 'step_00000002'}" in err  # debug only
    assert ember_logger.level == logging.DEBUG
    assert main(["train", str(rnn_recipe), "--run-dir", str(tmp_path / "i")]) == 0
    assert "checkpoint" not in capsys.readouterr().err


def test_an_embedding_program_that_silences_ember_sees_nothing(tmp_path, caplog, capsys, ember_logger):
    caplog.set_level(logging.DEBUG)  # a handler on the root logger that takes everything
    ember_logger.setLevel(logging.ERROR)
    train(tiny_recipe("rnn", "train.max_steps=2", "train.eval_every=2"), tmp_path / "run")
    assert [r for r in caplog.records if r.name.startswith("ember")] == []
    assert capsys.readouterr() == ("", "")
    assert not progress_wanted(logging.getLogger("ember.training.runlog"))  # nor a progress bar


def test_levels_decide_the_progress_bar_and_warnings_say_so(capsys, ember_logger):
    runlog = logging.getLogger("ember.training.runlog")
    assert progress_wanted(runlog)  # nothing set: root's default WARNING does not hide the bar
    configure_logging(-1)
    assert not progress_wanted(runlog) and ember_logger.level == logging.WARNING
    configure_logging(0, rich=False)
    assert progress_wanted(runlog) and len(ember_logger.handlers) == 1  # replaced, not added
    runlog.warning("something odd")
    runlog.info("a line")
    assert capsys.readouterr().err == "warning: something odd\na line\n"
    configure_logging(0, rich=True)
    runlog.info("through rich")
    assert "through rich" in capsys.readouterr().err
