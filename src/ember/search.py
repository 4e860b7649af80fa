"""``ember tune RECIPE --space SPACE.yaml``: hyper-parameter search with Optuna.

Each trial is an ordinary training run (``TUNE/trials/trial_NNNN``) of the recipe with
the trial's values set. It reports the watched validation metric (``eval.metric``) after
every validation, so Optuna's pruner (median or Hyperband) can stop a bad trial early.
The study lives in a database — SQLite in the tune directory by default; any SQLAlchemy
URL works, so workers on several machines can share one study — and a second run of the
same command resumes it: finished trials count, and a trial cut short by Ctrl-C (or whose
process died, once its heartbeat is stale) is run again from its newest checkpoint.

Under several processes one rank talks to the study and broadcasts each trial's values
and each pruning decision; every rank trains the same trial together.

The space file maps recipe keys to ranges::

    optim.lr:        {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    model.n_layer:   {type: int, low: 1, high: 4}
    model.dropout:   {type: float, low: 0.0, high: 0.3, step: 0.1}
    optim.name:      {type: categorical, choices: [adamw, sgd]}

Example::

    report = tune(load_recipe("recipes/gpt-tiny.yaml"), load_space("space.yaml"), sampler="tpe", trials=20)
    report.best["params"], report.best_recipe
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from ember.atomic import write_json_atomic, write_text_atomic
from ember.config import Recipe, read_recipe_file, recipe_from_dict, require_recipe, set_key
from ember.errors import EmberError
from ember.extras import require
from ember.runs import default_run_dir
from ember.training.device import resolve_device
from ember.training.distributed import broadcast_object, shared_process_group
from ember.training.loop import train
from ember.training.tasks import metric_mode

logger = logging.getLogger(__name__)


class FloatRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0, description="a grid: low, low+step, ... high")

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        _check_range(self.low, self.high, self.log, self.step)
        return self


class IntRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> IntRange:
        _check_range(self.low, self.high, self.log, None if self.step == 1 else self.step)
        return self


class Choice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if not low < high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError("a log range needs low > 0")
    if log and step is not None:
        raise ValueError("a range is either log or stepped, not both")


Param = Annotated[FloatRange | IntRange | Choice, Field(discriminator="type")]
SPACE = TypeAdapter(dict[str, Param])


def load_space(path: str | Path) -> dict[str, Param]:
    """Read and check a search-space YAML file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise EmberError(
            f"The search space {path} does not exist. Give a YAML file mapping recipe keys to ranges, "
            f"e.g. `optim.lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}`."
        )
    raw = read_recipe_file(path) or {}  # the recipe reader's bounds: duplicate keys, aliases, size, UTF-8
    try:
        space = SPACE.validate_python(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][:1])}: {e['msg']}" for e in err.errors())
        raise EmberError(
            f"The search space {path} is not valid: {problems}. Each key is a recipe key "
            f"(section.key) with {{type: float|int, low, high[, log][, step]}} or "
            f"{{type: categorical, choices: [...]}}."
        ) from None
    if not space:
        raise EmberError(f"The search space {path} names no parameters.")
    return space


def with_params(recipe: Recipe, params: dict[str, Any]) -> Recipe:
    """``recipe`` with each dotted key of ``params`` set (validated like any recipe)."""
    raw = recipe.model_dump(mode="json")
    for key, value in params.items():
        set_key(
            raw,
            key.split("."),
            value,
            f"The search space's key {key!r} (keys are like optim.lr, model.n_layer "
            f"or plugins.ema.decay; see README's recipe reference)",
        )
    return recipe_from_dict(raw, source=f"the recipe with {params}")


def suggest(trial, space: dict[str, Param]) -> dict[str, Any]:
    """The trial's value for every key of ``space`` (Optuna's suggest_* calls)."""
    params = {}
    for key, p in space.items():
        if isinstance(p, Choice):
            params[key] = trial.suggest_categorical(key, p.choices)
        elif isinstance(p, IntRange):
            params[key] = trial.suggest_int(key, p.low, p.high, step=p.step, log=p.log)
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return params


def grid_points(space: dict[str, Param]) -> dict[str, list]:
    """Every value grid search visits, per key: choices, each int (by step), each float step."""
    grid = {}
    for key, p in space.items():
        if isinstance(p, Choice):
            grid[key] = list(p.choices)
        elif isinstance(p, IntRange) and not p.log:
            grid[key] = list(range(p.low, p.high + 1, p.step))
        elif isinstance(p, FloatRange) and p.step is not None:
            n = int(math.floor((p.high - p.low) / p.step + 1e-9))
            grid[key] = [round(p.low + i * p.step, 12) for i in range(n + 1)]
        else:
            raise EmberError(
                f"Grid search needs a finite set of values; {key} is a continuous{' log' if p.log else ''} "
                f"range. Give it a step (e.g. step: 0.1), make it categorical, or use --sampler tpe or random."
            )
    return grid


def _optuna() -> ModuleType:
    """The optuna module, or the EmberError naming the extra that installs it."""
    return require("optuna", "tune", "ember tune (hyperparameter search with Optuna)")


def build_sampler(name: str, space: dict[str, Param], seed: int, startup_trials: int):
    optuna = _optuna()

    if name == "grid":
        return optuna.samplers.GridSampler(grid_points(space), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    raise EmberError(f"--sampler {name!r} is not a sampler; choose grid, random or tpe.")


def build_pruner(name: str, recipe: Recipe, startup_trials: int):
    optuna = _optuna()

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
    if name == "hyperband":  # resources are optimiser steps, from one validation to the whole run
        return optuna.pruners.HyperbandPruner(
            min_resource=recipe.train.eval_every or 1, max_resource=recipe.train.max_steps
        )
    if name == "none":
        return optuna.pruners.NopPruner()
    raise EmberError(f"--pruner {name!r} is not a pruner; choose median, hyperband or none.")


def open_study(storage: str, name: str, recipe: Recipe, space_yaml: str, direction: str, sampler, pruner):
    """Create the study, or load it (a resumed or shared search) after checking it is the same search."""
    optuna = _optuna()
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # ember prints one line per trial itself
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 4-5, and exactly what is needed
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(
                storage, heartbeat_interval=60, grace_period=180, heartbeat_stale_trial_callback=retry_trial
            )
        study = optuna.create_study(
            storage=rdb,
            study_name=name,
            sampler=sampler,
            pruner=pruner,
            direction="minimize" if direction == "min" else "maximize",
            load_if_exists=True,
        )
        saved = study.user_attrs
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        raise EmberError(
            f"{storage} cannot be opened as an Optuna study database ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); it is damaged or not a study. Move it away to start the "
            f"search anew, or point --run-dir / --storage at the study's real database."
        ) from None
    if not saved:
        study.set_user_attr("recipe", recipe.to_yaml())
        study.set_user_attr("space", space_yaml)
    elif saved.get("recipe") != recipe.to_yaml() or saved.get("space") != space_yaml:
        raise EmberError(
            f"The study {name!r} in {storage} was started with a different recipe or search space. Run "
            f"the same recipe and space to resume it, or name a new study with --study."
        )
    if study.direction.name.lower()[:3] != direction:
        raise EmberError(
            f"The study {name!r} {study.direction.name.lower()}s; eval.metric={recipe.eval.metric} wants "
            f"{direction}. Name a new study with --study."
        )
    return study


def retry_trial(study, trial) -> None:
    """Queue a trial that did not finish (interrupted, or its process died) to run again from its
    run directory: ``train(resume="auto")`` continues at its newest checkpoint."""
    study.enqueue_trial(
        trial.params, user_attrs={"retry_of": trial.number, "resume_dir": trial.user_attrs.get("run_dir", "")}
    )


def retry_interrupted(study) -> int:
    """Queue each interrupted trial (Ctrl-C) that has not been queued again yet; how many."""
    from optuna.trial import TrialState

    queued = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    todo = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.user_attrs.get("interrupted") and t.number not in queued
    ]
    for t in todo:
        retry_trial(study, t)
    return len(todo)


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_trial(recipe: Recipe, run_dir: str, judge: Callable[[int, dict], bool]):
    """One trial's training run, on every rank; ``judge`` answers "prune now?" after each validation."""
    return train(recipe, run_dir=run_dir, resume="auto", on_eval=judge)


def lead_objective(recipe: Recipe, space: dict[str, Param], trials_dir: Path, metric: str, total: int):
    """Rank 0's objective: sample, broadcast, train, report."""
    optuna = _optuna()

    def objective(trial) -> float:
        params = suggest(trial, space)
        trial_recipe = with_params(recipe, params)  # a bad combination fails this trial before anyone trains
        run_dir = trial.user_attrs.get("resume_dir") or str(trials_dir / f"trial_{trial.number:04d}")
        trial.set_user_attr("run_dir", run_dir)
        broadcast_object({"params": params, "run_dir": run_dir})

        def judge(step: int, metrics: dict) -> bool:
            trial.report(metrics[metric], step)
            return broadcast_object(trial.should_prune())

        try:
            result = run_trial(trial_recipe, run_dir, judge)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # queued again when the search resumes
            raise
        except EmberError as err:  # e.g. a diverging learning rate: this trial fails, the search goes on
            logger.warning("ember tune: trial %d failed: %s.", trial.number, str(err).split(". ")[0])
            raise
        trial.set_user_attr("steps", result.step)
        trial.set_user_attr("metrics", result.metrics)
        shown = "  ".join(f"{k}={_short(v)}" for k, v in params.items())
        outcome = f"pruned at step {result.step}" if result.halted else f"{metric} {result.metrics[metric]:.4f}"
        logger.info(
            "ember tune: trial %d (%d/%d): %s → %s", trial.number, finished(trial.study) + 1, total, shown, outcome
        )
        if result.halted:
            raise optuna.TrialPruned(f"pruned at step {result.step}")
        return result.metrics[metric]

    return objective


def follow(recipe: Recipe) -> None:
    """Ranks other than 0: train each trial rank 0 broadcasts, until it broadcasts None."""
    while (task := broadcast_object(None)) is not None:
        try:
            run_trial(
                with_params(recipe, task["params"]), task["run_dir"], lambda step, metrics: broadcast_object(None)
            )
        except EmberError:
            pass  # the same error failed the trial on rank 0, which goes on to the next one


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class TuneResult:
    """What ``tune`` returns; ``to_dict()`` is TUNE/tune.json.

    ``trials``: one ``{"trial", "state", "value", "params", "steps", "run_dir"}`` per trial, ranked
    (completed by value, then pruned by their last report, then the rest); ``best``: the first
    completed one, or None; ``importances``: each parameter's fANOVA share ({} when fewer than two
    trials completed); ``best_recipe``: TUNE/best.yaml, written when there is a best trial.
    """

    study: str
    storage: str
    metric: str
    direction: str
    best: dict[str, Any] | None
    trials: list[dict[str, Any]]
    importances: dict[str, float]
    best_recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: every field, ``best_recipe`` only when there is one."""
        return {k: v for k, v in asdict(self).items() if k != "best_recipe" or v is not None}


def _open_study(
    recipe: Recipe,
    space: dict[str, Param],
    run_dir: Path,
    storage: str | None,
    study_name: str,
    space_yaml: str,
    direction: str,
    search: tuple,
    trials: int,
):
    """(storage, the study, trials still to run), saying so; ``search``: (sampler, seed, startup trials, pruner)."""
    sampler, seed, startup_trials, pruner = search
    run_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"
    study = open_study(
        storage,
        study_name,
        recipe,
        space_yaml,
        direction,
        build_sampler(sampler, space, seed, startup_trials),
        build_pruner(pruner, recipe, startup_trials),
    )
    if requeued := retry_interrupted(study):
        logger.info("ember tune: %d interrupted trial(s) will continue from their checkpoints", requeued)
    remaining = trials - finished(study)
    logger.info(
        "ember tune: study %r in %s: %d finished trial(s), %d to go",
        study_name,
        storage,
        finished(study),
        max(remaining, 0),
    )
    return storage, study, remaining


def tune(
    recipe: Recipe,
    space: dict[str, Param],
    sampler: str = "tpe",
    trials: int = 20,
    run_dir: str | Path | None = None,
    storage: str | None = None,
    study_name: str = "ember",
    pruner: str = "median",
    seed: int = 0,
    startup_trials: int = 5,
) -> TuneResult:
    """Search ``space`` around ``recipe`` until the study holds ``trials`` finished (complete or
    pruned) trials; returns the report also written to TUNE/tune.json, with TUNE/best.yaml."""
    require_recipe(recipe, "ember.tune")
    _optuna()  # before anything is written: without ember[tune], one paragraph naming it
    if trials < 1:
        raise EmberError(f"--trials {trials}: give at least 1.")
    metric, direction = recipe.eval.metric, metric_mode(recipe.eval.metric, recipe.eval.mode)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir("tune")
    for key, p in space.items():  # every key is a recipe key, before the first trial trains
        with_params(recipe, {key: p.choices[0] if isinstance(p, Choice) else p.low})
    space_yaml = yaml.safe_dump(
        {k: p.model_dump(exclude_defaults=True) for k, p in space.items()}
    )  # type is required: kept
    with shared_process_group(resolve_device(recipe.train.device), recipe.parallel.timeout_s) as ctx:
        if not ctx.is_main:
            follow(recipe)
            return broadcast_object(None)
        storage, study, remaining = _open_study(
            recipe,
            space,
            run_dir,
            storage,
            study_name,
            space_yaml,
            direction,
            (sampler, seed, startup_trials, pruner),
            trials,
        )
        if remaining > 0:
            from optuna.study import MaxTrialsCallback
            from optuna.trial import TrialState

            objective = lead_objective(recipe, space, run_dir / "trials", metric, trials)
            study.optimize(
                objective,
                n_trials=remaining,
                catch=(EmberError,),
                callbacks=[MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED))],
            )
        broadcast_object(None)  # the other ranks stop following
        report = summarise(study, storage, metric, direction)
        if report.best is not None:
            report = replace(report, best_recipe=str(run_dir / "best.yaml"))
            write_text_atomic(run_dir / "best.yaml", with_params(recipe, report.best["params"]).to_yaml())
        write_json_atomic(run_dir / "tune.json", report.to_dict())
        return broadcast_object(report)


def summarise(study, storage: str, metric: str, direction: str) -> TuneResult:
    """Every trial ranked (completed by value, then pruned by their last report, then the rest),
    the best, and fANOVA parameter importances when at least two trials completed."""
    from optuna.trial import TrialState

    sign = 1 if direction == "min" else -1
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        value = t.value if t.state == TrialState.COMPLETE else last
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "value": value,
                "params": t.params,
                "steps": t.user_attrs.get("steps"),
                "run_dir": t.user_attrs.get("run_dir"),
            }
        )
    order = {"complete": 0, "pruned": 1}
    rows.sort(key=lambda r: (order.get(r["state"], 2), sign * r["value"] if r["value"] is not None else math.inf))
    complete = [r for r in rows if r["state"] == "complete"]
    return TuneResult(
        study=study.study_name,
        storage=storage,
        metric=metric,
        direction=direction,
        best=complete[0] if complete else None,
        trials=rows,
        importances=importances(study),
    )


def importances(study) -> dict[str, float]:
    """Each parameter's share of the variance of the objective (Optuna's fANOVA); {} when too few trials."""
    optuna = _optuna()
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return {}
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # e.g. every completed trial had the same values
        return {}


def format_tune(report: TuneResult, top: int = 10) -> str:
    """The ranked table (best ``top`` trials), the best values and the importances."""
    keys = list(report.trials[0]["params"]) if report.trials else []
    lines = [
        f"study {report.study!r}: {len(report.trials)} trial(s), {report.metric} "
        f"({'lower' if report.direction == 'min' else 'higher'} is better)",
        "  " + f"{'rank':>4} {'trial':>5} {'state':>9} {report.metric:>10} {'steps':>6}  " + "  ".join(keys),
    ]
    for i, r in enumerate(report.trials[:top]):
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        params = "  ".join(_short(r["params"].get(k, "-")) for k in keys)
        lines.append("  " + f"{i + 1:>4} {r['trial']:>5} {r['state']:>9} {value:>10} {r['steps'] or '-':>6}  {params}")
    if report.best is not None:
        lines.append(
            f"best: trial {report.best['trial']}, {report.metric} {report.best['value']:.4f}; "
            f"its recipe: {report.best_recipe}"
        )
    if report.importances:
        lines.append("importance: " + "  ".join(f"{k} {v:.2f}" for k, v in report.importances.items()))
    return "\n".join(lines)
