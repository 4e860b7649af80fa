"""Recipe validation: every user mistake fails before anything runs, naming the key."""

import pytest
import yaml

from ember.config import load_recipe, recipe_from_dict
from ember.errors import EmberError


def write(tmp_path, raw):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(tmp_path, raw, overrides=()):
    with pytest.raises(EmberError) as info:
        load_recipe(write(tmp_path, raw), list(overrides))
    return str(info.value)


def test_defaults_fill_every_section(tmp_path):
    recipe = load_recipe(write(tmp_path, {"model": {"name": "gpt"}}))
    assert recipe.train.max_steps == 1000 and recipe.optim.name == "adamw" and recipe.parallel.strategy == "auto"


def test_override_sets_nested_keys_with_yaml_values(tmp_path):
    recipe = load_recipe(
        write(tmp_path, {"model": {"name": "gpt"}}),
        ["train.max_steps=7", "optim.lr=3e-4", "schedule.milestones=[2,5]", "model.n_layer=1", "train.compile=true"],
    )
    assert recipe.train.max_steps == 7
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert recipe.schedule.milestones == [2, 5]
    assert recipe.model.n_layer == 1
    assert recipe.train.compile is True


def test_unknown_key_names_its_path(tmp_path):
    msg = error_of(tmp_path, {"model": {"name": "gpt"}, "train": {"max_stepz": 3}})
    assert "train.max_stepz" in msg and "unknown key" in msg


def test_unknown_model_key_names_model_path(tmp_path):
    msg = error_of(tmp_path, {"model": {"name": "cnn", "n_layer": 3}})
    assert "model.cnn.n_layer" in msg and "unknown key" in msg


def test_wrong_type_shows_given_value(tmp_path):
    msg = error_of(tmp_path, {"model": {"name": "gpt"}}, ["train.batch_size=lots"])
    assert "train.batch_size" in msg and "'lots'" in msg


def test_out_of_range_value_says_what_is_allowed(tmp_path):
    msg = error_of(tmp_path, {"model": {"name": "gpt"}}, ["optim.lr=-1"])
    assert "optim.lr" in msg and "greater than 0" in msg and "-1" in msg


def test_bad_choice_lists_the_choices(tmp_path):
    msg = error_of(tmp_path, {"model": {"name": "gpt"}}, ["train.precision=fp8"])
    assert "train.precision" in msg and "'fp8'" in msg and "bf16" in msg


def test_unknown_model_name_lists_models(tmp_path):
    msg = error_of(tmp_path, {"model": {"name": "mamba"}})
    assert "model" in msg and "mamba" in msg and "gpt" in msg and "cnn" in msg


def test_missing_model_section(tmp_path):
    assert "model: required key is missing" in error_of(tmp_path, {"train": {"max_steps": 3}})


def test_unknown_parallel_strategy_is_refused(tmp_path):
    assert "parallel.strategy" in error_of(tmp_path, {"model": {"name": "gpt"}, "parallel": {"strategy": "zero3"}})


def test_cross_field_checks(tmp_path):
    assert "nesterov" in error_of(tmp_path, {"model": {"name": "gpt"}, "optim": {"name": "adamw", "nesterov": True}})
    assert "fp16" in error_of(tmp_path, {"model": {"name": "gpt"}, "train": {"precision": "fp16", "device": "cpu"}})


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(EmberError, match="section.key=value"):
        load_recipe(write(tmp_path, {"model": {"name": "gpt"}}), ["train.max_steps"])
    with pytest.raises(EmberError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips_through_yaml():
    recipe = recipe_from_dict({"model": {"name": "rnn", "kind": "gru"}, "optim": {"lr": 0.01}})
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_metric_and_warmup_are_checked_before_anything_runs(tmp_path):
    assert "eval.metric 'acuracy'" in error_of(tmp_path, {"model": {"name": "cnn"}, "data": {"name": "digits"}, "eval": {"metric": "acuracy"}})
    assert "exact_match" in error_of(tmp_path, {"model": {"name": "gpt"}, "eval": {"metric": "exact_match"}})
    assert "warmup_steps (50)" in error_of(tmp_path, {"model": {"name": "gpt"}, "schedule": {"warmup_steps": 50}, "train": {"max_steps": 50}})
