"""The recipe's ``data`` section: which data a run reads and how it is prepared and loaded.

It lives with the data (not in ``ember.config``) so that step plugins can name data too
(EWC's old data) without importing the whole recipe.

Example::

    DataConfig(name="prepared", path="data/mine", seq_len=512)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ember.data.augment import AugmentConfig
from ember.data.clean import CleanConfig
from ember.data.dedup import DedupConfig
from ember.data.text_augment import TextAugmentConfig
from ember.schema import RecipeModel, Seed

# The task each bundled dataset poses (ember.data.build holds the builders); a
# prepared directory poses "lm" (token shards) or "classify" (image or table shards).
TASK_OF_DATA = {
    "stdlib": "lm",
    "digits": "classify",
    "digits-rows": "classify",
    "digits-captions": "clip",
    "addition": "seq2seq",
}


class DataConfig(RecipeModel):
    name: Literal["stdlib", "digits", "digits-rows", "digits-captions", "addition", "prepared", "custom"] = Field(
        "stdlib", description="a bundled set, prepared (data.path), or custom: a dataset given to ember.train(data=...)"
    )
    path: str = Field("", description="name=prepared: a directory written by `ember data prepare`")
    seq_len: int = Field(256, ge=2, le=1 << 20, description="LM context length in tokens")
    src_len: int = Field(
        0, ge=0, le=1 << 20, description="prepare, pairs: longest source in tokens (0 = seq_len; targets: seq_len)"
    )
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(
        0.0, ge=0, lt=1, description="prepare: share held out as a test split for `ember eval --split test` (0 = none)"
    )
    max_bytes: int = Field(0, ge=0, description="prepare: read source files until this many bytes (0 = all)")
    num_examples: int = Field(20000, ge=10, description="addition: generated training examples")
    max_digits: int = Field(4, ge=1, le=12, description="addition: digits per operand")
    seed: Seed = Field(0, description="seed of the train/val/test split and generated data (0 to 2**32 - 1)")
    kind: Literal["auto", "text", "images", "table", "labelled-text", "pairs", "captions", "instruct"] = Field(
        "auto",
        description="prepare: what the sources hold (auto: recognised; see `ember data prepare --help`): text for "
        "a language model, images, a table, labelled text, source/target pairs, images with captions, or "
        "instruction data (prompt/response rows or chat messages; loss on the responses only)",
    )
    text_field: str = Field("text", description="prepare: the JSONL field or Parquet/CSV column holding the text")
    source_field: str = Field("source", description="prepare, pairs: the field holding each pair's source text")
    target_field: str = Field("target", description="prepare, pairs: the field holding each pair's target text")
    prompt_field: str = Field("prompt", description="prepare, instruct: the field holding each row's prompt")
    response_field: str = Field("response", description="prepare, instruct: the field holding each row's response")
    messages_field: str = Field(
        "messages", description="prepare, instruct: the field holding a conversation: [{role, content}, ...]"
    )
    chat_template: str = Field(
        "<|{role}|>\n{content}\n",
        description="prepare, instruct: how each message is written ({role}, {content}); the loss counts an "
        "assistant's content, the text after it and the end-of-text token",
    )
    captions: str = Field("", description="prepare, captions: a JSONL/CSV file mapping each image file to its caption")
    image_field: str = Field(
        "", description="prepare, captions: the captions file's column naming each image ('' = file, image, path, ...)"
    )
    prompt: str = Field(
        "",
        description="clip: the zero-shot prompt, {} replaced by each class name, e.g. 'a photo of a {}' ('' = that; "
        "digits-captions: 'a picture of the number {}', the digit as a word)",
    )
    prompt_names: list[str] = Field(
        default_factory=list,
        description="clip: the class names put into data.prompt, one per class in label order ([] = the class "
        "folder names)",
    )
    label: str = Field(
        "", description="prepare: the label column of a table (CSV/TSV/JSONL/Parquet rows); set = prepare a table"
    )
    columns: list[str] = Field(
        default_factory=list, description="prepare: a table's feature columns; [] = every column but the label"
    )
    one_hot_max: int = Field(
        32,
        ge=0,
        le=1 << 20,
        description="prepare: a table's categorical column with more categories than this is one feature, the "
        "category's index into an embedding the model learns (mlp), instead of one-hot features",
    )
    target: Literal["auto", "classes", "values"] = Field(
        "auto",
        description="prepare: a table's label as classes (auto: always, never guessed) or as numeric values "
        "to regress (task regress: float targets, mse/mae/r2)",
    )
    tokenizer: str = Field(
        "bpe",
        description="prepare: bpe (train a byte-level BPE), bytes, or the path of any tokenizers tokenizer.json "
        "(BPE, byte-level BPE, WordPiece, Unigram: e.g. a Hugging Face model's)",
    )
    eos_token: str = Field(
        "",
        description="prepare: the given tokenizer's end-of-text token, which ends each document; '' = found by "
        "its name (<|endoftext|>, </s>, <|end_of_text|>, <eos>, ...)",
    )
    vocab_size: int = Field(
        4096, ge=257, le=1 << 22, description="prepare: BPE vocabulary size, special tokens included"
    )
    special_tokens: list[str] = Field(
        default_factory=list, description="prepare: extra BPE special tokens (<|endoftext|> is always id 0)"
    )
    tokenizer_sample_mb: float = Field(
        0.0,
        ge=0,
        description="prepare: train the BPE on about this many MB of the training split, chosen by each text's "
        "hash (the same sample for any order, workers or engine); 0 = all of it. BPE training is the one stage "
        "that does not parallelise (~5 MB/s on one thread): at corpus scale, e.g. 1000",
    )
    shard_size: int = Field(1 << 24, ge=1024, description="prepare: tokens (or images) per shard")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    text_augment: TextAugmentConfig = Field(default_factory=TextAugmentConfig)
    verify: Literal["full", "size"] = Field(
        "full", description="check each shard's sha256 (full) or only its size when a run starts"
    )
    num_workers: int = Field(
        0, ge=0, le=64, description="loader worker processes gathering batches ahead (0 = in the training process)"
    )
    prepare_workers: int = Field(1, ge=1, le=256, description="processes for preparing a bundled set on first use")
    folds: int = Field(
        0,
        ge=0,
        le=100,
        description="cross-validation: pool train and val and split them into this many folds (0 = off; `ember cv` sets it)",
    )
    fold: int = Field(0, ge=0, description="cross-validation: the fold this run holds out as its validation split")
    stratified_folds: bool = Field(
        False, description="cross-validation: keep each class's share in every fold (classifiers)"
    )
    classes: list[int] = Field(
        default_factory=list,
        description="classifiers: keep only these classes in every split "
        "(the model still has all the data's outputs); [] = all",
    )
    replay: ReplayConfig | None = Field(
        None,
        description="continual training: a share of older data mixed into "
        "the training split (ember continue sets it); null = none",
    )

    @model_validator(mode="after")
    def _path_for_prepared(self) -> DataConfig:
        if (self.name == "prepared") != bool(self.path):
            raise ValueError(
                "data.path names a prepared directory exactly when data.name is 'prepared' "
                "(set both, e.g. name: prepared, path: data/mine)"
            )
        if self.target != "auto" and not self.label:
            raise ValueError(
                f"data.target={self.target} says what a table's label column holds; it needs that column: "
                f"data.label (ember data prepare --label COLUMN)"
            )
        if self.replay is not None and self.replay.data.replay is not None:
            raise ValueError(
                "data.replay.data has a replay of its own; replay mixes one older dataset in, so remove "
                "data.replay.data.replay"
            )
        if self.folds == 1 or (self.folds and self.fold >= self.folds):
            raise ValueError(
                f"data.folds={self.folds}, data.fold={self.fold}: cross-validation needs at least 2 folds "
                f"and a fold index below data.folds (0 .. folds-1); data.folds=0 turns it off"
            )
        if self.tokenizer_sample_mb and self.tokenizer != "bpe":
            raise ValueError(
                f"data.tokenizer_sample_mb={self.tokenizer_sample_mb} chooses the text a BPE is trained on, but "
                f"data.tokenizer={self.tokenizer!r} trains none; remove tokenizer_sample_mb, or use tokenizer: bpe"
            )
        return self

    @model_validator(mode="after")
    def _held_out_leaves_training_data(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction} + {self.test_fraction} leaves "
                f"nothing to train on; keep their sum below 1, e.g. val_fraction 0.1 and test_fraction 0.1"
            )
        return self


class ReplayConfig(RecipeModel):
    """Older training data mixed into a continued run's training split, so batches keep reminding
    the model of the old task (``ember continue --replay``)."""

    data: DataConfig = Field(description="the data the starting run was trained on")
    share: float = Field(gt=0, lt=1, description="share of the training set drawn from data's training split")


DataConfig.model_rebuild()


def data_task(cfg: DataConfig) -> str | None:
    """The task the data poses; None for a prepared directory that cannot be read yet, or custom data."""
    if cfg.name == "custom":  # given in Python: known when the run starts
        return None
    if cfg.name != "prepared":
        return TASK_OF_DATA[cfg.name]
    try:
        manifest = json.loads((Path(cfg.path) / "manifest.json").read_text())
        kind = manifest["kind"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # read (and refused) properly when loading
        return None
    if kind == "pairs":
        return "seq2seq"
    if kind == "captions":
        return "clip"
    return "lm" if kind in ("tokens", "instruct") else "regress" if manifest.get("target") == "values" else "classify"
