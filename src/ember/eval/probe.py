"""``ember probe RUN``: how much a trained image model's features know about the labels it never saw.

The standard yardstick of self-supervised pre-training (SimCLR, CLIP's image tower): the
model is frozen, its pooled features of the labelled training split are fitted by a
multinomial logistic regression (scikit-learn, features standardised), and that linear
classifier is scored on the validation (or test) split. The same is done for a freshly
initialised model of the same architecture and seed — the features' worth without any
training — so the gain from pre-training is read off one report, written to
RUN/probe.json. Works for any finished cnn or vit run (supervised ones too), a SimCLR run
(features beneath the projection head) and a CLIP run (its image tower).

Example::

    report = probe("runs/simclr")
    report.trained["accuracy"], report.random_init["accuracy"]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember.atomic import write_json_atomic
from ember.config import load_recipe
from ember.data.build import build_data
from ember.data.loader import BatchLoader
from ember.data.spec import DataSpec
from ember.errors import EmberError
from ember.runs import load_trained_model, require_existing_run

SPLITS = ("val", "test")


@dataclass(frozen=True)
class ProbeResult:
    """What ``probe`` returns; ``to_dict()`` is RUN/probe.json.

    ``trained`` and ``random_init``: ``{"accuracy", "loss"}`` of the probe on the run's features and
    on a freshly initialised copy's (None without ``baseline``); ``features``: their width.
    """

    run: str
    split: str
    train_samples: int
    eval_samples: int
    trained: dict[str, float]
    random_init: dict[str, float] | None
    features: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: every field, ``random_init`` only when it was scored."""
        return {k: v for k, v in asdict(self).items() if k != "random_init" or v is not None}


def probe(run_dir: str | Path, split: str = "val", baseline: bool = True, batch_size: int = 256) -> ProbeResult:
    """Linear-probe accuracy and loss on ``split`` of ``run_dir``'s frozen features (and, with
    ``baseline``, of a randomly initialised copy); written to RUN/probe.json."""
    from ember.models.registry import build_model
    from ember.objectives import ObjectiveConfig

    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise EmberError(f"--split {split!r}: a probe is fitted on the training split and scored on val or test.")
    require_existing_run(run_dir, "ember probe")
    if not (run_dir / "recipe.yaml").is_file():
        raise EmberError(f"{run_dir} has no recipe.yaml: point ember probe at a run directory written by ember train.")
    recipe = load_recipe(run_dir / "recipe.yaml")
    model, info = load_trained_model(run_dir, "cpu")
    features = feature_function(model, info)
    data = build_data(recipe.data, batch_size, batch_size, seed=recipe.train.seed)  # the data's own labels
    if data.spec.num_classes < 2:
        raise EmberError(f"ember probe fits a classifier on the labels of the run's data; {recipe.data.name} has none.")
    held_out = data.val if split == "val" else data.test
    if held_out is None:
        raise EmberError(f"The run's data has no {split} split (data.test_fraction=0); probe on --split val.")
    train_split = BatchLoader(
        data.train.dataset, batch_size, shuffle=False, seed=0, drop_last=False, transform=data.val.transform
    )  # each sample once, not augmented
    trained, random_init = fit_and_score(features, train_split, held_out), None
    if baseline:
        torch.manual_seed(recipe.train.seed)  # the weights the run itself started from
        objective = ObjectiveConfig.model_validate(info["objective"]) if "objective" in info else None
        fresh = build_model(recipe.model, DataSpec.from_dict(info["data"]), objective)
        random_init = fit_and_score(feature_function(fresh.eval(), info), train_split, held_out)
        random_init.pop("features")
    report = ProbeResult(
        run=str(run_dir),
        split=split,
        train_samples=len(data.train.dataset),
        eval_samples=len(held_out.dataset),
        features=trained.pop("features"),
        trained=trained,
        random_init=random_init,
    )
    write_json_atomic(run_dir / "probe.json", report.to_dict())
    return report


def feature_function(model: torch.nn.Module, info: dict):
    """The frozen representation a probe reads: ``features(x)``, or a CLIP image tower's."""
    tower = getattr(model, "image_tower", model)  # clip: the image side
    if not hasattr(tower, "features"):
        raise EmberError(
            f"ember probe reads pooled image features; model {info['model']['name']} has none. Probe a "
            f"cnn, vit, SimCLR (objective.name=simclr) or clip run."
        )
    return tower.features


@torch.no_grad()
def embed(features, loader: BatchLoader) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for batch in loader.epoch_batches(torch.device("cpu")):
        xs.append(features(batch["x"]).float())
        ys.append(batch["y"])
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def fit_and_score(features, train_split: BatchLoader, held_out: BatchLoader) -> dict:
    """Fit a logistic regression on ``train_split``'s features; its accuracy and loss on ``held_out``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = embed(features, train_split)
    x_eval, y_eval = embed(features, held_out)
    scaler = StandardScaler().fit(x_train)
    classifier = LogisticRegression(max_iter=2000).fit(scaler.transform(x_train), y_train)
    probs = classifier.predict_proba(scaler.transform(x_eval))
    column = {c: i for i, c in enumerate(classifier.classes_)}
    # A class the training split never showed gets probability 0 (its loss capped by the clip).
    picked = np.array([probs[i, column[y]] if y in column else 0.0 for i, y in enumerate(y_eval)])
    predicted = classifier.classes_[probs.argmax(axis=1)]
    return {
        "accuracy": float((predicted == y_eval).mean()),
        "loss": float(-np.log(np.clip(picked, 1e-12, 1)).mean()),
        "features": int(x_train.shape[1]),
    }


def format_probe(report: ProbeResult) -> str:
    """The report as a few aligned lines."""
    lines = [
        f"linear probe on {report.features} frozen features: fitted on {report.train_samples} training "
        f"samples, scored on {report.eval_samples} {report.split} samples"
    ]
    for name, r in (("trained", report.trained), ("random init", report.random_init)):
        if r is not None:
            lines.append(f"  {name:<12} accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}")
    if report.random_init is not None:
        gain = report.trained["accuracy"] - report.random_init["accuracy"]
        lines.append(f"  gain from training: {gain:+.4f} accuracy")
    return "\n".join(lines)
