"""Recipes built on others (``base:``): merge precedence, chains, cycles, missing bases, and a run's
saved recipe that no longer needs its base; and "did you mean" for misspelt keys and names."""

from __future__ import annotations

import pytest
import yaml

from ember.config import load_recipe, read_recipe
from ember.errors import EmberError
from ember.runs import prepare_run_dir


def write(path, raw):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


BASE = {
    "model": {"name": "gpt", "n_layer": 3, "n_head": 2},
    "optim": {"lr": 0.002, "weight_decay": 0.1},
    "schedule": {"name": "multistep", "milestones": [100, 200, 300]},
    "train": {"max_steps": 400, "batch_size": 16},
    "plugins": [{"name": "ema", "decay": 0.9}],
}


def test_child_wins_key_by_key_lists_are_replaced_and_set_comes_last(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    child = write(
        tmp_path / "child.yaml",
        {
            "base": "base.yaml",
            "optim": {"lr": 0.0005},
            "schedule": {"milestones": [50]},
            "plugins": [{"name": "l1", "weight": 0.01}],
        },
    )
    recipe = load_recipe(child, ["train.max_steps=60"])
    assert recipe.optim.lr == 0.0005 and recipe.optim.weight_decay == 0.1  # merged: the child's key, the base's other
    assert recipe.schedule.name == "multistep" and recipe.schedule.milestones == [50]  # replaced, not [100,200,300,50]
    assert [p.name for p in recipe.plugins] == ["l1"]
    assert recipe.model.n_layer == 3 and recipe.train.batch_size == 16
    assert recipe.train.max_steps == 60  # --set over the chain


def test_chain_of_three_in_other_folders_relative_to_each_file(tmp_path):
    write(tmp_path / "shared" / "root.yaml", BASE)
    write(tmp_path / "shared" / "mid.yaml", {"base": "root.yaml", "train": {"batch_size": 8}, "optim": {"lr": 0.01}})
    leaf = write(tmp_path / "mine" / "leaf.yaml", {"base": "../shared/mid.yaml", "optim": {"lr": 0.02}})
    recipe = load_recipe(leaf)
    assert (recipe.optim.lr, recipe.train.batch_size, recipe.train.max_steps, recipe.optim.weight_decay) == (
        0.02,
        8,
        400,
        0.1,
    )


def test_another_model_replaces_the_model_section(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "model": {"name": "llama", "n_layer": 2}})
    recipe = load_recipe(child)
    assert recipe.model.name == "llama" and recipe.model.n_layer == 2 and recipe.model.n_head == 4  # llama's default
    same = write(tmp_path / "same.yaml", {"base": "base.yaml", "model": {"name": "gpt", "n_layer": 1}})
    assert load_recipe(same).model.n_head == 2  # the same model: merged


def test_cycle_is_refused_naming_the_loop(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml", "model": {"name": "gpt"}})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(EmberError, match=r"builds back on it .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_recipe(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", {"base": "self.yaml"})
    with pytest.raises(EmberError, match="cannot be its own base"):
        load_recipe(tmp_path / "self.yaml")


def test_missing_base_names_the_file_it_looked_for(tmp_path):
    child = write(tmp_path / "child.yaml", {"base": "nowhere/gone.yaml", "model": {"name": "gpt"}})
    with pytest.raises(EmberError) as info:
        load_recipe(child)
    assert f"builds on base: nowhere/gone.yaml, but {tmp_path / 'nowhere' / 'gone.yaml'} does not exist" in str(
        info.value
    )
    write(tmp_path / "num.yaml", {"base": 3})
    with pytest.raises(EmberError, match="base must be the path of another recipe"):
        load_recipe(tmp_path / "num.yaml")


def test_base_goes_through_the_hardened_reader(tmp_path):
    write(tmp_path / "base.yaml", "model: {name: gpt}\ntrain: {max_steps: 5}\ntrain: {max_steps: 6}\n")
    child = write(tmp_path / "child.yaml", {"base": "base.yaml"})
    with pytest.raises(EmberError, match="appears twice"):
        load_recipe(child)
    write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(EmberError, match="must be a mapping"):
        load_recipe(write(tmp_path / "c2.yaml", {"base": "list.yaml"}))


def test_old_form_in_a_base_is_read_as_today(tmp_path):
    write(tmp_path / "old.yaml", {"model": {"name": "gpt"}, "train": {"ema_decay": 0.99}})
    recipe = load_recipe(write(tmp_path / "child.yaml", {"base": "old.yaml", "optim": {"lr": 0.01}}))
    assert [(p.name, p.decay) for p in recipe.plugins] == [("ema", 0.99)]


def test_saved_run_recipe_is_resolved_and_resumes_without_the_base(tmp_path):
    base = write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "train": {"max_steps": 300}})
    recipe = load_recipe(child)
    run = prepare_run_dir(tmp_path / "run", recipe, resuming=False)
    saved = (run / "recipe.yaml").read_text()
    assert "base" not in yaml.safe_load(saved)
    base.unlink()
    again = load_recipe(run / "recipe.yaml")
    assert again == recipe and again.train.max_steps == 300 and again.model.n_layer == 3


def test_read_recipe_without_base_is_the_file(tmp_path):
    path = write(tmp_path / "r.yaml", BASE)
    assert read_recipe(path) == BASE


# --- did you mean -------------------------------------------------------------------------


def error_of(tmp_path, raw, overrides=()):
    with pytest.raises(EmberError) as info:
        load_recipe(write(tmp_path / "r.yaml", raw), list(overrides))
    return str(info.value)


GPT = {"model": {"name": "gpt"}}


@pytest.mark.parametrize(
    "override, line",
    [
        ("train.max_step=5", "train.max_step: unknown key (given: 5); did you mean train.max_steps?"),
        ("optim.learning_rate=0.1", "optim.learning_rate: unknown key (given: 0.1); did you mean optim.lr?"),
        ("train.warmup_steps=5", "did you mean schedule.warmup_steps or train.max_steps?"),
        ("train.lr=0.1", "train.lr: unknown key (given: 0.1); did you mean optim.lr?"),
        ("model.n_layers=2", "model.gpt.n_layers: unknown key (given: 2); did you mean model.n_layer?"),
        ("data.clean.min_char=3", "did you mean data.clean.min_chars or data.clean.max_chars?"),
        ("plugins.ema.decy=0.9", "plugins.ema.decy: unknown key (given: 0.9); did you mean plugins.ema.decay?"),
        ("train.zzzz=1", "train.zzzz: unknown key (given: 1); no key is spelt like it"),
    ],
)
def test_unknown_key_in_set_suggests_the_closest(tmp_path, override, line):
    assert line in error_of(tmp_path, GPT, [override])


def test_misspelt_section_in_a_file_suggests_the_section(tmp_path):
    msg = error_of(tmp_path, {**GPT, "trian": {"max_steps": 3}})
    assert "  - trian: unknown key; did you mean train? (`ember recipe explain` lists the sections)" in msg
    msg = error_of(tmp_path, {**GPT, "optimizer": {"lr": 3}})
    assert "did you mean optim?" in msg


def test_misspelt_names_suggest_the_choice(tmp_path):
    assert "did you mean 'gpt'?" in error_of(tmp_path, {"model": {"name": "gtp"}})
    assert "did you mean 'cosine'?" in error_of(tmp_path, GPT, ["schedule.name=cosin"])
    assert "did you mean 'ema'?" in error_of(tmp_path, GPT, ["plugins.emma.decay=0.9"])
    assert "did you mean" not in error_of(tmp_path, GPT, ["schedule.name=zzz"])


def test_a_data_section_alone_suggests_data_keys():
    from ember.config import data_config_from_dict

    with pytest.raises(EmberError) as info:
        data_config_from_dict({"clean": {"min_char": 3}, "seq_lenn": 3})
    assert "data.clean.min_char: unknown key (given: 3); did you mean data.clean.min_chars or" in str(info.value)
    assert "data.seq_lenn: unknown key (given: 3); did you mean data.seq_len or data.src_len?" in str(info.value)


def test_an_error_in_a_merged_recipe_names_its_base_too(tmp_path):
    write(tmp_path / "base.yaml", {"model": {"name": "mlp"}, "train": {"max_stepz": 3}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "data": {"name": "digits"}})
    with pytest.raises(EmberError) as info:
        load_recipe(child)
    assert f"The recipe {child} (merged over its base: base.yaml) is not valid" in str(info.value)
    assert "train.max_stepz: unknown key" in str(info.value)
    with pytest.raises(EmberError, match=r"recipe \S+/base\.yaml is not valid"):  # no base: the file alone
        load_recipe(tmp_path / "base.yaml")
