"""CPU bf16 detection and what depends on it (the once-per-process warning, the recurrent
layers' fp32 path, a time-bounded peak measurement), the MFU cap, and free memory.

The machine a test lands on may or may not have native bf16, so each path is tested
by monkeypatching the readings in ``ember.hardware``; the subprocess test caps oneDNN
at AVX2 (``ONEDNN_MAX_CPU_ISA``) to meet the real emulated-bf16 kernels on any x86 CPU.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from ember import hardware
from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.registry import build_model
from ember.models.rnn import RNNConfig
from ember.training import precision
from ember.training.flops import MfuMeter, measure_cpu_peak_flops
from ember.training.precision import SlowPrecisionWarning, autocast_factory

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def fake_cpu(monkeypatch, machine: str, flags: set[str], onednn: bool = True) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: onednn)
    monkeypatch.setattr(precision, "_WARNED", set())


@pytest.fixture
def avx2_only(monkeypatch):
    fake_cpu(monkeypatch, "x86_64", {"sse2", "avx", "avx2", "fma"})


@pytest.fixture
def native(monkeypatch):
    fake_cpu(monkeypatch, "x86_64", {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "machine,flags,onednn,native",
    [
        ("x86_64", {"avx2", "avx512f", "avx512_bf16"}, True, True),
        ("x86_64", {"avx2", "amx_bf16"}, True, True),
        ("x86_64", {"avx2", "avx512f", "avx512bw"}, True, False),  # AVX-512 without its bf16 extension
        ("x86_64", {"avx2"}, True, False),
        ("x86_64", {"avx512_bf16", "amx_bf16"}, False, False),  # oneDNN capped below them
        ("aarch64", {"fp", "asimd", "bf16"}, True, True),
        ("aarch64", {"fp", "asimd"}, True, False),
        ("riscv64", set(), True, False),
    ],
)
def test_native_bf16_needs_the_instructions_and_onednn(monkeypatch, machine, flags, onednn, native):
    fake_cpu(monkeypatch, machine, flags, onednn)
    support = hardware.cpu_bf16_support()
    assert support.native is native
    assert bool(support.reason) is not native


def test_reasons_name_what_is_missing(monkeypatch):
    fake_cpu(monkeypatch, "x86_64", {"avx2"})
    assert "avx512_bf16" in hardware.cpu_bf16_support().reason and "amx_bf16" in hardware.cpu_bf16_support().reason
    fake_cpu(monkeypatch, "x86_64", {"amx_bf16"}, onednn=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in hardware.cpu_bf16_support().reason


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo")
def test_cpu_flags_are_read_from_proc_cpuinfo():
    assert hardware.cpu_flags()  # every Linux CPU lists some


# --------------------------------------------------------------------------- the warning


def test_bf16_without_native_bf16_warns_once_with_the_reason_and_the_fix(avx2_only):
    with pytest.warns(SlowPrecisionWarning) as caught:
        autocast_factory("bf16", CPU)
        autocast_factory("bf16", CPU)  # a second run in the same process: said already
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "avx512_bf16" in text and "emulates" in text and "train.precision=fp32" in text


def test_no_warning_with_native_bf16(native):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autocast_factory("bf16", CPU)


def test_no_warning_for_fp32_without_native_bf16(avx2_only):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autocast_factory("fp32", CPU)


# --------------------------------------------------------------------------- recurrent layers


ROWS = DataSpec("classify", num_classes=10, input_shape=(8, 8))
LM = DataSpec("lm", vocab_size=64, seq_len=12)


@pytest.mark.parametrize(
    "kind,spec", [("lstm", ROWS), ("lstm", LM), ("gru", LM)], ids=["lstm-rows", "lstm-lm", "gru-lm"]
)
def test_recurrence_runs_in_fp32_under_bf16_autocast_without_native_bf16(avx2_only, kind, spec):
    torch.manual_seed(0)
    model = build_model(RNNConfig(kind=kind, hidden_size=32, embd=16), spec)
    seen = {}

    def record(module, args, out):
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        seen["in"] = args[0].dtype
        seen["out"] = (out[0]).dtype

    model.rnn.register_forward_hook(record)
    x = torch.randn(4, 8, 8) if spec.task == "classify" else torch.randint(64, (4, 12))
    with torch.no_grad():
        reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert seen == {"autocast": False, "in": torch.float32, "out": torch.float32}
    assert logits.dtype == torch.bfloat16  # the head still runs under autocast
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(logits.float(), reference, atol=5e-2, rtol=5e-2)


def test_recurrence_keeps_bf16_where_it_is_native_and_on_other_devices(monkeypatch):
    x = torch.zeros(2, 3)
    fake_cpu(monkeypatch, "x86_64", {"avx512_bf16"})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not hardware.fp32_recurrence(x)
    fake_cpu(monkeypatch, "x86_64", {"avx2"})
    assert not hardware.fp32_recurrence(x)  # no autocast: nothing to leave
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert hardware.fp32_recurrence(x)
        assert not hardware.fp32_recurrence(torch.zeros(2, 3, device="meta"))  # not a CPU tensor


# --------------------------------------------------------------------------- peak FLOP/s and MFU


def slow_matmul(seconds_at_1024: float):
    """A matmul whose time grows with m x k x n, ``seconds_at_1024`` for a 1024-wide square one."""

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        time.sleep(seconds_at_1024 * a.shape[0] * a.shape[1] * b.shape[1] / 1024**3)
        return a

    return matmul


@pytest.mark.parametrize("seconds_at_1024", [60.0, 2.0, 0.0])
def test_peak_measurement_is_bounded_in_time_however_slow_the_matmul(seconds_at_1024):
    start = time.perf_counter()
    peak = measure_cpu_peak_flops("bf16", matmul=slow_matmul(seconds_at_1024))
    assert time.perf_counter() - start < 1.0
    assert peak > 0


def test_peak_measurement_of_real_matmuls_is_bounded_in_time():
    for prec in ("fp32", "bf16"):
        start = time.perf_counter()
        assert measure_cpu_peak_flops(prec) > 0
        assert time.perf_counter() - start < 1.0


def test_mfu_is_never_above_100_percent_and_a_wrong_peak_is_said_once():
    said = []
    meter = MfuMeter(100.0, said.append, measured=True)
    assert meter(10.0, 5.0) == pytest.approx(0.5)
    assert meter(10.0, 20.0) is None and meter(10.0, 5.0) is None
    assert len(said) == 1 and "200%" in said[0] and "train.peak_flops" in said[0]
    assert MfuMeter(0.0, said.append, measured=False)(10.0, 5.0) is None


def test_a_run_with_a_peak_below_its_throughput_reports_no_mfu(tmp_path):
    from ember import train

    run = train(tiny_recipe("gpt", "train.peak_flops=1"), tmp_path).run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "mfu" in r]
    assert train_rows and all(r["mfu"] is None for r in train_rows)


# --------------------------------------------------------------------------- the real emulated kernels

SCRIPT = """
import json, time, warnings
import torch
from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.models.registry import build_model
from ember.models.rnn import RNNConfig
from ember.training.flops import measure_cpu_peak_flops
from ember.training.precision import autocast_factory

out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    autocast = autocast_factory("bf16", torch.device("cpu"))
out["warnings"] = [str(w.message) for w in caught]
model = build_model(RNNConfig(hidden_size=32, embd=16), DataSpec("lm", vocab_size=64, seq_len=12))
with autocast():
    logits = model(torch.randint(64, (4, 12)))
logits.float().sum().backward()
out["finite"] = bool(torch.isfinite(logits).all())
start = time.perf_counter()
measure_cpu_peak_flops("bf16")
out["peak_seconds"] = time.perf_counter() - start
print(json.dumps(out))
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN's AVX2 cap is x86 only")
def test_emulated_bf16_on_the_real_kernels_warns_trains_an_lstm_and_measures_quickly():
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["finite"]
    assert len(out["warnings"]) == 1  # the cap, or on a CPU without bf16 the missing instructions
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in out["warnings"][0] or "avx512_bf16" in out["warnings"][0]
    assert out["peak_seconds"] < 1.0


# --------------------------------------------------------------------------- free memory


def test_available_memory_is_the_tighter_of_the_machine_and_the_container(monkeypatch):
    monkeypatch.setattr(hardware, "meminfo_available", lambda: 10 * 2**30)
    monkeypatch.setattr(hardware, "cgroup_available", lambda: None)
    assert hardware.available_memory(CPU) == 10 * 2**30
    monkeypatch.setattr(hardware, "cgroup_available", lambda: 2 * 2**30)
    assert hardware.available_memory(CPU) == 2 * 2**30
    monkeypatch.setattr(hardware, "meminfo_available", lambda: None)
    monkeypatch.setattr(hardware, "cgroup_available", lambda: None)
    assert hardware.available_memory(CPU) is None
    assert hardware.available_memory(torch.device("meta")) is None


def test_available_memory_of_this_machine_is_read():
    free = hardware.available_memory(CPU)
    assert free is None or free > 0


def test_the_bf16_answer_carries_torchs_constant_mark_without_importing_dynamo():
    import subprocess
    import sys

    from ember.hardware import _native_bf16

    def probe() -> bool:
        return True

    marked = torch.compiler.assume_constant_result(probe)
    assert set(vars(marked)) <= set(vars(_native_bf16)) and all(vars(_native_bf16)[k] for k in vars(marked))
    code = "import sys, ember.config, ember.training.loop; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_bf16_on_a_gpu_that_only_emulates_it_is_refused_naming_the_gpu_and_the_fix(monkeypatch):
    # torch.cuda.is_bf16_supported() answers True on a V100 or T4 (emulation) unless asked for native support.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(EmberError, match="V100.*no native bf16.*train.precision=fp16"):
        autocast_factory("bf16", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, H100
    assert callable(autocast_factory("bf16", torch.device("cuda")))
