"""``ember quantize RUN``: post-training int8 quantisation with torchao, as a new run directory.

Methods (torchao's ``quantize_`` on every ``nn.Linear``; measured on this project's CPU
machines, torch 2.13 CPU build, torchao 0.18):

- ``int8-dynamic``: ``Int8DynamicActivationInt8WeightConfig``. Weights int8 per output
  row; activations quantised per token as each batch runs, then an int8 matmul
  (``torch._int_mm``). Faster than float only where the matmuls are large enough to pay
  for quantising the activations: the demo GPT 1.1-1.2x, the digits ViT (64 wide) 0.69x
  (benchmarks/compress_table.py, 1 thread).
- ``int8-weight-only``: ``Int8WeightOnlyConfig``. Weights int8 per row, dequantised for a
  float matmul: the same size on disk, closer to the float outputs, a little slower than
  float on the CPU (0.9x).

Neither needs calibration data: dynamic quantisation computes activation scales per batch
as it runs, and weight-only leaves activations in float. So ``calibration_batches`` is
refused rather than ignored. ``torch.ao.quantization.quantize_dynamic`` also runs on the
CPU (its fbgemm kernel is faster: 0.43 ms against torchao's 1.6 and float's 2.4 for a
256x256 @ 256x1024 matmul) but is deprecated and its packed weights do not go into
safetensors; torchao is DESIGN's choice and runs on the CPU, so it is used.

Covered: ``nn.Linear`` layers — the Transformers' attention and MLP projections and the
heads of every model. Not covered: convolutions (a CNN keeps its convs in float), LSTM/GRU
cells, embeddings, norms, and a Linear whose weight is tied to an embedding (a GPT's LM
head): quantising it would store the matrix twice, float for the lookup and int8 for the
head. What stays float is stored in float.

The quantised run directory::

    RUN-int8-dynamic/recipe.yaml, tokenizer.json   copied from RUN
    RUN-int8-dynamic/model.json          RUN's, plus "quantization": method, library, version, ...
    RUN-int8-dynamic/model.safetensors   int8 weights as NAME.qdata, their scales as NAME.scale,
                                         every other tensor as in RUN

Loading (``ember.runs.load_trained_model``, hence ``ember eval`` and ``ember generate``, through
``ember.models.stored.load_quantized``) rebuilds the float model from model.json, applies the same
quantisation, then copies the stored tensors into it: nothing but tensors is read from the file,
never a pickle.

Example::

    report = quantize("runs/gpt-tiny", method="int8-dynamic")
    report.run, report.rows[1].bytes / report.rows[0].bytes   # ('runs/gpt-tiny-int8-dynamic', 0.45...)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.atomic import atomic_path, read_json
from ember.compress.compare import compare
from ember.compress.measure import TradeoffRow, check_run_dir
from ember.errors import EmberError
from ember.models.stored import quantize_model, quantized_state
from ember.runs import load_merged_model, read_model_info, write_model_info

METHODS = ("int8-dynamic", "int8-weight-only")


@dataclass(frozen=True)
class QuantizeResult:
    """What ``quantize`` returns: the new run directory, its model.json ``quantization`` entry
    (method, source, library, version, reduce_range, layers) and the trade-off rows of the source
    and the quantised run."""

    run: str
    quantization: dict[str, Any]
    rows: list[TradeoffRow]


def quantize(
    run_dir: str | Path,
    method: str = "int8-dynamic",
    out: str | Path | None = None,
    calibration_batches: int = 0,
    max_batches: int = 0,
) -> QuantizeResult:
    """Quantise ``run_dir``'s model into a new run directory; return it, its entry and the table rows
    (quality over ``max_batches`` batches of the val split; 0 = all of it)."""
    run_dir = Path(run_dir)
    _check_method(method, calibration_batches)
    check_run_dir(run_dir, "ember quantize")
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}-{method}"
    info = read_model_info(run_dir)
    if "quantization" in info:
        raise EmberError(
            f"{run_dir} is already quantised ({info['quantization']['method']}). Quantise the float run "
            f"it came from ({info['quantization'].get('source', 'its source run')}) instead."
        )
    _check_out(out, run_dir)
    model, info = load_merged_model(run_dir, "cpu")  # a LoRA run's adapters folded in first
    entry = {"method": method, "source": str(run_dir), **quantize_model(model, method)}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        import safetensors.torch

        state = {k: t.contiguous() for k, t in quantized_state(model).items()}
        safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt", "quantization": method})
    for name in ("recipe.yaml", "tokenizer.json"):  # what eval and generate read besides the weights
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)
    write_model_info(out, {**info, "quantization": entry})
    rows = compare([run_dir, out], max_batches=max_batches)  # the source's row read back when fresh
    return QuantizeResult(run=str(out), quantization=entry, rows=rows)


def _check_method(method: str, calibration_batches: int) -> None:
    if method not in METHODS:
        raise EmberError(
            f"Unknown quantisation method {method!r}; choose one of {', '.join(METHODS)} "
            f"(int8-dynamic multiplies in int8, int8-weight-only stores int8 but multiplies in float)."
        )
    if calibration_batches:
        raise EmberError(
            f"--calibration-batches is for static quantisation, and {method} needs no calibration: int8-dynamic "
            f"computes activation scales from each batch as it runs, int8-weight-only keeps activations in float. "
            f"Drop --calibration-batches."
        )


def _check_out(out: Path, run_dir: Path) -> None:
    info = out / "model.json"
    ours = info.is_file() and "quantization" in read_json(
        info, "Give --out a new directory (default: RUN-METHOD beside RUN)."
    )
    if out.resolve() == run_dir.resolve() or ((out / "recipe.yaml").is_file() and not ours):
        raise EmberError(
            f"{out} holds a run that is not a quantised one, and quantising would write over it. "
            f"Give --out a new directory (default: RUN-METHOD beside RUN)."
        )
