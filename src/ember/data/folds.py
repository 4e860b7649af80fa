"""K-fold cross-validation splits: which samples a fold run trains on and which it holds out.

A recipe with ``data.folds: K`` and ``data.fold: i`` pools the data's train and val splits
(a test split, when the data has one, stays out of every fold), splits the pool into K
folds with scikit-learn, trains on K-1 of them and validates on fold i. Images and
generated examples are shuffled into folds by ``data.seed`` (``StratifiedKFold`` with
``data.stratified_folds``, keeping each class's share); language-model windows are cut
into K contiguous blocks, so a held-out block shares no document with its neighbours.

>>> train_idx, held_idx = fold_indices(10, folds=5, fold=0, seed=0)
>>> sorted(held_idx.tolist()), len(train_idx)   # two of the ten samples held out, eight to train on
([2, 8], 8)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ember.errors import EmberError


class Pooled:
    """Several loader datasets end to end, indexed as one."""

    def __init__(self, *parts: Any) -> None:
        self.parts = parts
        self.ends = torch.tensor([len(p) for p in parts]).cumsum(0)

    def __len__(self) -> int:
        return int(self.ends[-1])

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        part = torch.bucketize(idx, self.ends, right=True)
        gathered, where_all = [], []
        for p in part.unique().tolist():
            where = (part == p).nonzero().flatten()
            start = int(self.ends[p - 1]) if p else 0
            gathered.append(self.parts[p].get(idx[where] - start))
            where_all.append(where)
        order = torch.cat(where_all)
        back = torch.empty_like(order)
        back[order] = torch.arange(len(order))  # the batch in the order asked for
        return {k: _cat_rows([g[k] for g in gathered])[back] for k in gathered[0]}


def _cat_rows(parts: list[Tensor]) -> Tensor:
    """The parts' rows as one tensor. Token rows (labelled text) come cut to each part's longest text, so
    narrower parts are padded with zeros after their texts, which is what a row's padding is."""
    width = max(p.shape[1:] for p in parts)
    if all(p.shape[1:] == width for p in parts):
        return torch.cat(parts)
    if any(p.dim() != 2 or p.is_floating_point() for p in parts):
        raise EmberError(f"Cannot pool batches of shapes {[list(p.shape) for p in parts]}: only token rows vary.")
    return torch.cat([torch.nn.functional.pad(p, (0, width[0] - p.shape[1])) for p in parts])


class Subset:
    """The samples ``index`` of a loader dataset."""

    def __init__(self, dataset: Any, index: np.ndarray) -> None:
        self.dataset, self.index = dataset, torch.as_tensor(index, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.index)

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        return self.dataset.get(self.index[torch.as_tensor(indices, dtype=torch.long)])


def labels_of(dataset: Any) -> np.ndarray | None:
    """Every sample's class label, for stratified folds; None when the data has no labels."""
    if isinstance(dataset, Pooled):
        parts = [labels_of(p) for p in dataset.parts]
        return None if any(p is None for p in parts) else np.concatenate(parts)
    if isinstance(dataset, Subset):
        inner = labels_of(dataset.dataset)
        return None if inner is None else inner[dataset.index.numpy()]
    if hasattr(dataset, "images"):  # captioned images (digits-captions)
        return labels_of(dataset.images)
    if hasattr(dataset, "maps") and "labels" in dataset.maps[0]:  # image shards
        return np.concatenate([np.asarray(m["labels"]) for m in dataset.maps])
    y = getattr(dataset, "tensors", {}).get("y")
    return y.numpy() if y is not None and y.dim() == 1 else None


def keep_classes(dataset: Any, classes: list[int], name: str) -> Subset:
    """The samples of ``dataset`` whose label is one of ``classes`` (``data.classes``)."""
    labels = labels_of(dataset)
    if labels is None:
        raise EmberError(
            f"data.classes keeps some classes of a classifier's data; the {name} data has no class labels. "
            f"Remove data.classes."
        )
    return Subset(dataset, np.flatnonzero(np.isin(labels, classes)))


def replay_mix(new: Any, old: Any, share: float, seed: int) -> Any:
    """``new`` plus samples of ``old`` drawn once by ``seed``, so that they are ``share`` of the whole
    (all of ``old`` when it has fewer)."""
    if not share:
        return new
    wanted = min(len(old), round(share / (1 - share) * len(new)))
    chosen = np.random.default_rng(seed).choice(len(old), size=wanted, replace=False)
    return Pooled(new, Subset(old, np.sort(chosen)))


def fold_indices(
    n: int, folds: int, fold: int, seed: int, labels: np.ndarray | None = None, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices) of ``fold`` among ``folds`` over ``n`` samples.

    ``labels`` given: stratified. The folds of one (n, folds, seed, labels) are disjoint
    and cover 0..n-1.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    if n < folds:
        raise EmberError(
            f"data.folds={folds} needs at least {folds} samples; the pooled train and val splits have {n}. "
            f"Use fewer folds or more data."
        )
    if labels is not None:
        smallest = int(np.unique(labels, return_counts=True)[1].min()) if len(labels) else 0
        if smallest < folds:
            raise EmberError(
                f"Stratified {folds}-fold cross-validation needs every class at least {folds} times; one "
                f"class has {smallest} sample(s). Use fewer folds, or plain folds (no --stratified)."
            )
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    else:
        splitter = KFold(folds, shuffle=shuffle, random_state=seed if shuffle else None)
    train_idx, held_idx = list(splitter.split(np.zeros(n), labels))[fold]
    return train_idx, held_idx


def apply_folds(train: Any, val: Any, cfg: Any, task: str) -> tuple[Subset, Subset]:
    """The (train, held-out) datasets of ``cfg.fold`` when ``cfg.folds`` > 0 (see the module docstring)."""
    pool = Pooled(train, val)
    labels = None
    if cfg.stratified_folds:
        labels = labels_of(pool)
        if task != "classify" or labels is None:
            raise EmberError(
                f"data.stratified_folds needs class labels; the {cfg.name} data poses a {task} task. "
                f"Drop --stratified (plain folds)."
            )
    train_idx, held_idx = fold_indices(len(pool), cfg.folds, cfg.fold, cfg.seed, labels, shuffle=task != "lm")
    return Subset(pool, train_idx), Subset(pool, held_idx)
