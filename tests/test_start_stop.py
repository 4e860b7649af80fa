"""What a short run costs around its steps (issue 19): a run in one process imports none of the
distributed or optional machinery it does not use (nor rich without a bar, nor a tracker's
package without that tracker), a prepared bundled set is not prepared again, the objects alive
before a run are kept out of its garbage collections, and its final validation reads at most
``eval.max_batches`` batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_recipe
from ember.training import validation
from ember.training.loop import train

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Imported only by the features that need them: sharded checkpoints, pipeline stages, interop, search...
HEAVY = [
    "torch.distributed.checkpoint",
    "torch.distributed.pipelining",
    "transformers",
    "onnx",
    "onnxruntime",
    "optuna",
    "torchao",
    "torch_pruning",
    "matplotlib",
    "ray",
    # Shown or sent only when asked for: the bar (train.progress), the trackers (train.trackers),
    # shell completion (`ember completion`).
    "rich",
    "torch.utils.tensorboard",
    "tensorboard",
    "mlflow",
    "wandb",
    "shtab",
]
PROBE = """
import json, sys
def loaded():
    return sorted(m for m in sys.modules if m.startswith(PREFIXES) or m in HEAVY)
HEAVY = {heavy}
PREFIXES = ("torch.distributed.", *(h + "." for h in HEAVY))
import ember
ember.train  # resolving the function imports the loop and everything it needs to start
ember.load_recipe
at_import = loaded()
if sys.argv[1] == "import":
    pass
elif sys.argv[1] == "plain":  # what torch itself imports for a plain AdamW and a safetensors save
    import torch, safetensors.torch
    model = torch.nn.Linear(2, 2)
    torch.optim.AdamW(model.parameters()).step()
else:
    sys.path.insert(0, sys.argv[3])
    from conftest import tiny_recipe
    ember.train(tiny_recipe("gpt", "train.max_steps=2", "train.checkpoint_every=1"), run_dir=sys.argv[2])
print(json.dumps({{"import": at_import, "after": loaded()}}))
"""


def loaded_modules(mode: str, tmp_path: Path, run: str = "run") -> dict[str, list[str]]:
    code = PROBE.format(heavy=HEAVY)
    tests = str(Path(__file__).resolve().parent)
    proc = subprocess.run(
        [sys.executable, "-c", code, mode, str(tmp_path / run), tests],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "EMBER_CACHE": str(tmp_path / "cache")},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_ember_train_loads_no_distributed_or_optional_machinery(tmp_path):
    """``import ember; ember.train`` (as in a notebook) loads no DTensor, FSDP, DCP or pipelining,
    and no optional package."""
    eager = loaded_modules("import", tmp_path)["import"]
    assert not [m for m in eager if m.startswith(("torch.distributed.tensor", "torch.distributed.fsdp"))], eager
    assert not [m for m in eager if m in HEAVY or m.startswith(tuple(h + "." for h in HEAVY))], eager


@pytest.mark.slow
def test_a_one_process_run_imports_nothing_a_plain_script_does_not(tmp_path):
    """A one-process run with checkpoints loads no torch.distributed module beyond those torch's own
    AdamW pulls in (torch.optim imports torch._dynamo, which imports DTensor and FSDP; DCP is not
    among them), nor any optional package. The data set is prepared first, as a run on a bundled set
    does once (preparing shows its progress with rich)."""
    loaded_modules("ember", tmp_path, "first")
    ember_run, plain = loaded_modules("ember", tmp_path), loaded_modules("plain", tmp_path)
    extra = sorted(set(ember_run["after"]) - set(plain["after"]))
    assert not extra, f"a one-process run imported what a plain script does not: {extra}"
    assert any(m.startswith("torch.distributed.tensor") for m in plain["after"])  # the probe sees imports
    assert not [m for m in ember_run["after"] if m.startswith("torch.distributed.checkpoint")]


def test_the_final_validation_reads_at_most_eval_max_batches(tmp_path, monkeypatch):
    """The end-of-run validation (no validation before it: eval_every=0) is bounded like every other."""
    seen = []
    real = validation._sums

    def counting(model, loader, *args):
        batches = loader.epoch_batches
        monkeypatch.setattr(loader, "epoch_batches", lambda device: (seen.append(1) or b for b in batches(device)))
        return real(model, loader, *args)

    monkeypatch.setattr(validation, "_sums", counting)
    recipe = tiny_recipe("gpt", "train.max_steps=2", "train.eval_every=0", "eval.max_batches=2", "eval.batch_size=2")
    result = train(recipe, tmp_path / "run")
    assert len(seen) == 2 and "loss" in result.metrics
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "val" in json.dumps(row)] == [2]


def test_a_bundled_set_prepared_before_is_found_without_preparing_again(monkeypatch):
    """A run on a bundled set lists its sources once: a finished set of the same settings is used as
    it is; one an interrupted prepare left work in goes through ``prepare``, which clears it."""
    from ember.data import build, prepare
    from ember.data.shards import WORK

    calls = []
    real = prepare.prepare
    monkeypatch.setattr(prepare, "prepare", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    cfg = tiny_recipe("cnn").data
    out = build.prepared_dir(cfg)  # prepared here, or by an earlier test into the same cache
    calls.clear()
    assert build.prepared_dir(cfg) == out and calls == []
    (out / WORK).mkdir()
    assert build.prepared_dir(cfg) == out and calls == [out]
    assert not (out / WORK).exists()


def test_a_run_sets_the_objects_it_found_aside_from_the_collector_until_it_ends(tmp_path):
    """During ``train`` what was alive before it is frozen (full collections skip torch's objects);
    after it, nothing stays frozen, and a heap the program froze itself is left frozen."""
    import gc

    from ember.training.heap import run_objects_only

    frozen_during = []
    recipe = tiny_recipe("gpt", "train.max_steps=2", "train.eval_every=1")
    train(recipe, tmp_path / "run", on_eval=lambda step, metrics: frozen_during.append(gc.get_freeze_count()))
    assert len(frozen_during) == 2 and min(frozen_during) > 1000 and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        with run_objects_only():
            assert gc.get_freeze_count() == mine
        assert gc.get_freeze_count() == mine
    finally:
        gc.unfreeze()
