"""Image–text pairs (``ember data prepare FOLDER --captions FILE``, kind captions): the mapping file
read from JSONL or CSV alike, every bad input counted or refused by name, the zero-shot prompts from
the user's template and class names, a resumable and idempotent prepare, and the shipped recipe's
stated zero-shot accuracy (slow)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ember.config import DataConfig, load_recipe
from ember.data import caption_prepare
from ember.data.build import build_sets
from ember.data.caption_prepare import CaptionPrepare, write_sample
from ember.data.prepare import prepare
from ember.data.tokenizer import TextCodec
from ember.errors import EmberError

CLASSES = ("cat", "dog", "owl")
PER_CLASS = 12
ROOT = Path(__file__).resolve().parents[1]


def image_folder(tmp: Path, classes=CLASSES, per: int = PER_CLASS) -> Path:
    """``tmp/images/<class>/<n>.png``: 8x8 grey images, each class a different brightness."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (tmp / "images" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per):
            pixels = np.clip(rng.normal(60 + 70 * c, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp / "images" / name / f"{i:03d}.png")
    return tmp / "images"


def rows_for(images: Path, prefix: str = "images") -> list[tuple[str, str]]:
    """(file relative to the images' parent, caption) of every image, in sorted order."""
    return [
        (f"{prefix}/{p.parent.name}/{p.name}", f"a {'light' if p.parent.name == 'owl' else 'dark'} {p.parent.name}")
        for p in sorted(images.rglob("*.png"))
    ]


def write_jsonl(path: Path, rows, file_key: str = "file", text_key: str = "caption") -> Path:
    path.write_text("".join(json.dumps({file_key: f, text_key: t}) + "\n" for f, t in rows))
    return path


def run_prepare(images: Path, mapping: Path, out: Path, strict: bool = False, **keys):
    cfg = DataConfig(captions=str(mapping), val_fraction=0.25, **keys)
    return prepare([str(images)], out, cfg, strict=strict, progress=False)


def test_jsonl_and_csv_mapping_files_give_the_same_shards(tmp_path):
    images = image_folder(tmp_path)
    jsonl = write_jsonl(tmp_path / "captions.jsonl", rows_for(images))
    # The CSV names its columns otherwise and its paths relative to the image folder, not to itself.
    (tmp_path / "other").mkdir()
    with open(tmp_path / "other" / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image", "text"])
        rows = [(name.removeprefix("images/"), text) for name, text in rows_for(images)]
        rows[0] = (str(tmp_path / "images" / rows[0][0]), rows[0][1])  # absolute
        rows[1] = (rows[1][0].replace("/", "\\"), rows[1][1])  # written on Windows
        writer.writerows(rows)
    a = run_prepare(images, jsonl, tmp_path / "a").manifest
    b = run_prepare(images, tmp_path / "other" / "captions.csv", tmp_path / "b").manifest
    assert a["splits"] == b["splits"]  # every shard's sha256 included
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    assert a["classes"] == list(CLASSES) and a["num_classes"] == 3
    assert {s: a["splits"][s]["samples"] for s in ("train", "val")} == {"train": 27, "val": 9}
    labels = np.fromfile(tmp_path / "a" / a["splits"]["val"]["shards"][0]["files"]["labels"]["file"], dtype=np.int64)
    assert np.bincount(labels).tolist() == [3, 3, 3]  # stratified by class
    assert a["stats"]["captions"]["skipped"] == {
        "listed_but_absent": 0,
        "without_caption": 0,
        "unreadable": 0,
        "empty_or_unnamed_rows": 0,
    }
    assert a["mean"][0] == pytest.approx(125 / 255, abs=0.05)  # of the training images, on [0, 1]


def test_an_image_listed_but_absent_is_counted_or_refused_by_name(tmp_path):
    images = image_folder(tmp_path)
    mapping = write_jsonl(tmp_path / "captions.jsonl", [*rows_for(images), ("images/cat/999.png", "a ghost cat")])
    stats = run_prepare(images, mapping, tmp_path / "a").manifest["stats"]
    assert stats["captions"]["skipped"]["listed_but_absent"] == 1 and stats["captions"]["pairs"] == 36
    assert any("999.png" in s for s in stats["read"]["skipped"])
    with pytest.raises(EmberError, match=r"(?s)images/cat/999.png is not an image under .*fix the path"):
        run_prepare(images, mapping, tmp_path / "b", strict=True)


def test_an_image_without_caption_and_an_empty_caption_are_counted_or_refused(tmp_path):
    images = image_folder(tmp_path)
    rows = rows_for(images)
    rows = [*rows[:5], (rows[5][0], "   "), *rows[7:]]  # 005.png: an empty caption; 006.png: no row at all
    mapping = write_jsonl(tmp_path / "captions.jsonl", rows)
    manifest = run_prepare(images, mapping, tmp_path / "a").manifest
    skipped = manifest["stats"]["captions"]["skipped"]
    assert skipped["empty_or_unnamed_rows"] == 1 and skipped["without_caption"] == 2
    assert manifest["stats"]["captions"]["pairs"] == 34
    with pytest.raises(EmberError, match=r"(?s)006.png: no caption.*add a row"):
        run_prepare(images, mapping, tmp_path / "b", strict=True)
    with pytest.raises(EmberError, match=r"the caption of images/cat/005.png is empty"):
        run_prepare(images, mapping, tmp_path / "c", strict=True)


def test_an_unreadable_image_is_counted_once(tmp_path):
    images = image_folder(tmp_path)
    (images / "dog" / "003.png").write_bytes(b"not a png")
    mapping = write_jsonl(tmp_path / "captions.jsonl", rows_for(images))
    skipped = run_prepare(images, mapping, tmp_path / "a").manifest["stats"]["captions"]["skipped"]
    assert skipped["unreadable"] == 1 and skipped["listed_but_absent"] == 0 and skipped["without_caption"] == 0


def test_the_zero_shot_prompts_are_the_users_template_and_class_names(tmp_path):
    images = image_folder(tmp_path)
    out = tmp_path / "data"
    run_prepare(images, write_jsonl(tmp_path / "captions.jsonl", rows_for(images)), out)
    cfg = DataConfig(
        name="prepared", path=str(out), prompt="a drawing of a {}", prompt_names=["kitten", "puppy", "bird"]
    )
    sets = build_sets(cfg)
    codec = TextCodec.from_file(out / "tokenizer.json")
    prompts = sets.val_transform(sets.val.get(torch.arange(4)))["prompts"]
    assert [codec.decode(p[p != 0]) for p in prompts] == [
        "a drawing of a kitten",
        "a drawing of a puppy",
        "a drawing of a bird",
    ]
    assert sets.spec.task == "clip" and sets.spec.class_names == CLASSES
    assert prompts.shape[1] == sets.spec.seq_len >= json.loads((out / "manifest.json").read_text())["caption_len"]
    default = build_sets(DataConfig(name="prepared", path=str(out)))
    first = default.val_transform(default.val.get(torch.arange(1)))["prompts"][0]
    assert codec.decode(first[first != 0]) == "a photo of a cat"
    with pytest.raises(EmberError, match="has no \\{\\} where the class name goes"):
        build_sets(DataConfig(name="prepared", path=str(out), prompt="a photo"))
    with pytest.raises(EmberError, match="gives 2 name"):
        build_sets(DataConfig(name="prepared", path=str(out), prompt_names=["a", "b"]))


def test_digits_captions_take_the_prompt_template_too():
    sets = build_sets(DataConfig(name="digits-captions", prompt="a drawing of {}"))
    prompts = sets.val_transform(sets.val.get(torch.arange(2)))["prompts"]
    assert bytes(prompts[7][prompts[7] != 0].tolist()).decode() == "a drawing of seven"


def test_prepare_resumes_after_an_interruption_and_is_idempotent(tmp_path, monkeypatch):
    images = image_folder(tmp_path)
    mapping = write_jsonl(tmp_path / "captions.jsonl", rows_for(images))
    fresh = run_prepare(images, mapping, tmp_path / "fresh").manifest

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(CaptionPrepare, "write_shards", crash)
        with pytest.raises(RuntimeError):
            run_prepare(images, mapping, tmp_path / "out")
    resumed = run_prepare(images, mapping, tmp_path / "out")
    assert resumed.reused_units == 3  # one unit per class folder, none read again
    assert resumed.manifest["splits"] == fresh["splits"]
    again = run_prepare(images, mapping, tmp_path / "out")
    assert again.manifest == resumed.manifest and again.reused_units == 0
    with pytest.raises(EmberError, match="other settings"):
        run_prepare(images, mapping, tmp_path / "out", seed=1)


def test_two_workers_write_the_same_bytes_without_importing_torch(tmp_path):
    images = image_folder(tmp_path, per=600)  # two units per class: work for both workers
    mapping = write_jsonl(tmp_path / "captions.jsonl", rows_for(images))
    one = run_prepare(images, mapping, tmp_path / "one").manifest
    cfg = DataConfig(captions=str(mapping), val_fraction=0.25)
    two = prepare([str(images)], tmp_path / "two", cfg, workers=2, progress=False).manifest
    assert one["splits"] == two["splits"] and one["stats"]["captions"]["pairs"] == 1800
    code = "import sys, ember.data.caption_prepare; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_several_captions_per_image_train_as_pairs_and_validate_once(tmp_path):
    images = image_folder(tmp_path)
    rows = rows_for(images)
    mapping = write_jsonl(tmp_path / "captions.jsonl", rows + [(f, t + " again") for f, t in rows])
    m = run_prepare(images, mapping, tmp_path / "a").manifest
    assert (m["splits"]["train"]["samples"], m["splits"]["train"]["images"]) == (54, 27)
    assert (m["splits"]["val"]["samples"], m["splits"]["val"]["images"]) == (9, 9)
    sets = build_sets(DataConfig(name="prepared", path=str(tmp_path / "a")))
    codec = TextCodec.from_file(tmp_path / "a" / "tokenizer.json")
    first = sets.train.get(torch.arange(2))["text"]
    assert [codec.decode(t[t != 0]) for t in first] == ["a dark cat", "a dark cat again"]


def test_a_flat_folder_has_no_classes_and_no_prompts(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(image_folder(tmp_path).rglob("*.png")):
        p.rename(flat / f"{p.parent.name}-{p.name}")
    mapping = write_jsonl(tmp_path / "c.jsonl", [(f"flat/{p.name}", f"picture {p.stem}") for p in flat.iterdir()])
    m = run_prepare(flat, mapping, tmp_path / "a").manifest
    assert m["num_classes"] == 0 and m["classes"] == [] and m["stats"]["captions"]["pairs"] == 36
    sets = build_sets(DataConfig(name="prepared", path=str(tmp_path / "a")))
    batch = sets.val_transform(sets.val.get(torch.arange(3)))
    assert "prompts" not in batch and batch["text"].shape == (3, sets.spec.seq_len) and sets.spec.num_classes == 0


def test_long_captions_are_cut_to_seq_len_and_counted(tmp_path):
    images = image_folder(tmp_path)
    rows = [(f, t + " sitting quietly on a wooden fence at dusk") for f, t in rows_for(images)]
    m = run_prepare(
        images, write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "a", seq_len=4, tokenizer="bytes"
    ).manifest
    assert m["caption_len"] == 4 and m["stats"]["captions"]["truncated"] == 36
    assert m["stats"]["captions"]["longest"] == len("a light owl sitting quietly on a wooden fence at dusk")


def test_bad_sources_and_mapping_files_are_refused_with_the_fix(tmp_path):
    images = image_folder(tmp_path)
    with pytest.raises(EmberError, match="--captions FILE"):
        prepare([str(images)], tmp_path / "a", DataConfig(kind="captions"), progress=False)
    with pytest.raises(EmberError, match="does not exist"):
        run_prepare(images, tmp_path / "missing.jsonl", tmp_path / "a")
    mapping = write_jsonl(tmp_path / "c.jsonl", rows_for(images), file_key="where", text_key="words")
    with pytest.raises(EmberError, match="image_field=COLUMN"):
        run_prepare(images, mapping, tmp_path / "a")
    m = run_prepare(images, mapping, tmp_path / "a", image_field="where", text_field="words").manifest
    assert m["stats"]["captions"]["pairs"] == 36
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "loose.png")
    with pytest.raises(EmberError, match="both class sub-folders"):
        run_prepare(images, mapping, tmp_path / "b")


def test_write_sample_writes_the_digits_with_captions(tmp_path):
    mapping = write_sample(tmp_path / "sample")
    lines = [json.loads(line) for line in mapping.read_text().splitlines()]
    assert len(lines) == 1797 and len(list((tmp_path / "sample" / "images").rglob("*.png"))) == 1797
    assert lines[7]["file"] == "images/seven/0007.png" and lines[7]["caption"]
    assert Image.open(tmp_path / "sample" / lines[7]["file"]).size == (8, 8)
    assert caption_prepare.summary  # the CLI's summary of a prepared set


@pytest.mark.slow
def test_the_clip_captions_recipe_reaches_its_stated_zero_shot_accuracy(tmp_path):
    from ember.training.loop import train

    mapping = write_sample(tmp_path / "sample")
    prepare(
        [str(tmp_path / "sample" / "images")],
        tmp_path / "data",
        DataConfig(captions=str(mapping), test_fraction=0.1),
        progress=False,
    )
    overrides = [f"data.path={tmp_path / 'data'}", "train.progress=false", "train.checkpoint_every=0"]
    result = train(load_recipe(ROOT / "recipes" / "clip-captions.yaml", overrides), tmp_path / "run")
    # Zero-shot over ten prompts (chance 0.1); README and BENCHMARKS: 0.933 after 400 steps.
    assert result.metrics["accuracy"] >= 0.9, result.metrics
