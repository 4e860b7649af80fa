"""Fuzzing recipes (issue #15 §6): whatever a user writes, ``load_recipe`` returns a Recipe or
raises EmberError, quickly; a recipe it accepts is written back (RUN/recipe.yaml) and reads the
same; and a valid variation of a tiny recipe trains a step or raises EmberError.

Hypothesis draws whole recipes (known keys with wrong types, extremes, NaN/inf, unicode, nesting),
YAML text (aliases, anchors, merges, duplicate keys, tags, broken syntax, random characters) and
``--set`` overrides. Any other exception, or a case slower than the deadline, is a bug.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.config import DataConfig, Recipe, load_recipe, recipe_from_dict
from ember.errors import EmberError
from ember.plugins.registry import PLUGINS
from ember.schema import SEED_MAX

MODEL_NAMES = ["gpt", "seq2seq", "vit", "cnn", "rnn", "encoder", "clip", "mlp", "custom"]
SECTIONS = {name: field.annotation for name, field in Recipe.model_fields.items() if name not in ("model", "plugins")}


def _keys(model: Any) -> list[str]:
    return list(getattr(model, "model_fields", {}))


SECTION_KEYS = {name: _keys(cls) for name, cls in SECTIONS.items()}
# Sections of earlier versions, read as plugins and data.replay (ember.migrate): drawn too.
SECTION_KEYS["continual"] = ["old_data", "replay", "ewc", "ewc_samples"]
SECTION_KEYS["distill"] = ["teacher", "temperature", "alpha", "hidden_weight"]
SECTION_KEYS["optim"] = [*SECTION_KEYS["optim"], "l1"]
SECTION_KEYS["train"] = [*SECTION_KEYS["train"], "ema_decay"]
SECTION_KEYS["init"] = [*SECTION_KEYS["init"], "keep_zeros"]
PLUGIN_KEYS = sorted({k for config, _ in PLUGINS.values() for k in _keys(config)})
MODEL_KEYS = sorted({k for cls in Recipe.model_fields["model"].annotation.__args__ for k in _keys(cls)})
NESTED_DATA = {
    "clean": _keys(DataConfig.model_fields["clean"].annotation),
    "dedup": _keys(DataConfig.model_fields["dedup"].annotation),
    "augment": _keys(DataConfig.model_fields["augment"].annotation),
}
DOTTED = (
    [f"{s}.{k}" for s, keys in SECTION_KEYS.items() for k in keys]
    + [f"model.{k}" for k in MODEL_KEYS]
    + [f"data.{s}.{k}" for s, keys in NESTED_DATA.items() for k in keys]
    + [f"plugins.{name}.{k}" for name in PLUGINS for k in PLUGIN_KEYS if k != "name"]
)

EXTREME_INTS = [0, 1, -1, 2, 7, 2**31, SEED_MAX, SEED_MAX + 1, 2**63, 2**64, 2**70, 10**40, -(2**70)]
EXTREME_FLOATS = [0.0, -0.0, 1e-300, 5e-324, 1e300, 0.5, 0.999999, 1.0, 100.0, math.inf, -math.inf, math.nan]
WORDS = [
    "3e-4",
    "1e5",
    "inf",
    "nan",
    ".inf",
    "-.inf",
    ".nan",
    "yes",
    "no",
    "on",
    "null",
    "~",
    "",
    " ",
    "\x00",
    "ü",
    "日本",
    "\u202e",
    "gpt",
    "cnn",
    "auto",
    "stdlib",
    "digits",
    "prepared",
    "cosine",
    "multistep",
    "bf16",
    "fp16",
    "cpu",
    "loss",
    "accuracy",
    "0x10",
    "0o7",
    "1_000",
    "12:30",
    "2001-01-01",
    "[",
    "{",
    "&a",
    "*a",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(EXTREME_INTS),
    st.floats(),
    st.sampled_from(EXTREME_FLOATS),
    st.text(max_size=12),
    st.sampled_from(WORDS),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | st.sampled_from(DOTTED), inner, max_size=3)
    ),
    max_leaves=8,
)


def section(keys: list[str]) -> st.SearchStrategy:
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), values, max_size=4)


model_section = st.fixed_dictionaries(
    {"name": st.sampled_from(MODEL_NAMES) | scalars}, optional={k: values for k in MODEL_KEYS if k != "name"}
)
data_section = st.fixed_dictionaries(
    {}, optional={**{k: values for k in SECTION_KEYS["data"]}, **{k: section(keys) for k, keys in NESTED_DATA.items()}}
)
plugin_entry = st.fixed_dictionaries(
    {"name": st.sampled_from(sorted(PLUGINS)) | scalars}, optional={k: values for k in PLUGIN_KEYS if k != "name"}
)
recipes = st.fixed_dictionaries(
    {"model": model_section | values},
    optional={
        "data": data_section,
        **{s: section(keys) for s, keys in SECTION_KEYS.items() if s != "data"},
        "plugins": st.lists(plugin_entry | values, max_size=3) | values,
        "junk": values,
    },
)

FRAGMENTS = [
    "model:",
    "  name: gpt",
    "  name: cnn",
    "model: {name: rnn}",
    "train:",
    "  max_steps: 5",
    "  max_steps: true",
    "  seed: *a",
    "x: &a [1, 2]",
    "x: &a {max_steps: 3}",
    "train: *a",
    "  <<: *a",
    "train: {<<: *a, seed: 1}",
    "  - 1",
    "{",
    "[",
    "]",
    "}",
    "optim: {lr: 3e-4, lr: 1}",
    "a: &a [*a]",
    "!!python/object/apply:os.system ['true']",
    "data: !!binary aGVsbG8=",
    "? [1, 2]\n: 3",
    "%YAML 1.1",
    "---",
    "...",
    "&x",
    "*x",
    "|",
    ">",
    "\t",
    "'",
    '"\\x00"',
    "schedule: {milestones: [3, 1]}",
    "optim: {eps: .inf}",
    "train: {seed: -1}",
    "2001-01-01: x",
    "!!set {a, b}",
    "a: &b [x,x,x,x]\nb: &c [*b,*b,*b,*b]\nc: [*c,*c,*c,*c]",
    "[[[[[[[[[[[[[[[[",
    "data: {name: prepared}",
]
yaml_texts = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=20), max_size=8).map("\n".join)

override_values = st.one_of(
    st.sampled_from(WORDS + FRAGMENTS),
    st.text(max_size=20),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
)
overrides = st.lists(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(DOTTED) | st.text(max_size=10), override_values)
    | st.text(max_size=15),
    max_size=3,
)

FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def check(path: Path | None, sets: list[str]) -> None:
    """load_recipe returns a Recipe that round-trips through recipe.yaml, or raises EmberError."""
    try:
        recipe = load_recipe(path, sets)
    except EmberError:
        return
    assert isinstance(recipe, Recipe)
    with tempfile.TemporaryDirectory() as tmp:
        written = Path(tmp) / "recipe.yaml"
        written.write_text(recipe.to_yaml(), encoding="utf-8")
        assert load_recipe(written) == recipe


def check_text(text: str | bytes, sets: list[str] = ()) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        check(path, list(sets))


@FUZZ
@given(raw=recipes, sets=overrides)
def test_drawn_recipes_load_or_raise_ember_error(raw, sets):
    check_text(yaml.safe_dump(raw, allow_unicode=True), sets)


@FUZZ
@given(text=yaml_texts, sets=overrides)
def test_drawn_yaml_text_loads_or_raises_ember_error(text, sets):
    check_text(text, sets)


@FUZZ
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_random_bytes_load_or_raise_ember_error(data):
    check_text(data)


@FUZZ
@given(sets=overrides)
def test_overrides_alone_load_or_raise_ember_error(sets):
    check(None, ["model.name=gpt", *sets])


# --- training: valid variations of a tiny recipe train one step or raise EmberError -----------

TINY_CNN = {
    "data": {"name": "digits"},
    "model": {"name": "cnn", "width": 4, "depth": 1, "stages": 1},
    "train": {
        "max_steps": 1,
        "batch_size": 4,
        "eval_every": 0,
        "checkpoint_every": 0,
        "progress": False,
        "peak_flops": 1e12,
        "log_every": 1,
        "device": "cpu",
    },
    "eval": {"max_batches": 1},
}
unit = st.floats(0, 1, exclude_max=True)
VARIATIONS = {
    ("optim", "name"): st.sampled_from(["adamw", "adam", "sgd"]),
    ("optim", "lr"): st.floats(1e-12, 100),
    ("optim", "weight_decay"): st.floats(0, 1e6),
    ("optim", "l1"): st.floats(0, 1e6),
    ("optim", "betas"): st.tuples(unit, unit).map(list),
    ("optim", "eps"): st.floats(1e-300, 1e6),
    ("optim", "momentum"): unit,
    ("optim", "grad_clip"): st.floats(0, 1e6),
    ("schedule", "name"): st.sampled_from(["constant", "step", "multistep", "exponential", "cosine", "linear", "wsd"]),
    ("schedule", "min_lr_ratio"): st.floats(0, 1),
    ("schedule", "step_size"): st.integers(1, 2**70),
    ("schedule", "milestones"): st.lists(st.integers(1, 2**40), max_size=3, unique=True).map(sorted),
    ("schedule", "gamma"): st.floats(1e-300, 1),
    ("schedule", "decay_fraction"): st.floats(1e-300, 1),
    ("train", "seed"): st.sampled_from([0, 1, SEED_MAX]) | st.integers(0, SEED_MAX),
    ("train", "batch_size"): st.integers(1, 9),
    ("train", "grad_accum"): st.integers(1, 3),
    ("train", "label_smoothing"): unit,
    ("train", "ema_decay"): unit,
    ("train", "precision"): st.sampled_from(["fp32", "bf16"]),
    ("train", "max_steps"): st.integers(1, 2),
    ("train", "on_nonfinite"): st.sampled_from(["stop", "skip"]),
    ("data", "seed"): st.sampled_from([0, SEED_MAX]) | st.integers(0, SEED_MAX),
    ("data", "val_fraction"): st.floats(0.01, 0.9),
    ("data", "augment"): st.fixed_dictionaries(
        {},
        optional={
            "rotation": st.floats(0, 180),
            "translate": unit,
            "crop": st.floats(0.01, 1),
            "hflip": st.floats(0, 1),
            "p": st.floats(0, 1),
            "scale": st.tuples(st.floats(0.01, 1), st.floats(1, 10)).map(list),
        },
    ),
    ("model", "dropout"): unit,
    ("model", "width"): st.integers(1, 8),
    ("eval", "batch_size"): st.integers(0, 9),
    ("eval", "max_batches"): st.integers(0, 2),
}
variations = st.dictionaries(st.sampled_from(sorted(VARIATIONS)), st.none(), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: VARIATIONS[k] for k in keys})
)


def train_one(changes: dict) -> None:
    from ember.training.loop import train

    raw = {section: dict(values) for section, values in TINY_CNN.items()}
    for (section_name, key), value in changes.items():
        raw.setdefault(section_name, {})[key] = value
    try:
        recipe = recipe_from_dict(raw)
        with tempfile.TemporaryDirectory() as tmp:
            train(recipe, Path(tmp) / "run")
    except EmberError:
        pass


TRAIN = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=6, **TRAIN)
@given(changes=variations)
def test_valid_variations_of_a_tiny_recipe_train_or_raise_ember_error(changes):
    train_one(changes)


@pytest.mark.slow
@settings(max_examples=60, **TRAIN)
@given(changes=variations)
def test_many_variations_of_a_tiny_recipe_train_or_raise_ember_error(changes):
    train_one(changes)


@FUZZ
@given(changes=variations, model=st.sampled_from(MODEL_NAMES))
def test_valid_variations_load_and_round_trip(changes, model):
    """Mostly valid recipes, so that the round trip through recipe.yaml is exercised often."""
    raw: dict = {"model": {"name": model}}
    for (section_name, key), value in changes.items():
        if section_name != "model":
            raw.setdefault(section_name, {})[key] = value
    check_text(yaml.safe_dump(raw, allow_unicode=True))
