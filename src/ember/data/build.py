"""From the recipe's ``data`` section to a DataSpec and train/val (and test) loaders.

Each entry of ``DATASETS`` turns a DataConfig into ``Datasets`` (spec, train and val
datasets, device-side transforms). The bundled text and image sets are prepared once
by ``ember data prepare`` into the cache and read from memory-mapped shards;
``build_data`` wraps those in loaders: train is shuffled, endless and drop_last (fixed
batch shapes); val is ordered, one pass, and sees every sample exactly once, and so is
test, when the data has one (``data.test_fraction`` > 0; else ``Data.test`` is None).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.data import addition
from ember.data.datasets import Datasets
from ember.data.loader import ArrayDataset, Batch, BatchLoader
from ember.data.spec import DataSpec, named_classes
from ember.errors import EmberError
from ember.objectives import apply_objective

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ember.config import DataConfig
    from ember.objectives import ObjectiveConfig


@dataclass
class Data:
    spec: DataSpec
    train: BatchLoader  # shuffled, endless, drop_last
    val: BatchLoader  # ordered, one pass, exact
    items_per_sample: int  # tokens per sample (lm), target tokens (seq2seq), 1 (classify); for tokens/s
    codec_json: str = ""
    split_bytes_per_token: dict = field(default_factory=dict)
    test: BatchLoader | None = None  # ordered, one pass, exact, val's transform; None without a test split

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes per token of ``split`` (text sets), to turn nats per token into bits per byte."""
        return self.split_bytes_per_token.get(split, 1.0)


# The bundled sets a recipe can name, and the prepare sources they come from.
BUNDLED_SOURCES = {"stdlib": ["stdlib"], "digits": ["digits"], "digits-rows": ["digits"], "digits-captions": ["digits"]}


def prepared_dir(cfg: DataConfig) -> Path:
    """The directory of ``cfg``'s data: data.path, or a bundled set prepared once into the cache."""
    if cfg.name == "prepared":
        return Path(cfg.path)
    from ember.data.prepare import full_settings, prepare, settings_hash
    from ember.data.stdlib import cache_dir

    sources = BUNDLED_SOURCES[cfg.name]
    # Keyed by the settings and the input files' fingerprint: a changed source is a new entry.
    settings = full_settings(sources, cfg)
    out = cache_dir() / "prepared" / f"{sources[0]}-{settings_hash(settings)[:16]}"
    if _finished(out, settings_hash(settings)):
        return out  # what prepare() would find, without listing the sources a second time
    if not (out / "manifest.json").is_file():
        logger.info("ember: preparing the bundled %s set into %s (first use only)", sources[0], out)
    prepare(sources, out, cfg, workers=cfg.prepare_workers)
    return out


def _finished(out: Path, settings_sha256: str) -> bool:
    """``out`` holds a set prepared with these settings and nothing an interrupted prepare left behind."""
    from ember.data.shards import MANIFEST, WORK

    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or damaged: prepare() says what to do
        return False
    return (
        isinstance(manifest, dict) and manifest.get("settings_sha256") == settings_sha256 and not (out / WORK).exists()
    )


def _prepared(cfg: DataConfig) -> Datasets:
    from ember.data.shards import load_manifest
    from ember.data.text_augment import check_augment_fits

    path = prepared_dir(cfg)
    manifest = load_manifest(path)
    check_augment_fits(cfg, manifest["kind"] == "labelled-text", str(path))
    return _sets_for(manifest["kind"])(cfg, path, manifest)


def _sets_for(kind: str) -> Callable[[DataConfig, Path, dict], Datasets]:
    """The reader of a prepared directory of ``kind`` (the manifest's); each new kind lives in its own module."""
    if kind == "labelled-text":
        from ember.data.labelled_text import labelled_text_sets

        return labelled_text_sets
    if kind == "pairs":
        from ember.data.pairs import pair_sets

        return pair_sets
    if kind == "captions":
        from ember.data.captions import prepared_caption_sets

        return prepared_caption_sets
    if kind == "instruct":
        from ember.data.instruct import instruct_sets

        return instruct_sets
    return {"tokens": _token_sets, "table": _table_sets}.get(kind, _image_sets)


def _table_sets(cfg: DataConfig, path: Path, manifest: dict) -> Datasets:
    """Table rows: float32 features [n, F], standardised and encoded when prepared; no transform."""
    if cfg.augment.enabled():
        raise EmberError(
            f"data.augment transforms images; {path} holds table rows (prepared with --label). "
            f"Remove the data.augment settings for this data."
        )
    from ember.data.mapped import ImageShards
    from ember.data.shards import has_split

    train, val, test = (
        ImageShards(path, manifest, split, cfg.verify) if has_split(manifest, split) else None
        for split in ("train", "val", "test")
    )
    return Datasets(table_spec(manifest), train, val, test=test)


def table_spec(manifest: dict) -> DataSpec:
    """A prepared table's DataSpec: regress (``--target values``) or classify, its width and index columns."""
    shape, embeddings = tuple(manifest["image_shape"]), tuple(tuple(e) for e in manifest.get("embeddings", ()))
    if manifest.get("target") == "values":  # float32 labels, one number per row
        return DataSpec(task="regress", input_shape=shape, embeddings=embeddings)
    names = named_classes(manifest.get("classes"), manifest["num_classes"])
    return DataSpec(
        "classify", num_classes=manifest["num_classes"], input_shape=shape, class_names=names, embeddings=embeddings
    )


def token_spec(manifest: dict, seq_len: int) -> DataSpec:
    """A prepared token stream's DataSpec: its vocabulary, the context, the ids that end and start a document."""
    eos = manifest.get("eot_id", 0)  # sets prepared before the roles were recorded end documents with id 0
    return DataSpec(
        task="lm", vocab_size=manifest["vocab_size"], seq_len=seq_len, eos_id=eos, bos_id=manifest.get("bos_id", eos)
    )


def image_spec(manifest: dict, as_rows: bool = False) -> DataSpec:
    """A prepared image set's DataSpec (``as_rows``: each one-channel image as a sequence of its rows)."""
    shape = tuple(manifest["image_shape"])
    names = named_classes(manifest.get("classes"), manifest["num_classes"])
    return DataSpec(
        "classify", num_classes=manifest["num_classes"], input_shape=shape[1:] if as_rows else shape, class_names=names
    )


def prepared_spec(cfg: DataConfig, path: Path, manifest: dict) -> DataSpec:
    """The DataSpec of a prepared directory of any kind, from its manifest alone (``ember plan``, the memory check)."""
    kind = manifest["kind"]
    if kind == "tokens":
        return token_spec(manifest, cfg.seq_len)
    if kind == "table":
        return table_spec(manifest)
    if kind == "images":
        return image_spec(manifest)
    from ember.data import captions, instruct, labelled_text, pairs

    specs = {
        "pairs": lambda: pairs.pair_spec(manifest),
        "captions": lambda: captions.caption_spec(cfg, path, manifest),
        "labelled-text": lambda: labelled_text.text_spec(manifest),
        "instruct": lambda: instruct.instruct_spec(manifest, cfg.seq_len),
    }
    return specs[kind]()


def _token_sets(cfg: DataConfig, path: Path, manifest: dict) -> Datasets:
    from ember.data.mapped import PackedTokens
    from ember.data.shards import has_split
    from ember.data.tokenizer import data_codec_json

    train, val, test = (
        PackedTokens(path, manifest, split, cfg.seq_len, cfg.verify) if has_split(manifest, split) else None
        for split in ("train", "val", "test")
    )
    for split, windows in (("training", train), ("validation", val), ("test", test)):
        if windows is not None and len(windows) == 0:
            raise EmberError(
                f"The {split} split of {path} has {windows.rows} tokens, fewer than one window of data.seq_len + 1 = "
                f"{cfg.seq_len + 1}. Lower data.seq_len, or use more data (data.max_bytes = 0 reads all of it)"
                + (", or prepare with a larger data.test_fraction." if split == "test" else ".")
            )
    spec = token_spec(manifest, cfg.seq_len)
    codec_json = data_codec_json(path, manifest)
    kept = manifest["stats"]["kept"]
    per_split = {split: kept[split]["bytes"] / max(1, kept[split]["tokens"]) for split in kept}
    return Datasets(spec, train, val, codec_json=codec_json, test=test, split_bytes_per_token=per_split)


def _image_sets(cfg: DataConfig, path: Path, manifest: dict) -> Datasets:
    from ember.data.augment import build_image_transform
    from ember.data.mapped import ImageShards
    from ember.data.shards import has_split

    train, val, test = (
        ImageShards(path, manifest, split, cfg.verify) if has_split(manifest, split) else None
        for split in ("train", "val", "test")
    )
    as_rows = cfg.name == "digits-rows"
    if as_rows and manifest["image_shape"][0] != 1:
        raise EmberError(
            f"data.name=digits-rows reads one-channel images as rows; {path} has {manifest['image_shape'][0]} channels."
        )
    augment = None if as_rows else cfg.augment  # rows of pixels are a sequence, not an image
    pixels = manifest.get("image_dtype", "uint8")  # float32: float arrays, kept as they were given
    train_tf = build_image_transform(manifest["mean"], manifest["std"], augment, pixels).train()
    val_tf = build_image_transform(manifest["mean"], manifest["std"], None, pixels).eval()
    spec = image_spec(manifest, as_rows)
    return Datasets(spec, train, val, _images(train_tf, as_rows), _images(val_tf, as_rows), test=test)


def _images(transform, as_rows: bool) -> Callable[[Batch], Batch]:
    """uint8 (or float32) images → normalised floats on their device (rows: [B, H, W] sequences)."""

    def apply(batch: Batch) -> Batch:
        x = transform.to(batch["x"].device)(batch["x"])
        return {**batch, "x": x[:, 0] if as_rows else x}

    return apply


def _addition(cfg: DataConfig) -> Datasets:
    train, val, test = addition.load_splits(cfg)
    spec = addition.addition_spec(cfg.max_digits)
    return Datasets(spec, ArrayDataset(**train), ArrayDataset(**val), test=ArrayDataset(**test) if test else None)


def _captioned(cfg: DataConfig) -> Datasets:
    from ember.data.captions import caption_sets

    return caption_sets(_prepared(cfg), cfg.seed, cfg.prompt)


# addition is generated in memory (a synthetic task, not a corpus); the rest are prepared shards
# (digits-captions: with generated captions).
DATASETS: dict[str, Callable[[DataConfig], Datasets]] = {
    "stdlib": _prepared,
    "digits": _prepared,
    "digits-rows": _prepared,
    "digits-captions": _captioned,
    "prepared": _prepared,
    "addition": _addition,
}


def items_per_sample(spec: DataSpec) -> int:
    """What throughput counts per sample: tokens for token tasks, 1 for images (and image-caption pairs)."""
    return 1 if spec.task in ("classify", "regress", "simclr", "clip", "loss") else spec.seq_len


def build_sets(cfg: DataConfig, objective: ObjectiveConfig | None = None) -> Datasets:
    """The splits of the dataset ``cfg.name``, after cross-validation folds and the class filter,
    rewritten for a self-supervised ``objective`` (``ember.objectives``)."""
    if cfg.name == "custom":
        raise EmberError(
            "data.name=custom is a dataset given in Python, to ember.train(recipe, data=dataset); it is "
            "not stored with the run, so this command cannot read it. Pass the dataset to ember.train, or "
            "prepare it with `ember data prepare` and name the directory (data.name=prepared)."
        )
    if cfg.name not in DATASETS:
        raise EmberError(f"Unknown dataset data.name={cfg.name!r}; choose one of {sorted(DATASETS)}.")
    sets = DATASETS[cfg.name](cfg)
    if cfg.folds:  # cross-validation: train on K-1 folds of train+val, validate on the held-out one
        from ember.data.folds import apply_folds

        sets.train, sets.val = apply_folds(sets.train, sets.val, cfg, sets.spec.task)
    if cfg.classes:  # e.g. digits 0-4 first, 5-9 later (ember continue)
        from ember.data.folds import keep_classes

        sets.train, sets.val = (keep_classes(d, cfg.classes, cfg.name) for d in (sets.train, sets.val))
        sets.test = None if sets.test is None else keep_classes(sets.test, cfg.classes, cfg.name)
    return apply_objective(sets, objective, augmenting=cfg.augment.enabled())


def _replayed(sets: Datasets, cfg: DataConfig, objective: ObjectiveConfig | None) -> Any:
    """The training set with ``cfg.replay.share`` of it drawn from the older data's training split."""
    from ember.data.folds import replay_mix

    old = build_sets(cfg.replay.data, objective)
    if old.spec != sets.spec:
        raise EmberError(
            f"data.replay.data ({cfg.replay.data.name}) does not have the new data's shape "
            f"({cfg.name}); replay mixes samples of one shape, task and label set."
        )
    if old.spec.class_names and sets.spec.class_names and old.spec.class_names != sets.spec.class_names:
        raise EmberError(
            f"data.replay.data ({cfg.replay.data.name}) names its classes {', '.join(old.spec.class_names)}; the new "
            f"data ({cfg.name}) names them {', '.join(sets.spec.class_names)}. Replay mixes samples of one label "
            f"set: prepare both with the same classes."
        )
    return replay_mix(sets.train, old.train, cfg.replay.share, cfg.seed)


def build_data(
    cfg: DataConfig,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    grad_accum: int = 1,
    objective: ObjectiveConfig | None = None,
    replay: bool = False,
) -> Data:
    """Build the dataset named by ``cfg.name`` and its loaders for this rank.

    ``seed`` (the training seed) fixes the shuffle order; ``cfg.seed`` fixes the split
    and any generated data, so changing one does not change the other. ``replay``: mix in
    ``cfg.replay``, that share of the training set drawn from older data's training split
    (training does; evaluation and measurement read the data as it is).
    ``objective``: the recipe's; a self-supervised one changes the task and the batches.
    """
    sets = build_sets(cfg, objective)
    if replay and cfg.replay is not None:  # ember continue: a share of the old training data mixed in
        sets.train = _replayed(sets, cfg, objective)
    return loaders(sets, cfg, batch_size, eval_batch_size, seed, rank, world_size, grad_accum)


def loaders(
    sets: Datasets,
    cfg: DataConfig,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    grad_accum: int = 1,
) -> Data:
    """This rank's loaders over ``sets``: the training split shuffled and endless, the others in order,
    once (``cfg``: the data's name for errors and its loader workers)."""
    if len(sets.train) < batch_size * world_size * grad_accum:
        raise EmberError(
            f"The {cfg.name} training set has {len(sets.train)} samples, fewer than one optimiser step of "
            f"train.batch_size={batch_size} x train.grad_accum={grad_accum} x {world_size} rank(s). Lower "
            f"train.batch_size or train.grad_accum, or use more data."
        )
    if len(sets.val) == 0:
        raise EmberError(f"The {cfg.name} validation split is empty. Raise data.val_fraction.")
    common = dict(seed=seed, rank=rank, world_size=world_size, num_workers=cfg.num_workers)
    return Data(
        spec=sets.spec,
        train=BatchLoader(
            sets.train,
            batch_size,
            shuffle=True,
            drop_last=True,
            transform=sets.train_transform,
            accum=grad_accum,
            **common,
        ),
        val=BatchLoader(
            sets.val, eval_batch_size, shuffle=False, drop_last=False, transform=sets.val_transform, **common
        ),
        test=None
        if sets.test is None
        else BatchLoader(
            sets.test, eval_batch_size, shuffle=False, drop_last=False, transform=sets.val_transform, **common
        ),
        items_per_sample=items_per_sample(sets.spec),
        codec_json=sets.codec_json,
        split_bytes_per_token=sets.split_bytes_per_token,
    )
