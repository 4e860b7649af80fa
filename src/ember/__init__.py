"""ember: train neural models end to end from one recipe.

Example::

    import ember
    result = ember.train(ember.load_recipe("recipes/gpt-tiny.yaml", ["train.max_steps=20"]))
    print(ember.generate(result.run_dir, prompt="def "))
"""

__version__ = "0.1.0"

# Lazy: `ember --help` and `import ember` stay fast; torch loads when a function is used.
# Every public function, and the module that defines it (no module is named like a function,
# or importing it would replace the function on this package).
_PUBLIC = {
    "train": "ember.training.loop",
    "evaluate": "ember.eval.evaluate",
    "load_model": "ember.runs",
    "cross_validate": "ember.eval.crossval",
    "tune": "ember.search",
    "load_space": "ember.search",
    "ensemble": "ember.eval.ensemble",
    "generate": "ember.generation",
    "distill": "ember.compress.distill",
    "quantize": "ember.compress.quantize",
    "prune": "ember.compress.prune",
    "compare": "ember.compress.compare",
    "continue_training": "ember.continual",
    "probe": "ember.eval.probe",
    "report": "ember.reporting",
    "load_recipe": "ember.config",
    "show_recipe": "ember.recipe_tools",
    "explain_key": "ember.recipe_tools",
    "recipe_json_schema": "ember.recipe_tools",
    "EmberError": "ember.errors",
    "configure_logging": "ember.log",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ember' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])  # the lazy functions too: an editor or dir(ember) lists them
