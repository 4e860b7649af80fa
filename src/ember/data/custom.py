"""A user's own map-style dataset as ember data: ``ember.train(recipe, data=my_dataset)``.

Any object with ``__len__`` and ``__getitem__`` works (a ``torch.utils.data.Dataset``, a
list); each item is a dict of tensors — ``{"x": ..., "y": ...}`` for classification and
language modelling — or an ``(x, y)`` pair. Items are stacked into batches by
``torch.utils.data.default_collate``, so every item of a dataset must have the same shapes.
Pass ``(train, val)`` to choose the validation split yourself; a single dataset is split by
``data.val_fraction`` with ``data.seed``, like every ember dataset. The loop then reads it
exactly as its own data: every sample once per epoch across ranks, exact resume.

Example::

    data = custom_data(dataset, DataConfig(name="custom"), "classify", batch_size=32, eval_batch_size=64, seed=0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ember.data.build import Data, Datasets, loaders
from ember.data.config import DataConfig
from ember.data.spec import DataSpec
from ember.errors import EmberError

TASKS = ("classify", "lm", "loss")


class MapData:
    """``dataset[i]`` items gathered into ember batches (dicts of stacked tensors)."""

    def __init__(self, dataset: Any, indices: Tensor | None = None) -> None:
        self.dataset = dataset
        self.indices = indices if indices is not None else torch.arange(len(dataset))

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        from torch.utils.data import default_collate

        return default_collate([_as_dict(self.dataset[int(i)]) for i in self.indices[indices]])


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return {"x": item[0], "y": item[1]}
    raise EmberError(
        f"An item of the dataset given to ember.train is a {type(item).__name__}; ember reads a dict of "
        f"tensors ({{'x': ..., 'y': ...}}) or an (x, y) pair. Return one of those from __getitem__."
    )


def custom_data(
    dataset: Any,
    cfg: DataConfig,
    task: str | None,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    grad_accum: int = 1,
) -> Data:
    """Loaders over the user's ``dataset`` (or ``(train, val)``) for this rank, posing ``task``.

    ``task`` None: the data is for one of ember's models, which needs its shape: integer ``y``
    shaped like ``x`` is language modelling, else classification; the classes (or the
    vocabulary) are counted in one pass over the training split."""
    train, val = _splits(dataset, cfg)
    first = train.get(torch.zeros(1, dtype=torch.long))
    described = task is None
    if described:
        task = (
            "lm"
            if {"x", "y"} <= set(first) and first["x"].shape == first["y"].shape and not first["x"].is_floating_point()
            else "classify"
        )
    _check_batch(first, task)
    spec = _spec(first, task)
    if described:
        spec = _counted(spec, train)
    return loaders(Datasets(spec, train, val), cfg, batch_size, eval_batch_size, seed, rank, world_size, grad_accum)


def _splits(dataset: Any, cfg: DataConfig) -> tuple[MapData, MapData]:
    if (
        isinstance(dataset, (tuple, list))
        and len(dataset) == 2
        and all(hasattr(d, "__getitem__") for d in dataset)
        and not isinstance(dataset[0], torch.Tensor)
    ):
        train, val = (MapData(d) for d in dataset)
    else:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise EmberError(
                f"ember.train(data=...) takes a map-style dataset (with __len__ and __getitem__) or a "
                f"(train, val) pair of them, not a {type(dataset).__name__}. An iterable dataset has no "
                f"length to split and resume by: wrap it in a map-style one."
            )
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
        n_val = max(1, round(cfg.val_fraction * len(dataset)))
        train, val = MapData(dataset, order[n_val:].sort().values), MapData(dataset, order[:n_val].sort().values)
    if len(val) == 0 or len(train) == 0:
        raise EmberError(
            f"The data given to ember.train has {len(train)} training and {len(val)} validation samples; "
            f"both splits need at least one. Give more data or another data.val_fraction."
        )
    return train, val


def _check_batch(batch: dict[str, Any], task: str) -> None:
    if task not in TASKS:
        raise EmberError(f"model.task {task!r} is not one ember trains a given module for; choose one of {TASKS}.")
    if task != "loss" and not {"x", "y"} <= set(batch):
        raise EmberError(
            f"Task {task} reads items with 'x' (the input) and 'y' (the target); the dataset's items "
            f"have {sorted(batch)}. Rename them, or use model.task=loss with a module that takes the "
            f"whole batch and returns its summed loss."
        )
    if task != "loss" and batch["y"].is_floating_point():
        raise EmberError(
            f"Task {task} needs integer targets (class indices or token ids, -100 to ignore); the "
            f"dataset's 'y' is {batch['y'].dtype}. Return torch.long targets."
        )


def _counted(spec: DataSpec, train: MapData) -> DataSpec:
    """The classes (classify) or vocabulary size (lm) of the training split, in chunks of 1024 samples."""
    from dataclasses import replace

    keys = ("y",) if spec.task == "classify" else ("x", "y")
    top = -1
    for start in range(0, len(train), 1024):
        batch = train.get(torch.arange(start, min(start + 1024, len(train))))
        top = max([top, *(int(batch[k].max()) for k in keys)])
    return replace(spec, num_classes=top + 1) if spec.task == "classify" else replace(spec, vocab_size=top + 1)


def _spec(batch: dict[str, Tensor], task: str) -> DataSpec:
    if task == "lm":
        return DataSpec("lm", seq_len=batch["y"].shape[-1])
    if task == "classify":
        return DataSpec("classify", input_shape=tuple(batch["x"].shape[1:]))
    return DataSpec("loss")
