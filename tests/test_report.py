"""ember report: the page holds every section its run has data for and no other; plots are inline
PNGs; several runs share one page; a tune or cv directory is a run too; it renders in a browser."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

import ember
from conftest import tiny_recipe
from ember.cli import main
from ember.compress.prune import prune
from ember.data.build import build_data
from ember.errors import EmberError
from ember.eval.crossval import cross_validate
from ember.eval.ensemble import ensemble
from ember.reporting import report
from ember.search import load_space, tune
from ember.training.loop import train

CHROMIUM = Path("/usr/bin/chromium")
CNN_STEPS = ("train.max_steps=8", "train.eval_every=4", "train.log_every=2")


class Page(HTMLParser):
    """The sections of a report page by id: their images (attributes) and text; nested sections count
    for every enclosing one."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.open: list[str] = []
        self.sections: dict[str, dict] = {}
        self.images: list[dict] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.open.append(attrs["id"])
            self.sections[attrs["id"]] = {"images": [], "text": []}
        if tag == "img":
            self.images.append(attrs)
            for sid in self.open:
                self.sections[sid]["images"].append(attrs)

    def handle_endtag(self, tag):
        if tag == "section":
            self.open.pop()

    def handle_data(self, data):
        self.text.append(data)
        for sid in self.open:
            self.sections[sid]["text"].append(data)

    def alts(self, sid: str) -> list[str]:
        return [i["alt"] for i in self.sections[sid]["images"]]

    def said(self, sid: str) -> str:
        return " ".join(self.sections[sid]["text"])


def read_page(path: Path) -> tuple[str, Page]:
    text = path.read_text()
    return text, Page(text)


def assert_self_contained(text: str, page: Page) -> None:
    assert "<script" not in text and "<link" not in text and "url(" not in text
    assert page.images
    for image in page.images:
        assert image["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(image["src"].split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
        assert int(image["width"]) > 200 and image["alt"]


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cnn") / "cnn"
    train(tiny_recipe("cnn", *CNN_STEPS), run)
    return run


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gpt") / "gpt"
    train(tiny_recipe("gpt", "train.max_steps=6", "train.eval_every=3", "train.log_every=2"), run)
    return run


def test_a_classifier_page_holds_every_section_it_has_data_for(cnn_run, tmp_path):
    run = copy_run(cnn_run, tmp_path / "cnn")
    path = report([run])
    assert path == run / "report.html"
    text, page = read_page(path)
    assert set(page.sections) == {"curves", "validation", "evaluation", "confusion"}
    assert page.alts("curves") == [
        "training loss: cnn",
        "learning rate: cnn",
        "throughput (samples/s): cnn",
        "model FLOPs utilisation: cnn",
        "gradient norm: cnn",
    ]
    assert page.alts("validation") == ["validation loss: cnn", "validation accuracy: cnn"]
    assert len(page.alts("confusion")) == 1
    assert_self_contained(text, page)
    info = json.loads((run / "model.json").read_text())
    assert f"{info['params']:,}" in " ".join(page.text) and "classify, 10 classes" in " ".join(page.text)

    # The confusion matrix: ember eval's, on the whole validation split, written as ember eval writes it.
    saved = json.loads((run / "eval.json").read_text())
    counts = re.search(r'<table class="confusion-counts">(.*?)</table>', text, re.S).group(1)
    cells = [int(n.replace(",", "")) for n in re.findall(r'<td class="num">([\d,]+)</td>', counts)]
    assert len(cells) == 100 and sum(cells) == saved["samples"] == sum(map(sum, saved["confusion_matrix"]))
    recipe = tiny_recipe("cnn", *CNN_STEPS)
    assert saved["samples"] == build_data(recipe.data, 8, 8, seed=0).val.num_samples


def test_a_language_model_page_has_no_confusion_matrix(gpt_run, tmp_path):
    path = report([gpt_run], out=tmp_path / "gpt.html")
    text, page = read_page(path)
    assert set(page.sections) == {"curves", "validation"}
    assert "throughput (tokens/s): gpt" in page.alts("curves")
    assert page.alts("validation") == [
        "validation loss: gpt",
        "validation accuracy: gpt",
        "validation perplexity: gpt",
        "validation bits per byte: gpt",
    ]
    assert not (gpt_run / "eval.json").exists()  # nothing to evaluate for: nothing written
    assert_self_contained(text, page)


def test_no_eval_leaves_the_confusion_matrix_out_and_eval_json_is_read_when_fresh(cnn_run, tmp_path):
    run = copy_run(cnn_run, tmp_path / "cnn")
    text, page = read_page(report([run], evaluate=False))
    assert set(page.sections) == {"curves", "validation"}
    assert "Confusion matrix left out (--no-eval)" in text and not (run / "eval.json").exists()

    matrix = [[3 if i == j else (1 if j == (i + 1) % 10 else 0) for j in range(10)] for i in range(10)]
    (run / "eval.json").write_text(
        json.dumps(
            {
                "run": str(run),
                "split": "test",
                "task": "classify",
                "samples": 40,
                "metrics": {"accuracy": 0.75},
                "confusion_matrix": matrix,
            }
        )
    )
    text, page = read_page(report([run], evaluate=False))
    assert {"evaluation", "confusion"} <= set(page.sections) and "on the test split" in page.said("confusion")
    counts = re.search(r'<table class="confusion-counts">(.*?)</table>', text, re.S).group(1)
    assert sum(int(n) for n in re.findall(r'<td class="num">(\d+)</td>', counts)) == 40

    later = (run / "eval.json").stat().st_mtime + 10  # the model changed after the evaluation
    os.utime(run / "model.safetensors", (later, later))
    text, page = read_page(report([run], evaluate=False))
    assert "confusion" not in page.sections and "eval.json is older than model.safetensors" in text


def test_a_tune_directory_shows_its_search_history(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": {"type": "categorical", "choices": [0.002, 0.05]}}))
    recipe = tiny_recipe("cnn", "train.max_steps=4", "train.eval_every=2", "eval.max_batches=1")
    tune(recipe, load_space(space), sampler="grid", trials=2, run_dir=tmp_path / "tune", pruner="none")
    text, page = read_page(report([tmp_path / "tune"]))
    assert set(page.sections) == {"search"}  # no training log of its own
    assert page.alts("search") == [
        "search history: loss per trial and best so far",
        "validation loss per trial: trial 0, trial 1",
    ]
    rows = re.search(r'<table class="trials">(.*?)</table>', text, re.S).group(1)
    assert rows.count("<tr") == 3 and rows.count('class="best"') == 1 and "optim.lr" in rows
    assert "ember report: tune" in text and "tune.json" in " ".join(page.text)


def test_a_cv_directory_shows_folds_mean_and_std_and_its_ensemble(tmp_path):
    recipe = tiny_recipe("cnn", "train.max_steps=3", "data.test_fraction=0.1", "eval.max_batches=1")
    cv = cross_validate(recipe, folds=2, run_dir=tmp_path / "cv")
    ensemble([tmp_path / "cv" / "fold_0", tmp_path / "cv" / "fold_1"], method="mean", split="test", max_batches=2)
    text, page = read_page(report([tmp_path / "cv"]))
    assert set(page.sections) == {"cv", "ensemble"}
    table = re.search(r'<table class="cv-folds">(.*?)</table>', text, re.S).group(1)
    mean, std = cv.summary["accuracy"]["mean"], cv.summary["accuracy"]["std"]
    assert table.count("<tr") == 4 and f"{mean:.4f} ± {std:.4f}" in table  # header, 2 folds, mean ± std
    assert "training loss per fold: fold 0, fold 1" in page.alts("cv")
    assert "ensemble (mean)" in page.said("ensemble") and "ensemble-mean.json" in page.said("ensemble")


def test_compression_continual_and_probe_sections(cnn_run, tmp_path):
    source = copy_run(cnn_run, tmp_path / "cnn")  # measuring it writes its compress.json and eval.json
    pruned = prune(source, 0.5, out=tmp_path / "pruned", max_batches=1, say=lambda text: None).run
    text, page = read_page(report([pruned], evaluate=False))
    assert set(page.sections) == {"compression", "evaluation", "confusion"}  # no training log; measuring evaluated it
    trade = re.search(r'<table class="trade-off">(.*?)</table>', text, re.S).group(1)
    assert trade.count("<tr") == 3 and "l1-unstructured 50%" in trade  # header, source, pruned
    assert "prune-rounds" in text and "pruning" in " ".join(page.text)

    run = copy_run(cnn_run, tmp_path / "continued")
    before, after = {"accuracy": 0.99, "loss": 0.05}, {"accuracy": 0.60, "loss": 1.2}
    (run / "continual.json").write_text(
        json.dumps(
            {
                "run": str(run),
                "source": "runs/old",
                "metric": "accuracy",
                "replay": 0.2,
                "ewc": 0.0,
                "steps": 8,
                "before_old": before,
                "before_new": {"accuracy": 0.0},
                "after_old": after,
                "after_new": {"accuracy": 0.97},
                "gain": 0.97,
                "forgetting": 0.39,
            }
        )
    )
    (run / "probe.json").write_text(
        json.dumps(
            {
                "split": "val",
                "trained": {"accuracy": 0.91, "loss": 0.3},
                "random_init": {"accuracy": 0.55, "loss": 1.4},
                "train_samples": 1437,
                "eval_samples": 180,
                "features": 16,
            }
        )
    )
    text, page = read_page(report([run], evaluate=False))
    assert {"continual", "probe"} <= set(page.sections) and "compression" not in page.sections
    assert "0.3900" in page.said("continual") and "runs/old" in page.said("continual")
    assert (
        "0.9100" in page.said("probe") and "0.5500" in page.said("probe") and "16 frozen features" in page.said("probe")
    )


def test_several_runs_share_one_page_with_curves_overlaid(cnn_run, gpt_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = report([cnn_run, gpt_run], evaluate=False)
    assert path == Path("report.html")
    text, page = read_page(tmp_path / "report.html")
    comparison = re.search(r'<table class="comparison">(.*?)</table>', text, re.S).group(1)
    assert comparison.count("<tr") == 3 and "<td>cnn</td>" in comparison and "<td>gpt</td>" in comparison
    assert "ppl" in comparison and "accuracy" in comparison  # the union of both runs' final metrics
    alts = page.alts("curves")  # one panel per quantity, both runs in it; each throughput unit its own panel
    assert "training loss: cnn, gpt" in alts and "learning rate: cnn, gpt" in alts and len(alts) == 6
    assert "validation loss: cnn, gpt" in page.alts("validation")
    assert {"run0", "run1"} <= set(page.sections) and "run0-curves" not in page.sections
    assert "Confusion matrix left out" in page.said("run0") and "Confusion matrix" not in page.said("run1")
    assert_self_contained(text, page)


def test_user_mistakes_are_one_paragraph_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for path, why in (
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "holds no metrics.jsonl"),
        (tmp_path / "file.txt", "is not a directory"),
    ):
        with pytest.raises(EmberError, match=why):
            report([path])
    with pytest.raises(EmberError, match="at least one run"):
        report([])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1, "mfu": null}\n{"step": 2, "lo')
    with pytest.raises(EmberError, match="Create it first"):
        report([tmp_path / "run"], out=tmp_path / "nowhere" / "r.html")
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ember: error:") and "nothing to report on" in err and "Traceback" not in err
    # An unfinished run (a log, no model yet) still reports its curves; a cut-off last line is skipped.
    _, page = read_page(report([tmp_path / "run"], out=tmp_path))
    assert set(page.sections) == {"curves"} and page.alts("curves") == ["training loss: run", "learning rate: run"]


def test_report_command_and_library_function(cnn_run, tmp_path, capsys):
    run = copy_run(cnn_run, tmp_path / "cnn")
    assert main(["report", str(run), "--no-eval", "--out", str(tmp_path / "r.html")]) == 0
    assert str(tmp_path / "r.html") in capsys.readouterr().out and (tmp_path / "r.html").is_file()
    assert ember.report([run], evaluate=False) == run / "report.html"
    assert ember.report([run], evaluate=False) == run / "report.html"  # still the function, not a module


@pytest.mark.slow
def test_the_page_renders_in_a_headless_browser(cnn_run, gpt_run, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")
    run = copy_run(cnn_run, tmp_path / "cnn")
    for path in (report([run]), report([run, gpt_run], out=tmp_path / "both.html", evaluate=False)):
        text, page = read_page(path)
        # A copy with a checker: after loading, it writes how many images decoded (naturalWidth > 0) and the headings.
        probe = (
            '<script>window.addEventListener("load", () => { const ok = [...document.images].filter('
            'i => i.complete && i.naturalWidth > 0).length; const p = document.createElement("p"); '
            'p.id = "checked"; p.textContent = `decoded ${ok} of ${document.images.length}; ` + '
            '[...document.querySelectorAll("section > h2, section > h3")].map(h => h.textContent).join("|"); '
            "document.body.appendChild(p); });</script>"
        )
        checked = tmp_path / f"checked-{path.name}"
        checked.write_text(text.replace("</body>", probe + "</body>"))
        dom = browser(tmp_path, "--dump-dom", f"file://{checked}").stdout
        found = re.search(r'<p id="checked">decoded (\d+) of (\d+); ([^<]*)</p>', dom)
        assert found, dom[-2000:]
        assert int(found.group(1)) == int(found.group(2)) == len(page.images) > 0
        assert {"Training curves", "Validation metrics"} <= set(found.group(3).split("|"))
    shot = tmp_path / "shot.png"
    browser(
        tmp_path, "--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}", f"file://{run}/report.html"
    )
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    blue = ((rgb[..., 2] > 150) & (rgb[..., 0] < 120) & (rgb[..., 1] < 160)).sum()  # plot lines and the heatmap
    assert rgb.shape == (2400, 1280, 3) and blue > 2000


def browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def test_trade_off_speed_shows_the_rounds_range_and_no_measurable_difference():
    """Rows timed together show the per-round ratio's median and range; a range holding 1.0 is no difference."""
    from ember.reporting import trade_off_table

    base = {"name": "a", "bytes": 100, "ms_per_batch": 10.0, "round_ms": [10.0, 11.0, 9.0], "timed_with": "t"}
    same = {"name": "b", "bytes": 100, "ms_per_batch": 10.0, "round_ms": [9.0, 12.0, 10.0], "timed_with": "t"}
    fast = {"name": "c", "bytes": 50, "ms_per_batch": 5.0, "round_ms": [5.0, 5.0, 4.0], "timed_with": "t"}
    apart = {"name": "d", "bytes": 50, "ms_per_batch": 5.0}
    page = trade_off_table([base, same, fast, apart])
    assert "no measurable difference (0.92x [0.90–1.11])" in page
    assert "2.20x [2.00–2.25]" in page
    assert "2.00x (timed apart)" in page


def test_the_header_shows_the_runs_peak_memory(tmp_path):
    from ember.reporting import load_run, summary_rows

    lines = [
        {"step": 1, "loss": 2.0, "peak_rss_mb": 700.4, "cuda_peak_mb": 1500.0},
        {"step": 2, "loss": 1.9, "peak_rss_mb": 812.0, "cuda_peak_mb": 5120.2},
        {"step": 2, "split": "val", "loss": 1.8},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = dict(summary_rows(load_run(tmp_path, "run", evaluate=False)))
    assert rows["peak memory"] == "812 MiB CPU RSS, 5,120 MiB CUDA allocated"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")  # an older run's log
    assert "peak memory" not in dict(summary_rows(load_run(tmp_path, "run", evaluate=False)))
