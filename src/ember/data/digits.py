"""scikit-learn's bundled handwritten digits: 1797 8x8 grey images, 10 classes.

The data ships inside scikit-learn, so nothing is downloaded. The split is stratified
(every class keeps its share in val) and the pixels are standardised with the train
split's mean and std — one scalar each, so the images keep their relative contrast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.config import DataConfig

NUM_CLASSES = 10


def load_split(cfg: "DataConfig", rows: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_val, y_val).

    x is Float[N, 1, 8, 8] (an image), or Float[N, 8, 8] with ``rows=True``
    (8 rows of 8 features, a sequence for RNNs). y is Long[N].
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    n_val = round(len(y) * cfg.val_fraction)
    if min(n_val, len(y) - n_val) < NUM_CLASSES:  # a stratified split needs every class on both sides
        raise EmberError(
            f"data.val_fraction={cfg.val_fraction} leaves {n_val} of {len(y)} digits for validation; both splits need at "
            f"least {NUM_CLASSES} (one per class). Use a val_fraction between 0.01 and 0.99, e.g. 0.2."
        )
    x_tr, x_va, y_tr, y_va = train_test_split(
        x, y, test_size=cfg.val_fraction, stratify=y, random_state=cfg.seed
    )
    mean, std = x_tr.mean(), x_tr.std()
    shape = (-1, 8, 8) if rows else (-1, 1, 8, 8)

    def to_tensors(xs, ys) -> tuple[Tensor, Tensor]:
        xs = torch.tensor((xs - mean) / std, dtype=torch.float32).reshape(shape)
        return xs, torch.tensor(ys, dtype=torch.long)

    return (*to_tensors(x_tr, y_tr), *to_tensors(x_va, y_va))
