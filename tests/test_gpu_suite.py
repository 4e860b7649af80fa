"""The GPU suite (benchmarks/gpu_suite.py) end to end on the CPU (``--smoke``): one JSON with every
check, sane figures, skips that say why; and the suite reads what gpt2_mfu.py and overhead.py print."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SMOKE_RECIPES = ["cnn-digits", "gpt-tiny", "mlp-table"]
MODES = ["fp32", "bf16", "fp16", "compile", "deterministic"]
KEYS = {"name", "figure", "unit", "goal", "passed", "seconds", "error", "skipped", "details"}


def suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_every_check_with_sane_figures(tmp_path):
    from ember import hardware

    out = tmp_path / "suite.json"
    env = {**os.environ, "EMBER_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["torch"] == torch.__version__ and report["cuda"] == torch.version.cuda
    assert report["device"].startswith("cpu") and 0 < report["seconds"] <= report["budget_s"]
    checks = {c["name"]: c for c in report["checks"]}
    plans = ["plan_memory/fp32", "plan_memory/bf16", "plan_memory/fp32+ckpt"]
    recipes = [f"recipe/{r}/{m}" for r in SMOKE_RECIPES for m in MODES]
    assert list(checks) == ["gpt2_mfu", "overhead", *plans, *recipes]
    assert all(set(c) == KEYS and c["seconds"] >= 0 and c["goal"] for c in checks.values())
    for c in checks.values():  # a check either ran (passed, a figure) or says why it did not
        assert (c["passed"] is True and c["figure"] is not None) or (c["passed"] is None and c["skipped"]), c

    mfu = checks["gpt2_mfu"]
    assert 0 < mfu["figure"] < 1 and 0 < mfu["details"]["plain_mfu"] < 1 and mfu["details"]["time_ratio"] > 0
    for name in plans:  # the CPU allocator: the plan is within a few per cent there
        assert abs(checks[name]["figure"]) <= 0.15 and checks[name]["details"]["measured_bytes"] > 1e5, name
    fp32, ckpt = (checks[n]["details"]["measured_bytes"] for n in ("plan_memory/fp32", "plan_memory/fp32+ckpt"))
    assert ckpt < fp32  # activation checkpointing keeps less: a measurement, not a constant
    native_bf16 = hardware.cpu_bf16_support().native
    for r in SMOKE_RECIPES:
        fp32, bf16 = checks[f"recipe/{r}/fp32"], checks[f"recipe/{r}/bf16"]
        assert fp32["details"]["steps"] == 2 and all(math.isfinite(x) and x > 0 for x in fp32["details"]["losses"])
        assert "CUDA" in checks[f"recipe/{r}/fp16"]["skipped"]
        assert (bf16["passed"] is True) == native_bf16
        if native_bf16:  # the same seed, data and two steps: bf16's loss is fp32's within bf16's precision
            assert math.isclose(bf16["figure"], fp32["figure"], rel_tol=0.02), (r, bf16["figure"], fp32["figure"])


def test_the_suite_reads_both_forms_of_the_overhead_line():
    suite = suite_module()
    one = "overhead: ember/plain tokens/s = 0.987 (median of 3 rounds; best run vs best run 1.002; plain 9 tok/s)"
    several = (
        "round 1 (plain first), tok/s: plain 785  hf 1,396  ember 1,813  ember/plain 2.309  ember/hf 1.299\n"
        "overhead (tiny): ember/plain tokens/s = 1.012 (median of 3 rounds' ratios); ember/hf 1.101; best ...\n"
        "overhead (gpt2-small): ember/plain tokens/s = 0.964 (median of 3 rounds' ratios); best ..."
    )
    assert suite.parse_overhead(one) == {"default": {"ember/plain": 0.987, "ember/hf": None}}
    assert suite.parse_overhead(several) == {
        "tiny": {"ember/plain": 1.012, "ember/hf": 1.101},
        "gpt2-small": {"ember/plain": 0.964, "ember/hf": None},
    }
    assert suite.parse_overhead("Traceback (most recent call last): ...") == {}


def test_the_suite_reads_gpt2_mfu_and_the_recipe_headers():
    suite = suite_module()
    line = "ember MFU 52.1% on NVIDIA H200 (plain PyTorch step 53% ; ember/plain time per step 1.017)"
    assert suite.parse_mfu(line) is None  # not the script's form: no figure is made up
    line = "ember MFU 52.1% on NVIDIA H200 (plain PyTorch step 53%; ember/plain time per step 1.017)"
    assert suite.parse_mfu(line) == {
        "ember_mfu": 0.521,
        "plain_mfu": 0.53,
        "device": "NVIDIA H200",
        "time_ratio": 1.017,
    }
    tiny = suite.parse_mfu("ember MFU 4.12e-05% on CPU (plain PyTorch step 3.4e-05%; per step 0.8)")
    assert math.isclose(tiny["ember_mfu"], 4.12e-07)
