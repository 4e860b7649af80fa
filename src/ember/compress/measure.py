"""One row of the compression trade-off table: parameters, bytes on disk, CPU latency, quality.

``measure(RUN)`` works on any finished run directory — trained, quantised, pruned,
distilled — and writes its row to RUN/compress.json; ``time_rows`` times several runs'
rows side by side (what ``ember compare`` does). Quality is ``ember eval``'s
(``ember.eval.evaluate``): accuracy for classifiers, loss for language and seq2seq
models. Latency is timed as ``ember.compress.timing`` says: interleaved rounds of forward
passes of one evaluation batch, after warm-up, under ``torch.inference_mode`` with
``threads`` CPU threads (1 by default: comparable from machine to machine and less
disturbed by other work on a shared one), in float32 without autocast; the row keeps each
round's figure and an id shared by the rows timed together, so ``format_table`` compares
two rows round by round, and says "no measurable difference" when the rounds disagree on
which is faster.

Example::

    rows = compare(["runs/gpt-tiny", "runs/gpt-tiny-int8-dynamic"])
    print(format_table(rows))
"""

from __future__ import annotations

import statistics
import uuid
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from ember.atomic import read_json, write_json_atomic
from ember.compress.timing import PASSES, ROUNDS, speed_ratio, time_interleaved
from ember.errors import EmberError


@dataclass(frozen=True)
class TradeoffRow:
    """One run's row of the trade-off table (``measure``, ``compare``); ``to_dict()`` is RUN/compress.json.

    ``method``: float, the quantisation method, or the pruning method and amount; ``nonzero``: the
    parameters left non-zero by pruning (``params`` otherwise); ``bytes``: the weights on disk;
    ``ms_per_batch``: median CPU latency of one ``batch_size`` batch on ``threads`` threads over the
    rounds of ``round_ms`` (each round's median pass); ``timed_with``: the same id on rows whose rounds
    were timed together; ``quality``: ``metric`` (accuracy for classifiers, loss otherwise) over
    ``samples`` samples of ``split`` (``max_batches`` batches, 0 = all). Rows written before the rounds
    existed read back with no rounds (``round_ms`` empty, ``timed_with`` "").
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
    round_ms: tuple[float, ...] = ()
    timed_with: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (compress.json)."""
        return {**asdict(self), "round_ms": list(self.round_ms)}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> TradeoffRow | None:
        """A row read back from compress.json; None when it is not one (a row of an older ember:
        measured again). A row from before pruning existed has no ``nonzero``: all are; one from before
        interleaved timing has no rounds."""
        row = {"nonzero": row.get("params"), "round_ms": (), "timed_with": "", **row}
        if set(row) != {f.name for f in fields(cls)} or not isinstance(row["round_ms"], (list, tuple)):
            return None
        return cls(**{**row, "round_ms": tuple(row["round_ms"])})


def check_run_dir(run_dir: Path, command: str) -> None:
    """Refuse, in one paragraph, anything that is not a finished run directory."""
    from ember.runs import require_existing_run

    require_existing_run(run_dir, command)
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
    device: str = "cpu",
    threads: int = 1,
    max_batches: int = 0,
    rounds: int = ROUNDS,
    passes: int = PASSES,
) -> TradeoffRow:
    """The trade-off row of ``run_dir`` (quality on ``split``), timed alone, also written to RUN/compress.json."""
    row = quality_row(run_dir, split, batch_size, device, threads, max_batches)
    return time_rows([row], rounds, passes)[0]


def quality_row(
    run_dir: str | Path,
    split: str = "val",
    batch_size: int = 0,
    device: str = "cpu",
    threads: int = 1,
    max_batches: int = 0,
) -> TradeoffRow:
    """``run_dir``'s row with its size and quality (``ember eval`` on ``split``), not yet timed."""
    from ember.config import load_recipe
    from ember.eval.evaluate import evaluate
    from ember.runs import load_trained_model, read_model_info

    run_dir = Path(run_dir)
    check_run_dir(run_dir, "measuring a run")
    recipe = load_recipe(run_dir / "recipe.yaml")
    batch_size = batch_size or recipe.eval.batch_size or recipe.train.batch_size
    report = evaluate(run_dir, split=split, batch_size=batch_size, device=device, max_batches=max_batches)
    info = read_model_info(run_dir)
    metric = "accuracy" if report.task in ("classify", "clip") else "loss"
    params = info.get("params") or sum(p.numel() for p in load_trained_model(run_dir, device)[0].parameters())
    return TradeoffRow(
        name=run_dir.name,
        run=str(run_dir),
        method=_method(info),
        params=params,
        nonzero=info.get("pruning", {}).get("nonzero", params),
        bytes=weights_bytes(run_dir),
        ms_per_batch=0.0,
        batch_size=batch_size,
        threads=threads,
        device=device,
        metric=metric,
        quality=report.metrics[metric],
        split=split,
        samples=report.samples,
        max_batches=max_batches,
    )


def time_rows(rows: list[TradeoffRow], rounds: int = ROUNDS, passes: int = PASSES) -> list[TradeoffRow]:
    """``rows`` with their latencies timed together in interleaved rounds (``timing.time_interleaved``), each
    on its own run's model and evaluation batch, on the first row's device and threads; each row is written
    to its RUN/compress.json."""
    from ember.config import load_recipe
    from ember.runs import load_trained_model

    device, threads = rows[0].device, rows[0].threads
    cases = []
    for row in rows:
        run_dir = Path(row.run)
        model = load_trained_model(run_dir, device)[0]
        cases.append((model, _one_batch(load_recipe(run_dir / "recipe.yaml"), row.batch_size, device)))
    figures = time_interleaved(cases, rounds, passes, threads)
    session = uuid.uuid4().hex[:12]
    timed = []
    for row, ms in zip(rows, figures):
        new = replace(
            row,
            ms_per_batch=statistics.median(ms),
            round_ms=tuple(ms),
            timed_with=session,
            device=device,
            threads=threads,
        )
        write_json_atomic(Path(row.run) / "compress.json", new.to_dict())
        timed.append(new)
    return timed


def _method(info: dict) -> str:
    if "quantization" in info:
        return info["quantization"]["method"]
    if "pruning" in info:
        return f"{info['pruning']['method']} {info['pruning']['amount']:.0%}"
    return "float"


def _one_batch(recipe, batch_size: int, device: str) -> tuple[torch.Tensor, ...]:
    """A validation batch's model inputs: ``(x,)``, or for clip (images, class prompts or captions), for
    seq2seq (sources, shifted targets)."""
    from ember.data.build import build_data

    data = build_data(recipe.data, batch_size, batch_size, seed=recipe.train.seed, objective=recipe.objective)
    batch = next(iter(data.val.epoch_batches(torch.device(device))))
    if data.spec.task == "seq2seq":
        return batch["src"], batch["tgt_in"]
    return (batch["x"], batch.get("prompts", batch.get("text"))) if data.spec.task == "clip" else (batch["x"],)


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
    """The rows side by side, with size, quality and speed relative to the first row."""
    base = rows[0]
    lines = [
        f"{'run':<28} {'method':<18} {'params':>9} {'nonzero':>9} {'MB':>8} {'ms/batch [range]':>22} "
        f"{'quality':>16} {'size':>6} {'Δquality':>9}  speed [range]"
    ]
    for r in rows:
        lines.append(
            f"{r.name[:28]:<28} {r.method:<18} {r.params:>9,} {r.nonzero:>9,} {r.bytes / 1e6:>8.3f} "
            f"{_latency(r):>22} {r.metric + ' ' + format(r.quality, '.4f'):>16} "
            f"{r.bytes / base.bytes:>5.2f}x {_delta(r, base):>9}  {_speed(r, base)}"
        )
    shown = sorted({(r.batch_size, r.threads, r.samples, r.split) for r in rows})
    counts = sorted({len(r.round_ms) for r in rows if r.round_ms})
    lines.append(
        "size: bytes vs the first row; Δquality: accuracy in points, loss in %; ms/batch: median of the rounds' "
        "figures [lowest–highest]; speed: the first row's ms over this row's, round by round, median "
        "[lowest–highest]; no measurable difference: the rounds disagree on which is faster ("
        + "; ".join(f"batch {b}, {t} thread(s), {n} {s} samples" for b, t, n, s in shown)
        + (f"; {'/'.join(map(str, counts))} rounds" if counts else "")
        + ")"
    )
    return "\n".join(lines)


def _latency(row: TradeoffRow) -> str:
    if not row.round_ms:
        return f"{row.ms_per_batch:.2f}"
    return f"{row.ms_per_batch:.2f} [{min(row.round_ms):.2f}–{max(row.round_ms):.2f}]"


def _speed(row: TradeoffRow, base: TradeoffRow) -> str:
    """This row's speed against the base: measured round by round when they were timed together."""
    if row is base:
        return "1.00x"
    together = row.timed_with and row.timed_with == base.timed_with and len(row.round_ms) == len(base.round_ms)
    if not together:
        return f"{base.ms_per_batch / row.ms_per_batch:.2f}x (timed apart: not compared)"
    return speed_ratio(base.round_ms, row.round_ms).describe()


def _delta(row: TradeoffRow, base: TradeoffRow) -> str:
    if row.metric != base.metric:
        return "-"
    if row.metric == "accuracy":
        return f"{round(100 * (row.quality - base.quality), 2) + 0.0:+.2f} pt"  # + 0.0: no "-0.00"
    return f"{round(100 * (row.quality / base.quality - 1), 2) + 0.0:+.2f} %"
