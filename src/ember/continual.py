"""``ember continue RUN --data NEW``: keep training a finished run on new data, and measure what it forgot.

The continued run is an ordinary run of RUN's recipe with three changes: ``data`` is NEW's
data section, ``init.from_run`` is RUN (its trained weights), and ``continual`` names the
old data, with ``replay`` — that share of the training set drawn once from the old
training split, so batches keep reminding the model of the old task — and ``ewc`` —
elastic weight consolidation, a pull of each weight back to RUN's value in proportion to
its Fisher information on the old data (``ember.training.ewc``). Steps, learning rate and
any other key come from ``--set``.

Both models are then scored on both validation splits (``ember eval``'s metrics): the
gain is the new data's metric after minus before, the forgetting is the old data's metric
before minus after (for a loss, the other way round, so that forgetting is positive when
things got worse). The report goes to ``RUN_NEW/continual.json``.

>>> report = continue_training("runs/digits-0-4", "recipes/digits-5-9.yaml", replay=0.2)
>>> report["forgetting"], report["gain"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


from ember.config import DataConfig, apply_overrides, data_config_from_dict, load_recipe, read_recipe_file, recipe_from_dict
from ember.errors import EmberError


def load_data_section(path: str | Path) -> DataConfig:
    """The ``data`` section of a YAML file holding either a whole recipe or just a data section."""
    path = Path(path)
    if not path.is_file():
        raise EmberError(f"--data {path} does not exist. Give a YAML file with a data section (or a recipe), e.g. "
                         f"recipes/data/digits-5-9.yaml.")
    raw = read_recipe_file(path) or {}
    if not isinstance(raw, dict):
        raise EmberError(f"--data {path} must be a YAML mapping: a recipe, or a data section (name: digits, ...).")
    return data_config_from_dict(raw.get("data", raw), source=str(path))


def continue_training(run_dir: str | Path, data: str | Path | DataConfig, replay: float = 0.0, ewc: float = 0.0,
                      overrides: Optional[list[str]] = None, out: str | Path | None = None,
                      resume: Optional[str] = None) -> dict:
    """Train the finished run ``run_dir`` further on ``data``; return the report (metrics before and
    after on the old and the new validation split, gain, forgetting)."""
    from ember.compress.measure import check_run_dir
    from ember.eval.evaluate import evaluate
    from ember.training.checkpoint import write_json_atomic
    from ember.training.loop import train
    from ember.training.tasks import metric_mode

    run_dir = Path(run_dir)
    check_run_dir(run_dir, "ember continue")
    new_data = data if isinstance(data, DataConfig) else load_data_section(data)
    old = load_recipe(run_dir / "recipe.yaml")
    raw = old.model_dump(mode="json")
    raw["data"] = new_data.model_dump(mode="json")
    raw["init"] = {"from_run": str(run_dir), "keep_zeros": False}
    raw["continual"] = {"old_data": old.data.model_dump(mode="json"), "replay": replay, "ewc": ewc}
    raw["distill"] = {"teacher": ""}
    raw = apply_overrides(raw, list(overrides or []))
    recipe = recipe_from_dict(raw, source="the continued recipe")
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}-continued"
    result = train(recipe, run_dir=out, resume=resume)
    metric = recipe.eval.metric
    scores = {f"{when}_{which}": evaluate(run, data=section)["metrics"]
              for when, run in (("before", run_dir), ("after", out))
              for which, section in (("old", old.data), ("new", recipe.data))}
    sign = 1 if metric_mode(metric, recipe.eval.mode) == "max" else -1
    report = {
        "run": str(out), "source": str(run_dir), "metric": metric, "replay": replay, "ewc": ewc, "steps": result.step,
        **scores,
        "gain": sign * (scores["after_new"][metric] - scores["before_new"][metric]),
        "forgetting": sign * (scores["before_old"][metric] - scores["after_old"][metric]),
    }
    write_json_atomic(out / "continual.json", report)
    return report


def format_report(report: dict) -> str:
    """The before/after table of ``continue_training``'s report."""
    m = report["metric"]
    lines = [f"{'':<8} {'old data ' + m:>22} {'new data ' + m:>22}"]
    for when in ("before", "after"):
        lines.append(f"{when:<8} {report[f'{when}_old'][m]:>22.4f} {report[f'{when}_new'][m]:>22.4f}")
    lines.append(f"gain on the new data {report['gain']:+.4f}; forgetting of the old {report['forgetting']:+.4f} "
                 f"(replay {report['replay']}, ewc {report['ewc']}, {report['steps']} steps)")
    return "\n".join(lines)
