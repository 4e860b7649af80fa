"""Class names (issue 17, item 7): a prepared table's label values reach model.json, `ember eval`'s
tables, eval.json's per-class rows and the report; runs without names read as before."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import QUIET
from ember.cli import main
from ember.config import DataConfig, recipe_from_dict
from ember.data.prepare import prepare
from ember.data.spec import DataSpec, named_classes
from ember.errors import EmberError
from ember.eval.evaluate import EvalResult, format_report

NAMES = ["iris-setosa", "iris-versicolor", "iris-virginica"]


def prepared_table(tmp, names: list[str]) -> str:
    rng = np.random.default_rng(0)
    with open(tmp / "flowers.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "species"])
        for i in range(90):
            writer.writerow([f"{rng.normal(i % 3):.4f}", f"{rng.normal():.4f}", names[i % 3]])
    data = DataConfig(label="species", val_fraction=0.3, test_fraction=0.0, shard_size=1024)
    return str(prepare([str(tmp / "flowers.csv")], tmp / "out", data, progress=False).out_dir)


@pytest.fixture(scope="module")
def named_run(tmp_path_factory):
    from ember.models import registry

    if "mlp" not in registry.MODELS:
        pytest.skip("the mlp model is not registered in this tree")
    from ember.training.loop import train

    tmp = tmp_path_factory.mktemp("names")
    raw = {
        "data": {"name": "prepared", "path": prepared_table(tmp, NAMES)},
        "model": {"name": "mlp", "depth": 1, "width": 8},
        "train": {**QUIET["train"], "max_steps": 3},
    }
    train(recipe_from_dict(raw), tmp / "run")
    return tmp / "run"


def test_names_reach_model_json_eval_and_the_report(named_run, capsys):
    from ember import evaluate
    from ember.reporting import report

    info = json.loads((named_run / "model.json").read_text())
    assert info["data"]["class_names"] == NAMES
    result = evaluate(named_run)
    assert [r["name"] for r in result.per_class] == NAMES
    assert list(result.per_class[0]) == ["class", "name", "precision", "recall", "f1", "support"]
    written = json.loads((named_run / "eval.json").read_text())
    assert [r["name"] for r in written["per_class"]] == NAMES

    assert main(["eval", str(named_run)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("precision") : out.index("confusion matrix")]
    matrix = out[out.index("confusion matrix") :]
    for name in NAMES:
        assert name in table and name in matrix

    page = report([named_run], evaluate=False).read_text()
    assert all(page.count(name) >= 2 for name in NAMES)  # the per-class table and the confusion counts


def test_specs_without_names_read_and_write_as_before():
    old = {"task": "classify", "vocab_size": 0, "num_classes": 3, "input_shape": [4], "seq_len": 0}
    old |= {"src_len": 0, "pad_id": 0, "bos_id": 0, "eos_id": 0}
    spec = DataSpec.from_dict(old)  # a model.json written before class names
    assert spec.class_names == () and spec.to_dict() == old and spec.class_name(2) == "2"
    named = DataSpec.from_dict({**old, "class_names": ["a", "b", "c"]})
    assert named == spec  # names are not shapes: init.from_run, distill and replay compare shapes
    assert named.class_name(1) == "b" and DataSpec.from_dict(named.to_dict()) == named
    assert named_classes(["0", "1", "2"], 3) == () and named_classes(["x", "y"], 2) == ("x", "y")


def test_the_table_without_names_is_unchanged():
    rows = [{"class": c, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2} for c in range(2)]
    result = EvalResult("r", "val", "classify", 4, {"loss": 0.1}, rows, [[2, 0], [0, 2]])
    assert format_report(result).splitlines()[2:] == [
        "  class  precision   recall       f1  support",
        "      0     1.0000   1.0000   1.0000        2",
        "      1     1.0000   1.0000   1.0000        2",
        "  confusion matrix (rows: true class, columns: predicted)",
        "      2     0",
        "      0     2",
    ]


def test_an_image_folder_names_its_classes_and_npz_labels_do_not(tmp_path):
    from PIL import Image

    from ember.data.build import build_sets

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(
                tmp_path / "folder" / label / f"{i}.png"
            )
    np.savez(tmp_path / "arr.npz", x=rng.random((30, 4, 4)), y=np.arange(30) % 3)
    specs = []
    for source, out in ((tmp_path / "folder", "f"), (tmp_path / "arr.npz", "n")):
        prepare([str(source)], tmp_path / out, DataConfig(val_fraction=0.3, test_fraction=0.0), progress=False)
        specs.append(build_sets(DataConfig(name="prepared", path=str(tmp_path / out))).spec)
    assert specs[0].class_names == ("cat", "dog") and specs[1].class_names == ()


def test_replay_refuses_data_whose_classes_have_other_names(tmp_path):
    from ember.data.build import _replayed, build_sets
    from ember.data.config import ReplayConfig
    from ember.errors import EmberError

    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    new = DataConfig(name="prepared", path=prepared_table(tmp_path / "new", NAMES))
    same = DataConfig(name="prepared", path=prepared_table(tmp_path / "old", ["a", "b", "c"]))
    sets = build_sets(new)
    with pytest.raises(EmberError, match="Replay mixes samples of one label set"):
        _replayed(sets, new.model_copy(update={"replay": ReplayConfig(data=same, share=0.5)}), None)
    assert len(_replayed(sets, new.model_copy(update={"replay": ReplayConfig(data=new, share=0.5)}), None)) > len(
        sets.train
    )


def test_generate_names_the_classes_of_an_image_file(tmp_path):
    from PIL import Image

    from ember.generation import generate
    from ember.training.loop import train

    for label, level in (("dark", 20), ("light", 235)):  # a task a tiny CNN learns in a few steps
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(12):
            noise = np.random.default_rng(i).integers(0, 20, (8, 8), dtype=np.uint8)
            Image.fromarray(np.clip(level + noise, 0, 255).astype(np.uint8)).save(
                tmp_path / "folder" / label / f"{i}.png"
            )
    prepare([str(tmp_path / "folder")], tmp_path / "data", DataConfig(val_fraction=0.25), progress=False)
    recipe = recipe_from_dict(
        {
            "data": {"name": "prepared", "path": str(tmp_path / "data")},
            "model": {"name": "cnn", "width": 8, "depth": 1, "stages": 1},
            "train": {"max_steps": 30, "batch_size": 8, "eval_every": 0, "progress": False},
            "optim": {"lr": 0.01},
        }
    )
    run = train(recipe, tmp_path / "run").run_dir
    Image.fromarray(np.full((16, 16), 240, dtype=np.uint8)).save(tmp_path / "new.png")  # resized to 8x8
    ranked = [line.split() for line in generate(run, prompt=str(tmp_path / "new.png")).splitlines()]
    assert [name for name, _ in ranked] == ["light", "dark"] and float(ranked[0][1]) > 0.5
    with pytest.raises(EmberError, match="give an image file"):
        generate(run, prompt="no-such.png")
