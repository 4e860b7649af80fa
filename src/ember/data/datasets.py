"""The splits of one dataset, before loaders: what every dataset builder returns (``ember.data.build``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ember.data.loader import Batch
from ember.data.spec import DataSpec


@dataclass
class Datasets:
    spec: DataSpec
    train: Any  # a loader dataset: __len__ and get(indices)
    val: Any
    train_transform: Callable[[Batch], Batch] | None = None  # on the device, e.g. augmentation
    val_transform: Callable[[Batch], Batch] | None = None
    codec_json: str = ""  # text sets: the tokenizer, saved with the run for generate
    split_bytes_per_token: dict = field(default_factory=dict)  # text sets: UTF-8 bytes per token of each split
    test: Any = None  # None when the data has no test split
