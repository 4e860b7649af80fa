"""``ember continue RUN --data NEW``: keep training a finished run on new data, and measure what it forgot.

The continued run is an ordinary run of RUN's recipe with these changes: ``data`` is NEW's
data section, ``init.from_run`` is RUN (its trained weights), with ``replay`` the data gains
``data.replay`` — that share of the training set drawn once from RUN's training split, so
batches keep reminding the model of the old task — and with ``ewc`` the ``ewc`` step plugin
— elastic weight consolidation, a pull of each weight back to RUN's value in proportion to
its Fisher information on the old data (``ember.plugins.ewc``). Steps, learning rate and
any other key come from ``--set``.

Both models are then scored on both validation splits (``ember eval``'s metrics): the
gain is the new data's metric after minus before, the forgetting is the old data's metric
before minus after (for a loss, the other way round, so that forgetting is positive when
things got worse). The report goes to ``RUN_NEW/continual.json``.

Example::

    report = continue_training("runs/digits-0-4", "recipes/digits-5-9.yaml", replay=0.2)
    report.forgetting, report.gain
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ember.config import (
    DataConfig,
    Recipe,
    apply_overrides,
    data_config_from_dict,
    load_recipe,
    read_recipe,
    read_recipe_file,
    recipe_from_dict,
)
from ember.errors import EmberError


def load_data_section(path: str | Path) -> DataConfig:
    """The ``data`` section of a YAML file holding either a whole recipe or just a data section."""
    path = Path(path)
    if not path.is_file():
        raise EmberError(
            f"--data {path} does not exist. Give a YAML file with a data section (or a recipe), e.g. "
            f"recipes/data/digits-5-9.yaml."
        )
    raw = read_recipe_file(path) or {}
    if not isinstance(raw, dict):
        raise EmberError(f"--data {path} must be a YAML mapping: a recipe, or a data section (name: digits, ...).")
    if "base" in raw:  # a recipe built on another: its data section is the merged one
        raw = read_recipe(path)
    return data_config_from_dict(raw.get("data", raw), source=str(path))


@dataclass(frozen=True)
class ContinueResult:
    """What ``ember continue`` measured: ``eval.metric``'s values before and after, on the old and the
    new validation split (each the full metrics dict), the gain on the new and the forgetting of the old."""

    run: str
    source: str
    metric: str
    replay: float
    ewc: float
    steps: int
    before_old: dict[str, float]
    before_new: dict[str, float]
    after_old: dict[str, float]
    after_new: dict[str, float]
    gain: float
    forgetting: float

    def to_dict(self) -> dict:
        """continual.json."""
        return asdict(self)


def continue_training(
    run_dir: str | Path,
    data: str | Path | DataConfig,
    replay: float = 0.0,
    ewc: float = 0.0,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    resume: str | None = None,
) -> ContinueResult:
    """Train the finished run ``run_dir`` further on ``data``; return the report (metrics before and
    after on the old and the new validation split, gain, forgetting), also written to continual.json."""
    from ember.atomic import write_json_atomic
    from ember.compress.measure import check_run_dir
    from ember.eval.evaluate import evaluate
    from ember.training.loop import train
    from ember.training.tasks import metric_mode

    run_dir = Path(run_dir)
    check_run_dir(run_dir, "ember continue")
    old = load_recipe(run_dir / "recipe.yaml")
    recipe = continued_recipe(
        old, data if isinstance(data, DataConfig) else load_data_section(data), run_dir, replay, ewc, overrides
    )
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}-continued"
    result = train(recipe, run_dir=out, resume=resume)
    metric, new_data = recipe.eval.metric, recipe.data.model_copy(update={"replay": None})  # replay: training only
    scores = {
        f"{when}_{which}": evaluate(run, data=section).metrics
        for when, run in (("before", run_dir), ("after", out))
        for which, section in (("old", old.data), ("new", new_data))
    }
    sign = 1 if metric_mode(metric, recipe.eval.mode) == "max" else -1
    report = ContinueResult(
        run=str(out),
        source=str(run_dir),
        metric=metric,
        replay=replay,
        ewc=ewc,
        steps=result.step,
        **scores,
        gain=sign * (scores["after_new"][metric] - scores["before_new"][metric]),
        forgetting=sign * (scores["before_old"][metric] - scores["after_old"][metric]),
    )
    write_json_atomic(out / "continual.json", report.to_dict())
    return report


def continued_recipe(
    old: Recipe, new_data: DataConfig, run_dir: Path, replay: float, ewc: float, overrides: list[str] | None
) -> Recipe:
    """``old`` (RUN's recipe) on ``new_data``, starting from RUN's weights, with replay and EWC as asked."""
    raw = old.model_dump(mode="json")
    raw["data"] = new_data.model_dump(mode="json")
    raw["init"] = {"from_run": str(run_dir)}
    old_data = {**old.data.model_dump(mode="json"), "replay": None}  # what RUN learnt from, without its own replay
    if replay:
        raw["data"]["replay"] = {"data": old_data, "share": replay}
    # The source's teacher, masks and anchor belong to its own run; its other plugins (EMA, L1) carry on.
    raw["plugins"] = [p for p in raw["plugins"] if p["name"] not in ("distill", "keep_zeros", "ewc")]
    if ewc:
        raw["plugins"].append({"name": "ewc", "strength": ewc, "data": old_data})
    raw = apply_overrides(raw, list(overrides or []))
    return recipe_from_dict(raw, source="the continued recipe")


def format_report(report: ContinueResult) -> str:
    """The before/after table of ``continue_training``'s report."""
    m = report.metric
    lines = [f"{'':<8} {'old data ' + m:>22} {'new data ' + m:>22}"]
    for when in ("before", "after"):
        old, new = getattr(report, f"{when}_old"), getattr(report, f"{when}_new")
        lines.append(f"{when:<8} {old[m]:>22.4f} {new[m]:>22.4f}")
    lines.append(
        f"gain on the new data {report.gain:+.4f}; forgetting of the old {report.forgetting:+.4f} "
        f"(replay {report.replay}, ewc {report.ewc}, {report.steps} steps)"
    )
    return "\n".join(lines)
