"""One row of the compression trade-off table: parameters, bytes on disk, CPU latency, quality.

``measure(RUN)`` works on any finished run directory — trained, quantised, pruned,
distilled — and writes its row to RUN/compress.json. Quality is ``ember eval``'s
(``ember.eval.evaluate``): accuracy for classifiers, loss for language and seq2seq
models. Latency is the median of ``latency_batches`` timed forward passes of one
evaluation batch, after warm-up, under ``torch.inference_mode`` with ``threads`` CPU
threads (1 by default: comparable from machine to machine and less disturbed by other
work on a shared one), in float32 without autocast; the thread count is part of the row.

Example::

    rows = [measure("runs/gpt-tiny"), measure("runs/gpt-tiny-int8-dynamic")]
    print(format_table(rows))
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ember.atomic import read_json, write_json_atomic
from ember.errors import EmberError

WARMUP = 3  # untimed passes first: allocator, kernel selection and lazy init are not the model's speed


@dataclass(frozen=True)
class TradeoffRow:
    """One run's row of the trade-off table (``measure``, ``compare``); ``to_dict()`` is RUN/compress.json.

    ``method``: float, the quantisation method, or the pruning method and amount; ``nonzero``: the
    parameters left non-zero by pruning (``params`` otherwise); ``bytes``: the weights on disk;
    ``ms_per_batch``: median CPU latency of one ``batch_size`` batch on ``threads`` threads;
    ``quality``: ``metric`` (accuracy for classifiers, loss otherwise) over ``samples`` samples of
    ``split`` (``max_batches`` batches, 0 = all).
    """

    name: str
    run: str
    method: str
    params: int
    nonzero: int
    bytes: int
    ms_per_batch: float
    batch_size: int
    threads: int
    device: str
    metric: str
    quality: float
    split: str
    samples: int
    max_batches: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (compress.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> TradeoffRow | None:
        """A row read back from compress.json; None when it is not one (a row of an older ember:
        measured again). A row from before pruning existed has no ``nonzero``: all are."""
        row = {"nonzero": row.get("params"), **row}
        if set(row) != {f.name for f in fields(cls)}:
            return None
        return cls(**row)


def check_run_dir(run_dir: Path, command: str) -> None:
    """Refuse, in one paragraph, anything that is not a finished run directory."""
    missing = [n for n in ("recipe.yaml", "model.json", "model.safetensors") if not (run_dir / n).is_file()]
    if missing:
        raise EmberError(
            f"{run_dir} is not a finished run directory (it lacks {', '.join(missing)}); {command} needs one written "
            f"by ember train (or quantize, ensemble --method soup). Point at such a directory; if it is a run that "
            f"stopped early, finish it first with `ember train --run-dir {run_dir} --resume auto`."
        )


def weights_bytes(run_dir: Path) -> int:
    """Size on disk of the run's weights (model.safetensors, or its shards model-*.safetensors)."""
    return sum(p.stat().st_size for p in run_dir.glob("model*.safetensors"))


def measure(
    run_dir: str | Path,
    split: str = "val",
    batch_size: int = 0,
    latency_batches: int = 20,
    device: str = "cpu",
    threads: int = 1,
    max_batches: int = 0,
) -> TradeoffRow:
    """The trade-off row of ``run_dir`` (quality on ``split``), also written to RUN/compress.json."""
    from ember.config import load_recipe
    from ember.eval.evaluate import evaluate
    from ember.runs import load_trained_model

    run_dir = Path(run_dir)
    check_run_dir(run_dir, "measuring a run")
    if latency_batches < 1:
        raise EmberError(f"latency_batches must be at least 1 (timed forward passes), got {latency_batches}.")
    recipe = load_recipe(run_dir / "recipe.yaml")
    batch_size = batch_size or recipe.eval.batch_size or recipe.train.batch_size
    report = evaluate(run_dir, split=split, batch_size=batch_size, device=device, max_batches=max_batches)
    model, info = load_trained_model(run_dir, device)
    metric = "accuracy" if report.task in ("classify", "clip") else "loss"
    params = info.get("params") or sum(p.numel() for p in model.parameters())
    row = TradeoffRow(
        name=run_dir.name,
        run=str(run_dir),
        method=_method(info),
        params=params,
        nonzero=info.get("pruning", {}).get("nonzero", params),
        bytes=weights_bytes(run_dir),
        ms_per_batch=latency_ms(model, _one_batch(recipe, batch_size, device), latency_batches, threads),
        batch_size=batch_size,
        threads=threads,
        device=device,
        metric=metric,
        quality=report.metrics[metric],
        split=split,
        samples=report.samples,
        max_batches=max_batches,
    )
    write_json_atomic(run_dir / "compress.json", row.to_dict())
    return row


def _method(info: dict) -> str:
    if "quantization" in info:
        return info["quantization"]["method"]
    if "pruning" in info:
        return f"{info['pruning']['method']} {info['pruning']['amount']:.0%}"
    return "float"


def _one_batch(recipe, batch_size: int, device: str) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A validation batch's model input: ``x``, or for clip (images, class prompts or captions), for seq2seq
    (sources, shifted targets)."""
    from ember.data.build import build_data

    data = build_data(recipe.data, batch_size, batch_size, seed=recipe.train.seed, objective=recipe.objective)
    batch = next(iter(data.val.epoch_batches(torch.device(device))))
    if data.spec.task == "seq2seq":
        return batch["src"], batch["tgt_in"]
    return (batch["x"], batch.get("prompts", batch.get("text"))) if data.spec.task == "clip" else batch["x"]


def latency_ms(model: torch.nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], batches: int, threads: int) -> float:
    """Median milliseconds of one forward pass of ``x`` (or of the inputs ``x`` holds) over ``batches`` timed passes."""
    inputs = x if isinstance(x, tuple) else (x,)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if inputs[0].device.type == "cuda" else (lambda: None)
    times = []
    try:
        with torch.inference_mode():
            for i in range(WARMUP + batches):
                sync()
                start = time.perf_counter()
                model(*inputs)
                sync()
                if i >= WARMUP:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return 1000 * statistics.median(times)


def read_row(run_dir: Path) -> TradeoffRow | None:
    """RUN/compress.json if it is newer than the weights, else None (to measure again)."""
    path = run_dir / "compress.json"
    if not path.is_file() or path.stat().st_mtime < max(p.stat().st_mtime for p in run_dir.glob("model*.safetensors")):
        return None
    try:
        return TradeoffRow.from_dict(read_json(path, ""))
    except EmberError:  # a cache: an unreadable one is measured again (and rewritten)
        return None


def format_table(rows: list[TradeoffRow]) -> str:
    """The rows side by side, with size, speed and quality relative to the first row."""
    base = rows[0]
    head = (
        f"{'run':<28} {'method':<18} {'params':>9} {'nonzero':>9} {'MB':>8} {'ms/batch':>9} {'quality':>16} "
        f"{'size':>6} {'speed':>6} {'Δquality':>9}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.name[:28]:<28} {r.method:<18} {r.params:>9,} {r.nonzero:>9,} "
            f"{r.bytes / 1e6:>8.3f} "
            f"{r.ms_per_batch:>9.2f} {r.metric + ' ' + format(r.quality, '.4f'):>16} "
            f"{r.bytes / base.bytes:>5.2f}x {base.ms_per_batch / r.ms_per_batch:>5.2f}x "
            f"{_delta(r, base):>9}"
        )
    shown = sorted({(r.batch_size, r.threads, r.samples, r.split) for r in rows})
    lines.append(
        "size: bytes vs the first row; speed: its ms/batch over this row's; Δquality: accuracy in points, "
        "loss in % (" + "; ".join(f"batch {b}, {t} thread(s), {n} {s} samples" for b, t, n, s in shown) + ")"
    )
    return "\n".join(lines)


def _delta(row: TradeoffRow, base: TradeoffRow) -> str:
    if row.metric != base.metric:
        return "-"
    if row.metric == "accuracy":
        return f"{round(100 * (row.quality - base.quality), 2) + 0.0:+.2f} pt"  # + 0.0: no "-0.00"
    return f"{round(100 * (row.quality / base.quality - 1), 2) + 0.0:+.2f} %"
