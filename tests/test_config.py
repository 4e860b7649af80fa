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


def test_a_single_value_for_a_list_key_says_to_write_brackets(tmp_path):
    msg = error_of(tmp_path, {"model": {"name": "gpt"}}, ["train.trackers=wandb", "schedule.milestones=3"])
    assert "--set 'train.trackers=[wandb]', or [wandb] in the file" in msg
    assert "--set 'schedule.milestones=[3]'" in msg


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
    assert "eval.metric 'acuracy'" in error_of(
        tmp_path, {"model": {"name": "cnn"}, "data": {"name": "digits"}, "eval": {"metric": "acuracy"}}
    )
    assert "exact_match" in error_of(tmp_path, {"model": {"name": "gpt"}, "eval": {"metric": "exact_match"}})
    assert "warmup_steps (50)" in error_of(
        tmp_path, {"model": {"name": "gpt"}, "schedule": {"warmup_steps": 50}, "train": {"max_steps": 50}}
    )


# --- issue #15: recipe hardening ------------------------------------------------------------

import time  # noqa: E402
from pathlib import Path  # noqa: E402

from ember.config import MAX_NODES, data_config_from_dict, read_recipe_file  # noqa: E402
from ember.schema import SEED_MAX  # noqa: E402

GPT = "model:\n  name: gpt\n"


def text_error(tmp_path, text, overrides=()):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(EmberError) as info:
        load_recipe(path, list(overrides))
    return str(info.value)


@pytest.mark.parametrize(
    "text, key, lines",
    [
        (GPT + "train:\n  max_steps: 5\ntrain:\n  batch_size: 4\n", "'train'", "lines 3 and 5"),
        (GPT + "train:\n  max_steps: 5\n  max_steps: 50\n", "'max_steps'", "lines 4 and 5"),
        (GPT + "optim: {lr: 0.1, lr: 0.2}\n", "'lr'", "lines 3 and 3"),
    ],
)
def test_duplicate_section_or_key_is_refused_naming_both_lines(tmp_path, text, key, lines):
    msg = text_error(tmp_path, text)
    assert key in msg and lines in msg and "r.yaml" in msg


def test_merge_keys_may_repeat_a_merged_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GPT + "schedule: {<<: {warmup_steps: 1, step_size: 3}, warmup_steps: 2}\n")
    recipe = load_recipe(path)
    assert recipe.schedule.warmup_steps == 2 and recipe.schedule.step_size == 3


@pytest.mark.parametrize(
    "text, override, key",
    [
        (GPT + "train:\n  max_steps: true\n", None, "train.max_steps"),
        (GPT + "optim:\n  lr: yes\n", None, "optim.lr"),
        (GPT, "model.n_layer=on", "model.gpt.n_layer"),
        (GPT, "train.batch_size='7'", "train.batch_size"),
        (GPT, "optim.lr='0.1'", "optim.lr"),
        (GPT, "optim.betas=[0.9, '0.95']", "optim.betas"),
        (GPT, "schedule.milestones=[true]", "schedule.milestones"),
        (GPT, "data.augment.hflip=true", "data.augment.hflip"),
        (GPT, "data.dedup.num_perm=false", "data.dedup.num_perm"),
        (GPT, "objective.temperature='inf'", "objective.temperature"),
    ],
)
def test_booleans_and_text_are_refused_where_numbers_are_expected(tmp_path, text, override, key):
    msg = text_error(tmp_path, text, [override] if override else [])
    assert key in msg and ("boolean" in msg or "text" in msg)


def test_yaml_1_2_floats_load_as_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GPT + "optim:\n  lr: 3e-4\n  eps: 1E-8\ntrain:\n  max_steps: 1e3\n")
    recipe = load_recipe(path, ["optim.weight_decay=5e-2", "data.augment.rotation=1e1"])
    assert recipe.optim.lr == 3e-4 and recipe.optim.eps == 1e-8 and recipe.optim.weight_decay == 0.05
    assert recipe.train.max_steps == 1000 and type(recipe.train.max_steps) is int
    assert recipe.data.augment.rotation == 10.0


@pytest.mark.parametrize(
    "override",
    [
        "optim.eps=.inf",
        "parallel.timeout_s=.inf",
        "train.peak_flops=.inf",
        "optim.weight_decay=.nan",
        "plugins.distill.hidden_weight=.inf",
        "plugins.ewc.strength=.inf",
        "eval.min_delta=.nan",
        "optim.grad_clip=.inf",
        "model.dropout=.nan",
        "data.augment.scale=[0.5, .inf]",
        "data.clean.min_alpha_fraction=.nan",
        "data.dedup.threshold=.nan",
        "objective.mask_prob=.nan",
    ],
)
def test_non_finite_floats_are_refused_in_every_section(tmp_path, override):
    msg = text_error(tmp_path, GPT, [override])
    assert override.split("=")[0].replace("model.", "model.gpt.") in msg and "finite" in msg


@pytest.mark.parametrize("milestones", ["[-1]", "[0, 5]", "[5, 5]", "[5, 3]"])
@pytest.mark.parametrize("schedule", ["multistep", "cosine"])
def test_milestones_must_be_positive_and_strictly_increasing(tmp_path, milestones, schedule):
    msg = text_error(tmp_path, GPT, [f"schedule.name={schedule}", f"schedule.milestones={milestones}"])
    assert "schedule.milestones" in msg


@pytest.mark.parametrize(
    "override",
    [
        "train.seed=1180591620717411303424",
        "train.seed=-1",
        "data.seed=-1",
        f"data.seed={SEED_MAX + 1}",
        "data.dedup.seed=-5",
    ],
)
def test_seeds_outside_what_numpy_sklearn_and_torch_accept_are_refused(tmp_path, override):
    msg = text_error(tmp_path, GPT, [override])
    assert override.split("=")[0] in msg and f"0 to {SEED_MAX}" in msg


def test_seed_range_ends_are_accepted(tmp_path):
    recipe = load_recipe(write(tmp_path, {"model": {"name": "gpt"}}), [f"train.seed={SEED_MAX}", "data.seed=0"])
    assert recipe.train.seed == SEED_MAX and recipe.data.seed == 0


def test_recipe_that_is_not_utf8_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  name: gpt\n# café\n".encode("latin-1"))
    with pytest.raises(EmberError, match="latin1.yaml is not UTF-8 text") as info:
        load_recipe(path)
    assert "UTF-8" in str(info.value).split("text", 1)[1]  # the fix names the encoding to save in


@pytest.mark.parametrize("override", ["optim.lr=[1", "train.seed=*a", "train.seed={a: 1, a: 2}", "optim.lr=\x00"])
def test_set_values_that_are_not_valid_yaml_name_the_override(tmp_path, override):
    with pytest.raises(EmberError) as info:
        load_recipe(write(tmp_path, {"model": {"name": "gpt"}}), [override])
    assert repr(override) in str(info.value)


@pytest.mark.parametrize(
    "text", ["a: " + "[" * 50_000 + "]" * 50_000, "{a: " * 50_000 + "1" + "}" * 50_000, "a: &a [*a]", "a: &a {<<: *a}"]
)
def test_deep_or_self_referencing_yaml_is_an_ember_error(tmp_path, text):
    start = time.perf_counter()
    assert "refused" in text_error(tmp_path, text)
    assert time.perf_counter() - start < 2


BILLION_LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


@pytest.mark.parametrize("where", ["file", "key", "override"])
def test_billion_laughs_is_refused_quickly(tmp_path, where):
    if where == "file":
        text, overrides = BILLION_LAUGHS, []
    elif where == "key":  # the bomb inside a real key: before, validating it walked 10^9 items
        text, overrides = BILLION_LAUGHS + GPT + "train:\n  max_steps: *i\n", []
    else:
        text, overrides = GPT, ["data.special_tokens={" + BILLION_LAUGHS.replace("\n", ", ").rstrip(", ") + "}"]
    start = time.perf_counter()
    msg = text_error(tmp_path, text, overrides)
    assert time.perf_counter() - start < 2
    assert str(MAX_NODES) in msg


def test_oversized_recipe_file_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(GPT + "# " + "x" * (2 << 20) + "\n")
    with pytest.raises(EmberError, match="big.yaml is .* bytes"):
        load_recipe(path)


def test_override_of_an_aliased_section_changes_only_that_place(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: {name: cnn}\ndata: &d {name: digits, val_fraction: 0.2}\n"
        "plugins: [{name: ewc, strength: 1, data: *d}]\n"
    )
    recipe = load_recipe(path, ["data.val_fraction=0.3"])
    assert recipe.data.val_fraction == 0.3 and recipe.plugins[0].data.val_fraction == 0.2


def test_written_recipe_loads_back_through_the_recipe_reader(tmp_path):
    recipe = load_recipe(
        write(tmp_path, {"model": {"name": "gpt"}}),
        [
            "optim.lr=3e-4",
            "optim.eps=1e-12",
            "train.peak_flops=1.5e15",
            "train.seed=4294967295",
            "data.special_tokens=['<|ü|>', 'yes', '1e5', 'null']",
            "schedule.milestones=[1, 999999]",
            "data.augment.scale=[0.5, 2]",
        ],
    )
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    assert load_recipe(tmp_path / "recipe.yaml") == recipe


def test_data_only_recipe_files_read_through_the_same_reader():
    raw = read_recipe_file(Path(__file__).parent.parent / "recipes" / "data" / "digits-5-9.yaml")
    assert data_config_from_dict(raw["data"]).classes == [5, 6, 7, 8, 9]


def test_a_step_cap_that_leaves_a_key_behind_names_the_cap(tmp_path, monkeypatch):
    from ember.config import step_capped

    recipe = load_recipe(write(tmp_path, {"model": {"name": "gpt"}}), ["train.profile.start=5"])
    monkeypatch.setenv("EMBER_MAX_STEPS", "3")
    with pytest.raises(EmberError) as info:
        step_capped(recipe)
    msg = str(info.value)
    assert "train.profile.start (5) is past train.max_steps (3)" in msg
    assert "EMBER_MAX_STEPS=3 cut train.max_steps from 1000: raise EMBER_MAX_STEPS" in msg
    assert "--set override" not in msg  # the user gave neither: the cap did it
    monkeypatch.setenv("EMBER_MAX_STEPS", "5")
    assert step_capped(recipe)[0].train.max_steps == 5
