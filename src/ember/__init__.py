"""ember: train neural models end to end from one recipe.

>>> import ember
>>> result = ember.train(ember.load_recipe("recipes/gpt-tiny.yaml", ["train.max_steps=20"]))
>>> print(ember.generate(result.run_dir, prompt="def "))
"""

__version__ = "0.1.0"

__all__ = ["train", "evaluate", "generate", "load_recipe", "EmberError", "__version__"]


def __getattr__(name: str):
    # Lazy: `ember --help` and `import ember` stay fast; torch loads when a function is used.
    if name == "train":
        from ember.train.loop import train

        return train
    if name == "evaluate":
        from ember.eval.evaluate import evaluate

        return evaluate
    if name == "generate":
        from ember.generate import generate

        return generate
    if name == "load_recipe":
        from ember.config import load_recipe

        return load_recipe
    if name == "EmberError":
        from ember.errors import EmberError

        return EmberError
    raise AttributeError(f"module 'ember' has no attribute {name!r}")
