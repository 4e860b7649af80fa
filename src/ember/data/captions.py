"""``digits-captions``: the bundled 8x8 digits, each with a generated English caption (task ``clip``).

A caption names the digit (as a word or a numeral) in one of several phrasings and, in
some, says how the digit is drawn: ``bold`` or ``faint`` (ink above or below the training
split's median) and ``large`` or ``small`` (area of its inked bounding box, likewise). So
the text carries the class and some of the look of the image, as real alt-text does.
Captions are drawn once per split from ``data.seed``; they are ASCII bytes, padded with 0
on the right to ``CAPTION_LEN``.

Validation and test batches also carry ``prompts``: one caption per class in a phrasing
no training caption uses ("a picture of the number seven"), which the ``clip`` task scores
each image against — zero-shot classification, no classifier trained on the labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ember.data.loader import Batch

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "a {ink} {word}",
    "the number {word}, written {ink}",
    "a {size} {digit} drawn by hand",
    "{word} in {ink} strokes",
    "a {size}, {ink} sketch of {word}",
)
PROMPT = "a picture of the number {word}"  # zero-shot: a phrasing no training caption uses
CAPTION_LEN = 40
VOCAB_SIZE = 128  # ASCII
PAD = 0


def encode(texts: list[str]) -> Tensor:
    """ASCII captions as a ``Long[N, CAPTION_LEN]`` tensor, right-padded with PAD."""
    out = torch.full((len(texts), CAPTION_LEN), PAD, dtype=torch.long)
    for i, text in enumerate(texts):
        data = text.encode("ascii")[:CAPTION_LEN]
        out[i, : len(data)] = torch.tensor(list(data))
    return out


def looks(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ink, inked bounding-box area) of uint8 images [N, C, H, W]."""
    ink = images.reshape(len(images), -1).astype(np.float64).sum(1)
    inked = images.max(axis=1) > 64  # [N, H, W]
    rows, cols = inked.any(axis=2), inked.any(axis=1)
    height = np.where(rows.any(1), rows.shape[1] - rows[:, ::-1].argmax(1) - rows.argmax(1), 0)
    width = np.where(cols.any(1), cols.shape[1] - cols[:, ::-1].argmax(1) - cols.argmax(1), 0)
    return ink, height * width


def captions(images: np.ndarray, labels: np.ndarray, medians: tuple[float, float], seed: int) -> list[str]:
    """One caption per image: a phrasing drawn by ``seed``, filled in from its label and look."""
    ink, area = looks(images)
    phrasing = np.random.default_rng(seed).integers(len(TEMPLATES), size=len(labels))
    return [
        TEMPLATES[t].format(
            word=WORDS[y],
            digit=y,
            ink="bold" if i > medians[0] else "faint",
            size="large" if a > medians[1] else "small",
        )
        for t, y, i, a in zip(phrasing, labels, ink, area)
    ]


class Captioned:
    """A loader dataset of labelled images, each with its caption under ``"text"``."""

    def __init__(self, images: Any, text: Tensor) -> None:
        self.images, self.text = images, text

    def __len__(self) -> int:
        return len(self.images)

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        return {**self.images.get(indices), "text": self.text[torch.as_tensor(indices, dtype=torch.long)]}


def with_prompts(transform: Callable[[Batch], Batch] | None) -> Callable[[Batch], Batch]:
    """``transform``, then the class prompts added to the batch (validation and test)."""
    prompts = encode([PROMPT.format(word=w) for w in WORDS])

    def apply(batch: Batch) -> Batch:
        batch = transform(batch) if transform is not None else batch
        return {**batch, "prompts": prompts.to(batch["x"].device)}

    return apply


def caption_sets(sets: Any, seed: int) -> Any:
    """The digits ``Datasets`` with every split captioned and the spec of task ``clip``."""
    whole = {
        name: split.get(torch.arange(len(split)))
        for name, split in (("train", sets.train), ("val", sets.val), ("test", sets.test))
        if split is not None
    }
    ink, area = looks(whole["train"]["x"].numpy())
    medians = (float(np.median(ink)), float(np.median(area)))  # of the training split, for every split
    captioned = {
        name: Captioned(getattr(sets, name), encode(captions(b["x"].numpy(), b["y"].numpy(), medians, seed + k)))
        for k, (name, b) in enumerate(whole.items())
    }
    spec = replace(sets.spec, task="clip", vocab_size=VOCAB_SIZE, seq_len=CAPTION_LEN, pad_id=PAD)
    return replace(
        sets,
        spec=spec,
        train=captioned["train"],
        val=captioned["val"],
        test=captioned.get("test"),
        val_transform=with_prompts(sets.val_transform),
    )
