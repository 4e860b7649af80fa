"""``digits-captions``: the bundled 8x8 digits, each with a generated English caption (task ``clip``).

A caption names the digit (as a word or a numeral) in one of several phrasings and, in
some, says how the digit is drawn: ``bold`` or ``faint`` (ink above or below the training
split's median) and ``large`` or ``small`` (area of its inked bounding box, likewise). So
the text carries the class and some of the look of the image, as real alt-text does.
Captions are drawn once per split from ``data.seed``; they are ASCII bytes, padded with 0
on the right to ``CAPTION_LEN``.

Validation and test batches also carry ``prompts``: one caption per class in a phrasing
no training caption uses ("a picture of the number seven"; ``data.prompt`` gives another), which
the ``clip`` task scores each image against — zero-shot classification, no classifier trained on
the labels.

A user's own image–text pairs (``ember data prepare FOLDER --captions FILE``, kind ``captions``,
written by ``ember.data.caption_prepare``) are read here too: ``prepared_caption_sets`` gives the
same batches, the captions as token ids padded with 0, and the prompts ``data.prompt`` formats
from each class name (class folders; ``data.prompt_names`` renames them). A flat folder has no
classes: validation then scores in-batch retrieval (each image's own caption among the batch's,
and each caption's image), which depends on the batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ember.data.datasets import Datasets
from ember.data.loader import Batch
from ember.data.mapped import ImageShards
from ember.data.spec import DataSpec, named_classes
from ember.data.tokenizer import data_codec
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.config import DataConfig

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
DEFAULT_PROMPT = "a photo of a {}"  # a prepared set's zero-shot prompt when data.prompt is ''
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


def prompt_texts(template: str, names: list[str] | tuple[str, ...]) -> list[str]:
    """One zero-shot prompt per class: ``template`` with ``{}`` (or ``{name}``) replaced by each name."""
    if "{}" not in template and "{name}" not in template:
        raise EmberError(
            f"data.prompt={template!r} has no {{}} where the class name goes. Write it with one, e.g. "
            f"'a photo of a {{}}'."
        )
    return [template.replace("{name}", n).replace("{}", n) for n in names]


def digit_prompts(template: str = "") -> Tensor:
    """The ten digit prompts: ``PROMPT``, or ``template`` (data.prompt) filled with each digit's word."""
    texts = [PROMPT.format(word=w) for w in WORDS] if not template else prompt_texts(template, WORDS)
    long = [t for t in texts if len(t.encode("utf-8")) > CAPTION_LEN or not t.isascii()]
    if long:
        raise EmberError(
            f"The digits-captions prompts are ASCII of at most {CAPTION_LEN} bytes; data.prompt gives {long[0]!r}. "
            f"Shorten data.prompt."
        )
    return encode(texts)


def with_prompts(transform: Callable[[Batch], Batch] | None, prompts: Tensor | None = None) -> Callable[[Batch], Batch]:
    """``transform``, then the class prompts (default: the digits') added to the batch (validation and test)."""
    prompts = digit_prompts() if prompts is None else prompts

    def apply(batch: Batch) -> Batch:
        batch = transform(batch) if transform is not None else batch
        return {**batch, "prompts": prompts.to(batch["x"].device)}

    return apply


def caption_sets(sets: Any, seed: int, prompt: str = "") -> Any:
    """The digits ``Datasets`` with every split captioned and the spec of task ``clip``
    (``prompt``: data.prompt, '' for ``PROMPT``)."""
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
        val_transform=with_prompts(sets.val_transform, digit_prompts(prompt)),
    )


# ---- a prepared directory of kind captions (ember.data.caption_prepare) ----


class CaptionShards(ImageShards):
    """Image-caption pairs of one split: ``get`` adds each pair's caption ids under ``"text"``, padded
    with the manifest's padding id to ``length`` (at least the stored caption length: the prompts may be longer)."""

    def __init__(self, data_dir: str | Path, manifest: dict, split: str, length: int, verify: str = "full") -> None:
        super().__init__(data_dir, manifest, split, verify)
        self.length = length
        self.pad_id = manifest.get("pad_id", 0)  # sets prepared before it was recorded pad with 0

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        batch = super().get(indices)
        idx = indices.numpy() if isinstance(indices, Tensor) else np.asarray(indices)
        shard_of = np.searchsorted(self.starts, idx, side="right") - 1
        text = np.full((len(idx), self.length), self.pad_id, dtype=np.int64)
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            stored = self.maps[s]["captions"]
            text[where, : stored.shape[1]] = stored[idx[where] - self.starts[s]]
        return {**batch, "text": torch.from_numpy(text)}


def class_prompts(cfg: DataConfig, manifest: dict) -> list[str]:
    """The prepared set's zero-shot prompts: data.prompt filled with each class name ([] without classes)."""
    classes = list(manifest["classes"])
    names = list(cfg.prompt_names) or classes
    if cfg.prompt_names and len(names) != len(classes):
        raise EmberError(
            f"data.prompt_names gives {len(names)} name(s); the data has {len(classes)} classes "
            f"({', '.join(classes[:10])}). Give one name per class, in that order, or [] for the folder names."
        )
    return prompt_texts(cfg.prompt or DEFAULT_PROMPT, names) if classes else []


def _prompt_ids(cfg: DataConfig, path: str | Path, manifest: dict) -> list[list[int]]:
    return list(data_codec(path, manifest).encode_batch(class_prompts(cfg, manifest))) if manifest["classes"] else []


def caption_spec(cfg: DataConfig, path: str | Path, manifest: dict, prompts: list | None = None) -> DataSpec:
    """Task ``clip`` of a prepared captions set: its images, vocabulary, classes and text length (the
    stored caption length, or the longest prompt's when that is longer)."""
    prompts = _prompt_ids(cfg, path, manifest) if prompts is None else prompts
    length = max([manifest["caption_len"], *map(len, prompts)])
    return DataSpec(
        "clip",
        vocab_size=manifest["vocab_size"],
        num_classes=manifest["num_classes"],
        input_shape=tuple(manifest["image_shape"]),
        seq_len=length,
        pad_id=manifest.get("pad_id", 0),  # sets prepared before it was recorded pad with 0
        class_names=named_classes(manifest["classes"], manifest["num_classes"]),
    )


def prepared_caption_sets(cfg: DataConfig, path: Path, manifest: dict) -> Datasets:
    """The splits of a prepared captions directory: images normalised (and augmented in training, by
    data.augment) on their device; validation and test carry the class prompts when there are classes."""
    from ember.data.augment import build_image_transform
    from ember.data.shards import has_split

    prompt_ids = _prompt_ids(cfg, path, manifest)
    spec = caption_spec(cfg, path, manifest, prompt_ids)
    train, val, test = (
        CaptionShards(path, manifest, split, spec.seq_len, cfg.verify) if has_split(manifest, split) else None
        for split in ("train", "val", "test")
    )
    prompts = torch.full((len(prompt_ids), spec.seq_len), spec.pad_id, dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        prompts[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    train_tf = _on_device(build_image_transform(manifest["mean"], manifest["std"], cfg.augment).train())
    val_tf = _on_device(build_image_transform(manifest["mean"], manifest["std"], None).eval())
    codec_json = data_codec(path, manifest).to_json()
    val_tf = with_prompts(val_tf, prompts) if len(prompt_ids) else val_tf
    return Datasets(spec, train, val, train_tf, val_tf, codec_json=codec_json, test=test)


def _on_device(transform: Any) -> Callable[[Batch], Batch]:
    """uint8 images → normalised (and, in training, augmented) floats on the batch's device."""

    def apply(batch: Batch) -> Batch:
        return {**batch, "x": transform.to(batch["x"].device)(batch["x"])}

    return apply
