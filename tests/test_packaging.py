"""Packaging: every import is declared, the extras' messages, one version, py.typed, no POSIX-only import at load.

The floors themselves are tested by installing them: ``make test-floor``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ember
from ember.cli import main
from ember.errors import EmberError
from ember.extras import USER_EXTRAS, require

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ember"
# import name -> distribution name, where they differ
DISTRIBUTION = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "torch_pruning": "torch-pruning",
    "pydantic_core": "pydantic",  # pydantic pins its own core exactly; declaring it twice could only disagree
    "annotated_types": "pydantic",  # the constraint types pydantic's Field(ge=...) is made of: pydantic's own
    "mlflow": "mlflow-skinny",
}
POSIX_ONLY = ("fcntl", "resource", "pwd", "grp", "termios")


def _floors():
    spec = importlib.util.spec_from_file_location("floors", ROOT / "tools" / "floors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


floors = _floors()
PROJECT = floors.tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    return floors.REQUIREMENT.match(requirement).group(1).lower().replace("_", "-")


def _declared(*extras: str) -> set[str]:
    return {_name(line) for line in floors.requirements(PROJECT["project"], list(extras))}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level third-party package, whether imported at module level) for each import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    top_level |= {id(n) for node in tree.body if isinstance(node, ast.Try) for n in node.body + node.orelse}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "ember":
                found.append((name, id(node) in top_level))
    return found


ALL_IMPORTS = {path: _imports(path) for path in SRC.rglob("*.py")}


def test_every_third_party_import_is_declared() -> None:
    declared = _declared("all")
    missing = {
        f"{path.relative_to(SRC)}: {name}"
        for path, found in ALL_IMPORTS.items()
        for name, _ in found
        if DISTRIBUTION.get(name.split(".")[0], name.split(".")[0].replace("_", "-")).lower() not in declared
    }
    assert not missing, f"imported but declared nowhere in pyproject.toml (core or an extra): {sorted(missing)}"
    assert {"scipy", "datasketch", "torch"} <= _declared()  # the scanner sees the core's own


def test_no_extra_is_imported_at_module_level() -> None:
    core = _declared()
    optional = {DISTRIBUTION.get(k, k) for k in ("optuna", "torchao", "torch_pruning", "matplotlib", "kornia")}
    assert not optional & core, "a package of an extra is still in the core dependencies"
    at_load = sorted(
        f"{path.relative_to(SRC)}: {name}"
        for path, found in ALL_IMPORTS.items()
        for name, module_level in found
        if module_level
        and (
            DISTRIBUTION.get(name.split(".")[0], name.split(".")[0].replace("_", "-")) not in core
            or name.startswith("torch.utils.tensorboard")
        )
    )
    assert not at_load, f"an extra's package imported when the module loads (the core install would fail): {at_load}"


def test_extras_table_matches_pyproject() -> None:
    optional = PROJECT["project"]["optional-dependencies"]
    for extra, distributions in USER_EXTRAS.items():
        names = {_name(line) for line in optional[extra]} - {"torch"}  # compress raises torch's floor
        assert names == set(distributions), extra
    assert _declared("all") - _declared() == {d for ds in USER_EXTRAS.values() for d in ds}
    assert _declared("all") <= _declared("test"), "the test extra must install every optional feature"


def test_floors_pin_the_declared_lowest_versions(tmp_path: Path) -> None:
    pins = floors.floors(ROOT / "pyproject.toml", ["test"])
    assert pins["datasketch"] == "2.0" and pins["scipy"] == "1.10" and pins["optuna"] == "4.9"
    assert "torch" not in pins  # one torch build at hand: make test-floor's TORCH
    assert floors.floors(ROOT / "pyproject.toml", [], with_torch=True)["torch"] == "2.6"
    assert floors.floors(ROOT / "pyproject.toml", ["compress"], with_torch=True)["torch"] == "2.11"
    assert floors.floor_of(">=1.4.2") == "1.4.2" and floors.floor_of("==0.17.6") == "0.17.6"
    assert floors.floor_of("") is None and floors.floor_of("<3") is None
    toml = tmp_path / "pyproject.toml"
    toml.write_text('[project]\ndependencies = ["a>=1.2", "b"]\n[project.optional-dependencies]\n'
                    'x = ["c==3", "a>=1.10"]\ny = ["ember[x]", "d>=0.1,<1"]\n')  # fmt: skip
    assert floors.floors(toml, ["y"]) == {"a": "1.10", "c": "3", "d": "0.1"}


def test_one_version_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert "version" not in PROJECT["project"] and PROJECT["project"]["dynamic"] == ["version"]
    assert PROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ember.__version__"}
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ember {ember.__version__}"


def test_package_ships_type_information_and_license() -> None:
    assert (SRC / "py.typed").is_file()
    assert PROJECT["tool"]["setuptools"]["package-data"]["ember"] == ["py.typed"]
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and len(license_text) > 10_000


def _hide(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` and every submodule already loaded unimportable, as if not installed."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def test_require_returns_the_module_or_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require("json", "tune", "a test") is sys.modules["json"]
    with pytest.raises(ValueError, match="not one of ember's extras"):
        require("json", "nope", "a test")
    _hide(monkeypatch, "optuna")
    with pytest.raises(EmberError) as err:
        require("optuna.trial", "tune", "ember tune (hyperparameter search)")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("ember tune (hyperparameter search) needs the optuna package")
    assert "`pip install 'ember[tune]'`" in message and "`pip install 'ember[all]'`" in message


def _quantize() -> None:
    from ember.models.stored import quantize_model

    quantize_model(nn.Sequential(nn.Linear(8, 8)), "int8-dynamic")


def _prune_structured() -> None:
    from ember.compress.structure import prune_channels

    prune_channels(nn.Sequential(nn.Linear(8, 8)), {"x": torch.zeros(2, 8)}, "classify", 0.5)


def _report() -> None:
    from ember.reporting import report

    report(["runs/none"])


def _augment() -> None:
    from ember.data.augment import AugmentConfig, build_image_transform

    build_image_transform([0.5], [0.25], AugmentConfig(rotation=10))


# (extra, package made missing, entry point that needs it)
MISSING = [
    ("compress", "torchao", _quantize),
    ("compress", "torch_pruning", _prune_structured),
    ("report", "matplotlib", _report),
    ("vision", "kornia", _augment),
]


@pytest.mark.parametrize(("extra", "package", "entry"), MISSING, ids=[m[1] for m in MISSING])
def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch, extra: str, package: str, entry) -> None:
    _hide(monkeypatch, package)
    with pytest.raises(EmberError, match=rf"needs the {package} package.*pip install 'ember\[{extra}\]'"):
        entry()


def test_images_without_augmentation_need_no_kornia(monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.data.augment import AugmentConfig, build_image_transform

    _hide(monkeypatch, "kornia")
    transform = build_image_transform([0.5], [0.25], AugmentConfig()).train()
    out = transform(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(out, torch.full((1, 1, 2, 2), 2.0))  # (1 - 0.5) / 0.25


def test_ember_tune_without_optuna_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _hide(monkeypatch, "optuna")
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 0.0001, high: 0.01, log: true}\n")
    run_dir = tmp_path / "tune"
    code = main(["tune", str(ROOT / "recipes" / "gpt-tiny.yaml"), "--space", str(space), "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2
    assert "ember tune (hyperparameter search with Optuna) needs the optuna package" in err
    assert "pip install 'ember[tune]'" in err and "Traceback" not in err
    assert not run_dir.exists()  # refused before anything was written


def test_prepare_lock_without_fcntl_names_posix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ember.data.prepare import _locked

    monkeypatch.setitem(sys.modules, "fcntl", None)
    with pytest.raises(EmberError, match="needs a POSIX system"), _locked(tmp_path):
        pass


def test_no_posix_only_module_is_imported_at_module_level() -> None:
    at_load = sorted(
        f"{path.relative_to(SRC)}: {node.names[0].name if isinstance(node, ast.Import) else node.module}"
        for path in SRC.rglob("*.py")
        for node in ast.parse(path.read_text(encoding="utf-8")).body
        if (isinstance(node, ast.Import) and any(a.name.split(".")[0] in POSIX_ONLY for a in node.names))
        or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in POSIX_ONLY)
    )
    assert not at_load, f"POSIX-only modules imported at load (ember would not import on Windows): {at_load}"


@pytest.mark.slow  # about 8 s: a fresh process imports torch and every ember module
def test_every_module_imports_without_posix_only_modules() -> None:
    """As on Windows: fcntl, resource, pwd, grp and termios missing (third-party packages loaded first,
    so that only ember's own imports are judged)."""
    names = sorted(
        ".".join(("ember", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        for p in SRC.rglob("*.py")
        if p.name != "__main__.py"
    )
    script = (
        "import importlib, sys\n"
        "import numpy, pydantic, torch, torch.distributed, yaml, rich, safetensors\n"
        f"for name in {POSIX_ONLY!r}:\n"
        "    sys.modules[name] = None\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(len(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(names) > 100


def test_the_core_install_trains_evaluates_and_generates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every extra but tb missing (runs still write TensorBoard logs by default): what the core does, works."""
    from conftest import tiny_recipe
    from ember.eval.evaluate import evaluate
    from ember.generation import generate
    from ember.training.loop import train

    # torchmetrics asks the installed distributions whether matplotlib is there, then imports it: a
    # module hidden here but installed would fool it, so it is loaded first (without matplotlib it plots nothing).
    importlib.import_module("torchmetrics.classification")
    importlib.import_module("torchmetrics.utilities.plot")
    for package in ("optuna", "torchao", "torch_pruning", "matplotlib", "kornia"):
        _hide(monkeypatch, package)
    lm = train(tiny_recipe("gpt"), run_dir=tmp_path / "gpt")
    assert lm.step == 4 and len(generate(lm.run_dir, prompt="def ", max_new_tokens=5)) > 4
    images = train(tiny_recipe("cnn"), run_dir=tmp_path / "cnn")  # no data.augment: no kornia
    assert 0.0 <= evaluate(images.run_dir, max_batches=2).metrics["accuracy"] <= 1.0
