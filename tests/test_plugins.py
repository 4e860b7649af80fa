"""The contract every step plugin keeps (composer's pattern: one test over all of them).

Each registered plugin, with the example below, must change training (it does something),
resume bit-identically from a checkpoint (its state travels with it), and be exact under
gradient accumulation (its terms are summed like the loss). A new plugin is tested by
being registered and given an example here; a plugin without one fails
``test_every_registered_plugin_has_an_example``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import TINY, tiny_recipe
from ember.compress.prune import prune
from ember.config import recipe_from_dict
from ember.errors import EmberError
from ember.plugins.registry import PLUGINS
from ember.training.loop import train

COMMON = ("train.deterministic=true", "optim.name=sgd", "optim.lr=0.3", "model.dropout=0.0")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A trained tiny GPT (a teacher, and a start for EWC) and its magnitude-pruned copy (keep_zeros).
    A GPT, not the CNN: BatchNorm's batch statistics make no model with it exact under accumulation."""
    root = tmp_path_factory.mktemp("plugin-sources")
    teacher = train(tiny_recipe("gpt", "train.max_steps=6", "model.n_embd=48"), root / "teacher").run_dir
    base = train(tiny_recipe("gpt", "train.max_steps=3"), root / "base").run_dir
    pruned = Path(prune(base, amount=0.5, out=root / "pruned", say=lambda text: None).run)
    return {"teacher": teacher, "base": base, "pruned": pruned}


def examples(sources) -> dict[str, tuple[dict, list[str]]]:
    """Per plugin: its recipe entry and the overrides it needs (a starting run)."""
    return {
        "l1": ({"name": "l1", "weight": 0.05}, []),
        # the tiny GPT reads bytes: one weight per byte, every third one heavier
        "class_weights": ({"name": "class_weights", "weights": [1.0 + 2.0 * (i % 3 == 0) for i in range(256)]}, []),
        "ema": ({"name": "ema", "decay": 0.5}, []),
        "keep_zeros": ({"name": "keep_zeros"}, [f"init.from_run={sources['pruned']}"]),
        "ewc": (
            {"name": "ewc", "strength": 50.0, "samples": 8, "data": TINY["gpt"]["data"]},
            [f"init.from_run={sources['base']}"],
        ),
        "distill": ({"name": "distill", "teacher": str(sources["teacher"]), "alpha": 0.7, "hidden_weight": 1.0}, []),
        "lora": ({"name": "lora", "rank": 4, "alpha": 8.0, "targets": ["q", "v", "fc"]}, []),
    }


def recipe_with(entry, overrides, *more):
    recipe = tiny_recipe("gpt", *COMMON, *overrides, *more)
    return recipe_from_dict({**recipe.model_dump(mode="json"), "plugins": [entry] if entry else []})


def weights(run_dir):
    return safetensors.torch.load_file(str(run_dir / "model.safetensors"))


def test_every_registered_plugin_has_an_example(sources):
    missing = sorted(set(PLUGINS) - set(examples(sources)))
    assert not missing, f"registered plugins without an example in tests/test_plugins.py: {missing}"


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_plugin_changes_training_and_resumes_bit_identically(tmp_path, sources, name):
    entry, overrides = examples(sources)[name]
    recipe = recipe_with(entry, overrides, "train.max_steps=4", "train.checkpoint_every=2")
    full = weights(train(recipe, tmp_path / "full").run_dir)
    plain = weights(train(recipe_with(None, overrides, "train.max_steps=4"), tmp_path / "plain").run_dir)
    # (lora's model also holds its adapters, which a plain run's has not)
    assert any(n not in plain or not torch.equal(full[n], plain[n]) for n in full), f"the {name} plugin changed nothing"
    cut = tmp_path / "cut"
    train(recipe, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000004")  # as if the process died after step 2's checkpoint
    (cut / "model.safetensors").unlink()
    assert train(recipe, cut, resume="auto").step == 4
    resumed = weights(cut)
    assert all(torch.equal(full[n], resumed[n]) for n in full), f"the {name} plugin does not resume exactly"


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_plugin_is_exact_under_gradient_accumulation(tmp_path, sources, name):
    entry, overrides = examples(sources)[name]
    small = recipe_with(entry, overrides, "train.batch_size=4", "train.grad_accum=3", "train.max_steps=3")
    big = recipe_with(entry, overrides, "train.batch_size=12", "train.grad_accum=1", "train.max_steps=3")
    a, b = weights(train(small, tmp_path / "a").run_dir), weights(train(big, tmp_path / "b").run_dir)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=f"{name}: {n}")


def test_keep_zeros_holds_the_pruned_weights_at_zero(tmp_path, sources):
    entry, overrides = examples(sources)["keep_zeros"]
    start = weights(sources["pruned"])
    end = weights(train(recipe_with(entry, overrides, "train.max_steps=3"), tmp_path / "r").run_dir)
    zeros = {n: start[n] == 0 for n in start if n.endswith("weight") and start[n].dim() > 1 and (start[n] == 0).any()}
    assert zeros and all(bool((end[n][z] == 0).all()) for n, z in zeros.items())


def test_old_recipe_sections_become_plugins_and_conflicts_are_refused():
    recipe = tiny_recipe("cnn", "optim.l1=0.01", "train.ema_decay=0.9")
    assert [(p.name, getattr(p, "weight", None)) for p in recipe.plugins] == [("l1", 0.01), ("ema", None)]
    assert "l1:" not in recipe.to_yaml().split("plugins:")[0]  # written back in today's form only
    both = {**tiny_recipe("cnn").model_dump(mode="json"), "plugins": [{"name": "l1", "weight": 0.02}]}
    both["optim"]["l1"] = 0.01  # one file giving one method both ways: which is meant?
    with pytest.raises(EmberError, match="optim.l1 and a plugins entry named 'l1' are both given"):
        recipe_from_dict(both)
    # As overrides (or search keys) the old key is the new one: the last setting wins, 0 switches it off.
    assert tiny_recipe("cnn", "optim.l1=0.01", "plugins.l1.weight=0.02").plugins[0].weight == 0.02
    assert tiny_recipe("cnn", "plugins.ema.decay=0.9", "train.ema_decay=0").plugins == []
    with pytest.raises(EmberError, match=r"distill\.alpha: Input should be less than or equal to 1"):
        recipe_from_dict({**tiny_recipe("cnn").model_dump(mode="json"), "distill": {"teacher": "", "alpha": 7}})
    with pytest.raises(EmberError, match="lists \\['ema'\\] more than once"):
        recipe_from_dict(
            {
                **tiny_recipe("cnn").model_dump(mode="json"),
                "plugins": [{"name": "ema", "decay": 0.5}, {"name": "ema", "decay": 0.6}],
            }
        )


def test_a_checkpoint_of_an_earlier_version_with_ewc_and_replay_passes_the_resume_check():
    from ember.data.config import DataConfig
    from ember.training.resume import check_compatible

    old = tiny_recipe("cnn").model_dump(mode="json")
    del old["plugins"], old["data"]["replay"]  # keys that did not exist then
    old_data = DataConfig(name="digits", classes=[0, 1]).model_dump(mode="json")
    del old_data["replay"]
    old["continual"] = {"old_data": old_data, "replay": 0.2, "ewc": 5.0, "ewc_samples": 16}
    recipe = recipe_from_dict(old)  # today's reading of the recipe the run was started with
    assert recipe.data.replay.share == 0.2 and recipe.plugins[0].strength == 5.0
    check_compatible({"recipe": old, "dp_size": 1}, recipe, "ckpt")
    with pytest.raises(EmberError, match="plugins"):
        check_compatible({"recipe": {**old, "continual": {**old["continual"], "ewc": 6.0}}, "dp_size": 1}, recipe, "c")


def test_a_search_space_may_name_plugin_keys_in_either_form():
    from ember.search import with_params

    recipe = with_params(
        tiny_recipe("cnn", "plugins.ema.decay=0.9"), {"train.ema_decay": 0.5, "plugins.l1.weight": 0.01}
    )
    assert [(p.name, p.model_dump()) for p in recipe.plugins] == [
        ("ema", {"name": "ema", "decay": 0.5}),
        ("l1", {"name": "l1", "weight": 0.01}),
    ]
