"""``ember report RUN [RUN ...]``: one self-contained HTML page about a run, or several runs compared.

The page is a single file: plots are PNG images drawn with matplotlib (Agg, no pyplot)
and inlined as base64, the style sheet is inline, there is no script and nothing is
fetched from anywhere, so it can be mailed, archived or opened offline.

A page shows every section its run has data for, and no section for data it lacks:

=======================  ==============================================================
section                  read from
=======================  ==============================================================
header                   model.json (model, parameters, task, steps, final metrics,
                         pruning / quantization / soup entries), recipe.yaml
training curves          metrics.jsonl training records: loss, lr, samples/s or
                         tokens/s, MFU, gradient norm (and the peak memory in the header)
validation metrics       metrics.jsonl ``split: "val"`` records, one panel per metric
evaluation               eval.json (``ember eval``): metrics, per-class table
confusion matrix         eval.json's ``confusion_matrix``
search history           tune.json (``ember tune``), and each trial's metrics.jsonl
cross-validation         cv.json (``ember cv``), and each fold's metrics.jsonl
compression              prune.json (``ember prune``) or compress.json (``ember compare``,
                         ``ember quantize``), with the source run's row when known
continual training       continual.json (``ember continue``)
linear probe             probe.json
ensembles                ensemble-*.json (``ember ensemble``) in the directory
profiles                 profile/ (``train.profile``): links to the torch.profiler traces
                         and CUDA memory snapshots, which the page never opens
=======================  ==============================================================

RUN may be a training run (metrics.jsonl), a finished run without a training log
(``ember quantize`` / ``ember prune`` output, a soup), a tune directory (tune.json) or a
cv directory (cv.json): the last two have no metrics.jsonl of their own and show their
search or cross-validation section with their trials' or folds' curves overlaid.

A finished classifier whose eval.json is missing (or older than its weights) is evaluated
on its validation split with ``ember.eval.evaluate`` — the function ``ember eval`` runs —
which writes RUN/eval.json as ``ember eval RUN`` would; the next report reads it back.
``evaluate=False`` (``--no-eval``) skips that, and the page says the confusion matrix was
left out. Several runs give one page: the final metrics side by side, curves overlaid
(one line per run), then each run's own sections.

The module is ``reporting``, not ``report``, so that importing it never replaces the function
``ember.report`` on the package (as ``search`` holds ``tune``).

Example::

    from ember.reporting import report                    # or ember.report
    report(["runs/cnn"])                                  # PosixPath('runs/cnn/report.html')
    report(["runs/cnn", "runs/cnn-l1-unstructured-50"], out="compare.html")   # PosixPath('compare.html')
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ember.atomic import read_json, write_text_atomic
from ember.compress.timing import speed_ratio
from ember.errors import EmberError
from ember.extras import require
from ember.runs import verify_weights

# A directory is reportable when it holds one of these.
MARKERS = ("metrics.jsonl", "model.json", "tune.json", "cv.json")
# Reports other commands write into a run directory: name → file.
JSON_FILES = {
    "eval": "eval.json",
    "compress": "compress.json",
    "prune": "prune.json",
    "cv": "cv.json",
    "tune": "tune.json",
    "continual": "continual.json",
    "probe": "probe.json",
}
# Metrics shown first, in this order, wherever a table picks some.
HEADLINE = ("loss", "accuracy", "f1_macro", "precision_macro", "recall_macro", "ppl", "bpb", "exact_match")
NICE = {
    "loss": "loss",
    "accuracy": "accuracy",
    "ppl": "perplexity",
    "bpb": "bits per byte",
    "exact_match": "exact match",
    "f1_macro": "F1 (macro)",
}
# Training-record panels: key, title, y label, scale.
TRAIN_PANELS = (
    ("loss", "training loss", "loss", 1.0),
    ("lr", "learning rate", "lr", 1.0),
    ("samples_per_s", "throughput (samples/s)", "samples/s", 1.0),
    ("tokens_per_s", "throughput (tokens/s)", "tokens/s", 1.0),
    ("mfu", "model FLOPs utilisation", "MFU (%)", 100.0),
    ("grad_norm", "gradient norm", "norm", 1.0),
)
DPI = 150  # pixels per inch of the PNGs
CSS_PX_PER_INCH = 100  # their size on the page: crisp on high-density screens
MAX_LEGEND = 12

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; max-width: 1320px;
       margin: 0 auto; padding: 1rem 1.5rem 3rem; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
th, td { padding: .25rem .7rem; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { font-weight: 600; background: #eef6ee; }
.plots { display: flex; flex-wrap: wrap; gap: .8rem; } .plots img { max-width: 100%; height: auto; }
.tables { display: flex; flex-wrap: wrap; gap: 2.5rem; align-items: flex-start; }
.note { color: #6b5900; background: #fff8db; padding: .3rem .6rem; border-radius: 4px; }
.muted, footer { color: #666; font-size: .85rem; } pre { background: #f6f6f8; padding: .6rem; overflow-x: auto; }
table.summary td:first-child { color: #555; white-space: nowrap; } table.summary td { max-width: 70rem; }
section.run { border-top: 3px solid #bbb; margin-top: 2.5rem; }
"""


@dataclass
class RunData:
    """Everything a page shows about one directory, read once."""

    path: Path
    name: str
    info: dict = field(default_factory=dict)  # model.json
    train: list = field(default_factory=list)  # metrics.jsonl training records
    val: list = field(default_factory=list)  # metrics.jsonl validation records
    files: dict = field(default_factory=dict)  # JSON_FILES key → parsed report
    ensembles: list = field(default_factory=list)  # (file name, parsed ensemble report)
    recipe: str = ""
    notes: list = field(default_factory=list)
    page_dir: Path = Path(".")  # where the page is written: its links to the run's files are relative to it


def report(runs: list[str | Path], out: str | Path | None = None, evaluate: bool = True) -> Path:
    """Write the HTML report of ``runs`` (one page; several runs are compared) and return its path.

    ``out`` defaults to RUN/report.html for one run and ./report.html for several; an
    existing directory gets report.html inside it. ``evaluate`` lets a finished classifier
    without eval.json be evaluated for its confusion matrix.

    Example::

        report(["runs/cnn"], evaluate=False)   # PosixPath('runs/cnn/report.html')
    """
    _matplotlib()  # before any slow work: without ember[report], one paragraph naming it
    paths = [Path(r) for r in runs]
    if not paths:
        raise EmberError("ember report needs at least one run directory, e.g. `ember report runs/cnn`.")
    for path in paths:  # every mistake before any slow work
        check_reportable(path)
    target = _out_path(paths, out)
    loaded = [load_run(path, name, evaluate) for path, name in zip(paths, _names(paths))]
    for run in loaded:
        run.page_dir = target.parent
    page = single_page(loaded[0]) if len(loaded) == 1 else compare_page(loaded)
    write_text_atomic(target, page)
    return target


def check_reportable(path: Path) -> None:
    """Refuse, in one paragraph, a path that holds nothing to report on."""
    if path.is_dir() and any((path / m).is_file() for m in MARKERS):
        return
    what = (
        "does not exist"
        if not path.exists()
        else "is not a directory"
        if not path.is_dir()
        else "holds no metrics.jsonl, model.json, tune.json or cv.json"
    )
    raise EmberError(
        f"{path} {what}, so there is nothing to report on. ember report reads a run directory written "
        f"by ember train (metrics.jsonl, model.json), ember quantize or prune, ember tune (tune.json) or "
        f"ember cv (cv.json): point it at one, e.g. `ember report runs/cnn`."
    )


def _out_path(paths: list[Path], out: str | Path | None) -> Path:
    if out is None:
        return paths[0] / "report.html" if len(paths) == 1 else Path("report.html")
    target = Path(out)
    if target.is_dir():
        target = target / "report.html"
    if not target.parent.is_dir():
        raise EmberError(
            f"--out {out}: the directory {target.parent} does not exist. Create it first (mkdir -p "
            f"{target.parent}), or give --out a path in an existing directory."
        )
    return target


def _names(paths: list[Path]) -> list[str]:
    """Each run's label: its directory name, or the path as given when two names clash."""
    names = [p.resolve().name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


# --------------------------------------------------------------------------- reading a run


def load_run(path: Path, name: str, evaluate: bool = True) -> RunData:
    """Read every file the page uses; evaluate a finished classifier lacking a fresh eval.json."""
    run = RunData(path=path, name=name)
    run.info = _read_json(path / "model.json") or {}
    if run.info and (path / "model.safetensors").is_file():
        verify_weights(path, run.info)  # a corrupted or foreign model is refused, not scored
    run.train, run.val = read_metrics(path / "metrics.jsonl")
    for key, filename in JSON_FILES.items():
        if (data := _read_json(path / filename)) is not None:
            run.files[key] = data
    for file in sorted(path.glob("ensemble-*.json")):
        if (data := _read_json(file)) is not None and "members" in data:
            run.ensembles.append((file.name, data))
    for recipe in ("recipe.yaml", "best.yaml"):
        if (path / recipe).is_file():
            run.recipe = (path / recipe).read_bytes().decode("utf-8", errors="replace")  # shown, escaped, never parsed
            break
    stale = _drop_stale_eval(run)
    if _wants_evaluation(run):
        _attach_evaluation(run, evaluate)
    if stale and "eval" not in run.files:
        run.notes.append(
            "eval.json is older than model.safetensors (the model changed after `ember eval`), so it is "
            "not used; `ember eval` again to refresh it."
        )
    return run


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a metrics.jsonl. Its last line may be cut short (a run
    killed mid-write) and is then skipped; any other damage is a message, never silently dropped data."""
    if not path.is_file():
        return [], []
    train, val = [], []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if number == len(lines) and number > 1:
                continue
            raise EmberError(
                f"{path} line {number} is not a JSON record: the file is corrupted or was not written by "
                f"ember. Restore it, or move it away to report the run without its curves."
            ) from None
        if isinstance(record, dict) and _number(record.get("step")):
            if "split" not in record:
                train.append(record)
            elif record["split"] == "val":
                val.append(record)
    return train, val


def _read_json(path: Path) -> dict | None:
    """A run file the page shows, or None where the run has none; a damaged one is a message."""
    if not path.is_file():
        return None
    return read_json(path, f"Re-run the command that wrote {path.name}, or move it away to report the run without it.")


def _drop_stale_eval(run: RunData) -> bool:
    """Forget an eval.json older than the weights it should describe; whether there was one."""
    weights = run.path / "model.safetensors"
    if "eval" in run.files and weights.is_file() and (run.path / "eval.json").stat().st_mtime < weights.stat().st_mtime:
        del run.files["eval"]
        return True
    return False


def _wants_evaluation(run: RunData) -> bool:
    return (
        run.info.get("data", {}).get("task") == "classify"
        and (run.path / "model.safetensors").is_file()
        and "confusion_matrix" not in run.files.get("eval", {})
    )


def _attach_evaluation(run: RunData, evaluate: bool) -> None:
    """The run's eval.json report, computed by ember eval's function on the validation split."""
    if not evaluate:
        run.notes.append(
            f"Confusion matrix left out (--no-eval): `ember eval {run.path}` computes it, or report "
            f"again without --no-eval."
        )
        return
    from ember.eval.evaluate import evaluate as evaluate_run

    try:
        run.files["eval"] = evaluate_run(run.path, split="val").to_dict()  # as read from eval.json
    except EmberError as err:  # e.g. its data is gone: the rest of the page still stands
        run.notes.append(f"Confusion matrix left out: evaluating the run failed: {err}")


# --------------------------------------------------------------------------- HTML and plot helpers


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value) -> str:
    """A cell's text: thousands for integers, 4 decimals for ordinary floats, else scientific."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def table(head: list[str] | None, rows: list[list], cls: str = "", best: int = -1) -> str:
    """An HTML table (no header row when ``head`` is None); numbers right-aligned, every cell
    escaped; row ``best`` highlighted."""
    th = f"<thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead>" if head is not None else ""
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="num">{esc(fmt(v))}</td>' if _number(v) else f"<td>{esc(fmt(v))}</td>" for v in row)
        body.append(f'<tr class="best">{cells}</tr>' if i == best else f"<tr>{cells}</tr>")
    return f'<table class="{esc(cls)}">{th}<tbody>{"".join(body)}</tbody></table>'


def _ordered(keys) -> list[str]:
    """Metric names, the headline ones first."""
    keys = list(dict.fromkeys(keys))
    return [k for k in HEADLINE if k in keys] + [k for k in keys if k not in HEADLINE]


def _matplotlib() -> None:
    """Check that matplotlib is installed, or raise the EmberError naming the extra that installs it."""
    require("matplotlib", "report", "ember report (its plots are drawn with matplotlib)")


def new_figure(width: float = 4.0, height: float = 2.8):
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global state)."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def img(fig, alt: str) -> str:
    """The figure as an inline base64 PNG <img>."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    width, height = (CSS_PX_PER_INCH * s for s in fig.get_size_inches())
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" width="{width:.0f}" height="{height:.0f}" alt="{esc(alt)}">'


def gallery(images: list[str]) -> str:
    images = [i for i in images if i]
    return f'<div class="plots">{"".join(images)}</div>' if images else ""


def line_plot(title: str, ylabel: str, series: list[tuple[str, list, list]], xlabel: str = "step") -> str:
    """One panel, a line per (label, xs, ys) series; "" when no series has a point. A series keeps
    its colour by its place in ``series`` (empty ones too), so a run looks the same in every panel."""
    drawn = [(f"C{i % 10}", label, xs, ys) for i, (label, xs, ys) in enumerate(series) if xs]
    if not drawn:
        return ""
    fig = new_figure()
    ax = fig.add_subplot()
    for color, label, xs, ys in drawn:
        ax.plot(xs, ys, color=color, label=label, linewidth=1.4, marker="o" if len(xs) <= 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    _scale_y(ax, [y for _, _, _, ys in drawn for y in ys])
    if 1 < len(series) and len(drawn) <= MAX_LEGEND:
        ax.legend(fontsize=7, loc="best")
    return img(fig, f"{title}: {', '.join(label for _, label, _, _ in drawn)}")


def _scale_y(ax, values: list[float]) -> None:
    """A log axis when positive values span more than 10x (a diverging trial, a loss from its start), else plain."""
    if values and min(values) > 0 and max(values) > 10 * min(values):
        from matplotlib.ticker import LogFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())  # 2, 5, 10, 20 rather than 2×10⁰
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)


def xy(records: list[dict], key: str, scale: float = 1.0) -> tuple[list, list]:
    """Steps and values of ``key`` where it is a finite number."""
    pairs = [(r["step"], scale * r[key]) for r in records if _number(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# --------------------------------------------------------------------------- curves (one run or overlaid)


def curves_html(runs: list[tuple[str, list[dict]]]) -> str:
    """Training loss, learning rate, throughput, MFU and gradient norm: a panel each, a line per run."""
    return gallery(
        [
            line_plot(title, ylabel, [(name, *xy(records, key, scale)) for name, records in runs])
            for key, title, ylabel, scale in TRAIN_PANELS
        ]
    )


def validation_html(runs: list[tuple[str, list[dict]]]) -> str:
    return gallery(validation_plots(runs))


def validation_plots(runs: list[tuple[str, list[dict]]]) -> list[str]:
    """One panel per validation metric, a line per run."""
    keys = _ordered(
        k for _, records in runs for r in records for k in r if k not in ("step", "split", "time") and _number(r[k])
    )
    return [
        line_plot(f"validation {NICE.get(k, k)}", k, [(name, *xy(records, k)) for name, records in runs]) for k in keys
    ]


def curves_section(run: RunData) -> str:
    return curves_html([(run.name, run.train)])


def validation_section(run: RunData) -> str:
    return validation_html([(run.name, run.val)])


def _child_runs(parent: Path, dirs: list[tuple[str, str | None, str]]) -> list[tuple[str, list, list]]:
    """(label, train, val) of child runs given as (label, recorded path, name under ``parent``)."""
    out = []
    for label, recorded, fallback in dirs:
        for candidate in ([Path(recorded)] if recorded else []) + [parent / fallback]:
            if (candidate / "metrics.jsonl").is_file():
                out.append((label, *read_metrics(candidate / "metrics.jsonl")))
                break
    return out


# --------------------------------------------------------------------------- header and sections


def header_html(run: RunData, level: int = 1) -> str:
    """Name, what the directory holds, model, size, task, steps, final metrics, notes, the recipe."""
    title = f"ember report: {run.name}" if level == 1 else run.name
    parts = [
        f"<h{level}>{esc(title)}</h{level}>",
        f'<p class="muted">{esc(run.path.resolve())}</p>',
        table(None, [[k, v if isinstance(v, str) else fmt(v)] for k, v in summary_rows(run)], cls="summary"),
    ]
    source, final = final_metrics(run)
    if final and source != "best trial":  # a tune directory's best is in its summary rows
        keys = [k for k in _ordered(final) if k in HEADLINE] or _ordered(final)
        parts.append(
            f'<p class="muted">{esc(source)}</p>' + table(keys, [[final[k] for k in keys]], cls="final-metrics")
        )
    parts += [f'<p class="note">{esc(note)}</p>' for note in run.notes]
    if run.recipe:
        parts.append(f"<details><summary>recipe</summary><pre>{esc(run.recipe)}</pre></details>")
    return "".join(parts)


def summary_rows(run: RunData) -> list[list]:
    info, data = run.info, run.info.get("data", {})
    held = dict.fromkeys(m for m in (*MARKERS, *JSON_FILES.values()) if (run.path / m).is_file())
    rows = [["holds", ", ".join([*held, *(name for name, _ in run.ensembles)])]]
    if "model" in info:
        config = ", ".join(f"{k} {v}" for k, v in info["model"].items() if k != "name")
        rows.append(["model", f"{info['model'].get('name', '?')} ({config})"])
    rows += [
        [label, info[key]]
        for key, label in (("params", "parameters"), ("flops_per_item", "training FLOPs per item"))
        if key in info
    ]
    if data.get("task"):
        sizes = [
            f"{data[k]} {what}"
            for k, what in (("num_classes", "classes"), ("vocab_size", "tokens in the vocabulary"))
            if data.get(k)
        ]
        rows.append(["task", ", ".join([data["task"], *sizes])])
    steps = info.get("step", run.train[-1]["step"] if run.train else None)
    if steps is not None:
        rows.append(["steps", steps if "step" in info else f"{steps} (no model.json: unfinished?)"])
    if memory := peak_memory_text(run.train):
        rows.append(["peak memory", memory])
    for key in ("objective", "quantization", "pruning"):
        if isinstance(info.get(key), dict):
            entry = info[key]
            rows.append([key, ", ".join(f"{k} {fmt(v)}" for k, v in entry.items() if not isinstance(v, (list, dict)))])
    if info.get("soup_of"):
        rows.append(["weight soup of", ", ".join(info["soup_of"])])
    return rows + search_and_cv_rows(run)


def peak_memory_text(records: list[dict]) -> str:
    """'812 MiB CPU RSS, 5,120 MiB CUDA allocated': the largest figures of the log lines ("" if none has one)."""
    parts = []
    for key, what in (("peak_rss_mb", "CPU RSS"), ("cuda_peak_mb", "CUDA allocated")):
        values = [r[key] for r in records if _number(r.get(key))]
        if values:
            parts.append(f"{max(values):,.0f} MiB {what}")
    return ", ".join(parts)


def search_and_cv_rows(run: RunData) -> list[list]:
    """What a tune or cv directory is, in a line each."""
    rows = []
    if tune := run.files.get("tune"):
        best = tune.get("best") or {}
        rows.append(
            [
                "search",
                f"study {tune.get('study', '?')}, {len(tune.get('trials', []))} trial(s), "
                f"{tune.get('metric', '?')} ({tune.get('direction', '?')})",
            ]
        )
        if best:
            rows.append(
                [
                    "best trial",
                    f"trial {best.get('trial')}: {tune.get('metric', 'value')} {fmt(best.get('value'))}, "
                    + ", ".join(f"{k} {fmt(v)}" for k, v in (best.get("params") or {}).items()),
                ]
            )
    if cv := run.files.get("cv"):
        rows.append(
            ["cross-validation", f"{cv.get('folds', '?')} folds{' (stratified)' if cv.get('stratified') else ''}"]
        )
    return rows


def final_metrics(run: RunData) -> tuple[str, dict]:
    """(where from, the run's final metrics): model.json's, else the last validation, else the
    mean over cv folds, else the best trial's; ("", {}) when there are none."""
    if isinstance(run.info.get("metrics"), dict) and run.info["metrics"]:
        return "final validation metrics", run.info["metrics"]
    if run.val:
        last = run.val[-1]
        return f"last validation (step {last['step']})", {
            k: v for k, v in last.items() if k not in ("step", "split", "time")
        }
    if "cv" in run.files:
        return "mean over the folds", {k: s.get("mean") for k, s in run.files["cv"].get("summary", {}).items()}
    best = run.files.get("tune", {}).get("best")
    return ("best trial", {run.files["tune"].get("metric", "value"): best.get("value")}) if best else ("", {})


def evaluation_section(run: RunData) -> str:
    """eval.json: its metrics, and the per-class table of a classifier."""
    ev = run.files.get("eval")
    if not ev or not isinstance(ev.get("metrics"), dict):
        return ""
    metrics = table(["metric", "value"], [[k, ev["metrics"][k]] for k in _ordered(ev["metrics"])], cls="eval-metrics")
    per_class = ""
    if ev.get("per_class"):
        keys = ("class", "name") if any("name" in c for c in ev["per_class"]) else ("class",)
        rows = [[c.get(k) for k in (*keys, "precision", "recall", "f1", "support")] for c in ev["per_class"]]
        per_class = table([*keys, "precision", "recall", "F1", "support"], rows, cls="per-class")
    return (
        f"<p>split <b>{esc(ev.get('split', '?'))}</b>, {esc(fmt(ev.get('samples')))} samples</p>"
        f'<div class="tables">{metrics}{per_class}</div>'
    )


def confusion_section(run: RunData) -> str:
    """Heatmap with counts of eval.json's confusion matrix (rows: true class), and the counts as a table."""
    matrix = run.files.get("eval", {}).get("confusion_matrix")
    if not matrix:
        return ""
    labels = class_labels(run.files["eval"], len(matrix))
    head = ["true \\ predicted", *labels]
    counts = table(head, [[label, *row] for label, row in zip(labels, matrix)], cls="confusion-counts")
    split = run.files["eval"].get("split", "?")
    named = labels if labels != [str(i) for i in range(len(matrix))] else None
    return (
        f"<p>on the {esc(split)} split; rows: true class, columns: predicted class</p>"
        + gallery([confusion_plot(matrix, f"confusion matrix of {run.name} ({split})", named)])
        + f"<details><summary>counts</summary>{counts}</details>"
    )


def class_labels(ev: dict, n: int) -> list[str]:
    """The classes' names from eval.json's per-class rows, where it has them; else their numbers."""
    names = {c.get("class"): c["name"] for c in ev.get("per_class") or [] if "name" in c}
    return [str(names.get(i, i)) for i in range(n)]


def confusion_plot(matrix: list[list[int]], alt: str, names: list[str] | None = None) -> str:
    import numpy as np

    m = np.asarray(matrix)
    n = len(m)
    side = min(9.0, max(3.4, 0.38 * n + 1.2))
    fig = new_figure(side + 0.9, side)
    ax = fig.add_subplot()
    image = ax.imshow(m, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.85)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        if names:
            short = [name if len(name) <= 14 else name[:13] + "…" for name in names]
            ax.set_xticklabels(short, rotation=45, ha="right", fontsize=8)
            ax.set_yticklabels(short, fontsize=8)
    if n <= 20:
        top = m.max() or 1
        for (i, j), v in np.ndenumerate(m):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                fontsize=8 if n <= 12 else 6,
                color="white" if v > top / 2 else "black",
            )
    return img(fig, alt)


def search_section(run: RunData) -> str:
    """tune.json: objective per trial with the best so far, the ranked trials, importances, trial curves."""
    tune = run.files.get("tune")
    if not tune or not tune.get("trials"):
        return ""
    metric, trials = tune.get("metric", "value"), tune["trials"]
    keys = list(dict.fromkeys(k for t in trials for k in (t.get("params") or {})))
    best = tune.get("best") or {}
    rows = [
        [
            i + 1,
            t.get("trial"),
            t.get("state"),
            t.get("value"),
            t.get("steps"),
            *((t.get("params") or {}).get(k) for k in keys),
        ]
        for i, t in enumerate(trials)
    ]
    best_row = next((i for i, t in enumerate(trials) if best and t.get("trial") == best.get("trial")), -1)
    better = "lower" if tune.get("direction", "min") == "min" else "higher"
    parts = [
        f"<p>study {esc(tune.get('study', '?'))}: {len(trials)} trial(s), {esc(metric)} ({better} is better)"
        + (f"; best: trial {esc(best.get('trial'))}, {esc(fmt(best.get('value')))}" if best else "")
        + "</p>"
    ]
    trial_runs = _child_runs(
        run.path,
        [
            (f"trial {t.get('trial')}", t.get("run_dir"), f"trials/{Path(t.get('run_dir') or '').name}")
            for t in sorted(trials, key=lambda t: str(t.get("trial")).zfill(9))
        ],
    )
    parts.append(
        gallery(
            [
                search_plot(trials, metric, tune.get("direction", "min")),
                line_plot(
                    f"validation {metric} per trial",
                    metric,
                    [(label, *xy(val, metric)) for label, _, val in trial_runs],
                ),
            ]
        )
    )
    parts.append(table(["rank", "trial", "state", metric, "steps", *keys], rows, cls="trials", best=best_row))
    if tune.get("importances"):
        parts.append(
            table(["parameter", "importance"], [[k, v] for k, v in tune["importances"].items()], cls="importances")
        )
    return "".join(parts)


def search_plot(trials: list[dict], metric: str, direction: str) -> str:
    """Each trial's value (pruned ones at their last report) by trial number, and the best so far."""
    done = sorted(
        (t["trial"], t["value"], t.get("state")) for t in trials if _number(t.get("trial")) and _number(t.get("value"))
    )
    if not done:
        return ""
    fig = new_figure(5.6, 3.4)
    ax = fig.add_subplot()
    for state, label, marker, color in (
        ("complete", "complete", "o", "C0"),
        ("pruned", "pruned (last report)", "x", "0.5"),
    ):
        points = [(n, v) for n, v, s in done if s == state]
        if points:
            ax.scatter(*zip(*points), marker=marker, color=color, label=label, zorder=3)
    pick, best, steps = (min if direction == "min" else max), None, []
    for n, v, s in done:
        if s == "complete":
            best = v if best is None else pick(best, v)
        if best is not None:
            steps.append((n, best))
    if steps:
        ax.step(*zip(*steps), where="post", color="C3", label="best so far")
    ax.set(title=f"search history: {metric}", xlabel="trial", ylabel=metric)
    _scale_y(ax, [v for _, v, _ in done])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return img(fig, f"search history: {metric} per trial and best so far")


def cv_section(run: RunData) -> str:
    """cv.json: the headline metrics per fold, their mean ± std, all metrics summarised, fold curves."""
    cv = run.files.get("cv")
    if not cv or not cv.get("fold_metrics"):
        return ""
    summary, folds = cv.get("summary", {}), cv["fold_metrics"]
    keys = [k for k in _ordered(summary) if k in HEADLINE] or _ordered(summary)
    samples = cv.get("fold_samples") or [None] * len(folds)
    rows = [[i, n, *(m.get(k) for k in keys)] for i, (m, n) in enumerate(zip(folds, samples))]
    rows.append(["mean ± std", None, *(f"{fmt(summary[k].get('mean'))} ± {fmt(summary[k].get('std'))}" for k in keys)])
    parts = [
        f"<p>{esc(cv.get('folds', len(folds)))}-fold cross-validation"
        f"{' (stratified)' if cv.get('stratified') else ''}; std with ddof = 1</p>",
        table(["fold", "samples", *keys], rows, cls="cv-folds"),
    ]
    every = [[k, s.get("mean"), s.get("std"), s.get("min"), s.get("max")] for k, s in summary.items()]
    every_table = table(["metric", "mean", "std", "min", "max"], every, cls="cv-summary")
    parts.append(f"<details><summary>every metric</summary>{every_table}</details>")
    fold_runs = _child_runs(run.path, [(f"fold {i}", None, f"fold_{i}") for i in range(len(folds))])
    if fold_runs:
        parts.append(
            gallery(
                [
                    line_plot("training loss per fold", "loss", [(f, *xy(t, "loss")) for f, t, _ in fold_runs]),
                    *validation_plots([(f, v) for f, _, v in fold_runs]),
                ]
            )
        )
    return "".join(parts)


def compression_section(run: RunData) -> str:
    """The trade-off rows (prune.json's, or the source's and this run's compress.json), and pruning rounds."""
    prune = run.files.get("prune", {})
    rows = [r for r in prune.get("rows", []) if isinstance(r, dict)]
    if not rows and "compress" in run.files:
        rows = [r for r in (_source_row(run), run.files["compress"]) if r]
    if not rows:
        return ""
    parts = [trade_off_table(rows)]
    if prune.get("rounds"):
        keys = ("round", "amount", "sparsity", "nonzero", "params", "structured")
        parts.append(table(list(keys), [[r.get(k) for k in keys] for r in prune["rounds"]], cls="prune-rounds"))
    return "".join(parts)


def _source_row(run: RunData) -> dict | None:
    """The compress.json row of the run this one was quantised or pruned from, when it is there."""
    entry = run.info.get("quantization") or run.info.get("pruning") or {}
    source = Path(entry["source"]) / "compress.json" if entry.get("source") else None
    return _read_json(source, []) if source is not None else None


def trade_off_table(rows: list[dict]) -> str:
    """``ember compare``'s table: size, speed and quality, each relative to the first row."""
    base, out = rows[0], []
    for r in rows:
        size = r.get("bytes", 0) / base["bytes"] if base.get("bytes") and _number(r.get("bytes")) else None
        out.append(
            [
                r.get("name"),
                r.get("method"),
                r.get("params"),
                r.get("nonzero", r.get("params")),
                r["bytes"] / 1e6 if _number(r.get("bytes")) else None,
                r.get("ms_per_batch"),
                f"{r.get('metric', '')} {fmt(r.get('quality'))}",
                f"{size:.2f}x" if size else None,
                _speed_cell(r, base),
            ]
        )
    shown = sorted(
        {
            f"batch {r.get('batch_size')}, {r.get('threads')} thread(s), {r.get('samples')} {r.get('split')} samples"
            for r in rows
        }
    )
    return (
        table(
            ["run", "method", "params", "nonzero", "MB", "ms/batch", "quality", "size", "speed"], out, cls="trade-off"
        )
        + f'<p class="muted">size and speed relative to the first row; {esc("; ".join(shown))}</p>'
    )


def _speed_cell(row: dict, base: dict) -> str | None:
    """The row's speed against the first: per-round ratios with their range when the two were timed together
    (``ember compare``'s interleaved rounds), "no measurable difference" where the rounds disagree."""
    if row is base:
        return "1.00x"
    ms, base_ms = row.get("round_ms"), base.get("round_ms")
    together = (
        row.get("timed_with")
        and row.get("timed_with") == base.get("timed_with")
        and isinstance(ms, list)
        and isinstance(base_ms, list)
        and len(ms) == len(base_ms) > 0
        and all(_number(v) and v > 0 for v in ms + base_ms)
    )
    if together:
        return speed_ratio(base_ms, ms).describe()
    fast = _number(base.get("ms_per_batch")) and _number(row.get("ms_per_batch")) and row["ms_per_batch"] > 0
    return f"{base['ms_per_batch'] / row['ms_per_batch']:.2f}x (timed apart)" if fast else None


def continual_section(run: RunData) -> str:
    """continual.json: the metric before and after on the old and the new data, gain and forgetting."""
    c = run.files.get("continual")
    if not c or not c.get("metric"):
        return ""
    m = c["metric"]
    rows = [[when, c.get(f"{when}_old", {}).get(m), c.get(f"{when}_new", {}).get(m)] for when in ("before", "after")]
    return (
        table(["", f"old data {m}", f"new data {m}"], rows, cls="continual")
        + f"<p>gain on the new data <b>{esc(fmt(c.get('gain')))}</b>, forgetting of the old "
        f"<b>{esc(fmt(c.get('forgetting')))}</b> (replay {esc(fmt(c.get('replay')))}, ewc {esc(fmt(c.get('ewc')))}, "
        f"{esc(fmt(c.get('steps')))} steps from {esc(c.get('source', '?'))})</p>"
    )


def probe_section(run: RunData) -> str:
    """probe.json: a linear probe's accuracy and loss on the trained encoder's features and on a random one's."""
    p = run.files.get("probe")
    if not p or not any(isinstance(p.get(k), dict) for k in ("trained", "random_init")):
        return ""
    rows = [
        [label, (p.get(k) or {}).get("accuracy"), (p.get(k) or {}).get("loss")]
        for k, label in (("trained", "trained encoder"), ("random_init", "random initialisation"))
        if k in p
    ]
    return (
        table(["features of", "accuracy", "loss"], rows, cls="probe")
        + f'<p class="muted">a logistic regression on {esc(fmt(p.get("features")))} frozen features, fitted on '
        f"{esc(fmt(p.get('train_samples')))} training samples, scored on {esc(fmt(p.get('eval_samples')))} "
        f"{esc(p.get('split', '?'))} samples</p>"
    )


def ensemble_section(run: RunData) -> str:
    """Each ensemble-*.json in the directory: members and the ensemble side by side."""
    parts = []
    for filename, e in run.ensembles:
        members = [m for m in e.get("members", []) if isinstance(m, dict)]
        ours = e.get("ensemble", {}).get("metrics", {})
        keys = [k for k in HEADLINE if k in ours or any(k in m.get("metrics", {}) for m in members)]
        rows = [[m.get("run"), *(m.get("metrics", {}).get(k) for k in keys)] for m in members]
        rows.append([f"ensemble ({e.get('method', '?')})", *(ours.get(k) for k in keys)])
        parts.append(
            f"<p><b>{esc(filename)}</b>: {len(members)} runs, split {esc(e.get('split', '?'))}, "
            f"{esc(fmt(e.get('samples')))} samples</p>"
            + table(["run", *keys], rows, cls="ensemble", best=len(rows) - 1)
        )
    return "".join(parts)


def profile_section(run: RunData) -> str:
    """Links to RUN/profile's traces (Perfetto, chrome://tracing, TensorBoard's profiler plugin) and
    memory snapshots (pytorch.org/memory_viz): named and sized, never opened (a snapshot is a pickle)."""
    import os

    rows = []
    for file in sorted((run.path / "profile").glob("*")):
        if not file.is_file():
            continue
        if file.name.endswith((".pt.trace.json", ".pt.trace.json.gz")):
            worker, _, rest = file.name.partition(".")
            first = rest.split(".")[0]
            what = f"trace of {worker}" + (f" from step {first}" if first.isdigit() else "")
        elif file.suffix == ".pickle":
            what = "memory snapshot " + ("at out-of-memory" if file.name.startswith("oom_") else "at the trace's end")
        else:
            continue
        href = Path(os.path.relpath(file.resolve(), run.page_dir.resolve())).as_posix()
        link = f'<a href="{esc(href)}">{esc(file.name)}</a>'
        rows.append([link, what, f"{file.stat().st_size / 1e6:.2f} MB"])
    if not rows:
        return ""
    body = "".join(f"<tr><td>{a}</td><td>{esc(b)}</td><td class='num'>{esc(c)}</td></tr>" for a, b, c in rows)
    return (
        f"<table class='profiles'><tr><th>file</th><th>what</th><th>size</th></tr>{body}</table>"
        '<p class="muted">Open a trace in Perfetto (ui.perfetto.dev, "Open trace file") or chrome://tracing, '
        "or run <code>tensorboard --logdir RUN/profile</code> with the torch-tb-profiler plugin; a memory "
        "snapshot at pytorch.org/memory_viz.</p>"
    )


# Every per-run section in page order: id, heading, function (HTML body, or "" without data).
SECTIONS: tuple[tuple[str, str, Callable[[RunData], str]], ...] = (
    ("curves", "Training curves", curves_section),
    ("validation", "Validation metrics", validation_section),
    ("evaluation", "Evaluation", evaluation_section),
    ("confusion", "Confusion matrix", confusion_section),
    ("search", "Search history", search_section),
    ("cv", "Cross-validation", cv_section),
    ("compression", "Compression", compression_section),
    ("continual", "Continual training", continual_section),
    ("probe", "Linear probe", probe_section),
    ("ensemble", "Ensembles", ensemble_section),
    ("profiles", "Profiles", profile_section),
)
OVERLAID = ("curves", "validation")  # drawn once for all runs on a comparison page


# --------------------------------------------------------------------------- pages


def section(slug: str, title: str, body: str, level: int = 2, prefix: str = "") -> str:
    """A section of the page, or "" when ``body`` is empty (no data, no section)."""
    if not body:
        return ""
    return f'<section id="{esc(prefix + slug)}" class="{esc(slug)}"><h{level}>{esc(title)}</h{level}>{body}</section>'


def page(title: str, body: str) -> str:
    from ember import __version__

    stamp = time.strftime("%Y-%m-%d %H:%M")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body>{body}"
        f"<footer><p>written by ember {esc(__version__)}, {esc(stamp)}</p></footer></body></html>\n"
    )


def single_page(run: RunData) -> str:
    """One run: its header, then every section it has data for."""
    body = header_html(run) + "".join(section(slug, title, fn(run)) for slug, title, fn in SECTIONS)
    return page(f"ember report: {run.name}", body)


def compare_page(runs: list[RunData]) -> str:
    """Several runs: final metrics side by side, curves overlaid, then each run's own sections."""
    named = [(r.name, r) for r in runs]
    parts = [
        f"<h1>ember report: {len(runs)} runs</h1>",
        f'<p class="muted">{esc(", ".join(n for n, _ in named))}</p>',
        section("comparison", "Final metrics", comparison_table(runs)),
        section("curves", "Training curves", curves_html([(n, r.train) for n, r in named])),
        section("validation", "Validation metrics", validation_html([(n, r.val) for n, r in named])),
    ]
    for i, run in enumerate(runs):
        body = "".join(
            section(slug, title, fn(run), level=3, prefix=f"run{i}-")
            for slug, title, fn in SECTIONS
            if slug not in OVERLAID
        )
        parts.append(f'<section class="run" id="run{i}">{header_html(run, level=2)}{body}</section>')
    return page(f"ember report: {', '.join(n for n, _ in named)}", "".join(parts))


def comparison_table(runs: list[RunData]) -> str:
    """One row per run: model, parameters, task, steps and the final metrics."""
    finals = [final_metrics(r)[1] for r in runs]
    keys = _ordered(k for f in finals for k in f)
    rows = [
        [
            r.name,
            r.info.get("model", {}).get("name"),
            r.info.get("params"),
            r.info.get("data", {}).get("task"),
            r.info.get("step", r.train[-1]["step"] if r.train else None),
            *(f.get(k) for k in keys),
        ]
        for r, f in zip(runs, finals)
    ]
    return table(["run", "model", "params", "task", "steps", *keys], rows, cls="comparison")
