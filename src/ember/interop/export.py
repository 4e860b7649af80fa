"""``ember export RUN --format hf|onnx --out DIR``: a finished run's model written in another
ecosystem's format, and checked there against ember's own outputs.

Each format is one module with one function ``export_<format>(run_dir, out, merge) -> ExportResult``:
``ember.interop.hf`` (a ``transformers`` checkpoint directory: config.json, safetensors, tokenizer)
and ``ember.interop.onnx`` (an ``.onnx`` graph of a classifier). ``merge`` folds LoRA adapters into
the weights first.

Example::

    result = export_run("runs/llama-tiny", "exports/llama-tiny", fmt="hf")
    print(result.files)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ember.errors import EmberError
from ember.interop.result import ExportResult  # built by each format's module; re-exported here

FORMATS = ("hf", "onnx")
__all__ = ["FORMATS", "ExportResult", "export_run"]


def _exporter(fmt: str) -> Callable[..., ExportResult]:
    # Imported on demand: each format pulls its own dependencies.
    if fmt == "hf":
        from ember.interop.hf import export_hf

        return export_hf
    if fmt == "onnx":
        from ember.interop.onnx import export_onnx

        return export_onnx
    raise EmberError(f"Unknown export format {fmt!r}. Choose one of: {', '.join(FORMATS)}.")


def export_run(run: str | Path, out: str | Path, fmt: str = "hf", merge: bool = False) -> ExportResult:
    """Write the finished run ``run``'s model to ``out`` in format ``fmt`` (see FORMATS).

    ``merge``: fold LoRA adapters into the base weights before writing (a run trained with the
    ``lora`` plugin exports its adapters alone otherwise, where the format allows it).
    """
    run, out = Path(run), Path(out)
    from ember.runs import require_existing_run

    require_existing_run(run, "ember export")
    if not run.is_dir():
        raise EmberError(f"{run} is a file, not a run directory. Give the directory `ember train` wrote.")
    if out.resolve() == run.resolve():
        raise EmberError(f"--out {out} is the run directory itself; export into a new directory.")
    return _exporter(fmt)(run, out, merge=merge)
