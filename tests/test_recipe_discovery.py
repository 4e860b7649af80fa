"""Recipes you can discover: `ember recipe show | explain | schema` (ember.recipe_tools)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ember.cli import main
from ember.config import load_recipe, read_recipe_file
from ember.errors import EmberError
from ember.recipe_tools import explain_key, recipe_json_schema, show_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_show_fills_every_default_and_loads_back_equal(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"name": "gpt", "n_layer": 2}}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": "base.yaml", "optim": {"lr": 0.01}}))
    text = show_recipe(str(child), ["train.max_steps=300"])
    shown = yaml.safe_load(text)
    assert shown["optim"]["lr"] == 0.01 and shown["train"]["max_steps"] == 300
    assert shown["model"] == {**shown["model"], "name": "gpt", "n_layer": 2, "n_head": 4, "block_size": 256}
    assert shown["train"]["batch_size"] == 32 and shown["schedule"]["name"] == "cosine"  # defaults
    assert "base" not in shown
    (tmp_path / "shown.yaml").write_text(text)
    assert load_recipe(tmp_path / "shown.yaml") == load_recipe(child, ["train.max_steps=300"])


def test_explain_a_key_gives_type_range_default_and_description():
    assert explain_key("optim.lr") == "optim.lr\n  type     number\n  range    > 0 and <= 100\n  default  0.001"
    text = explain_key("train.max_steps")
    assert text.splitlines() == [
        "train.max_steps",
        "  type     integer",
        "  range    >= 1",
        "  default  1000",
        "  about    optimiser steps",
    ]
    assert "  type     one of: constant, step, multistep, exponential, cosine, linear, wsd" in explain_key(
        "schedule.name"
    )
    assert "  range    each >= 1" in explain_key("schedule.milestones")
    assert "  default  required" in explain_key("plugins.ema.decay")


def test_explain_a_model_key_depends_on_the_model():
    across = explain_key("model.n_layer")
    assert "  models   encoder, gpt, llama, vit" in across and "(not a key of: clip, cnn," in across
    assert "  range    >= 1 and <= 512" in explain_key("model.n_layer", "gpt")
    assert explain_key("model.n_layer", "gpt") == explain_key("model.gpt.n_layer")
    with pytest.raises(EmberError, match="model has no variant 'gtp' \\(did you mean 'gpt'\\?\\)"):
        explain_key("model.n_layer", "gtp")
    assert explain_key("model", "llama").startswith("model (name: llama): 16 keys\n")


def test_explain_a_section_lists_its_keys_one_line_each():
    lines = explain_key("train").splitlines()
    assert lines[0].startswith("train: ") and lines[0].endswith(" keys")
    max_steps = next(line for line in lines if line.split()[0] == "max_steps")
    assert max_steps.split()[1:] == ["integer,", ">=", "1", "1000", "optimiser", "steps"]
    assert len(lines) == len(type(load_recipe(None, ["model.name=gpt"]).train).model_fields) + 2
    sections = explain_key("")
    assert "  plugins" in sections and "  model" in sections and "gpt" in sections
    assert "  ema " in explain_key("plugins")
    assert "  base " in sections and explain_key("base").startswith("base\n  type     text (a path)\n")


@pytest.mark.parametrize(
    "key, message",
    [
        ("trian", "no key trian; did you mean train?"),
        ("train.max_step", "no key train.max_step; did you mean train.max_steps?"),
        ("model.n_layerz", "No model has the key model.n_layerz; did you mean model.n_layer"),
        ("train.max_steps.x", "train.max_steps is a value, not a section"),
    ],
)
def test_explain_an_unknown_key_says_what_was_meant(key, message):
    with pytest.raises(EmberError, match=message.replace("?", "\\?").replace(".", "\\.")):
        explain_key(key)


def test_schema_allows_base_and_requires_model_names():
    schema = recipe_json_schema()
    assert schema["properties"]["base"]["type"] == "string"
    assert schema["anyOf"] == [{"required": ["model"]}, {"required": ["base"]}]
    assert schema["$defs"]["GPTConfig"]["required"] == ["name"]
    assert schema["$defs"]["EMAConfig"]["required"] == ["decay", "name"]
    assert schema["$defs"]["TrainConfig"]["properties"]["max_steps"]["minimum"] == 1


def test_editors_accept_the_shipped_recipes_and_flag_mistakes():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(recipe_json_schema())
    assert len(RECIPES) >= 10
    for path in RECIPES:
        assert not list(validator.iter_errors(read_recipe_file(path))), path
    assert not list(validator.iter_errors({"base": "gpt-tiny.yaml", "train": {"max_steps": 5}}))
    bad = [
        {"model": {"name": "gpt"}, "train": {"max_step": 5}},  # unknown key
        {"model": {"name": "gpt", "n_layer": 0}},  # out of range
        {"model": {"n_layer": 2}},  # which model?
        {"model": {"name": "cnn", "n_layer": 2}},  # another model's key
        {"train": {"max_steps": 5}},  # neither model nor base
        {"model": {"name": "gpt"}, "plugins": [{"name": "ema"}]},  # ema without its decay
    ]
    for raw in bad:
        assert list(validator.iter_errors(raw)), raw


def test_cli_recipe_commands(tmp_path, capsys):
    assert main(["recipe", "explain", "model.n_head", "--model", "vit"]) == 0
    assert capsys.readouterr().out.startswith("model.n_head\n  type     integer\n")
    assert main(["recipe", "show", str(RECIPES[0]), "--set", "train.max_steps=77"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["max_steps"] == 77
    assert main(["recipe", "schema", "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == recipe_json_schema()
    assert main(["recipe", "explain", "optim.learning_rate"]) == 2
    assert "did you mean optim.lr?" in capsys.readouterr().err
