"""Tables with a numeric target (``ember data prepare --label COLUMN --target values``): task ``regress``,
float32 targets, an MLP with one output, exact accumulation, and mse/mae/r2 in validation and ``ember eval``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from sklearn.datasets import load_diabetes

from conftest import QUIET
from ember.cli import main
from ember.config import DataConfig, recipe_from_dict
from ember.data import shards
from ember.data.prepare import prepare
from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.training.loop import train
from ember.training.tasks import METRICS, count_targets, metric_mode, task_loss
from ember.training.validation import metrics_from_totals, validate


def write_csv(path, header: list[str], rows: list[list]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"label": "progression", "target": "values", "val_fraction": 0.2, "shard_size": 1024, **kw})


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory):
    """scikit-learn's diabetes table (442 rows, 10 numeric features, a numeric target) prepared to regress."""
    tmp = tmp_path_factory.mktemp("diabetes")
    data = load_diabetes(scaled=False)
    rows = [[*(f"{v:.6g}" for v in x), f"{y:g}"] for x, y in zip(data.data, data.target)]
    path = write_csv(tmp / "diabetes.csv", [*data.feature_names, "progression"], rows)
    return prepare([path], tmp / "out", cfg(), progress=False)


def recipe(out_dir, *, steps: int, batch: int = 32, accum: int = 1, lr: float = 0.1, optim: str = "adamw"):
    return recipe_from_dict(
        {
            "data": {"name": "prepared", "path": str(out_dir)},
            "model": {"name": "mlp", "depth": 2, "width": 32},
            "train": {**QUIET["train"], "max_steps": steps, "batch_size": batch, "grad_accum": accum},
            "optim": {"name": optim, "lr": lr},
        }
    )


def test_prepared_values_are_float_targets(diabetes):
    m = diabetes.manifest
    assert m["target"] == "values" and m["label_dtype"] == "float32" and m["num_classes"] == 0
    assert shards.array_dtypes(m)["labels"] == "float32"
    y = np.concatenate([np.asarray(a["labels"]) for _, a in shards.open_split(diabetes.out_dir, m, "train")])
    assert y.dtype == np.float32 and m["target_stats"]["mean"] == pytest.approx(float(y.mean()), rel=1e-6)
    assert 25 <= y.min() and y.max() <= 346  # the raw target, not scaled


def test_an_mlp_regresses_the_diabetes_table(diabetes, tmp_path):
    metrics = train(recipe(diabetes.out_dir, steps=200), tmp_path / "run").metrics
    assert set(metrics) == set(METRICS["regress"])
    # Measured: val r2 0.593 (mse 2779, mae 42.2) after 200 steps; linear regression reaches about 0.5.
    assert metrics["r2"] > 0.3
    assert metrics["loss"] == metrics["mse"]


def test_regress_metric_modes():
    assert metric_mode("r2", "auto") == "max"
    assert metric_mode("mse", "auto") == metric_mode("mae", "auto") == "min"


def test_float_targets_all_count():
    targets = torch.tensor([-100.0, 0.0, 1.5, 2.0])  # -100.0 is a value here, not IGNORE_INDEX
    assert int(count_targets(targets)) == 4
    loss = task_loss("regress", torch.tensor([[0.0], [1.0], [1.5], [0.0]]), targets)
    assert float(loss) == pytest.approx(100.0**2 + 1.0 + 0.0 + 4.0)


def test_accumulation_equals_one_big_batch(diabetes, tmp_path):
    small = recipe(diabetes.out_dir, steps=3, batch=4, accum=3, lr=1e-3, optim="sgd")
    big = recipe(diabetes.out_dir, steps=3, batch=12, accum=1, lr=1e-3, optim="sgd")

    def weights(run):
        return safetensors.torch.load_file(str(train(run[0], tmp_path / run[1]).run_dir / "model.safetensors"))

    a, b = weights((small, "a")), weights((big, "b"))
    start = weights((recipe(diabetes.out_dir, steps=1, lr=1e-9, optim="sgd"), "c"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.allclose(a[n], start[n], atol=1e-4) for n in a)  # the steps did move the weights


class _Affine(torch.nn.Module):
    def forward(self, x):
        return (x[:, :1] * 3.0 + 1.0).clone()  # [B, 1]: squeezed by the task


class _Rows:
    """Val batches of uneven size, as BatchLoader gives them."""

    def __init__(self, batches):
        self.batches, self.batches_per_epoch = batches, len(batches)

    def epoch_batches(self, device):
        return iter(self.batches)


def test_validation_metrics_equal_numpy():
    import contextlib

    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 4)).astype(np.float32)
    y = (2.5 * x[:, 0] + rng.normal(size=23)).astype(np.float32)
    batches = [{"x": torch.from_numpy(x[i : i + 5]), "y": torch.from_numpy(y[i : i + 5])} for i in range(0, 23, 5)]
    m = validate(_Affine(), _Rows(batches), "regress", torch.device("cpu"), contextlib.nullcontext, reduce=lambda t: t)
    pred = (x[:, 0] * 3.0 + 1.0).astype(np.float64)
    err = pred - y
    assert m["mse"] == pytest.approx(np.mean(err**2), rel=1e-6)  # the loss is summed in float32
    assert m["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-6)  # the loss is summed in float32
    assert m["r2"] == pytest.approx(
        1 - np.sum(err**2) / np.sum((y - y.mean()) ** 2), rel=1e-6
    )  # the loss is summed in float32
    # exact across ranks: the sums of two halves, added (what all_reduce does), give the same metrics
    sums = []
    for part in (batches[:2], batches[2:]):
        validate(
            _Affine(),
            _Rows(part),
            "regress",
            torch.device("cpu"),
            contextlib.nullcontext,
            reduce=lambda t: sums.append(t) or t,
        )
    assert metrics_from_totals(sums[0] + sums[1], "regress") == pytest.approx(m, rel=1e-12)


def test_ember_eval_prints_mse_mae_r2(diabetes, tmp_path, capsys):
    run = train(recipe(diabetes.out_dir, steps=20), tmp_path / "run").run_dir
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    for name in ("mse", "mae", "r2"):
        assert f"  {name} " in out
    report = json.loads((run / "eval.json").read_text())
    assert report["task"] == "regress" and report.get("per_class") is None
    assert set(report["metrics"]) == {"loss", "mse", "mae", "r2"}


def test_mlp_regressor_has_one_output():
    from ember.models.registry import build_model

    model = build_model(recipe_from_dict({"model": {"name": "mlp"}}).model, DataSpec("regress", input_shape=(7,)))
    assert model(torch.zeros(3, 7)).shape == (3, 1)


def test_a_non_numeric_target_is_one_paragraph(tmp_path):
    rows = [[i, i * 2.0] for i in range(30)]
    rows[17][1] = "high"
    path = write_csv(tmp_path / "t.csv", ["a", "progression"], rows)
    with pytest.raises(EmberError) as err:
        prepare([path], tmp_path / "out", cfg(), progress=False)
    message = str(err.value)
    assert "'high'" in message and "row 18 of" in message and "--target values" in message
    assert "\n" not in message
    rows[17][1] = ""
    path = write_csv(tmp_path / "t2.csv", ["a", "progression"], rows)
    with pytest.raises(EmberError, match="is empty in row 18"):
        prepare([path], tmp_path / "out2", cfg(), progress=False)


def test_ensembles_and_distillation_of_regressors(diabetes, tmp_path):
    from ember.eval.ensemble import ensemble

    def regressor(steps: int, seed: int = 0, plugins: list | None = None):
        d = recipe(diabetes.out_dir, steps=steps).model_dump(mode="json")
        d["train"]["seed"], d["plugins"] = seed, plugins or []
        return recipe_from_dict(d)

    runs = [train(regressor(60, seed), tmp_path / f"r{seed}") for seed in (0, 1)]
    report = ensemble([r.run_dir for r in runs], method="mean", split="val")
    members = [m["metrics"] for m in report.members]
    assert [m["r2"] for m in members] == pytest.approx([r.metrics["r2"] for r in runs], rel=1e-6)
    # the mean of two predictions errs less than the members do on average (squared error is convex)
    assert report.ensemble["metrics"]["mse"] <= sum(m["mse"] for m in members) / 2 + 1e-6
    from ember.generation import generate

    # one row by its cells (the others missing: imputed), answered with a number
    assert 25 < float(generate(runs[0].run_dir, prompt="age=50,bmi=32,bp=100")) < 346
    teacher = [{"name": "distill", "teacher": str(runs[0].run_dir), "alpha": 1.0}]
    student = train(regressor(30, plugins=teacher), tmp_path / "student")
    plain = train(regressor(30), tmp_path / "plain")
    assert student.metrics["mse"] != plain.metrics["mse"]  # the teacher's predictions changed the training


def test_values_as_a_target_need_a_label_column():
    with pytest.raises(ValueError, match="needs that column: data.label"):
        DataConfig(target="values")
