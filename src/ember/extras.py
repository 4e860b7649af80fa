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
import importlib.util
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


def require(module: str, extra: str, feature: str, instead: str = "") -> ModuleType:
    """Import ``module`` and return it; when it is not installed, raise an EmberError that names
    ``feature`` (what needed it) and the extra that installs it (``instead``: what else the user
    may do, e.g. "take mlflow out of train.trackers").

    Example::

        plt = require("matplotlib.figure", "report", "ember report's plots")
    """
    _check_extra(extra)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = (err.name or module).split(".")[0]  # the package one installs, not its submodule
        raise missing_extra(missing, extra, feature, instead) from None


def require_installed(module: str, extra: str, feature: str, instead: str = "") -> None:
    """``require``'s check without the import: refuse, with the same message, a package that is not
    installed, before the work that needs it starts (importing MLflow or W&B takes seconds)."""
    _check_extra(extra)
    package = module.split(".")[0]
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken install, or a module without a spec: the import will say
        found = True
    if not found:
        raise missing_extra(package, extra, feature, instead)


def missing_extra(package: str, extra: str, feature: str, instead: str = "") -> EmberError:
    """The one paragraph for a missing optional package: what needs it, the extra to install, and ``instead``."""
    return EmberError(
        f"{feature} needs the {package} package, which is not installed here: the core install leaves it "
        f"out because only this feature uses it. Install the extra with `pip install 'ember[{extra}]'` "
        f"(or `pip install 'ember[all]'` for every optional feature), then run the command again"
        + (f"; or {instead}." if instead else ".")
    )


def _check_extra(extra: str) -> None:
    if extra not in USER_EXTRAS:
        raise ValueError(f"{extra!r} is not one of ember's extras: {', '.join(USER_EXTRAS)}")
