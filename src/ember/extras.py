"""Optional dependencies: import a package that only some commands need, or say which extra installs it.

The core install (``pip install ember``) carries what training, evaluation and generation need.
Packages that one command alone needs live in extras (``pyproject.toml``); a command that reaches
for one that is missing gets one paragraph naming the extra, never a bare ``ImportError``.

Example::

    from ember.extras import require
    optuna = require("optuna", "tune", "ember tune (hyperparameter search)")
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ember.errors import EmberError

# extra -> the distributions it adds: pyproject.toml's [project.optional-dependencies] says the
# same with version floors (tests/test_packaging.py keeps the two equal).
USER_EXTRAS: dict[str, tuple[str, ...]] = {
    "tune": ("optuna", "sqlalchemy"),
    "compress": ("torchao", "torch-pruning"),
    "report": ("matplotlib",),
    "vision": ("kornia",),
    "tb": ("tensorboard",),
    "mlflow": ("mlflow-skinny", "sqlalchemy", "alembic"),
    "wandb": ("wandb",),
    "parquet": ("pyarrow",),
    "hf": ("transformers",),
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "ray": ("ray",),
}


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` and return it; when it is not installed, raise an EmberError that names
    ``feature`` (what needed it) and the extra that installs it.

    Example::

        plt = require("matplotlib.figure", "report", "ember report's plots")
    """
    if extra not in USER_EXTRAS:
        raise ValueError(f"{extra!r} is not one of ember's extras: {', '.join(USER_EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = (err.name or module).split(".")[0]  # the package one installs, not its submodule
        raise EmberError(
            f"{feature} needs the {missing} package, which is not installed here: the core install leaves it "
            f"out because only this feature uses it. Install the extra with `pip install 'ember[{extra}]'` "
            f"(or `pip install 'ember[all]'` for every optional feature), then run the command again."
        ) from None
