"""train.precision=auto: the precision each kind of hardware gets and why, with the CPU's flags
and torch.cuda faked; one real run on this CPU, whose header and model.json must say what
ember.hardware says of it; resuming where auto resolves otherwise; ``ember plan`` with auto."""

from __future__ import annotations

import json
import platform
import shutil

import pytest
import torch
import yaml

from conftest import tiny_recipe
from ember import hardware
from ember.training import precision
from ember.training.loop import train
from ember.training.memory import plan
from ember.training.precision import build_scaler, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def fake_cpu(monkeypatch, machine: str, flags: set[str], onednn: bool = True) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: onednn)
    monkeypatch.setattr(precision, "_WARNED", set())


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability >= (8, 0))


@pytest.mark.parametrize(
    "machine,flags,onednn,expected,words",
    [
        ("x86_64", {"avx2", "avx512f", "avx512_bf16"}, True, "bf16", "this CPU has avx512_bf16"),
        ("x86_64", {"avx2", "amx_bf16", "avx512_bf16"}, True, "bf16", "amx_bf16 and avx512_bf16"),
        ("x86_64", {"avx2", "fma"}, True, "fp32", "neither avx512_bf16 nor amx_bf16"),
        ("x86_64", {"amx_bf16"}, False, "fp32", "oneDNN may not use"),
        ("aarch64", {"asimd", "bf16"}, True, "bf16", "this CPU has bf16"),
        ("aarch64", {"asimd"}, True, "fp32", "does not report the bf16 feature"),
    ],
)
def test_auto_on_a_cpu_is_bf16_only_where_it_is_native(monkeypatch, machine, flags, onednn, expected, words):
    fake_cpu(monkeypatch, machine, flags, onednn)
    chosen = resolve_precision("auto", CPU)
    assert chosen.precision == expected
    assert words in chosen.reason
    assert chosen.describe("auto") == f"{expected} (precision auto: {chosen.reason})"


@pytest.mark.parametrize(
    "name,capability,expected",
    [
        ("NVIDIA H100 80GB HBM3", (9, 0), "bf16"),
        ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16"),
        ("NVIDIA GeForce RTX 3090", (8, 6), "bf16"),
        ("Tesla V100-SXM2-16GB", (7, 0), "fp16"),
        ("Tesla T4", (7, 5), "fp16"),
        ("Tesla P100-PCIE-16GB", (6, 0), "fp32"),
    ],
)
def test_auto_on_a_gpu_is_bf16_from_ampere_fp16_on_volta_and_turing_else_fp32(monkeypatch, name, capability, expected):
    fake_gpu(monkeypatch, name, capability)
    chosen = resolve_precision("auto", CUDA)
    assert chosen.precision == expected
    assert name in chosen.reason and f"{capability[0]}.{capability[1]}" in chosen.reason


def test_a_named_precision_is_kept_whatever_the_hardware(monkeypatch):
    fake_cpu(monkeypatch, "x86_64", {"avx2"})
    assert resolve_precision("bf16", CPU) == precision.ResolvedPrecision("bf16", "")
    assert resolve_precision("bf16", CPU).describe("bf16") == "bf16"
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    assert resolve_precision("fp32", CUDA).precision == "fp32"


def test_auto_elsewhere_is_fp32():
    chosen = resolve_precision("auto", torch.device("meta"))
    assert chosen.precision == "fp32" and "not on meta" in chosen.reason


def test_the_scaler_follows_what_auto_resolves_to(monkeypatch):
    fake_cpu(monkeypatch, "x86_64", {"avx512_bf16"})
    assert not build_scaler("auto", CPU).is_enabled()
    assert precision.autocast_factory("auto", CPU)().fast_dtype == torch.bfloat16
    fake_cpu(monkeypatch, "x86_64", {"avx2"})
    assert precision.autocast_factory("auto", CPU) is not None and not build_scaler("auto", CPU).is_enabled()


def test_a_real_run_with_auto_says_and_records_what_this_cpu_gets(tmp_path, capsys):
    support = hardware.cpu_bf16_support()
    expected = "bf16" if support.native else "fp32"
    recipe = tiny_recipe("cnn", "train.precision=auto", "train.max_steps=2", "train.checkpoint_every=2")
    run = train(recipe, tmp_path / "run").run_dir
    header = " ".join(capsys.readouterr().err.split())
    assert f"{expected} (precision auto: " in header
    assert (support.reason or "this CPU has") in header
    assert json.loads((run / "model.json").read_text())["precision"] == expected
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["precision"] == "auto"  # as the user wrote it
    state = torch.load(run / "checkpoints" / "step_00000002" / "trainer.pt", weights_only=True)
    assert state["precision"] == expected and state["recipe"]["train"]["precision"] == "auto"


def test_resuming_where_auto_resolves_otherwise_runs_and_says_so(tmp_path, monkeypatch, capsys):
    """A checkpoint trained in bf16 on a CPU with native bf16 resumes in fp32 on one without."""
    fake_cpu(monkeypatch, "x86_64", {"avx2", "avx512_bf16"})
    recipe = tiny_recipe("cnn", "train.precision=auto", "train.max_steps=4", "train.checkpoint_every=2")
    run = train(recipe, tmp_path / "run").run_dir
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    fake_cpu(monkeypatch, "x86_64", {"avx2"})
    capsys.readouterr()
    result = train(recipe, run, resume="auto")
    header = " ".join(capsys.readouterr().err.split())
    assert result.step == 4
    assert "fp32 (precision auto: this CPU has neither" in header and "the checkpoint was trained in bf16" in header
    assert json.loads((run / "model.json").read_text())["precision"] == "fp32"


def test_plan_takes_auto_as_bf16_on_the_gpus_it_knows():
    planned = plan(tiny_recipe("gpt", "train.precision=auto"), gpus=1, gpu="a100")
    assert planned.precision == "bf16"
    assert any("precision=auto is planned as bf16" in note for note in planned.notes)
    assert planned.tokens_per_s_estimate == pytest.approx(
        plan(tiny_recipe("gpt", "train.precision=bf16"), gpus=1, gpu="a100").tokens_per_s_estimate
    )


def test_a_loss_scale_crosses_a_resume_only_where_both_sides_run_fp16():
    from ember.training.resume import load_scaler

    fp16 = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    load_scaler(fp16, {})  # the checkpoint ran in bf16 or fp32: keep the initial scale
    assert fp16.get_scale() == 2.0**10
    load_scaler(fp16, {**torch.amp.GradScaler("cpu", init_scale=8.0).state_dict(), "scale": 8.0})
    assert fp16.get_scale() == 8.0
    off = torch.amp.GradScaler("cpu", enabled=False)
    load_scaler(off, fp16.state_dict())  # the checkpoint ran in fp16, this run does not: nothing to scale
    assert not off.is_enabled()
