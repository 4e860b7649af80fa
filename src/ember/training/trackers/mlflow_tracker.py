"""MLflow (``train.trackers: [mlflow]``, extra ``ember[mlflow]``): one MLflow run per ember run.

The store is ``$MLFLOW_TRACKING_URI`` when set, else a SQLite file of the run's own,
RUN/mlflow.db (``own_store``), with artifacts under RUN/mlartifacts (MLflow 3 keeps its
plain-file store, ``./mlruns``, in maintenance mode and refuses it by default). Experiment:
``$MLFLOW_EXPERIMENT_NAME`` or ``ember``; run name: the run directory's name. Recorded: every
recipe key as a parameter (``train.lr``; a value longer than MLflow's limit is cut and says so,
the whole recipe is the artifact ``recipe.yaml``), metrics ``train/<key>`` and ``val/<metric>``
at their step (written by MLflow's background thread, waited for when the run ends), tags
``ember.run_dir`` and ``ember.model``, a language model's samples as artifacts
``samples/step_XXXXXXXX.txt``, and the run's end as its status (FINISHED, FAILED, KILLED). On
resume the same MLflow run continues: steps it already holds (logged before the interruption)
are not logged twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from ember.errors import EmberError
from ember.training.trackers.base import flat_recipe, register_tracker, tracker_package

logger = logging.getLogger(__name__)

STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


@register_tracker("mlflow", module="mlflow", extra="mlflow")
class MlflowTracker:
    def start(self, recipe: dict, recipe_text: str, run_dir: Path, resumed_step: int, kept: dict | None) -> dict:
        tracker_package("mlflow")
        from mlflow.tracking import MlflowClient

        # The store is resolved now, never read from the run directory: a copied or crafted trackers.json
        # cannot send this run's figures elsewhere, and a moved run directory finds its own store.
        store = os.environ.get("MLFLOW_TRACKING_URI") or "RUN/mlflow.db"
        with quiet_mlflow():  # a new store's "Creating initial MLflow database tables" lines
            if store == "RUN/mlflow.db":
                self.client = own_store(run_dir, MlflowClient)
            else:
                self.client = client_of(store, MlflowClient)
        self.run_id = self._run_to_continue(kept, store)
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged_up_to = self._last_logged_step()
        else:
            self.run_id = self._new_run(recipe, run_dir)
            self.logged_up_to = 0
        self.pending: list = []  # metrics being written by MLflow's background thread
        self._log_params(flat_recipe(recipe))
        self.client.log_text(
            self.run_id, recipe_text, f"recipe_step_{resumed_step}.yaml" if resumed_step else "recipe.yaml"
        )
        return {"store": store, "run_id": self.run_id}

    def _run_to_continue(self, kept: dict | None, store: str) -> str | None:
        """The run a resume continues: the one this run started, when it is in the same store."""
        from mlflow.exceptions import MlflowException

        if not kept or kept.get("store") != store or not isinstance(kept.get("run_id"), str):
            return None
        try:
            return self.client.get_run(kept["run_id"]).info.run_id
        except MlflowException:  # deleted, or another store under the same name
            return None

    def _new_run(self, recipe: dict, run_dir: Path) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "ember")
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            experiment = found.experiment_id
        elif self.client.tracking_uri == local_store(run_dir):  # artifacts beside it, in the run directory
            experiment = self.client.create_experiment(
                name, artifact_location=(run_dir / "mlartifacts").resolve().as_uri()
            )
        else:
            experiment = self.client.create_experiment(name)
        tags = {"ember.run_dir": str(run_dir.resolve()), "ember.model": recipe["model"]["name"]}
        return self.client.create_run(experiment, run_name=run_dir.resolve().name, tags=tags).info.run_id

    def _last_logged_step(self) -> int:
        history = self.client.get_metric_history(self.run_id, "train/loss")
        return max((m.step for m in history), default=0)

    def _log_params(self, params: dict) -> None:
        """Parameters the run does not hold yet (MLflow refuses to change one: a resumed run's longer
        train.max_steps stays as it started; recipe_step_N.yaml records the change)."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        held = self.client.get_run(self.run_id).data.params
        new = [Param(k, clip(str(v), MAX_PARAM_VAL_LENGTH)) for k, v in params.items() if k not in held]
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, step: int, metrics: dict[str, float], split: str) -> None:
        if step <= self.logged_up_to:
            return  # logged before the interruption: once per step
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"{split}/{k}", v, now, step) for k, v in metrics.items()]
        # In MLflow's background thread: a SQLite write is ~20 ms, which would count against throughput.
        self.pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))
        if len(self.pending) > 100:  # the older half is long written: keep the list short
            for operation in self.pending[:50]:
                operation.wait()
            del self.pending[:50]

    def log_text(self, step: int, tag: str, text: str) -> None:
        if step > self.logged_up_to:
            self.client.log_text(self.run_id, text, f"{tag}s/step_{step:08d}.txt")

    def finish(self, status: str) -> None:
        # Every metric in the store before the run is marked ended. (mlflow.flush_async_logging would
        # also open MLflow's default store, ./mlflow.db in the working directory.)
        for operation in self.pending:
            operation.wait()
        self.client.set_terminated(self.run_id, STATUS[status])


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """MLflow's own INFO lines (its logger prints to stderr) held back, unless ember's logger shows debug."""
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        mlflow_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        mlflow_logger.setLevel(level)


def client_of(store: str, client_class):
    """A client of the store ``$MLFLOW_TRACKING_URI`` names; one MLflow refuses is the user's to fix."""
    from mlflow.exceptions import MlflowException

    try:
        return client_class(tracking_uri=store)
    except MlflowException as err:
        cause = str(err).split(". ")[0]
        raise EmberError(
            f"MLflow cannot use the store MLFLOW_TRACKING_URI={store} ({cause}). Point it at a store MLflow "
            f"accepts (sqlite:///PATH/mlflow.db, or a tracking server's http(s):// address), or unset it to "
            f"keep the run's own RUN/mlflow.db."
        ) from None


def local_store(run_dir: Path) -> str:
    """The run's own SQLite store (MLflow's recommended local backend)."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def own_store(run_dir: Path, client_class):
    """A client of RUN/mlflow.db. A new store starts as a copy of an empty one kept in the user cache
    (one per MLflow version): MLflow makes a store's tables with ~70 migrations, 4 s; a copy takes
    milliseconds. The first run makes the cached copy from its own store, before writing to it."""
    import mlflow

    from ember.training.flops import peak_cache_path

    target, empty = run_dir / "mlflow.db", peak_cache_path().parent / f"mlflow-{mlflow.__version__}-empty.db"
    fresh = not target.exists()
    if fresh and empty.is_file():
        shutil.copyfile(empty, target)
    client = client_class(tracking_uri=local_store(run_dir))  # makes the tables of a store without them
    if fresh and not empty.is_file():
        empty.parent.mkdir(parents=True, exist_ok=True)
        partial = empty.with_name(f"{empty.name}.{os.getpid()}.partial")
        shutil.copyfile(target, partial)
        os.replace(partial, empty)  # whole or absent, also with several runs starting at once
    return client


def clip(value: str, limit: int) -> str:
    """A parameter value within MLflow's length limit; a cut one says where the whole value is."""
    mark = "... (cut: see the artifact recipe.yaml)"
    return value if len(value) <= limit else value[: limit - len(mark)] + mark
