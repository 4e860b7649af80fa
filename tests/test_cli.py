"""The command line: every command listed, user errors as one paragraph with exit 2,
train → generate end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import TINY
from ember.cli import NOT_YET, main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ember", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_every_command():
    out = run_cli("--help").stdout
    for name in ["train", "generate", *NOT_YET]:
        assert name in out


def test_bad_recipe_is_one_message_and_exit_2(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "gpt"}, "train": {"batch_sise": 4}}))
    proc = run_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "train.batch_sise: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # failed before anything ran


def test_resume_without_run_dir_is_explained(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "gpt"}}))
    assert main(["train", str(path), "--resume", "auto"]) == 2
    assert "--resume needs --run-dir" in capsys.readouterr().err


def test_train_then_generate(tmp_path, capsys):
    recipe = dict(
        TINY["gpt"],
        train={"max_steps": 3, "progress": False, "peak_flops": 1e12, "batch_size": 4},
        eval={"max_batches": 2},
    )
    path = tmp_path / "gpt.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main(["train", str(path), "--run-dir", str(run), "--set", "train.log_every=1"]) == 0
    out = capsys.readouterr().out
    assert "done: step 3" in out and str(run) in out
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ") and len(text.encode()) >= 20
    main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1"])
    assert capsys.readouterr().out == text  # seeded sampling is repeatable


def test_generate_refuses_a_classifier_and_a_missing_run(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty")]) == 2
    assert "no finished model" in capsys.readouterr().err
    recipe = dict(TINY["rnn"], train={"max_steps": 1, "progress": False, "peak_flops": 1e12, "batch_size": 4})
    path = tmp_path / "rnn.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--run-dir", str(tmp_path / "rnn")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "rnn")]) == 2
    assert "language-model and seq2seq runs" in capsys.readouterr().err


def test_module_entry_point():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("ember ")


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    import signal
    import time

    recipe = dict(
        TINY["gpt"],
        train={
            "max_steps": 100000,
            "progress": False,
            "peak_flops": 1e12,
            "batch_size": 4,
            "log_every": 1,
            "checkpoint_every": 0,
        },
        eval={"max_batches": 2},
    )
    path = tmp_path / "gpt.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember", "train", str(path), "--run-dir", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not (
        (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 3
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Resume with --resume auto" in err and "Traceback" not in err
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert len(saved) == 1
    step = int(saved[0].stem.split("_")[1])
    assert step >= 3
    assert (
        main(["train", str(path), "--run-dir", str(run), "--resume", "auto", "--set", f"train.max_steps={step + 2}"])
        == 0
    )


def test_user_mistakes_in_data_and_generate_are_messages(tmp_path, capsys):
    recipe = dict(TINY["cnn"], train={"max_steps": 2, "progress": False, "peak_flops": 1e12, "batch_size": 4})
    path = tmp_path / "cnn.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--run-dir", str(tmp_path / "a"), "--set", "data.val_fraction=0.001"]) == 2
    assert "data.val_fraction=0.001" in capsys.readouterr().err
    assert main(["train", str(path), "--run-dir", str(tmp_path / "b"), "--set", "optim.lr=1e45"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_resume_without_a_recipe_uses_the_runs_own(tmp_path, capsys):
    recipe = dict(TINY["rnn"], train={"max_steps": 2, "progress": False, "peak_flops": 1e12, "batch_size": 4})
    path = tmp_path / "rnn.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main(["train", str(path), "--run-dir", str(run), "--set", "optim.lr=0.01"]) == 0
    assert main(["train", "--run-dir", str(run), "--resume", "auto", "--set", "train.max_steps=3"]) == 0
    assert "done: step 3" in capsys.readouterr().out


def test_resuming_a_finished_run_with_nproc_starts_no_process(tmp_path, capsys, monkeypatch):
    import ember.cli

    recipe = dict(TINY["rnn"], train={"max_steps": 2, "progress": False, "peak_flops": 1e12, "batch_size": 4})
    path = tmp_path / "rnn.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main(["train", str(path), "--run-dir", str(run)]) == 0
    launches = []
    monkeypatch.setattr(ember.cli, "_relaunch_job", lambda args, run_dir: launches.append(run_dir) or 0)
    assert main(["train", "--run-dir", str(run), "--resume", "auto", "--nproc", "2"]) == 0
    assert launches == [] and "done: step 2" in capsys.readouterr().out  # said at once, nothing started
    assert main(["train", "--run-dir", str(run), "--resume", "auto", "--nproc", "2", "--set", "train.max_steps=3"]) == 0
    assert launches == [run]  # more steps to go: the processes start


def test_generate_answers_with_a_seq2seq_run(tmp_path, capsys):
    recipe = dict(TINY["seq2seq"], train={"max_steps": 2, "progress": False, "peak_flops": 1e12, "batch_size": 4})
    path = tmp_path / "s2s.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "12+34"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer.isdigit() or answer == ""  # untrained, but a well-formed decode
    assert main(["generate", str(tmp_path / "run"), "--prompt", "123+4"]) == 2  # max_digits is 2 here
    assert "at most 2 digits" in capsys.readouterr().err


def test_data_prepare_inspect_verify_then_train_and_generate(tmp_path, capsys):
    corpus = tmp_path / "texts"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(60)))
    out = tmp_path / "data"
    assert (
        main(
            [
                "data",
                "prepare",
                str(corpus),
                "--out",
                str(out),
                "--vocab-size",
                "320",
                "--shard-size",
                "2048",
                "--set",
                "dedup.near=false",
                "--val-fraction",
                "0.2",
            ]
        )
        == 0
    )
    assert "prepared" in capsys.readouterr().out
    assert main(["data", "inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "vocab 320" in shown and "def f" in shown
    assert main(["data", "verify", str(out)]) == 0 and "every shard matches" in capsys.readouterr().out

    recipe = {
        "data": {"name": "prepared", "path": str(out), "seq_len": 16},
        "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
        "train": {"max_steps": 3, "batch_size": 4, "progress": False, "peak_flops": 1e12},
        "eval": {"max_batches": 2},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "def f1", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def f1")  # BPE ids decoded back to text

    shard = sorted(out.glob("train_*.tokens.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x00\x00")
    assert main(["data", "verify", str(out)]) == 2
    assert shard.name in capsys.readouterr().err
    assert main(["train", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run2")]) == 2
    assert f"shard {shard}" in capsys.readouterr().err


def test_data_prepare_mistakes_are_messages(tmp_path, capsys):
    assert main(["data", "prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "prepare", "stdlib", "--out", str(tmp_path / "o"), "--set", "clean.nope=1"]) == 2
    assert "data.clean.nope: unknown key" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "not a prepared data set" in capsys.readouterr().err


def test_public_functions_stay_functions_after_every_module_is_imported():
    """No module shares a name with a public function: importing ember.training.loop (say)
    must not replace ``ember.train`` on the package."""
    import importlib
    import pkgutil

    import ember

    for info in pkgutil.walk_packages(ember.__path__, "ember."):
        if info.name != "ember.__main__":
            importlib.import_module(info.name)
    for name in ember.__all__:
        if name != "__version__":
            assert callable(getattr(ember, name)) and not isinstance(getattr(ember, name), type(ember)), name


def test_the_library_lists_its_functions_and_refuses_a_path_for_a_recipe(tmp_path):
    """From a script: dir(ember) shows the lazy functions, and a recipe path where a Recipe belongs is
    one paragraph saying how to make one (not an AttributeError from deep in the loop)."""
    import ember

    assert {"train", "load_recipe", "tune", "cross_validate"} <= set(dir(ember))
    space = {"optim.lr": ember.load_space}  # never reached: the recipe is refused first
    for call in (
        lambda: ember.train("recipes/mlp-digits.yaml", tmp_path / "run"),
        lambda: ember.cross_validate({"model": {"name": "mlp"}}, run_dir=tmp_path / "cv"),
        lambda: ember.tune("recipes/mlp-digits.yaml", space, run_dir=tmp_path / "tune"),
    ):
        with pytest.raises(ember.EmberError, match=r"takes a Recipe, not a (str|dict).*ember\.load_recipe\("):
            call()
    assert not list(tmp_path.iterdir())  # refused before anything was written
